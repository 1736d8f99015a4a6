// Portable scalar kernels of the log-prob row contract (fp32/bf16/fp16 logits, fp32 math), used on
// CPUs without AVX2. Same chunked two-sweep structure and the same header math as the AVX2
// kernels, one lane wide; the row loop is shared with them (row_driver.h).
#include <cstdint>

#include "logps_cpu.h"
#include "row_driver.h"
#include "storage.h"

namespace fastdpo::cpu {
namespace {

constexpr int64_t kChunk = 2048;

struct Generic {
  template <bool kEntropy, class S>
  static SoftmaxState<float> fwd_row(const S* x, int64_t V, float c) {
    SoftmaxState<float> st = state_init<float>();
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t c1 = (V - c0 < kChunk) ? V : c0 + kChunk;
      float m = -INFINITY;
      for (int64_t i = c0; i < c1; ++i) m = Math<float>::max(to_acc(x[i]), m);
      rescale<kEntropy>(st, Math<float>::max(m, st.m), c);
      const Shift<float> sh = make_shift(ref_point(st.m), c);
      // Four fresh partial sums per chunk: short summation chains keep fp32 sums of 10^5 terms
      // accurate (one running sum loses ~sqrt(V) ulps).
      float s[4] = {0, 0, 0, 0}, t[4] = {0, 0, 0, 0};
      int64_t i = c0;
      for (; i + 4 <= c1; i += 4) {
        for (int k = 0; k < 4; ++k) {
          accumulate<kEntropy>(s[k], t[k], scaled_diff(to_acc(x[i + k]), sh, 0.0f));
        }
      }
      for (; i < c1; ++i) {
        accumulate<kEntropy>(s[0], t[0], scaled_diff(to_acc(x[i]), sh, 0.0f));
      }
      st.s = st.s + ((s[0] + s[1]) + (s[2] + s[3]));
      if constexpr (kEntropy) st.t = st.t + ((t[0] + t[1]) + (t[2] + t[3]));
    }
    return st;
  }

  template <bool kEntropy, class S>
  static void bwd_sweep(const S* x, S* out, int64_t V, const GradCoeffs<float>& k) {
    // Element i is read before it is written: out may be x.
    for (int64_t i = 0; i < V; ++i) {
      out[i] = from_acc<S>(grad_element<kEntropy>(to_acc(x[i]), k));
    }
  }
};

}  // namespace

void logps_fwd_rows_generic(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_rows<Generic, float>(p, r0, r1);
    case DType::kBFloat16: return fwd_rows<Generic, BF16>(p, r0, r1);
    case DType::kFloat16: return fwd_rows<Generic, FP16>(p, r0, r1);
  }
}

void logps_bwd_rows_generic(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_rows<Generic, float>(p, r0, r1);
    case DType::kBFloat16: return bwd_rows<Generic, BF16>(p, r0, r1);
    case DType::kFloat16: return bwd_rows<Generic, FP16>(p, r0, r1);
  }
}

float block_max_generic(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = Math<float>::max(x[i], m);
  return m;
}

float block_exp_generic(const float* x, float* out, int64_t n, float ref, float c, float* t,
                        float out_scale) {
  const Shift<float> sh = make_shift(ref, c);
  float s[4] = {0, 0, 0, 0}, tt[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    const float d = scaled_diff(x[i], sh, 0.0f);
    const float e = Math<float>::exp(d);
    s[i % 4] += e;
    if (t) tt[i % 4] = Math<float>::fma(e, Math<float>::max(kLowestExpArg, d), tt[i % 4]);
    if (out) out[i] = e * out_scale;  // after every read of x[i]: out may be x
  }
  if (t) *t = (tt[0] + tt[1]) + (tt[2] + tt[3]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void round_trip_generic(const float* in, float* out, int64_t n, DType dtype) {
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::kBFloat16: out[i] = to_acc(from_acc<BF16>(in[i])); break;
      case DType::kFloat16: out[i] = to_acc(from_acc<FP16>(in[i])); break;
      default: out[i] = in[i];
    }
  }
}

}  // namespace fastdpo::cpu

// Portable scalar kernels of the log-prob row contract: every dtype (fp64 accumulates in fp64),
// used for fp64 logits and on CPUs without AVX2. Same chunked two-sweep structure and the same
// header math as the AVX2 kernels, one lane wide.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastdpo/logps_grad.h"
#include "fastdpo/online_softmax.h"
#include "logps_cpu.h"
#include "storage.h"

namespace fastdpo::cpu {
namespace {

constexpr int64_t kChunk = 2048;

template <class S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <class S, class A>
FASTDPO_INLINE S store_acc(A v) {
  if constexpr (std::is_same_v<S, double>) return v;
  else return from_acc<S>(static_cast<float>(v));
}

template <bool kEntropy, class S, class A = typename AccOf<S>::type>
SoftmaxState<A> fwd_row(const S* x, int64_t V, A inv_temp) {
  SoftmaxState<A> st = state_init<A>();
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t c1 = (V - c0 < kChunk) ? V : c0 + kChunk;
    A m = A(-INFINITY);
    for (int64_t i = c0; i < c1; ++i) m = Math<A>::max(A(to_acc(x[i])), m);
    rescale<kEntropy>(st, Math<A>::max(m * inv_temp, st.m));
    const A neg_ref = A(0) - ref_point(st.m);
    // Four fresh partial sums per chunk: short summation chains keep fp32 sums of 10^5 terms
    // accurate (one running sum loses ~sqrt(V) ulps).
    A s[4] = {0, 0, 0, 0}, t[4] = {0, 0, 0, 0};
    int64_t i = c0;
    for (; i + 4 <= c1; i += 4) {
      for (int k = 0; k < 4; ++k) {
        accumulate<kEntropy>(s[k], t[k], Math<A>::fma(A(to_acc(x[i + k])), inv_temp, neg_ref));
      }
    }
    for (; i < c1; ++i) {
      accumulate<kEntropy>(s[0], t[0], Math<A>::fma(A(to_acc(x[i])), inv_temp, neg_ref));
    }
    st.s = st.s + ((s[0] + s[1]) + (s[2] + s[3]));
    if constexpr (kEntropy) st.t = st.t + ((t[0] + t[1]) + (t[2] + t[3]));
  }
  return st;
}

template <class S>
void fwd_rows(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  using A = typename AccOf<S>::type;
  const S* logits = static_cast<const S*>(p.logits);
  const int64_t V = p.rows.V;
  const A inv_temp = static_cast<A>(p.inv_temp);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / p.rows.T, t = row - b * p.rows.T;
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    if (lab.kind == LabelKind::kIgnored) {
      p.logp[row] = 0.0f;
      p.lse[row] = 0.0f;
      if (p.entropy) p.entropy[row] = 0.0f;
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    A lse, ent;
    if (p.entropy) {
      finalize(fwd_row<true>(x, V, inv_temp), lse, ent);
      p.entropy[row] = static_cast<float>(ent);
    } else {
      finalize(fwd_row<false>(x, V, inv_temp), lse, ent);
    }
    p.lse[row] = static_cast<float>(lse);
    const A z_label = lab.kind == LabelKind::kLocal ? A(to_acc(x[lab.local])) * inv_temp : A(0);
    p.logp[row] = lab.kind == LabelKind::kInvalid ? NAN : static_cast<float>(z_label - lse);
  }
}

template <bool kEntropy, class S, class A>
void bwd_row(const S* x, S* out, int64_t V, A inv_temp, const GradCoeffs<A>& c,
             const LabelInfo& lab, A g) {
  A label_value = 0;
  if (lab.kind == LabelKind::kLocal) {
    label_value = grad_element<kEntropy>(A(to_acc(x[lab.local])), inv_temp, c) +
                  label_grad(g, inv_temp);
  }
  for (int64_t i = 0; i < V; ++i) {
    out[i] = store_acc<S>(grad_element<kEntropy>(A(to_acc(x[i])), inv_temp, c));
  }
  if (lab.kind == LabelKind::kLocal) out[lab.local] = store_acc<S>(label_value);
}

template <class S>
void bwd_rows(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  using A = typename AccOf<S>::type;
  const S* logits = static_cast<const S*>(p.logits);
  S* grad = static_cast<S*>(p.grad_logits);
  const int64_t V = p.rows.V, T = p.rows.T;
  const A inv_temp = static_cast<A>(p.inv_temp);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / T, t = row - b * T;
    S* out = grad + b * p.grad_stride_b + t * p.grad_stride_t;
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    if (lab.kind == LabelKind::kIgnored) {
      std::memset(static_cast<void*>(out), 0, static_cast<size_t>(V) * sizeof(S));
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    const A g = p.grad_logp.at(b, t);
    const A lse = p.lse.at(b, t);
    if (p.grad_entropy.data) {
      const GradCoeffs<A> c = grad_coeffs<A>(g, p.grad_entropy.at(b, t), lse,
                                             p.entropy.at(b, t), inv_temp);
      bwd_row<true>(x, out, V, inv_temp, c, lab, g);
    } else {
      const GradCoeffs<A> c = grad_coeffs<A>(g, A(0), lse, A(0), inv_temp);
      bwd_row<false>(x, out, V, inv_temp, c, lab, g);
    }
  }
}

}  // namespace

void logps_fwd_rows_generic(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_rows<float>(p, r0, r1);
    case DType::kBFloat16: return fwd_rows<BF16>(p, r0, r1);
    case DType::kFloat16: return fwd_rows<FP16>(p, r0, r1);
    case DType::kFloat64: return fwd_rows<double>(p, r0, r1);
  }
}

void logps_bwd_rows_generic(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_rows<float>(p, r0, r1);
    case DType::kBFloat16: return bwd_rows<BF16>(p, r0, r1);
    case DType::kFloat16: return bwd_rows<FP16>(p, r0, r1);
    case DType::kFloat64: return bwd_rows<double>(p, r0, r1);
  }
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

// AVX2 + FMA (+ F16C) kernels of the log-prob row contract for fp32/bf16/fp16 logits.
//
// The whole file is compiled for AVX2 through `#pragma GCC target`, so the extension keeps a plain
// x86-64 baseline and picks these kernels at run time (logps_cpu.h). Standard and intrinsic headers
// come first, outside the pragma, so their out-of-line inline functions stay baseline code.
//
// Forward, per row: the row is walked in L1-sized chunks; a first sweep takes the per-lane max of
// the chunk, the state is rescaled once to it, a second sweep over the (now cached) chunk adds
// exp((x - max) / T). That is one exp per element instead of the two of an element-wise online
// update. Backward: one sweep, one exp per element, reading each logit before writing its gradient
// (the gradient may be written into the logits themselves). The row loop around these sweeps is
// row_driver.h, shared with the scalar kernels.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "logps_cpu.h"
#include "storage.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTDPO_HAVE_AVX2_KERNELS 1
#endif

#if FASTDPO_HAVE_AVX2_KERNELS

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

#include "fastdpo/logps_grad.h"
#include "fastdpo/online_softmax.h"
#include "row_driver.h"

namespace fastdpo::cpu::avx2_impl {

// 8 fp32 lanes with the operators the generic softmax code uses.
struct F8 {
  __m256 v;
  F8() = default;
  F8(float x) : v(_mm256_set1_ps(x)) {}  // NOLINT: implicit broadcast, as T(float) is used
  F8(__m256 x) : v(x) {}                 // NOLINT
};
FASTDPO_INLINE F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
FASTDPO_INLINE F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
FASTDPO_INLINE F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }

// exp on 8 lanes within 3 ulp: round(x log2 e) by the magic-number trick, x - n ln 2 in one fma
// (its error grows with |n|, i.e. only for terms far too small to matter in a sum), and a degree-5
// minimax polynomial with exp(0) = 1 exactly. Arguments are clamped to [-88, 88]; at -88 n is -127,
// whose exponent field is 0, so -inf and anything below e^-87.7 give exactly 0 (masked logits
// contribute nothing) with no extra mask. NaN stays NaN (min/max operand order keeps it).
FASTDPO_INLINE __m256 exp8(__m256 x) {
  // 1.5 * 2^23 + 127: adding it rounds to an integer and leaves n + 127 in the low mantissa bits.
  const __m256 magic = _mm256_set1_ps(12583039.0f);
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  const __m256 k = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(k, magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945309f), x);
  __m256 y = _mm256_set1_ps(0.008290297351777554f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.041897911578416824f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.1666763573884964f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.4999915063381195f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.9999997019767761f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23));
  return _mm256_mul_ps(y, scale);
}

}  // namespace fastdpo::cpu::avx2_impl

namespace fastdpo {
template <>
struct Math<cpu::avx2_impl::F8> {
  using F8 = cpu::avx2_impl::F8;
  using Mask = __m256;
  static FASTDPO_INLINE F8 max(F8 a, F8 b) { return _mm256_max_ps(a.v, b.v); }  // (a > b) ? a : b
  static FASTDPO_INLINE Mask is_neg_inf(F8 x) {
    return _mm256_cmp_ps(x.v, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ);
  }
  static FASTDPO_INLINE F8 select(Mask m, F8 a, F8 b) { return _mm256_blendv_ps(b.v, a.v, m); }
  static FASTDPO_INLINE F8 fma(F8 a, F8 b, F8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static FASTDPO_INLINE F8 exp(F8 x) { return cpu::avx2_impl::exp8(x.v); }
};
}  // namespace fastdpo

namespace fastdpo::cpu::avx2_impl {

using State8 = SoftmaxState<F8>;

// 8 logits of storage type S as fp32 lanes, and back (round to nearest even, NaN kept).
FASTDPO_INLINE F8 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTDPO_INLINE F8 load8(const BF16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
FASTDPO_INLINE F8 load8(const FP16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// kStream: a non-temporal store (p aligned to 8 elements), for gradients written to memory that
// is not read back soon; skips reading each destination line before overwriting it.
template <bool kStream = false>
FASTDPO_INLINE void store8(float* p, F8 v) {
  if constexpr (kStream) _mm256_stream_ps(p, v.v);
  else _mm256_storeu_ps(p, v.v);
}
template <bool kStream = false>
FASTDPO_INLINE void store_half8(void* p, __m128i v) {
  if constexpr (kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(p), v);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
}
template <bool kStream = false>
FASTDPO_INLINE void store8(FP16* p, F8 v) {
  store_half8<kStream>(p, _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT));
}
template <bool kStream = false>
FASTDPO_INLINE void store8(BF16* p, F8 v) {
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  const __m256 nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
  const __m256i qnan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
  r = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan), nan));
  r = _mm256_srli_epi32(r, 16);
  // packus works per 128-bit half: [r0..3 r0..3 | r4..7 r4..7]; gather the two useful quarters.
  r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
  store_half8<kStream>(p, _mm256_castsi256_si128(r));
}

constexpr int64_t kVec = 8;
constexpr int kSets = 2;                 // independent lane sets per step (few: all in registers)
constexpr int64_t kUnit = kSets * kVec;  // elements per step
constexpr int64_t kChunk = 2048;         // elements per two-sweep chunk (L1-resident)
constexpr int64_t kLine = 64;            // bytes per cache line

template <class S>
struct Tail {
  S buf[kUnit];
  // The last V % kUnit elements, padded with -inf (which adds 0 to every sum).
  Tail(const S* x, int64_t n) {
    for (int64_t i = 0; i < kUnit; ++i) buf[i] = neg_inf_storage<S>();
    std::memcpy(buf, x, static_cast<size_t>(n) * sizeof(S));
  }
};

// One chunk of n (a multiple of kUnit) elements. The second sweep reads from L1 and meanwhile asks
// for the next chunk [x + n, x + n + prefetch_n), so its first sweep does not wait on memory.
template <bool kEntropy, class S>
FASTDPO_INLINE void fwd_chunk(const S* x, int64_t n, int64_t prefetch_n, F8 c,
                              State8 (&st)[kSets]) {
  F8 m[kSets];
  for (int k = 0; k < kSets; ++k) m[k] = F8(-INFINITY);
  for (int64_t i = 0; i < n; i += kUnit) {
    for (int k = 0; k < kSets; ++k) m[k] = Math<F8>::max(load8(x + i + k * kVec), m[k]);
  }
  Shift<F8> sh[kSets];
  for (int k = 0; k < kSets; ++k) {
    rescale<kEntropy>(st[k], Math<F8>::max(m[k], st[k].m), c);
    sh[k] = make_shift(ref_point(st[k].m), c);
  }
  const char* next = reinterpret_cast<const char*>(x + n);
  const int64_t next_bytes = prefetch_n * static_cast<int64_t>(sizeof(S));
  constexpr int64_t kUnitBytes = kUnit * static_cast<int64_t>(sizeof(S));
  const F8 zero(0.0f);
  // At temperature 1 (the common case) x - ref alone has the same rounding and overflows only
  // where the exact value is below -FLT_MAX anyway: one subtraction instead of two fmas.
  const bool unit = _mm256_movemask_ps(_mm256_cmp_ps(c.v, _mm256_set1_ps(1.0f), _CMP_EQ_OQ)) == 0xff;
  F8 ref[kSets];
  for (int k = 0; k < kSets; ++k) ref[k] = ref_point(st[k].m);
  for (int64_t i = 0; i < n; i += kUnit) {
    const int64_t pb = i * static_cast<int64_t>(sizeof(S));
    if (pb % kLine < kUnitBytes && pb < next_bytes) _mm_prefetch(next + pb, _MM_HINT_T0);
    if (unit) {
      for (int k = 0; k < kSets; ++k) {
        accumulate<kEntropy>(st[k].s, st[k].t, load8(x + i + k * kVec) - ref[k]);
      }
    } else {
      for (int k = 0; k < kSets; ++k) {
        accumulate<kEntropy>(st[k].s, st[k].t, scaled_diff(load8(x + i + k * kVec), sh[k], zero));
      }
    }
  }
}

template <bool kEntropy, bool kStream = false, class S>
FASTDPO_INLINE void bwd_unit(const S* x, S* out, const GradCoeffs<F8>& k) {
  F8 v[kSets];
  for (int j = 0; j < kSets; ++j) v[j] = grad_element<kEntropy>(load8(x + j * kVec), k);
  // Stores after all loads: out may be x.
  for (int j = 0; j < kSets; ++j) store8<kStream>(out + j * kVec, v[j]);
}

template <bool kEntropy, bool kStream, class S>
FASTDPO_INLINE void bwd_body(const S* x, S* out, int64_t full, int64_t V,
                             const GradCoeffs<F8>& k) {
  constexpr int64_t kAhead = 4096 / static_cast<int64_t>(sizeof(S));  // elements prefetched ahead
  constexpr int64_t kPerLine = kLine / static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < full; i += kUnit) {
    if (i % kPerLine < kUnit && i + kAhead < V) {
      _mm_prefetch(reinterpret_cast<const char*>(x + i + kAhead), _MM_HINT_T0);
    }
    bwd_unit<kEntropy, kStream>(x + i, out + i, k);
  }
}

namespace {
// The sweeps of one row for the shared row loop (row_driver.h).
struct Avx2 {
  template <bool kEntropy, class S>
  static SoftmaxState<float> fwd_row(const S* x, int64_t V, float c) {
    State8 st[kSets];
    for (auto& s : st) s = state_init<F8>();
    const F8 vc(c);
    const int64_t full = V / kUnit * kUnit;
    for (int64_t i = 0; i < full; i += kChunk) {
      const int64_t n = (full - i < kChunk) ? full - i : kChunk;
      const int64_t rest = full - i - n;
      fwd_chunk<kEntropy>(x + i, n, rest < kChunk ? rest : kChunk, vc, st);
    }
    if (full < V) {
      const Tail<S> tail(x + full, V - full);
      fwd_chunk<kEntropy>(tail.buf, kUnit, 0, vc, st);
    }
    State8 a = st[0];
    for (int k = 1; k < kSets; ++k) a = merge<kEntropy>(a, st[k], vc);
    alignas(32) float m[8], s[8], t[8];
    _mm256_store_ps(m, a.m.v);
    _mm256_store_ps(s, a.s.v);
    _mm256_store_ps(t, a.t.v);
    SoftmaxState<float> out{m[0], s[0], t[0]};
    for (int l = 1; l < 8; ++l) {
      out = merge<kEntropy>(out, SoftmaxState<float>{m[l], s[l], t[l]}, c);
    }
    return out;
  }

  template <bool kEntropy, class S>
  static void bwd_sweep(const S* x, S* out, int64_t V, const GradCoeffs<float>& k) {
    const GradCoeffs<F8> kv{{F8(k.shift.neg_half_ref), F8(k.shift.c2)}, F8(k.neg_log_sum),
                            F8(k.a), F8(k.b)};
    const int64_t full = V / kUnit * kUnit;
    // Out of place, the gradient goes straight to memory (non-temporal stores) when aligned: it is
    // not read again by this op, and a fresh buffer would otherwise be read in before each write.
    const bool stream = out != x && reinterpret_cast<uintptr_t>(out) % (kVec * sizeof(S)) == 0;
    if (stream) {
      bwd_body<kEntropy, true>(x, out, full, V, kv);
      _mm_sfence();  // order the streamed lines before the ordinary stores that follow
    } else {
      bwd_body<kEntropy, false>(x, out, full, V, kv);
    }
    if (full < V) {
      const Tail<S> tail(x + full, V - full);
      S res[kUnit];
      bwd_unit<kEntropy>(tail.buf, res, kv);
      std::memcpy(out + full, res, static_cast<size_t>(V - full) * sizeof(S));
    }
  }
};
}  // namespace

}  // namespace fastdpo::cpu::avx2_impl

namespace fastdpo::cpu {

void logps_fwd_rows_avx2(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_rows<avx2_impl::Avx2, float>(p, r0, r1);
    case DType::kBFloat16: return fwd_rows<avx2_impl::Avx2, BF16>(p, r0, r1);
    case DType::kFloat16: return fwd_rows<avx2_impl::Avx2, FP16>(p, r0, r1);
  }
}

void logps_bwd_rows_avx2(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_rows<avx2_impl::Avx2, float>(p, r0, r1);
    case DType::kBFloat16: return bwd_rows<avx2_impl::Avx2, BF16>(p, r0, r1);
    case DType::kFloat16: return bwd_rows<avx2_impl::Avx2, FP16>(p, r0, r1);
  }
}

// Blocks of a row for the CPU fused LM head's per-block statistics (linear_cpu.cpp): the max (NaN
// skipped, as the running max of the row kernels), and the sum of exp((x_j - ref) c) (8 lane
// sums, then across lanes: a fixed order for a given n), optionally writing each term times
// out_scale to out (which may be x).
float block_max_avx2(const float* x, int64_t n) {
  using avx2_impl::F8;
  F8 m(-INFINITY);
  const int64_t full = n / 8 * 8;
  for (int64_t i = 0; i < full; i += 8) m = Math<F8>::max(avx2_impl::load8(x + i), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m.v);
  float out = lanes[0];
  for (int l = 1; l < 8; ++l) out = Math<float>::max(lanes[l], out);
  for (int64_t i = full; i < n; ++i) out = Math<float>::max(x[i], out);
  return out;
}

template <bool kEntropy, bool kStore>
static float block_exp_impl(const float* x, float* out, int64_t n, float ref, float c, float* t,
                            float out_scale) {
  using avx2_impl::F8;
  const Shift<F8> sh = make_shift(F8(ref), F8(c));
  const F8 zero(0.0f), lowest(kLowestExpArg), k(out_scale);
  F8 s(0.0f), tt(0.0f);
  const int64_t full = n / 8 * 8;
  for (int64_t i = 0; i < full; i += 8) {
    const F8 d = scaled_diff(avx2_impl::load8(x + i), sh, zero);
    const F8 e = Math<F8>::exp(d);
    if constexpr (kStore) avx2_impl::store8(out + i, e * k);
    s = s + e;
    if constexpr (kEntropy) tt = Math<F8>::fma(e, Math<F8>::max(lowest, d), tt);
  }
  if (full < n) {  // the tail padded with -inf (exp gives 0)
    alignas(32) float buf[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    std::memcpy(buf, x + full, static_cast<size_t>(n - full) * sizeof(float));
    const F8 d = scaled_diff(avx2_impl::load8(buf), sh, zero);
    const F8 e = Math<F8>::exp(d);
    if constexpr (kStore) {
      _mm256_store_ps(buf, (e * k).v);
      std::memcpy(out + full, buf, static_cast<size_t>(n - full) * sizeof(float));
    }
    s = s + e;
    if constexpr (kEntropy) tt = Math<F8>::fma(e, Math<F8>::max(lowest, d), tt);  // pads: 0
  }
  alignas(32) float lanes[8];
  if constexpr (kEntropy) {
    _mm256_store_ps(lanes, tt.v);
    *t = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
  _mm256_store_ps(lanes, s.v);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

float block_exp_avx2(const float* x, float* out, int64_t n, float ref, float c, float* t,
                     float out_scale) {
  if (out) {
    return t ? block_exp_impl<true, true>(x, out, n, ref, c, t, out_scale)
             : block_exp_impl<false, true>(x, out, n, ref, c, t, out_scale);
  }
  return t ? block_exp_impl<true, false>(x, out, n, ref, c, t, out_scale)
           : block_exp_impl<false, false>(x, out, n, ref, c, t, out_scale);
}

void exp_avx2(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t k = (n - i < 8) ? n - i : 8;
    std::memcpy(buf, in + i, static_cast<size_t>(k) * sizeof(float));
    _mm256_storeu_ps(buf, avx2_impl::exp8(_mm256_loadu_ps(buf)));
    std::memcpy(out + i, buf, static_cast<size_t>(k) * sizeof(float));
  }
}

namespace {
template <class S>
void round_trip_as(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    S st[8];
    const int64_t k = (n - i < 8) ? n - i : 8;
    std::memcpy(buf, in + i, static_cast<size_t>(k) * sizeof(float));
    avx2_impl::store8(st, _mm256_loadu_ps(buf));
    _mm256_storeu_ps(buf, avx2_impl::load8(st).v);
    std::memcpy(out + i, buf, static_cast<size_t>(k) * sizeof(float));
  }
}
}  // namespace

void round_trip_avx2(const float* in, float* out, int64_t n, DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return round_trip_as<BF16>(in, out, n);
    case DType::kFloat16: return round_trip_as<FP16>(in, out, n);
    default: std::memcpy(out, in, static_cast<size_t>(n) * sizeof(float));
  }
}

}  // namespace fastdpo::cpu

#pragma GCC pop_options

namespace fastdpo::cpu {
bool avx2_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
}  // namespace fastdpo::cpu

#else  // not GCC/Clang on x86: the scalar kernels serve every CPU

namespace fastdpo::cpu {
bool avx2_supported() { return false; }
void logps_fwd_rows_avx2(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  logps_fwd_rows_generic(p, r0, r1);
}
void logps_bwd_rows_avx2(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  logps_bwd_rows_generic(p, r0, r1);
}
void exp_avx2(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::exp(in[i]);
}
float block_max_avx2(const float* x, int64_t n) { return block_max_generic(x, n); }
float block_exp_avx2(const float* x, float* out, int64_t n, float ref, float c, float* t,
                     float out_scale) {
  return block_exp_generic(x, out, n, ref, c, t, out_scale);
}
void round_trip_avx2(const float* in, float* out, int64_t n, DType dtype) {
  round_trip_generic(in, out, n, dtype);
}
}  // namespace fastdpo::cpu

#endif

// AVX2 + FMA (+ F16C) kernels of the log-prob row contract for fp32/bf16/fp16 logits.
//
// The whole file is compiled for AVX2 through `#pragma GCC target`, so the extension keeps a plain
// x86-64 baseline and picks these kernels at run time (logps_cpu.h). Standard and intrinsic headers
// come first, outside the pragma, so their out-of-line inline functions stay baseline code.
//
// Forward, per row: the row is walked in L1-sized chunks; a first sweep takes the per-lane max of
// the chunk, the state is rescaled once to it, a second sweep over the (now cached) chunk adds
// exp(x / T - max). That is one exp per element instead of the two of an element-wise online
// update. Backward: one sweep, one exp per element, reading each logit before writing its gradient
// (the gradient may be written into the logits themselves).
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
FASTDPO_INLINE void fwd_chunk(const S* x, int64_t n, int64_t prefetch_n, F8 inv_temp,
                              State8 (&st)[kSets]) {
  F8 m[kSets];
  for (int k = 0; k < kSets; ++k) m[k] = F8(-INFINITY);
  for (int64_t i = 0; i < n; i += kUnit) {
    for (int k = 0; k < kSets; ++k) m[k] = Math<F8>::max(load8(x + i + k * kVec), m[k]);
  }
  F8 neg_ref[kSets];
  for (int k = 0; k < kSets; ++k) {
    // inv_temp > 0, so the max of x / T is (max x) / T.
    rescale<kEntropy>(st[k], Math<F8>::max(m[k] * inv_temp, st[k].m));
    neg_ref[k] = F8(0.0f) - ref_point(st[k].m);
  }
  const char* next = reinterpret_cast<const char*>(x + n);
  const int64_t next_bytes = prefetch_n * static_cast<int64_t>(sizeof(S));
  constexpr int64_t kUnitBytes = kUnit * static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < n; i += kUnit) {
    const int64_t pb = i * static_cast<int64_t>(sizeof(S));
    if (pb % kLine < kUnitBytes && pb < next_bytes) _mm_prefetch(next + pb, _MM_HINT_T0);
    for (int k = 0; k < kSets; ++k) {
      const F8 d = Math<F8>::fma(load8(x + i + k * kVec), inv_temp, neg_ref[k]);
      accumulate<kEntropy>(st[k].s, st[k].t, d);
    }
  }
}

template <bool kEntropy, class S>
SoftmaxState<float> fwd_row(const S* x, int64_t V, float inv_temp) {
  State8 st[kSets];
  for (auto& s : st) s = state_init<F8>();
  const F8 vt(inv_temp);
  const int64_t full = V / kUnit * kUnit;
  for (int64_t c = 0; c < full; c += kChunk) {
    const int64_t n = (full - c < kChunk) ? full - c : kChunk;
    const int64_t rest = full - c - n;
    fwd_chunk<kEntropy>(x + c, n, rest < kChunk ? rest : kChunk, vt, st);
  }
  if (full < V) {
    const Tail<S> tail(x + full, V - full);
    fwd_chunk<kEntropy>(tail.buf, kUnit, 0, vt, st);
  }
  State8 a = st[0];
  for (int k = 1; k < kSets; ++k) a = merge<kEntropy>(a, st[k]);
  alignas(32) float m[8], s[8], t[8];
  _mm256_store_ps(m, a.m.v);
  _mm256_store_ps(s, a.s.v);
  _mm256_store_ps(t, a.t.v);
  SoftmaxState<float> out{m[0], s[0], t[0]};
  for (int l = 1; l < 8; ++l) out = merge<kEntropy>(out, SoftmaxState<float>{m[l], s[l], t[l]});
  return out;
}

template <class S>
void fwd_rows(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  const S* logits = static_cast<const S*>(p.logits);
  const int64_t V = p.rows.V;
  const float inv_temp = static_cast<float>(p.inv_temp);
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
    float lse, ent;
    if (p.entropy) {
      finalize(fwd_row<true>(x, V, inv_temp), lse, ent);
      p.entropy[row] = ent;
    } else {
      finalize(fwd_row<false>(x, V, inv_temp), lse, ent);
    }
    p.lse[row] = lse;
    const float z_label = lab.kind == LabelKind::kLocal ? to_acc(x[lab.local]) * inv_temp : 0.0f;
    p.logp[row] = lab.kind == LabelKind::kInvalid ? NAN : z_label - lse;
  }
}

template <bool kEntropy, bool kStream = false, class S>
FASTDPO_INLINE void bwd_unit(const S* x, S* out, F8 inv_temp, const GradCoeffs<F8>& c) {
  F8 v[kSets];
  for (int k = 0; k < kSets; ++k) v[k] = grad_element<kEntropy>(load8(x + k * kVec), inv_temp, c);
  // Stores after all loads: out may be x.
  for (int k = 0; k < kSets; ++k) store8<kStream>(out + k * kVec, v[k]);
}

template <bool kEntropy, bool kStream, class S>
FASTDPO_INLINE void bwd_body(const S* x, S* out, int64_t full, int64_t V, F8 vt,
                             const GradCoeffs<F8>& cv) {
  constexpr int64_t kAhead = 4096 / static_cast<int64_t>(sizeof(S));  // elements prefetched ahead
  constexpr int64_t kPerLine = kLine / static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < full; i += kUnit) {
    if (i % kPerLine < kUnit && i + kAhead < V) {
      _mm_prefetch(reinterpret_cast<const char*>(x + i + kAhead), _MM_HINT_T0);
    }
    bwd_unit<kEntropy, kStream>(x + i, out + i, vt, cv);
  }
}

template <bool kEntropy, class S>
void bwd_row(const S* x, S* out, int64_t V, float inv_temp, const GradCoeffs<float>& c,
             const LabelInfo& lab, float g) {
  // The label's gradient is computed first: its logit may be overwritten below.
  float label_value = 0.0f;
  if (lab.kind == LabelKind::kLocal) {
    label_value =
        grad_element<kEntropy>(to_acc(x[lab.local]), inv_temp, c) + label_grad(g, inv_temp);
  }
  const GradCoeffs<F8> cv{F8(c.neg_lse), F8(c.a), F8(c.b)};
  const F8 vt(inv_temp);
  const int64_t full = V / kUnit * kUnit;
  // Out of place, the gradient goes straight to memory (non-temporal stores) when aligned: it is
  // not read again by this op, and a fresh buffer would otherwise be read in before each write.
  const bool stream = out != x && reinterpret_cast<uintptr_t>(out) % (kVec * sizeof(S)) == 0;
  if (stream) {
    bwd_body<kEntropy, true>(x, out, full, V, vt, cv);
    _mm_sfence();  // order the streamed lines before the ordinary stores below (label, tail)
  } else {
    bwd_body<kEntropy, false>(x, out, full, V, vt, cv);
  }
  if (full < V) {
    const Tail<S> tail(x + full, V - full);
    S res[kUnit];
    bwd_unit<kEntropy>(tail.buf, res, vt, cv);
    std::memcpy(out + full, res, static_cast<size_t>(V - full) * sizeof(S));
  }
  if (lab.kind == LabelKind::kLocal) out[lab.local] = from_acc<S>(label_value);
}

template <class S>
void bwd_rows(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  const S* logits = static_cast<const S*>(p.logits);
  S* grad = static_cast<S*>(p.grad_logits);
  const int64_t V = p.rows.V, T = p.rows.T;
  const float inv_temp = static_cast<float>(p.inv_temp);
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / T, t = row - b * T;
    S* out = grad + b * p.grad_stride_b + t * p.grad_stride_t;
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    if (lab.kind == LabelKind::kIgnored) {
      std::memset(static_cast<void*>(out), 0, static_cast<size_t>(V) * sizeof(S));
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    const float g = p.grad_logp.at(b, t);
    const float lse = p.lse.at(b, t);
    if (p.grad_entropy.data) {
      const GradCoeffs<float> c =
          grad_coeffs(g, p.grad_entropy.at(b, t), lse, p.entropy.at(b, t), inv_temp);
      bwd_row<true>(x, out, V, inv_temp, c, lab, g);
    } else {
      const GradCoeffs<float> c = grad_coeffs(g, 0.0f, lse, 0.0f, inv_temp);
      bwd_row<false>(x, out, V, inv_temp, c, lab, g);
    }
  }
}

}  // namespace fastdpo::cpu::avx2_impl

namespace fastdpo::cpu {

void logps_fwd_rows_avx2(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return avx2_impl::fwd_rows<float>(p, r0, r1);
    case DType::kBFloat16: return avx2_impl::fwd_rows<BF16>(p, r0, r1);
    case DType::kFloat16: return avx2_impl::fwd_rows<FP16>(p, r0, r1);
    default: return logps_fwd_rows_generic(p, r0, r1);
  }
}

void logps_bwd_rows_avx2(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  switch (p.dtype) {
    case DType::kFloat32: return avx2_impl::bwd_rows<float>(p, r0, r1);
    case DType::kBFloat16: return avx2_impl::bwd_rows<BF16>(p, r0, r1);
    case DType::kFloat16: return avx2_impl::bwd_rows<FP16>(p, r0, r1);
    default: return logps_bwd_rows_generic(p, r0, r1);
  }
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
void round_trip_avx2(const float* in, float* out, int64_t n, DType dtype) {
  round_trip_generic(in, out, n, dtype);
}
}  // namespace fastdpo::cpu

#endif

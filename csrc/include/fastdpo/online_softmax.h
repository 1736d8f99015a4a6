// Online log-sum-exp (and entropy) over a row of raw logits x with scale c = 1 / temperature, one
// element or one block at a time, as a state that partial results merge into.
//
// State (m, s, t) over the elements seen so far, with r = ref_point(m) and d = (x - r) * c
// (scaled_diff):
//   m = max x (raw units, before the temperature),   s = sum exp(d),   t = sum exp(d) * d
// so that log_sum = log s, lse = r * c + log_sum and the entropy H = log s - t / s. Everything
// stays relative to the running max: d is exact to fp32 rounding at any logit offset or
// temperature, and t does not cancel two large numbers the way lse - sum p z would.
#pragma once

#include "common.h"
#include "params.h"
#include "row_math.h"

namespace fastdpo {

template <class T>
struct SoftmaxState {
  T m;  // running max of the raw logits (-inf before any finite element)
  T s;  // sum of exp(d)
  T t;  // sum of exp(d) * d; only maintained when entropy is wanted
};

// What a row reports (the forward's outputs besides logp).
template <class T>
struct RowStats {
  T row_max, log_sum, entropy;
};

template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE SoftmaxState<T> state_init() {
  return SoftmaxState<T>{T(-INFINITY), T(0.0f), T(0.0f)};
}

// Add one element given its d = scaled_diff(x, make_shift(ref_point(m), c), 0), with x <= m (the
// state already holds x's max).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void accumulate(T& s, T& t, T d) {
  T e = Math<T>::exp(d);
  s = s + e;
  if constexpr (kEntropy) t = Math<T>::fma(e, Math<T>::max(T(kLowestExpArg), d), t);
}

// Move the state to a new max m_new >= m (the caller's max of m and the incoming elements).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void rescale(SoftmaxState<T>& st, T m_new, T c) {
  // (ref(m) - ref(m_new)) * c; written with st.m so an empty state (m = -inf) gets scale 0.
  T delta = scaled_diff(st.m, make_shift(ref_point(m_new), c), T(0.0f));
  T scale = Math<T>::exp(delta);
  if constexpr (kEntropy) {
    st.t = scale * Math<T>::fma(Math<T>::max(T(kLowestExpArg), delta), st.s, st.t);
  }
  st.s = st.s * scale;
  st.m = m_new;
}

// One element: the textbook online softmax step (two exps; kernels batch elements instead).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void update(SoftmaxState<T>& st, T x, T c) {
  rescale<kEntropy>(st, Math<T>::max(x, st.m), c);
  accumulate<kEntropy>(st.s, st.t, scaled_diff(x, make_shift(ref_point(st.m), c), T(0.0f)));
}

// The state of the union of two disjoint sets of elements.
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE SoftmaxState<T> merge(SoftmaxState<T> a, SoftmaxState<T> b,
                                                         T c) {
  T m = Math<T>::max(a.m, b.m);
  rescale<kEntropy>(a, m, c);
  rescale<kEntropy>(b, m, c);
  if constexpr (kEntropy) return SoftmaxState<T>{m, a.s + b.s, a.t + b.t};
  return SoftmaxState<T>{m, a.s + b.s, T(0.0f)};
}

// A functor form of merge for block reductions (cub::BlockReduce).
template <bool kEntropy, class T>
struct MergeOp {
  T c;
  FASTDPO_HOST_DEVICE FASTDPO_INLINE SoftmaxState<T> operator()(const SoftmaxState<T>& a,
                                                                const SoftmaxState<T>& b) const {
    return merge<kEntropy>(a, b, c);
  }
};

// log_sum = log s, entropy = log s - t / s. As log_softmax: a row of only -inf gives
// row_max = log_sum = -inf (entropy NaN); a +inf or NaN logit makes log_sum and entropy NaN (it
// reaches the sum as inf - inf or NaN). The running max skips NaN, so row_max is set to NaN here
// when the sum is NaN without a +inf max (a NaN logit), and stays +inf for a +inf row: as amax.
// Scalar T only.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE RowStats<T> finalize(const SoftmaxState<T>& st) {
  T log_s = Math<T>::log(st.s);
  const bool nan_row = st.s != st.s && st.m != T(INFINITY);
  return RowStats<T>{nan_row ? st.s : st.m, log_s, log_s - st.t / st.s};
}

// logp = (x_label - ref) * c - log_sum. An off-shard label counts a label logit of 0 (logp is
// -lse); an invalid one gives NaN. x_label is read only for a local label.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T label_logp(LabelKind kind, T x_label, const RowStats<T>& r,
                                                T c) {
  if (kind == LabelKind::kInvalid) return T(NAN);
  const T x = kind == LabelKind::kLocal ? x_label : T(0.0f);
  return scaled_diff(x, make_shift(ref_point(r.row_max), c), T(0.0f) - r.log_sum);
}

}  // namespace fastdpo

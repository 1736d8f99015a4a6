// Online log-sum-exp (and entropy) over a row of scaled logits z, one element or one block at a
// time, as a state that partial results merge into.
//
// State (m, s, t) over the elements seen so far, with r = ref(m) (m, or 0 while m is -inf):
//   m = max z,   s = sum exp(z - r),   t = sum exp(z - r) * (z - r)
// so that lse = r + log s and entropy H = lse - sum p z = log s - t / s. Keeping t relative to the
// running max (instead of sum p z) avoids cancelling two large numbers when |z| is large.
#pragma once

#include "common.h"

namespace fastdpo {

template <class T>
struct SoftmaxState {
  T m;  // running max (-inf before any finite element)
  T s;  // sum of exp(z - ref(m))
  T t;  // sum of exp(z - ref(m)) * (z - ref(m)); only maintained when entropy is wanted
};

template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE SoftmaxState<T> state_init() {
  return SoftmaxState<T>{T(-INFINITY), T(0.0f), T(0.0f)};
}

// The point exponents are taken relative to: the max, or 0 while the max is -inf (so that an
// all -inf prefix gives exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN).
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T ref_point(T m) {
  return Math<T>::select(Math<T>::is_neg_inf(m), T(0.0f), m);
}

// Add one element given d = z - ref(m), with z <= m (the state already holds z's max).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void accumulate(T& s, T& t, T d) {
  T e = Math<T>::exp(d);
  s = s + e;
  if constexpr (kEntropy) t = Math<T>::fma(e, Math<T>::max(T(kLowestExpArg), d), t);
}

// Move the state to a new max m_new >= m (the caller's max of m and the incoming elements).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void rescale(SoftmaxState<T>& st, T m_new) {
  // ref(m) - ref(m_new); written with st.m so an empty state (m = -inf) gets scale 0.
  T delta = st.m - ref_point(m_new);
  T scale = Math<T>::exp(delta);
  if constexpr (kEntropy) {
    st.t = scale * Math<T>::fma(Math<T>::max(T(kLowestExpArg), delta), st.s, st.t);
  }
  st.s = st.s * scale;
  st.m = m_new;
}

// One element: the textbook online softmax step (two exps; kernels batch elements instead).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void update(SoftmaxState<T>& st, T z) {
  rescale<kEntropy>(st, Math<T>::max(z, st.m));
  accumulate<kEntropy>(st.s, st.t, z - ref_point(st.m));
}

// The state of the union of two disjoint sets of elements.
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE SoftmaxState<T> merge(SoftmaxState<T> a, SoftmaxState<T> b) {
  T m = Math<T>::max(a.m, b.m);
  rescale<kEntropy>(a, m);
  rescale<kEntropy>(b, m);
  if constexpr (kEntropy) return SoftmaxState<T>{m, a.s + b.s, a.t + b.t};
  return SoftmaxState<T>{m, a.s + b.s, T(0.0f)};
}

// A functor form of merge for block reductions (cub::BlockReduce).
template <bool kEntropy>
struct MergeOp {
  template <class T>
  FASTDPO_HOST_DEVICE FASTDPO_INLINE SoftmaxState<T> operator()(const SoftmaxState<T>& a,
                                                                const SoftmaxState<T>& b) const {
    return merge<kEntropy>(a, b);
  }
};

// lse = ref(m) + log s; entropy = log s - t / s. Like log_softmax in PyTorch, an all -inf row
// gives lse = -inf and entropy NaN, and a row holding +inf or NaN gives NaN (+inf - +inf reaches
// the sum). Scalar T only.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE void finalize(const SoftmaxState<T>& st, T& lse, T& entropy) {
  T log_s = Math<T>::log(st.s);
  lse = ref_point(st.m) + log_s;
  entropy = log_s - st.t / st.s;
}

}  // namespace fastdpo

// Global statistics of a row from K disjoint parts of its vocabulary (tiles or shards), each
// reported by the row op over its own columns: the C++ twin of fastdpo.rows.combine, for scalar
// T. A part's share of the row's sum, relative to the global max M, is
//   a_k = (m_k - ref(M)) c + log_sum_k  (<= log_sum_k, formed by scaled_diff),
// L = logsumexp_k a_k is the global log_sum; the label's log-prob is re-based from its part's sum
// onto L, a row with no part holding its label gets -lse (the off-shard value), and the entropy is
// the mixture of the parts' entropies with weights w_k = exp(a_k - L).
#pragma once

#include "common.h"
#include "row_math.h"

namespace fastdpo {

template <class T>
struct Combined {
  T logp, row_max, log_sum, entropy;
};

// Parts k = 0..K-1 at logp[k * stride] etc.; entropy may be null (then Combined::entropy is 0).
// holder: the part whose columns hold the label, or -1 (off-shard label); invalid: the label is
// outside [0, vocab_total) (log-prob NaN). The parts are visited in index order: the result
// depends on nothing but the K values (a fixed reduction order).
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE Combined<T> combine_parts(const T* logp, const T* row_max,
                                                             const T* log_sum, const T* entropy,
                                                             int64_t stride, int64_t K,
                                                             int64_t holder, bool invalid, T c) {
  const T nan = T(NAN), ninf = T(-INFINITY);
  // M = max of the parts' maxima; a NaN anywhere makes it NaN (as torch.amax)
  T M = ninf;
  bool any_nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const T m = row_max[k * stride];
    if (m != m) any_nan = true;
    else M = Math<T>::max(m, M);
  }
  if (any_nan) M = nan;
  const Shift<T> sh = make_shift(ref_point(M), c);
  T A = ninf;
  for (int64_t k = 0; k < K; ++k) {
    const T a = scaled_diff(row_max[k * stride], sh, log_sum[k * stride]);
    if (a != a) any_nan = true;
    else A = Math<T>::max(a, A);
  }
  T L;
  if (any_nan) {
    L = nan;
  } else if (A == ninf) {
    L = ninf;  // no part has a finite logit
  } else {
    T s = T(0.0f);
    for (int64_t k = 0; k < K; ++k) {
      s = s + Math<T>::exp(scaled_diff(row_max[k * stride], sh, log_sum[k * stride]) - A);
    }
    L = A + Math<T>::log(s);
  }
  Combined<T> out{T(0.0f), M, L, T(0.0f)};
  if (invalid) {
    out.logp = nan;
  } else if (holder >= 0) {
    const T a = scaled_diff(row_max[holder * stride], sh, log_sum[holder * stride]);
    // a holder with no finite logit makes the label's log-prob -inf, not -inf - -inf
    out.logp = (a == ninf ? ninf : logp[holder * stride] + a) - L;
  } else {
    out.logp = scaled_diff(T(0.0f), sh, T(0.0f) - L);  // -lse, as the row kernels' off-shard
  }
  if (entropy != nullptr) {
    if (L == ninf || L != L) {
      out.entropy = nan;  // no distribution at all, or a NaN row
    } else {
      T e = T(0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const T log_w = scaled_diff(row_max[k * stride], sh, log_sum[k * stride]) - L;
        const T w = Math<T>::exp(log_w);
        // a dead part (all -inf, w = 0) has no distribution of its own: it adds nothing
        if (w > T(0.0f)) e = e + w * (entropy[k * stride] - log_w);
      }
      out.entropy = e;
    }
  }
  return out;
}

}  // namespace fastdpo

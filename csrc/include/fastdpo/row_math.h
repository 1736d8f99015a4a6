// The two primitives every exponent of the row math goes through, for any value type T of
// common.h (scalars on CPU and GPU, the AVX2 lanes). Kept out of common.h, which the kernel
// parameters include: a CPU file that compiles its kernels for another target includes this (and
// the math headers) under its target options, so these inline into its vector code.
#pragma once

#include "common.h"

namespace fastdpo {

// Where a row's exponents are taken from: its max m (raw logits), or 0 while m is -inf, so that a
// row with no finite logit gives exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T ref_point(T m) {
  return Math<T>::select(Math<T>::is_neg_inf(m), T(0.0f), m);
}

// (x - ref) * c + offset, c = 1 / temperature: every exponent of the row math is formed here.
// The max is subtracted before scaling, so x - ref is exact for the logits that matter (those
// near the max) at any offset; x * c - ref * c would lose the digits of |x * c| instead.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T scaled_diff(T x, T ref, T c, T offset) {
  return Math<T>::fma(x - ref, c, offset);
}

}  // namespace fastdpo

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
// The max is subtracted before scaling, so the difference is exact for the logits that matter
// (those near the max) at any offset; x * c - ref * c would lose the digits of |x * c|. It is
// formed as (x / 2 - ref / 2) * 2c: halving and doubling are exact, so the rounding is that of
// (x - ref) * c, but finite logits of opposite signs near the largest float do not overflow
// where x - ref would. Two fmas, with the row's constants -ref / 2 and 2c computed once.
template <class T>
struct Shift {
  T neg_half_ref;  // -ref / 2
  T c2;            // 2c
};

template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE Shift<T> make_shift(T ref, T c) {
  return Shift<T>{ref * T(-0.5f), c * T(2.0f)};
}

template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T scaled_diff(T x, const Shift<T>& sh, T offset) {
  return Math<T>::fma(Math<T>::fma(x, T(0.5f), sh.neg_half_ref), sh.c2, offset);
}

}  // namespace fastdpo

// Gradient of one row of (logp, entropy) with respect to the raw logits x, c = 1 / temperature:
//   dx_j = c (g (onehot_j - p_j) - g_ent p_j (d_j + H)),   d_j = (x_j - ref) c - log_sum = log p_j
// with (ref, log_sum) the forward's row statistics (any reference >= x_j with its matching sum).
// Factored per row into p_j * (a d_j + b) plus g c on the label, so the per-element work is two
// fmas for d, one exp and one fma.
#pragma once

#include "common.h"
#include "row_math.h"

namespace fastdpo {

template <class T>
struct GradCoeffs {
  Shift<T> shift;  // of ref_point(row_max) and c
  T neg_log_sum;   // -log_sum, so d = scaled_diff(x, shift, neg_log_sum)
  T a;             // -g_ent c
  T b;             // -(g + g_ent H) c
};

template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE GradCoeffs<T> grad_coeffs(T g, T g_ent, T row_max, T log_sum,
                                                             T entropy, T c) {
  return GradCoeffs<T>{make_shift(ref_point(row_max), c), T(0.0f) - log_sum, T(0.0f) - c * g_ent,
                       T(0.0f) - c * Math<T>::fma(g_ent, entropy, g)};
}

// Gradient of a non-label element. kEntropy=false assumes g_ent = 0 (a is then not read).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T grad_element(T x, const GradCoeffs<T>& k) {
  T d = scaled_diff(x, k.shift, k.neg_log_sum);
  T p = Math<T>::exp(d);
  // d is clamped so that a masked logit (-inf, p = 0) gives 0 rather than 0 * inf.
  if constexpr (kEntropy) return p * Math<T>::fma(k.a, Math<T>::max(T(kLowestExpArg), d), k.b);
  return p * k.b;
}

// What the label element adds on top of grad_element.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T label_grad(T g, T c) { return g * c; }

}  // namespace fastdpo

// Gradient of one row of (logp, entropy) with respect to the raw logits x, z = x / temperature:
//   dx_j = (g (onehot_j - p_j) - g_ent p_j (z_j - lse + H)) / temperature,   p_j = exp(z_j - lse)
// factored per row into p_j * (a d_j + b) with d_j = z_j - lse, plus g / temperature on the label,
// so the per-element work is one fma for d, one exp and one fma.
#pragma once

#include "common.h"

namespace fastdpo {

template <class T>
struct GradCoeffs {
  T neg_lse;  // -lse, so d = fma(x, inv_temp, neg_lse)
  T a;        // -g_ent / temperature
  T b;        // -(g + g_ent H) / temperature
};

template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE GradCoeffs<T> grad_coeffs(T g, T g_ent, T lse, T entropy,
                                                             T inv_temp) {
  return GradCoeffs<T>{T(0.0f) - lse, T(0.0f) - inv_temp * g_ent,
                       T(0.0f) - inv_temp * Math<T>::fma(g_ent, entropy, g)};
}

// Gradient of a non-label element. kEntropy=false assumes g_ent = 0 (a is then not read).
template <bool kEntropy, class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T grad_element(T x, T inv_temp, const GradCoeffs<T>& c) {
  T d = Math<T>::fma(x, inv_temp, c.neg_lse);
  T p = Math<T>::exp(d);
  // d is clamped so that a masked logit (-inf, p = 0) gives 0 rather than 0 * inf.
  if constexpr (kEntropy) return p * Math<T>::fma(c.a, Math<T>::max(T(kLowestExpArg), d), c.b);
  return p * c.b;
}

// What the label element adds on top of grad_element.
template <class T>
FASTDPO_HOST_DEVICE FASTDPO_INLINE T label_grad(T g, T inv_temp) { return g * inv_temp; }

}  // namespace fastdpo

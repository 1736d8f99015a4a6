// The row loop both CPU kernel sets share: label rule, ignored rows, outputs, the label's gradient.
// A kernel set supplies only the sweeps over one row's logits:
//
//   template <bool kEntropy, class S>
//   static SoftmaxState<float> fwd_row(const S* x, int64_t V, float c);
//   template <bool kEntropy, class S>
//   static void bwd_sweep(const S* x, S* out, int64_t V, const GradCoeffs<float>& k);
//
// Each kernel file includes this header where its own target options are in force (the AVX2 file
// inside its `#pragma GCC target`) and passes a Kernel type of internal linkage, so the drivers it
// instantiates are its own code, compiled for its target; everything they call is always_inline.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastdpo/logps_grad.h"
#include "fastdpo/online_softmax.h"
#include "fastdpo/params.h"
#include "storage.h"

namespace fastdpo::cpu {

template <class Kernel, class S>
void fwd_rows(const LogpsFwdParams& p, int64_t r0, int64_t r1) {
  const S* logits = static_cast<const S*>(p.logits);
  const int64_t V = p.rows.V, T = p.rows.T;
  const float c = p.inv_temp;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / T, t = row - b * T;
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    if (lab.kind == LabelKind::kIgnored) {
      p.logp[row] = p.row_max[row] = p.log_sum[row] = 0.0f;
      if (p.entropy) p.entropy[row] = 0.0f;
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    const RowStats<float> r = finalize(p.entropy ? Kernel::template fwd_row<true>(x, V, c)
                                                 : Kernel::template fwd_row<false>(x, V, c));
    p.row_max[row] = r.row_max;
    p.log_sum[row] = r.log_sum;
    if (p.entropy) p.entropy[row] = r.entropy;
    const float x_label = lab.kind == LabelKind::kLocal ? to_acc(x[lab.local]) : 0.0f;
    p.logp[row] = label_logp(lab.kind, x_label, r, c);
  }
}

template <class Kernel, class S>
void bwd_rows(const LogpsBwdParams& p, int64_t r0, int64_t r1) {
  const S* logits = static_cast<const S*>(p.logits);
  S* grad = static_cast<S*>(p.grad_logits);
  const int64_t V = p.rows.V, T = p.rows.T;
  const float c = p.inv_temp;
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
    const bool ent = p.grad_entropy.data != nullptr;
    const GradCoeffs<float> k =
        grad_coeffs(g, ent ? p.grad_entropy.at(b, t) : 0.0f, p.row_max.at(b, t),
                    p.log_sum.at(b, t), ent ? p.entropy.at(b, t) : 0.0f, c);
    // The label's gradient first: the sweep may overwrite its logit (in-place backward).
    float label_value = 0.0f;
    if (lab.kind == LabelKind::kLocal) {
      const float xl = to_acc(x[lab.local]);
      label_value = (ent ? grad_element<true>(xl, k) : grad_element<false>(xl, k)) +
                    label_grad(g, c);
    }
    if (ent) Kernel::template bwd_sweep<true>(x, out, V, k);
    else Kernel::template bwd_sweep<false>(x, out, V, k);
    if (lab.kind == LabelKind::kLocal) out[lab.local] = from_acc<S>(label_value);
  }
}

}  // namespace fastdpo::cpu

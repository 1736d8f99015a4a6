// Kernel arguments as plain pointers, sizes and element strides (int64 throughout), and the label
// rule of the row contract (fastdpo/ops.py). Torch-free: the .cu files and the CPU kernel files
// include only this, the glue fills it from tensors.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastdpo {

// Storage dtypes of the logits (the native backend takes no fp64); every output is fp32.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RowsLayout {
  int64_t B = 0, T = 0, V = 0;
  int64_t stride_b = 0, stride_t = 0;  // in elements; the vocabulary stride is 1
  // Rows are numbered row = b * T + t; kernels split the index once (64-bit division is a call
  // on GPUs) and pass (b, t) to every accessor.
  FASTDPO_HOST_DEVICE FASTDPO_INLINE int64_t offset(int64_t b, int64_t t) const {
    return b * stride_b + t * stride_t;
  }
};

struct LabelsView {
  const void* data = nullptr;
  bool is_int64 = true;
  int64_t stride_b = 0, stride_t = 0;
  FASTDPO_HOST_DEVICE FASTDPO_INLINE int64_t at(int64_t b, int64_t t) const {
    const int64_t off = b * stride_b + t * stride_t;
    return is_int64 ? static_cast<const int64_t*>(data)[off]
                    : static_cast<int64_t>(static_cast<const int32_t*>(data)[off]);
  }
};

// A (B, T) fp32 tensor with any strides (inputs of the backward).
struct RowScalars {
  const float* data = nullptr;
  int64_t stride_b = 0, stride_t = 0;
  FASTDPO_HOST_DEVICE FASTDPO_INLINE float at(int64_t b, int64_t t) const {
    return data[b * stride_b + t * stride_t];
  }
};

struct LabelRule {
  int64_t ignore_index = -100;
  int64_t vocab_start = 0;  // global id of column 0; the glue checks it is >= 0
  int64_t vocab_total = 0;
};

enum class LabelKind : int {
  kIgnored = 0,  // row skipped: 0 in every output, zero gradient
  kInvalid = 1,  // outside [0, vocab_total): logp is NaN; never read
  kOffShard = 2, // valid but another shard's column: label logit counts as 0
  kLocal = 3,    // column `local` of this shard
};

struct LabelInfo {
  LabelKind kind;
  int64_t local;  // column in [0, V) when kLocal, else 0 (always safe to index when V > 0)
};

FASTDPO_HOST_DEVICE FASTDPO_INLINE LabelInfo classify_label(int64_t label, const LabelRule& rule,
                                                            int64_t V) {
  if (label == rule.ignore_index) return LabelInfo{LabelKind::kIgnored, 0};
  if (label < 0 || label >= rule.vocab_total) return LabelInfo{LabelKind::kInvalid, 0};
  // label >= 0 and vocab_start >= 0: no overflow.
  int64_t local = label - rule.vocab_start;
  if (local < 0 || local >= V) return LabelInfo{LabelKind::kOffShard, 0};
  return LabelInfo{LabelKind::kLocal, local};
}

struct LogpsFwdParams {
  DType dtype = DType::kFloat32;
  const void* logits = nullptr;
  RowsLayout rows;
  LabelsView labels;
  LabelRule rule;
  float inv_temp = 1.0f;     // c = 1 / temperature, finite and > 0 (the glue checks)
  float* logp = nullptr;     // contiguous (B, T), as are the outputs below
  float* row_max = nullptr;
  float* log_sum = nullptr;
  float* entropy = nullptr;  // null when not wanted
};

struct LogpsBwdParams {
  DType dtype = DType::kFloat32;
  const void* logits = nullptr;
  RowsLayout rows;  // of logits
  void* grad_logits = nullptr;
  int64_t grad_stride_b = 0, grad_stride_t = 0;  // grad_logits strides (vocabulary stride 1)
  LabelsView labels;
  LabelRule rule;
  float inv_temp = 1.0f;
  RowScalars grad_logp;
  RowScalars grad_entropy;  // data null when absent
  RowScalars row_max;
  RowScalars log_sum;
  RowScalars entropy;  // data null when absent
};

}  // namespace fastdpo

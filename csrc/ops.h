// Entry points of the native ops (schemas in fastdpo/ops.py) and the argument checks they share:
// every TORCH_CHECK names the argument, then the tensors become plain kernel parameters.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "fastdpo/params.h"

namespace fastdpo {

struct FwdOutputs {
  at::Tensor logp, row_max, log_sum, entropy;
};

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks the forward's arguments, allocates its outputs on the logits' device, fills the params.
LogpsFwdParams prepare_fwd(const at::Tensor& logits, const at::Tensor& labels,
                           int64_t ignore_index, double temperature, int64_t vocab_start,
                           int64_t vocab_total, bool with_entropy, FwdOutputs& out);

LogpsBwdParams prepare_bwd(const at::Tensor& grad_logp,
                           const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                           const at::Tensor& labels, const at::Tensor& row_max,
                           const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                           int64_t ignore_index, double temperature, int64_t vocab_start,
                           int64_t vocab_total, const at::Tensor& grad_logits);

FwdResult logps_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                        double temperature, int64_t vocab_start, int64_t vocab_total,
                        bool with_entropy);

void logps_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                   const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                   int64_t ignore_index, double temperature, int64_t vocab_start,
                   int64_t vocab_total, const at::Tensor& grad_logits);

// The CUDA entry points repeat the CPU signatures above: both implement the same schema.
#ifdef FASTDPO_WITH_CUDA
FwdResult logps_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                          double temperature, int64_t vocab_start, int64_t vocab_total,
                          bool with_entropy);

void logps_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                    const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                    int64_t ignore_index, double temperature, int64_t vocab_start,
                    int64_t vocab_total, const at::Tensor& grad_logits);
#endif

// Which CPU kernels run: "avx2" (when the CPU has it) or "generic"; tests pin each in turn.
std::string cpu_kernel();
void set_cpu_kernel(const std::string& name);  // "auto" or "generic"

}  // namespace fastdpo

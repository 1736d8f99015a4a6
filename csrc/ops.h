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

// The fused LM head on CPU (csrc/cpu/linear_cpu.cpp): the native_linear_logps_fwd / _bwd schemas.
FwdResult linear_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                         int64_t ignore_index, double temperature, double logit_scale,
                         double softcap, int64_t vocab_start, int64_t vocab_total,
                         bool with_entropy, bool batch_invariant);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& row_max, const at::Tensor& log_sum,
    const std::optional<at::Tensor>& entropy, int64_t ignore_index, double temperature,
    double logit_scale, double softcap, int64_t vocab_start, int64_t vocab_total,
    bool need_hidden_grad, bool need_weight_grad, bool need_bias_grad, bool batch_invariant);

// A frozen head's forward with each token's d logp / d hidden (native_linear_frozen_fwd):
// (logp, row_max, log_sum, u, entropy), u (N, H) fp32, 0 on ignored rows; entropy (N,) with
// with_entropy, else empty (a metric: no gradient).
using FrozenResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
FrozenResult linear_frozen_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double temperature, double logit_scale,
    double softcap, bool batch_invariant, bool with_entropy);

// A trainable head's chunk with its logits kept (native_linear_keep_fwd / _bwd): the forward
// writes them to `keep` (linear_keep_numel floats), the backward forms d logits there in place
// and adds d_weight / d_bias into fp32 accumulators; 3 GEMMs, no recompute. An empty keep given
// to the backward: it recomputes each tile's logits in cache (a pair streamed in slabs).
FwdResult linear_keep_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double temperature, double logit_scale,
    double softcap, bool batch_invariant, at::Tensor& keep, bool with_entropy);
at::Tensor linear_keep_bwd_cpu(at::Tensor& keep, const at::Tensor& grad_logp,
                               const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                               const at::Tensor& row_max, const at::Tensor& log_sum,
                               int64_t ignore_index, double temperature, double logit_scale,
                               double softcap, bool batch_invariant, bool need_hidden_grad,
                               at::Tensor& d_weight, at::Tensor& d_bias);
int64_t linear_keep_numel(int64_t N, int64_t V, int64_t H, bool batch_invariant);
// (tile rows, tile columns, L2 bytes, L3 bytes) the CPU fused head uses for V, H (tests, bench).
std::tuple<int64_t, int64_t, int64_t, int64_t> linear_cpu_plan(int64_t V, int64_t H);
// (d_hidden groups, token block rows, bytes of each thread's buffers) of its backward for N
// tokens of `itemsize` bytes (hidden, weight and d_weight in one dtype).
std::tuple<int64_t, int64_t, int64_t> linear_cpu_bwd_plan(int64_t N, int64_t V, int64_t H,
                                                          int64_t itemsize, bool batch_invariant,
                                                          bool softcap);

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

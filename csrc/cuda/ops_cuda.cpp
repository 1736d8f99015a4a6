// CUDA entry points: the shared checks (csrc/ops.cpp), then the launchers on the current stream.
// Built only with a CUDA torch (setup.py); no host synchronisation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/logps_cuda.h"
#include "ops.h"

namespace fastdpo {
namespace {

void check_cuda_rows(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor here, got ", logits.device());
  // The kernels split row indices with 32-bit division.
  TORCH_CHECK(logits.size(0) * logits.size(1) < std::numeric_limits<int32_t>::max(), op,
              ": B * T must be below 2^31, got shape ", logits.sizes());
}

}  // namespace

// These entry points mirror the CPU ones in ops.cpp on purpose: the checks and parameters are
// shared (prepare_fwd / prepare_bwd); only the device guard, stream and launch differ.
FwdResult logps_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                         double temperature, int64_t vocab_start, int64_t vocab_total,
                         bool with_entropy) {
  FwdOutputs out;
  const LogpsFwdParams p = prepare_fwd(logits, labels, ignore_index, temperature, vocab_start,
                                       vocab_total, with_entropy, out);
  check_cuda_rows(logits, "native_logps_fwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_logps_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  return {out.logp, out.row_max, out.log_sum, out.entropy};
}

void logps_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                    const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                    int64_t ignore_index, double temperature, int64_t vocab_start,
                    int64_t vocab_total, const at::Tensor& grad_logits) {
  const LogpsBwdParams p =
      prepare_bwd(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                  ignore_index, temperature, vocab_start, vocab_total, grad_logits);
  check_cuda_rows(logits, "native_logps_bwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(cuda::launch_logps_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace fastdpo

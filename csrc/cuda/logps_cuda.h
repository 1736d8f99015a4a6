// Launchers of the CUDA kernels (torch-free: the .cu files include only the fastdpo headers, CUDA
// and CUB; csrc/cuda/ops_cuda.cpp turns tensors into params and passes the current stream).
#pragma once

#include <cuda_runtime_api.h>

#include "fastdpo/params.h"

namespace fastdpo::cuda {

// Both return the launch error (cudaSuccess when nothing was launched for an empty input).
cudaError_t launch_logps_fwd(const LogpsFwdParams& p, cudaStream_t stream);
cudaError_t launch_logps_bwd(const LogpsBwdParams& p, cudaStream_t stream);

}  // namespace fastdpo::cuda

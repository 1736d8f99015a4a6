// CUDA backward of the log-prob row contract: one block per row, each thread reads its 16-byte
// vectors of logits and writes their gradient (possibly into the logits: every element is read by
// the thread that writes it, before it writes it). One exp per element, no reduction.
#include <cstdint>

#include "fastdpo/logps_grad.h"
#include "kernel_utils.cuh"
#include "logps_cuda.h"

namespace fastdpo::cuda {
namespace {

template <class S, bool kEntropy, int kBlock>
__global__ void __launch_bounds__(kBlock, 1) logps_bwd_kernel(const LogpsBwdParams p) {
  constexpr int kN = Vec<S>::kN;
  const int64_t rows = p.rows.B * p.rows.T;
  const int64_t V = p.rows.V, T = p.rows.T;
  const float c = p.inv_temp;
  const S* logits = static_cast<const S*>(p.logits);
  S* grad = static_cast<S*>(p.grad_logits);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t b, t;
    split_index(row, T, b, t);
    S* out = grad + b * p.grad_stride_b + t * p.grad_stride_t;
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    const RowSplit so = split_row<S>(reinterpret_cast<uintptr_t>(out), V);
    if (lab.kind == LabelKind::kIgnored) {
      for (int64_t i = threadIdx.x; i < so.head; i += kBlock) out[i] = from_acc<S>(0.0f);
      for (int64_t i = so.tail_begin + threadIdx.x; i < V; i += kBlock) {
        out[i] = from_acc<S>(0.0f);
      }
      Vec<S> zero;
#pragma unroll
      for (int j = 0; j < kN; ++j) zero.v[j] = from_acc<S>(0.0f);
      Vec<S>* ov = reinterpret_cast<Vec<S>*>(out + so.head);
      for (int64_t v = threadIdx.x; v < so.nvec; v += kBlock) ov[v] = zero;
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    const float g = p.grad_logp.at(b, t);
    const GradCoeffs<float> k =
        grad_coeffs(g, kEntropy ? p.grad_entropy.at(b, t) : 0.0f, p.row_max.at(b, t),
                    p.log_sum.at(b, t), kEntropy ? p.entropy.at(b, t) : 0.0f, c);
    const int64_t label = lab.kind == LabelKind::kLocal ? lab.local : -1;
    const float label_g = label_grad(g, c);
    auto value = [&](float xv, int64_t i) {
      const float d = grad_element<kEntropy>(xv, k);
      return i == label ? d + label_g : d;
    };
    // Vectors need logits and gradient rows equally misaligned (always so in place).
    const RowSplit sx = split_row<S>(reinterpret_cast<uintptr_t>(x), V);
    const bool vec = sx.head == so.head && sx.nvec == so.nvec;
    const int64_t head = vec ? sx.head : V, nvec = vec ? sx.nvec : 0;
    const int64_t tail = vec ? sx.tail_begin : V;
    for (int64_t i = threadIdx.x; i < head; i += kBlock) {
      out[i] = from_acc<S>(value(to_acc(x[i]), i));
    }
    for (int64_t i = tail + threadIdx.x; i < V; i += kBlock) {
      out[i] = from_acc<S>(value(to_acc(x[i]), i));
    }
    const Vec<S>* xv = reinterpret_cast<const Vec<S>*>(x + head);
    Vec<S>* ov = reinterpret_cast<Vec<S>*>(out + head);
    for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += int64_t{kBlock} * kUnroll) {
      Vec<S> w[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t{u} * kBlock;
        if (v < nvec) w[u] = xv[v];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = v0 + int64_t{u} * kBlock;
        if (v < nvec) {
#pragma unroll
          for (int j = 0; j < kN; ++j) {
            w[u].v[j] = from_acc<S>(value(to_acc(w[u].v[j]), head + v * kN + j));
          }
          ov[v] = w[u];
        }
      }
    }
  }
}

// The launch mirrors logps_fwd.cu's on purpose (row_grid / short_rows are shared): only the
// kernel template differs, and a launcher template over kernel templates would hide which runs.
template <class S, bool kEntropy>
cudaError_t launch_typed(const LogpsBwdParams& p, cudaStream_t stream) {
  const unsigned grid = row_grid(p.rows.B * p.rows.T);
  if (short_rows<S>(p.rows.V)) {
    logps_bwd_kernel<S, kEntropy, 128><<<grid, 128, 0, stream>>>(p);
  } else {
    logps_bwd_kernel<S, kEntropy, 512><<<grid, 512, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class S>
cudaError_t launch_dtype(const LogpsBwdParams& p, cudaStream_t stream) {
  return p.grad_entropy.data ? launch_typed<S, true>(p, stream) : launch_typed<S, false>(p, stream);
}

}  // namespace

cudaError_t launch_logps_bwd(const LogpsBwdParams& p, cudaStream_t stream) {
  if (p.rows.B * p.rows.T == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return launch_dtype<float>(p, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_dtype<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdpo::cuda

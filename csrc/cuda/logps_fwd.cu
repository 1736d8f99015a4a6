// CUDA forward of the log-prob row contract: one block per row (grid-stride over rows), 16-byte
// loads, an online softmax state per thread over the raw logits (one rescale per kUnroll vectors),
// and one CUB block reduction whose operator merges (max, sum, sum p*d) states.
#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include "fastdpo/online_softmax.h"
#include "kernel_utils.cuh"
#include "logps_cuda.h"

namespace fastdpo::cuda {
namespace {

template <class S, bool kEntropy, int kBlock>
__global__ void __launch_bounds__(kBlock, 1) logps_fwd_kernel(const LogpsFwdParams p) {
  using State = SoftmaxState<float>;
  using Reduce = cub::BlockReduce<State, kBlock>;
  constexpr int kN = Vec<S>::kN;
  __shared__ typename Reduce::TempStorage temp;

  const int64_t rows = p.rows.B * p.rows.T;
  const int64_t V = p.rows.V;
  const float c = p.inv_temp;
  const S* logits = static_cast<const S*>(p.logits);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    // Uniform across the block, so every thread reaches (or skips) the reduction together.
    int64_t b, t;
    split_index(row, p.rows.T, b, t);
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    if (lab.kind == LabelKind::kIgnored) {
      if (threadIdx.x == 0) {
        p.logp[row] = p.row_max[row] = p.log_sum[row] = 0.0f;
        if (kEntropy) p.entropy[row] = 0.0f;
      }
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    const RowSplit sp = split_row<S>(reinterpret_cast<uintptr_t>(x), V);
    State st = state_init<float>();
    for (int64_t i = threadIdx.x; i < sp.head; i += kBlock) update<kEntropy>(st, to_acc(x[i]), c);
    for (int64_t i = sp.tail_begin + threadIdx.x; i < V; i += kBlock) {
      update<kEntropy>(st, to_acc(x[i]), c);
    }
    const Vec<S>* xv = reinterpret_cast<const Vec<S>*>(x + sp.head);
    for (int64_t v0 = threadIdx.x; v0 < sp.nvec; v0 += int64_t{kBlock} * kUnroll) {
      float vals[kUnroll][kN];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t v = v0 + int64_t{k} * kBlock;
        if (v < sp.nvec) {
          const Vec<S> w = xv[v];
#pragma unroll
          for (int j = 0; j < kN; ++j) vals[k][j] = to_acc(w.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < kN; ++j) vals[k][j] = -INFINITY;  // adds exp(-inf) = 0
        }
      }
      float m = -INFINITY;
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < kN; ++j) m = Math<float>::max(vals[k][j], m);
      }
      rescale<kEntropy>(st, Math<float>::max(m, st.m), c);
      const Shift<float> sh = make_shift(ref_point(st.m), c);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          accumulate<kEntropy>(st.s, st.t, scaled_diff(vals[k][j], sh, 0.0f));
        }
      }
    }
    st = Reduce(temp).Reduce(st, MergeOp<kEntropy, float>{c});
    if (threadIdx.x == 0) {
      const RowStats<float> r = finalize(st);
      p.row_max[row] = r.row_max;
      p.log_sum[row] = r.log_sum;
      if (kEntropy) p.entropy[row] = r.entropy;
      const float x_label = lab.kind == LabelKind::kLocal ? to_acc(x[lab.local]) : 0.0f;
      p.logp[row] = label_logp(lab.kind, x_label, r, c);
    }
    __syncthreads();  // the next row reuses `temp`
  }
}

template <class S, bool kEntropy>
cudaError_t launch_typed(const LogpsFwdParams& p, cudaStream_t stream) {
  const unsigned grid = row_grid(p.rows.B * p.rows.T);
  if (short_rows<S>(p.rows.V)) {
    logps_fwd_kernel<S, kEntropy, 128><<<grid, 128, 0, stream>>>(p);
  } else {
    logps_fwd_kernel<S, kEntropy, 512><<<grid, 512, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class S>
cudaError_t launch_dtype(const LogpsFwdParams& p, cudaStream_t stream) {
  return p.entropy ? launch_typed<S, true>(p, stream) : launch_typed<S, false>(p, stream);
}

}  // namespace

cudaError_t launch_logps_fwd(const LogpsFwdParams& p, cudaStream_t stream) {
  if (p.rows.B * p.rows.T == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return launch_dtype<float>(p, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_dtype<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdpo::cuda

// CUDA forward of the log-prob row contract: one block per row (grid-stride over rows), 16-byte
// loads, an online softmax state per thread (one rescale per kUnroll vectors), and one CUB block
// reduction whose operator merges (max, sum, sum p*z) states.
#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include "fastdpo/online_softmax.h"
#include "kernel_utils.cuh"
#include "logps_cuda.h"

namespace fastdpo::cuda {
namespace {


template <class S, bool kEntropy, int kBlock>
__global__ void __launch_bounds__(kBlock, 1) logps_fwd_kernel(const LogpsFwdParams p) {
  using A = typename AccOf<S>::type;
  using State = SoftmaxState<A>;
  using Reduce = cub::BlockReduce<State, kBlock>;
  constexpr int kN = Vec<S>::kN;
  constexpr int kUnroll = kUnrollOf<S>;
  __shared__ typename Reduce::TempStorage temp;

  const int64_t rows = p.rows.B * p.rows.T;
  const int64_t V = p.rows.V;
  const A inv_temp = static_cast<A>(p.inv_temp);
  const S* logits = static_cast<const S*>(p.logits);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    // Uniform across the block, so every thread reaches (or skips) the reduction together.
    int64_t b, t;
    split_index(row, p.rows.T, b, t);
    const LabelInfo lab = classify_label(p.labels.at(b, t), p.rule, V);
    if (lab.kind == LabelKind::kIgnored) {
      if (threadIdx.x == 0) {
        p.logp[row] = 0.0f;
        p.lse[row] = 0.0f;
        if (kEntropy) p.entropy[row] = 0.0f;
      }
      continue;
    }
    const S* x = logits + p.rows.offset(b, t);
    const RowSplit sp = split_row<S>(reinterpret_cast<uintptr_t>(x), V);
    State st = state_init<A>();
    for (int64_t i = threadIdx.x; i < sp.head; i += kBlock) {
      update<kEntropy>(st, to_acc(x[i]) * inv_temp);
    }
    for (int64_t i = sp.tail_begin + threadIdx.x; i < V; i += kBlock) {
      update<kEntropy>(st, to_acc(x[i]) * inv_temp);
    }
    const Vec<S>* xv = reinterpret_cast<const Vec<S>*>(x + sp.head);
    for (int64_t v0 = threadIdx.x; v0 < sp.nvec; v0 += int64_t{kBlock} * kUnroll) {
      A vals[kUnroll][kN];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t v = v0 + int64_t{k} * kBlock;
        if (v < sp.nvec) {
          const Vec<S> w = xv[v];
#pragma unroll
          for (int j = 0; j < kN; ++j) vals[k][j] = to_acc(w.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < kN; ++j) vals[k][j] = A(-INFINITY);  // adds exp(-inf) = 0
        }
      }
      A m = A(-INFINITY);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < kN; ++j) m = Math<A>::max(vals[k][j], m);
      }
      // inv_temp > 0, so the max of x / T is (max x) / T.
      rescale<kEntropy>(st, Math<A>::max(m * inv_temp, st.m));
      const A neg_ref = A(0) - ref_point(st.m);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
#pragma unroll
        for (int j = 0; j < kN; ++j) {
          accumulate<kEntropy>(st.s, st.t, Math<A>::fma(vals[k][j], inv_temp, neg_ref));
        }
      }
    }
    st = Reduce(temp).Reduce(st, MergeOp<kEntropy>{});
    if (threadIdx.x == 0) {
      A lse, ent;
      finalize(st, lse, ent);
      p.lse[row] = static_cast<float>(lse);
      if (kEntropy) p.entropy[row] = static_cast<float>(ent);
      const A z_label = lab.kind == LabelKind::kLocal ? to_acc(x[lab.local]) * inv_temp : A(0);
      p.logp[row] = lab.kind == LabelKind::kInvalid ? __int_as_float(0x7fc00000)
                                                    : static_cast<float>(z_label - lse);
    }
    __syncthreads();  // the next row reuses `temp`
  }
}

template <class S, bool kEntropy>
cudaError_t launch_typed(const LogpsFwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.rows.B * p.rows.T;
  const unsigned grid = static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
  // Short rows: a small block keeps most threads busy.
  if (p.rows.V * static_cast<int64_t>(sizeof(S)) <= 8192) {
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
    case DType::kFloat64: return launch_dtype<double>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdpo::cuda

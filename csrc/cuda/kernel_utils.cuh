// Device helpers shared by the CUDA kernels: storage <-> accumulator conversion and the 16-byte
// vector view of a row (aligned body, scalar head and tail).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "fastdpo/params.h"

namespace fastdpo::cuda {

// Logits are fp32/bf16/fp16 and every kernel computes in fp32.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <class S> __device__ __forceinline__ S from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}

// Blocks per launch; kernels loop over rows beyond it.
constexpr int64_t kMaxGrid = int64_t{1} << 30;

// Launch shape of the row kernels (one block a row): the grid, and whether a row is short enough
// (<= 8 KiB) that a 128-thread block keeps most threads busy; longer rows take 512 threads.
inline unsigned row_grid(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
}
template <class S>
inline bool short_rows(int64_t V) { return V * static_cast<int64_t>(sizeof(S)) <= 8192; }

// (b, t) of a row. The glue checks B * T < 2^31, so 32-bit division (inline, where 64-bit division
// is a called subroutine that costs registers) is exact.
__device__ __forceinline__ void split_index(int64_t row, int64_t T, int64_t& b, int64_t& t) {
  const uint32_t r = static_cast<uint32_t>(row), tt = static_cast<uint32_t>(T);
  const uint32_t q = r / tt;
  b = q;
  t = r - q * tt;
}

// 16-byte vectors in flight per thread.
constexpr int kUnroll = 4;

// 16 bytes of S: one 128-bit load or store.
template <class S>
struct alignas(16) Vec {
  static constexpr int kN = 16 / static_cast<int>(sizeof(S));
  S v[kN];
};

// A row split as [0, head) scalar, [head, head + nvec * kN) 16-byte vectors, the rest scalar.
struct RowSplit {
  int64_t head, nvec, tail_begin;
};

// `addr` is the row's start; head elements bring it to a 16-byte boundary. Rows whose address is
// not a multiple of the element size (never produced by torch) get no vector body at all.
template <class S>
__device__ __forceinline__ RowSplit split_row(uintptr_t addr, int64_t V) {
  constexpr int64_t kN = Vec<S>::kN;
  if (addr % sizeof(S) != 0) return RowSplit{V, 0, V};
  int64_t head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(S));
  if (head > V) head = V;
  const int64_t nvec = (V - head) / kN;
  return RowSplit{head, nvec, head + nvec * kN};
}

}  // namespace fastdpo::cuda

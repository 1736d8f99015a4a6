// CPU kernels of the log-prob row contract over a range of rows [row_begin, row_end): the AVX2+FMA
// kernels and the portable scalar ones (fp32/bf16/fp16 logits, fp32 math, no fp64). The
// glue (csrc/ops.cpp) splits rows across threads and picks the kernel from the CPU's features.
#pragma once

#include <cstdint>

#include "fastdpo/params.h"

namespace fastdpo::cpu {

// Whether this CPU runs the AVX2 kernels (AVX2, FMA and F16C).
bool avx2_supported();

void logps_fwd_rows_avx2(const LogpsFwdParams& p, int64_t row_begin, int64_t row_end);
void logps_bwd_rows_avx2(const LogpsBwdParams& p, int64_t row_begin, int64_t row_end);

void logps_fwd_rows_generic(const LogpsFwdParams& p, int64_t row_begin, int64_t row_end);
void logps_bwd_rows_generic(const LogpsBwdParams& p, int64_t row_begin, int64_t row_end);

// One block of a row for the CPU fused LM head's per-block statistics (linear_cpu.cpp): the max
// of x (NaN skipped), and the sum of exp(d_j), d_j = (x_j - ref) c; with t, also
// *t = sum exp(d_j) d_j (d clamped below at kLowestExpArg, as online_softmax.h's accumulate);
// with out (may be x), out_j <- exp(d_j) * out_scale. The sums do not depend on out.
float block_max_avx2(const float* x, int64_t n);
float block_exp_avx2(const float* x, float* out, int64_t n, float ref, float c, float* t,
                     float out_scale);
float block_max_generic(const float* x, int64_t n);
float block_exp_generic(const float* x, float* out, int64_t n, float ref, float c, float* t,
                        float out_scale);

// Test hooks, exposed through the pybind module: the AVX2 exp, and the round trip of fp32 values
// through a storage dtype (AVX2 store/load, and the scalar conversions). Callers check
// avx2_supported() before the AVX2 ones.
void exp_avx2(const float* in, float* out, int64_t n);
void round_trip_avx2(const float* in, float* out, int64_t n, DType dtype);
void round_trip_generic(const float* in, float* out, int64_t n, DType dtype);

}  // namespace fastdpo::cpu

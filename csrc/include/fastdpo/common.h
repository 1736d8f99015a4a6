// Torch-free building blocks shared by the CPU and CUDA kernels: the host/device macro and the
// math policy the generic softmax code is written against.
//
// The generic functions in online_softmax.h and logps_grad.h are templates over a value type T and
// use only +, -, *, the constructor T(float) and the static functions of Math<T>. float and double
// get Math here; the CPU kernel adds an 8-lane AVX2 type with the same functions, so one formula
// serves a CUDA thread, a scalar test and a vector of lanes alike.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDPO_HOST_DEVICE __host__ __device__
#define FASTDPO_INLINE __forceinline__
#else
#define FASTDPO_HOST_DEVICE
#define FASTDPO_INLINE inline __attribute__((always_inline))
#endif

namespace fastdpo {

// exp(d) is exactly 0 in fp32 and fp64 for d below this, so clamping d here changes no sum but
// keeps 0 * d finite when d is -inf (masked logits).
constexpr float kLowestExpArg = -1.0e4f;

template <class T>
struct Math;  // max, is_neg_inf, select, fma, exp, log

template <class T>
struct ScalarMath {
  using Mask = bool;
  // (a > b) ? a : b, the semantics of x86 maxps: a NaN in `a` yields `b`. Nothing relies on a NaN
  // surviving max: a NaN logit still reaches the sum through exp(NaN - max).
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE T max(T a, T b) { return a > b ? a : b; }
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE bool is_neg_inf(T x) { return x == -T(INFINITY); }
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE T select(bool mask, T a, T b) { return mask ? a : b; }
};

// Math<float> and Math<double> differ only in the device intrinsics they call.
template <>
struct Math<float> : ScalarMath<float> {
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  }
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE float exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);  // ex2.approx: arguments here are <= 0, where it is within a few ulp
#else
    return std::exp(x);
#endif
  }
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE float log(float x) {
#if defined(__CUDA_ARCH__)
    return ::logf(x);
#else
    return std::log(x);
#endif
  }
};

template <>
struct Math<double> : ScalarMath<double> {
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE double fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
    return __fma_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  }
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE double exp(double x) {
#if defined(__CUDA_ARCH__)
    return ::exp(x);
#else
    return std::exp(x);
#endif
  }
  static FASTDPO_HOST_DEVICE FASTDPO_INLINE double log(double x) {
#if defined(__CUDA_ARCH__)
    return ::log(x);
#else
    return std::log(x);
#endif
  }
};

}  // namespace fastdpo

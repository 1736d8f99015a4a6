// Storage types of the logits as the CPU kernels see them (torch-free), and scalar conversions to
// and from the fp32 accumulator: round to nearest even, NaN kept NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastdpo::cpu {

struct BF16 { uint16_t bits; };
struct FP16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_acc(float x) { return x; }
inline float to_acc(BF16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_acc(FP16 x) {
  const uint32_t sign = (x.bits & 0x8000u) ? 1u : 0u;
  const int exp = (x.bits >> 10) & 0x1f;
  const int man = x.bits & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);              // zero / subnormal
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(man + 1024), exp - 25);
  return sign ? -v : v;
}

template <class S> inline S from_acc(float v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline BF16 from_acc<BF16>(float v) {
  uint32_t u = float_to_bits(v);
  if (std::isnan(v)) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}
template <> inline FP16 from_acc<FP16>(float v) {
  const uint32_t u = float_to_bits(v);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return FP16{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return FP16{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal count of 2^-24 units, rounded to even
    const float units = std::nearbyint(bits_to_float(a) * 16777216.0f);
    return FP16{static_cast<uint16_t>(sign | static_cast<uint16_t>(units))};
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias the exponent by -112, add the rounding bias
  return FP16{static_cast<uint16_t>(sign | (a >> 13))};
}

template <class S> inline S neg_inf_storage();
template <> inline float neg_inf_storage<float>() { return -INFINITY; }
template <> inline BF16 neg_inf_storage<BF16>() { return BF16{0xff80u}; }
template <> inline FP16 neg_inf_storage<FP16>() { return FP16{0xfc00u}; }

}  // namespace fastdpo::cpu

// Scalar bfloat16 / float16 <-> float32 conversions by bit manipulation, usable in any
// translation unit whatever its instruction-set flags (round to nearest even).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace llmk {

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_f32(sign);
  // subnormal half: value = man * 2^-24, exact in float
  float v = float(man) * (1.0f / 16777216.0f);
  return sign ? -v : v;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (u < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Adding 0.5 (2^-1) aligns the mantissa so float rounding gives the half subnormal bits.
    float a = bits_to_f32(u) + 0.5f;
    return uint16_t(sign | uint16_t(f32_to_bits(a) - 0x3f000000u));
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and round to nearest even
  return uint16_t(sign | uint16_t(u >> 13));
}

// Branch-free forms of f16_to_f32 / f32_to_f16 (the same bits for every input), for loops
// that the compiler should vectorize: every case is computed and the right one selected (the
// branchy forms kept float16 optimizer steps scalar, 17x slower than bfloat16 ones).
inline float f16_to_f32_select(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Normal and subnormal halves: the bits moved into float position are the value times
  // 2^-112 (a float subnormal for half subnormals), and scaling by 2^112 is exact.
  const uint32_t finite = f32_to_bits(bits_to_f32(em << 13) * 0x1p112f);
  const uint32_t special = 0x7f800000u | (em << 13);  // inf / NaN
  return bits_to_f32(sign | (em >= 0x7c00u ? special : finite));
}

inline uint16_t f32_to_f16_select(float f) {
  uint32_t u = f32_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  const uint32_t subnormal = f32_to_bits(bits_to_f32(u) + 0.5f) - 0x3f000000u;
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  uint32_t r = u < 0x38800000u ? subnormal : normal;
  r = u >= 0x477ff000u ? 0x7c00u : r;
  r = u > 0x7f800000u ? 0x7e00u : r;
  return uint16_t(sign | (r & 0xffffu));
}

// Checks the branch-free forms against the branchy ones: all halves, and floats around every
// rounding boundary. '' when they agree, else the first difference.
std::string half_conversions_selftest();

}  // namespace llmk

// One SIMD vocabulary for every CPU tier, written with GCC/Clang vector extensions.
// A tier's translation unit defines LLMK_VEC_BYTES (16, 32 or 64) and LLMK_ISA_NS (a
// namespace private to that tier) before including this file, and is compiled with that
// tier's -m flags, so the same kernel source becomes SSE/NEON, AVX2 or AVX-512 code.
// Everything here lives in the tier's namespace: no symbol is shared between tiers, so
// the linker can never pick an AVX-512 copy of a function for a generic caller.
#pragma once
#include <cstdint>
#include <cstring>

#include "../common/half.h"

#if !defined(LLMK_VEC_BYTES) || !defined(LLMK_ISA_NS)
#error "define LLMK_VEC_BYTES and LLMK_ISA_NS before including vec.h"
#endif

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LLMK_INLINE inline __attribute__((always_inline))

namespace llmk {
namespace LLMK_ISA_NS {

constexpr int W = LLMK_VEC_BYTES / 4;  // float lanes per vector
typedef float vf __attribute__((vector_size(LLMK_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(LLMK_VEC_BYTES)));

template <class T> LLMK_INLINE T min_(T a, T b) { return a < b ? a : b; }
template <class T> LLMK_INLINE T max_(T a, T b) { return a < b ? b : a; }
LLMK_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// s - 0 is exactly s (also for -0 and NaN), so this folds to a plain broadcast.
LLMK_INLINE vf splat(float s) { return s - vf{}; }
LLMK_INLINE vf loadu(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
LLMK_INLINE void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
LLMK_INLINE vf as_vf(vi v) { return (vf)v; }
LLMK_INLINE vi as_vi(vf v) { return (vi)v; }
LLMK_INLINE vf select(vi mask, vf a, vf b) { return as_vf((mask & as_vi(a)) | (~mask & as_vi(b))); }
LLMK_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));

// Horizontal reductions by halving (log2(W) shuffles), not a lane-by-lane scalar loop.
// hmax ignores NaN lanes; callers that must see NaN detect it elsewhere.
LLMK_INLINE v4f to_v4(vf v, bool want_max) {
#if LLMK_VEC_BYTES == 64
  v8f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  v8f hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  v8f a = want_max ? (lo > hi ? lo : hi) : lo + hi;
  v4f l4 = __builtin_shufflevector(a, a, 0, 1, 2, 3), h4 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return want_max ? (l4 > h4 ? l4 : h4) : l4 + h4;
#elif LLMK_VEC_BYTES == 32
  v4f l4 = __builtin_shufflevector(v, v, 0, 1, 2, 3), h4 = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return want_max ? (l4 > h4 ? l4 : h4) : l4 + h4;
#else
  return v;
#endif
}

LLMK_INLINE float hmax(vf v) {
  v4f a = to_v4(v, true);
  v4f b = __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a = a > b ? a : b;
  return a[0] > a[1] ? a[0] : a[1];
}

LLMK_INLINE float hsum(vf v) {
  v4f a = to_v4(v, false);
  a = a + __builtin_shufflevector(a, a, 2, 3, 0, 1);
  return a[0] + a[1];
}

// Lanes 0, 2, 4, ... (even) or 1, 3, 5, ... (odd) of a and b side by side.
LLMK_INLINE vf even_lanes(vf a, vf b) {
#if LLMK_VEC_BYTES == 64
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#elif LLMK_VEC_BYTES == 32
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
#else
  return __builtin_shufflevector(a, b, 0, 2, 4, 6);
#endif
}
LLMK_INLINE vf odd_lanes(vf a, vf b) {
#if LLMK_VEC_BYTES == 64
  return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#elif LLMK_VEC_BYTES == 32
  return __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#else
  return __builtin_shufflevector(a, b, 1, 3, 5, 7);
#endif
}
// out[j] = the sum of v[j]'s lanes for the W vectors v[0..W): W horizontal sums as one
// vector, by halving (each level adds the even and the odd lanes of two vectors side by side,
// so lane order is kept). Overwrites v.
LLMK_INLINE vf transpose_sums(vf* v) {
#pragma GCC unroll 8
  for (int n = W; n > 1; n /= 2)
#pragma GCC unroll 8
    for (int i = 0; i < n / 2; ++i)
      v[i] = even_lanes(v[2 * i], v[2 * i + 1]) + odd_lanes(v[2 * i], v[2 * i + 1]);
  return v[0];
}

// e^x, relative error ~2e-7 over the float range; exactly 0 below -87.3 (masked scores
// are -inf), NaN in gives NaN out.
LLMK_INLINE vf vexp(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.3365478515625f);
  vf xc = select(x > hi, hi, x);
  xc = select(xc < lo, lo, xc);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = xc * splat(1.44269504088896341f) + magic;
  vf n = t - magic;
  vf r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.f / 720.f);
  p = p * r + splat(1.f / 120.f);
  p = p * r + splat(1.f / 24.f);
  p = p * r + splat(1.f / 6.f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf y = p * as_vf(e);
  return select(x < lo, vf{}, y);  // a NaN x fails every compare above and stays NaN
}

// 2^x for x <= 0, the softmax weights: relative error ~2e-7, exactly 0 below -126 (masked
// scores are -inf), NaN stays NaN. AVX-512's vscalefps applies 2^n (and underflows to 0)
// in one instruction; other tiers build 2^n from its exponent bits.
LLMK_INLINE vf vexp2_nonpos(vf x) {
  const vf lo = splat(-150.f);
  x = x < lo ? lo : x;  // keeps NaN: a NaN fails the compare
#if LLMK_VEC_BYTES == 64 && defined(__AVX512F__)
  const vf n = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x + magic) - magic;
#endif
  const vf f = x - n;  // in [-0.5, 0.5]
  // Degree-5 polynomial for 2^f with p(0) = 1, fitted here for minimal relative error on
  // [-0.5, 0.5] (iteratively reweighted least squares): 1.9e-7 evaluated in float32, less
  // than degree-6 Taylor's 2.4e-7, with one multiply-add fewer.
  vf p = splat(1.326472731307149e-3f);
  p = p * f + splat(9.671512991189957e-3f);
  p = p * f + splat(5.550733581185341e-2f);
  p = p * f + splat(2.4022242426872253e-1f);
  p = p * f + splat(6.931470036506653e-1f);
  p = p * f + splat(1.f);
#if LLMK_VEC_BYTES == 64 && defined(__AVX512F__)
  return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return select(n < splat(-126.f), vf{}, p * as_vf(e));
#endif
}

// tanh(x) = sign(x) (1 - 2 / (e^{2|x|} + 1)) from |x| = 0.625, and below it Cephes' tanhf
// polynomial x + x^3 P(x^2) (relative error ~1e-7). The first form alone cancels near 0: an
// absolute error ~1e-7 there, which softcap * tanh(u / softcap) multiplied by softcap (a
// float32 softcap of 1e4 gave errors 1600x torch's).
LLMK_INLINE vf vtanh(vf x) {
  const vi sign_bit = vi{} + int32_t(0x80000000u);
  vf ax = as_vf(as_vi(x) & ~sign_bit);
  vf e = vexp(ax + ax);
  vf t = splat(1.f) - splat(2.f) / (e + splat(1.f));
  const vf z = ax * ax;
  vf p = splat(-5.70498872745e-3f) * z + splat(2.06390887954e-2f);
  p = p * z - splat(5.37397155531e-2f);
  p = p * z + splat(1.33314422036e-1f);
  p = p * z - splat(3.33332819422e-1f);
  const vf small = p * z * ax + ax;
  t = select(ax < splat(0.625f), small, t);
  return as_vf(as_vi(t) | (as_vi(x) & sign_bit));
}

// Scalar element loads with conversion to float.
LLMK_INLINE float f16_scalar(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return f16_to_f32(h);
#endif
}

}  // namespace LLMK_ISA_NS
}  // namespace llmk

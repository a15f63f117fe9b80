// Per-tier element loops of the fused optimizers (compiled once per tier: see vec.h). The
// loops are plain scalar code over contiguous arrays, written so that the compiler
// vectorizes them for the tier's instruction set (float32 math, -fno-math-errno sqrt); where
// that vectorization measured poorly (AdamW8bit's block update and codes, bf16 SGD) AVX-512
// and AVX2 intrinsics do the same operations in the same order, so every tier gives the same
// bits (tests/test_optim*.py compare them).
// These files compile without FMA contraction: each operation rounds as torch's does (its
// lerp is the one fused multiply-add), so trajectories follow torch.optim's to a few ulps.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common/half.h"
#include "../common/hash32.h"
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "optim.h"

namespace llmk {
namespace LLMK_ISA_NS {

namespace {

// Round to nearest even, NaN kept quiet: half.h's f32_to_bf16 without its branch, so that
// the loops vectorize.
inline uint16_t to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  const uint32_t quiet = u | 0x400000u;
  return uint16_t(((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded) >> 16);
}

// Element i of a float32 (T = float), bfloat16 (uint16_t) or float16 (uint16_t, kHalf) array,
// as float32.
// (float16: half.h's branch-free conversions, so that the loops vectorize.)
template <class T, bool kHalf>
inline float ld(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else if constexpr (kHalf) return f16_to_f32_select(p[i]);
  else return bf16_to_f32(p[i]);
}
template <class T, bool kHalf>
inline void st(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) p[i] = v;
  else if constexpr (kHalf) p[i] = f32_to_f16_select(v);
  else p[i] = to_bf16(v);
}

// float16 arrays on tiers with F16C: converted 8 values per instruction into float32 copies of
// a chunk (in L1), the float32 loop runs on those, and the results are converted back. The
// same bits as the element-wise conversions, except NaN payloads (the instruction keeps them;
// f32_to_f16 makes every NaN 0x7e00).
constexpr int64_t kHalfChunk = 512;
#if defined(__F16C__)
constexpr bool kF16C = true;
inline void load_f16(const void* src, int64_t at, float* dst, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src) + at;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = f16_to_f32_select(s[i]);
}
inline void store_f16(const float* src, void* dst, int64_t at, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst) + at;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = f32_to_f16_select(src[i]);
}
#else
constexpr bool kF16C = false;
inline void load_f16(const void*, int64_t, float*, int64_t) {}
inline void store_f16(const float*, void*, int64_t, int64_t) {}
#endif

inline TensorView float_view(float* data) {
  TensorView v;
  v.data = data;
  v.dtype = DType::f32;
  return v;
}

// Stochastic rounding to bfloat16: add 16 random bits below the kept ones, then truncate,
// so that an update smaller than half a bf16 ulp still moves the parameter on average.
// The bits are murmur3's finalizer of (index * golden ratio + key): deterministic for a
// given seed, step and tensor, whatever the threading (the reference path computes the
// same stream with torch ops).
inline uint32_t sr_bits(int64_t i, uint32_t key) { return fmix32(uint32_t(i) * 0x9E3779B1u + key); }
inline uint16_t sr_bf16(float f, uint32_t bits) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t quiet = u | 0x400000u;
  const uint32_t noisy = u + (bits & 0xFFFFu);
  return uint16_t(((u & 0x7fffffffu) > 0x7f800000u ? quiet : noisy) >> 16);
}

#if defined(__AVX512F__)
// to_bf16 of 16 values by integer rounding, in the low 16 bits of each lane: round to nearest
// even, NaN kept quiet.
inline __m512i bf16_bits16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i q = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
  return _mm512_srli_epi32(_mm512_mask_mov_epi32(r, nan, q), 16);
}

// to_bf16 of 16 values.
inline __m256i to_bf16x16(__m512 x) {
#if defined(__AVX512BF16__)
  // The instruction rounds and quiets NaN as to_bf16 does, but flushes float32 denormals to
  // zero: vectors holding one (rare) take the integer path.
  if (_mm512_fpclass_ps_mask(x, 0x20) == 0)  // class 0x20: denormal
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#endif
  return _mm512_cvtepi32_epi16(bf16_bits16(x));
}

// 32 values as bfloat16 (to_bf16), lo's first. AVX512-BF16: one two-source conversion, which
// costs what one 16-value conversion does on Zen 4 (bfloat16 AdamW8bit, one thread, in cache:
// 0.69 -> 0.66 ns a value); either vector holding a denormal takes the integer path. That
// path packs both vectors' words at once (one pack and one permute for two narrowing moves).
inline void store_bf16x32(uint16_t* a, __m512 lo, __m512 hi) {
#if defined(__AVX512BF16__)
  if (_kortestz_mask16_u8(_mm512_fpclass_ps_mask(lo, 0x20), _mm512_fpclass_ps_mask(hi, 0x20))) {
    _mm512_storeu_si512(a, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    return;
  }
#endif
  // per 128-bit lane: lo's 4 words, hi's 4; the permute puts lo's quads first
  const __m512i words = _mm512_packus_epi32(bf16_bits16(lo), bf16_bits16(hi));
  const __m512i quads = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
  _mm512_storeu_si512(a, _mm512_permutexvar_epi64(quads, words));
}

// 16 values as float32 (load16.h) and back. Unmasked: masked memory operations cost ~10% of
// the 8-bit loop on Zen 4, so partial vectors go to the scalar loops.
#include "load16.h"
template <class T, bool kHalf>
inline void store16(T* a, __m512 x) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(a, x);
  } else {
    const __m256i h = kHalf ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                            : to_bf16x16(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), h);
  }
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2 loads and stores of 8 values as float32 (bfloat16: to_bf16's rounding).
template <class T, bool kHalf>
inline __m256 load8(const T* a) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(a);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  if constexpr (kHalf) return _mm256_cvtph_ps(h);
  else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// to_bf16 of 8 values, in the low 16 bits of each lane: round to nearest even, NaN kept quiet.
inline __m256i bf16_bits8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
  return _mm256_srli_epi32(_mm256_blendv_epi8(r, q, nan), 16);
}
template <class T, bool kHalf>
inline void store8(T* a, __m256 x) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(a, x);
    return;
  } else {
    __m128i h;
    if constexpr (kHalf) {
      h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m256i bits = bf16_bits8(x);
      // 8 x 16 bits, in lane order: packus keeps them (< 2^16), permute4x64 joins the halves
      h = _mm256_castsi256_si128(
          _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), _MM_SHUFFLE(3, 1, 2, 0)));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a), h);
  }
}

// 16 values as bfloat16, lo's first: one pack and one permute for both (AVX2 bfloat16 AdamW8bit,
// one thread, in cache: with bf16_bits8's NaN test, 0.99 -> 0.95 ns a value on a Zen 4).
inline void store_bf16x16(uint16_t* a, __m256 lo, __m256 hi) {
  // lanes: lo 0-3, hi 0-3, lo 4-7, hi 4-7; the permute puts lo's halves first
  const __m256i words = _mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a),
                      _mm256_permute4x64_epi64(words, _MM_SHUFFLE(3, 1, 2, 0)));
}

#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// The float vector of the tier and the few operations the intrinsics loops share, so that one
// loop body serves AVX-512 and AVX2 (each wrapper is one instruction).
struct Simd {
#if defined(__AVX512F__)
  using V = __m512;
  static constexpr int kW = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // std::max(a, b): b if a < b, else a (NaN: a)
  static V max_as_std(V a, V b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), a, b);
  }
  template <class T, bool kHalf> static V load(const T* p) { return load16<T, kHalf>(p); }
  template <class T, bool kHalf> static void store(T* p, V x) { store16<T, kHalf>(p, x); }
  // two vectors to p and p + kW
  template <class T, bool kHalf> static void store2(T* p, V lo, V hi) {
    if constexpr (std::is_same_v<T, uint16_t> && !kHalf) return store_bf16x32(p, lo, hi);
    store16<T, kHalf>(p, lo);
    store16<T, kHalf>(p + kW, hi);
  }
  // 2 kW values at p in pair order (see the AVX2 ones): here the natural one
  template <class T, bool kHalf> static void load_pair(const T* p, V& lo, V& hi) {
    lo = load16<T, kHalf>(p);
    hi = load16<T, kHalf>(p + kW);
  }
  template <class T, bool kHalf> static void store_pair(T* p, V lo, V hi) {
    store2<T, kHalf>(p, lo, hi);
  }
  static void storeu(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  // kW byte codes as floats
  static V from_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V from_u8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // running maxima of |x|'s bit patterns (for non-negative floats, the values' order)
  using I = __m512i;
  static I izero() { return _mm512_setzero_si512(); }
  static I max_abs_bits(I acc, V x) {
    return _mm512_max_epu32(acc, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  }
  static uint32_t hmax_bits(I acc) { return uint32_t(_mm512_reduce_max_epu32(acc)); }
#else
  using V = __m256;
  static constexpr int kW = 8;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max_as_std(V a, V b) { return _mm256_blendv_ps(a, b, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  template <class T, bool kHalf> static V load(const T* p) { return load8<T, kHalf>(p); }
  template <class T, bool kHalf> static void store(T* p, V x) { store8<T, kHalf>(p, x); }
  template <class T, bool kHalf> static void store2(T* p, V lo, V hi) {
    if constexpr (std::is_same_v<T, uint16_t> && !kHalf) return store_bf16x16(p, lo, hi);
    store8<T, kHalf>(p, lo);
    store8<T, kHalf>(p + kW, hi);
  }
  // 2 kW values at p in pair order, the same for loads and stores (elementwise loops only).
  // bfloat16: lo holds elements 0-3 and 8-11, hi 4-7 and 12-15, what one unpack of the
  // 16 values each gives, and the store's pack puts them back in place: 1 instruction a
  // vector each way instead of 2 (widen + shift, narrow + permute): see adam_vec, sgd_loop.
  template <class T, bool kHalf> static void load_pair(const T* p, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, uint16_t> && !kHalf) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), h));
      hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), h));
    } else {
      lo = load8<T, kHalf>(p);
      hi = load8<T, kHalf>(p + kW);
    }
  }
  template <class T, bool kHalf> static void store_pair(T* p, V lo, V hi) {
    if constexpr (std::is_same_v<T, uint16_t> && !kHalf) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi)));
    } else {
      store8<T, kHalf>(p, lo);
      store8<T, kHalf>(p + kW, hi);
    }
  }
  static void storeu(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V abs(V a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static V from_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V from_u8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  using I = __m256i;
  static I izero() { return _mm256_setzero_si256(); }
  static I max_abs_bits(I acc, V x) { return _mm256_max_epu32(acc, _mm256_castps_si256(abs(x))); }
  static uint32_t hmax_bits(I acc) {
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    uint32_t r = lanes[0];
    for (int i = 1; i < 8; ++i) r = std::max(r, lanes[i]);
    return r;
  }
#endif
};

// 16-bit parameters with moments of their dtype, rounded to nearest: the element loop in
// intrinsics, whole vectors from b on; returns where it stopped (the scalar loop does the
// rest). The compiler's vectorization of the 16-bit conversions left this loop compute-bound
// (one thread, 1M bf16 values: 0.79 ns each on AVX-512, 1.36 on AVX2). The same operations in
// the same order as the scalar loop below; max as std::max (the first operand unless the
// second is larger).
template <class T, bool kHalf, bool kDecoupled, bool kAmsgrad>
int64_t adam_vec(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
  using S = Simd;
  T* p = static_cast<T*>(t.param.data);
  const T* g = static_cast<const T*>(t.grad.data);
  T* m = static_cast<T*>(t.exp_avg.data);
  T* v = static_cast<T*>(t.exp_avg_sq.data);
  T* vmax = static_cast<T*>(t.max_exp_avg_sq.data);
  const S::V signed_inv_scale = S::set1(h.maximize ? -h.inv_grad_scale : h.inv_grad_scale);
  const S::V wd = S::set1(h.weight_decay), decay = S::set1(h.decay);
  const bool l2 = h.weight_decay != 0.f;  // see adam_loop
  const S::V b2 = S::set1(h.beta2), eps = S::set1(h.eps);
  const S::V one_m_b1 = S::set1(h.one_minus_beta1), one_m_b2 = S::set1(h.one_minus_beta2);
  const S::V neg_step = S::set1(-t.step_size), bc2 = S::set1(t.bias_correction2_sqrt);
  struct Vals { S::V p, g, m, v, vmax; };  // p, m, v, vmax: the new ones after update
  auto update = [&](Vals& a) {  // (vmax read only with amsgrad)
    S::V pi = a.p;
    S::V gi = S::mul(a.g, signed_inv_scale);
    if constexpr (kDecoupled) pi = S::mul(pi, decay);
    else if (l2) gi = S::fmadd(pi, wd, gi);
    S::V mi = a.m;
    mi = S::fmadd(one_m_b1, S::sub(gi, mi), mi);
    S::V vi = S::mul(a.v, b2);
    vi = S::add(vi, S::mul(S::mul(one_m_b2, gi), gi));
    S::V vd = vi;
    if constexpr (kAmsgrad) vd = S::max_as_std(a.vmax, vi);
    const S::V denom = S::add(S::div(S::sqrt(vd), bc2), eps);
    a = Vals{S::add(pi, S::mul(neg_step, S::div(mi, denom))), a.g, mi, vi, vd};
  };
  // Pairs of vectors in pair order (load_pair; AVX2 bf16, one thread, 64K values in cache on
  // a Zen 4: 0.86 -> 0.69 ns each), then a lone vector; the caller's scalar loop does the rest.
  int64_t i = b;
  for (; i + 2 * S::kW <= e; i += 2 * S::kW) {
    Vals lo, hi;
    S::load_pair<T, kHalf>(p + i, lo.p, hi.p);
    S::load_pair<T, kHalf>(g + i, lo.g, hi.g);
    S::load_pair<T, kHalf>(m + i, lo.m, hi.m);
    S::load_pair<T, kHalf>(v + i, lo.v, hi.v);
    if constexpr (kAmsgrad) S::load_pair<T, kHalf>(vmax + i, lo.vmax, hi.vmax);
    update(lo);
    update(hi);
    S::store_pair<T, kHalf>(p + i, lo.p, hi.p);
    S::store_pair<T, kHalf>(m + i, lo.m, hi.m);
    S::store_pair<T, kHalf>(v + i, lo.v, hi.v);
    if constexpr (kAmsgrad) S::store_pair<T, kHalf>(vmax + i, lo.vmax, hi.vmax);
  }
  for (; i + S::kW <= e; i += S::kW) {
    Vals a{S::load<T, kHalf>(p + i), S::load<T, kHalf>(g + i), S::load<T, kHalf>(m + i),
           S::load<T, kHalf>(v + i), kAmsgrad ? S::load<T, kHalf>(vmax + i) : S::V{}};
    update(a);
    S::store<T, kHalf>(p + i, a.p);
    S::store<T, kHalf>(m + i, a.m);
    S::store<T, kHalf>(v + i, a.v);
    if constexpr (kAmsgrad) S::store<T, kHalf>(vmax + i, a.vmax);
  }
  return i;
}
#endif

// The flags are template arguments so that each loop body is branch-free (vectorizable).
// kF32State: 16-bit parameters with float32 moments (AdamW8bit's small tensors).
template <class T, bool kHalf, bool kDecoupled, bool kAmsgrad, bool kSR = false,
          bool kF32State = false>
void adam_loop(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (!std::is_same_v<T, float> && !kSR && !kF32State) {
    b = adam_vec<T, kHalf, kDecoupled, kAmsgrad>(h, t, b, e);
    if (b == e) return;
  }
#endif
  if constexpr (kHalf && kF16C && !kSR) {
    float buf[5][kHalfChunk];
    for (int64_t c = b; c < e; c += kHalfChunk) {
      const int64_t n = std::min(kHalfChunk, e - c);
      AdamTensor f = t;
      f.param = float_view(buf[0]);
      f.grad = float_view(buf[1]);
      load_f16(t.param.data, c, buf[0], n);
      load_f16(t.grad.data, c, buf[1], n);
      if constexpr (kF32State) {  // float32 moments: used in place
        f.exp_avg = float_view(static_cast<float*>(t.exp_avg.data) + c);
        f.exp_avg_sq = float_view(static_cast<float*>(t.exp_avg_sq.data) + c);
        if (kAmsgrad) f.max_exp_avg_sq = float_view(static_cast<float*>(t.max_exp_avg_sq.data) + c);
      } else {
        f.exp_avg = float_view(buf[2]);
        f.exp_avg_sq = float_view(buf[3]);
        f.max_exp_avg_sq = float_view(buf[4]);
        load_f16(t.exp_avg.data, c, buf[2], n);
        load_f16(t.exp_avg_sq.data, c, buf[3], n);
        if (kAmsgrad) load_f16(t.max_exp_avg_sq.data, c, buf[4], n);
      }
      adam_loop<float, false, kDecoupled, kAmsgrad>(h, f, 0, n);
      store_f16(buf[0], t.param.data, c, n);
      if constexpr (!kF32State) {
        store_f16(buf[2], t.exp_avg.data, c, n);
        store_f16(buf[3], t.exp_avg_sq.data, c, n);
        if (kAmsgrad) store_f16(buf[4], t.max_exp_avg_sq.data, c, n);
      }
    }
    return;
  }
  using S = std::conditional_t<kF32State, float, T>;
  T* p = static_cast<T*>(t.param.data);
  const T* g = static_cast<const T*>(t.grad.data);
  S* m = static_cast<S*>(t.exp_avg.data);
  S* v = static_cast<S*>(t.exp_avg_sq.data);
  S* vmax = static_cast<S*>(t.max_exp_avg_sq.data);
  const float wd = h.weight_decay, b2 = h.beta2, eps = h.eps;
  // Adam's L2 term only when weight_decay != 0, as torch: p * 0 would turn an infinite
  // parameter's gradient into NaN (and a -0 gradient into +0).
  const bool l2 = wd != 0.f;
  const float one_m_b1 = h.one_minus_beta1, one_m_b2 = h.one_minus_beta2, decay = h.decay;
  const float step_size = t.step_size, bc2 = t.bias_correction2_sqrt;
  // g * inv_scale * sign in one multiply: negation commutes with rounding, same bits.
  const float signed_inv_scale = h.maximize ? -h.inv_grad_scale : h.inv_grad_scale;
  auto get = [](const T* a, int64_t i) { return ld<T, kHalf>(a, i); };
  auto put = [](T* a, int64_t i, float x) { st<T, kHalf>(a, i, x); };
  auto sget = [](const S* a, int64_t i) { return ld<S, kHalf && !kF32State>(a, i); };
  auto sput = [](S* a, int64_t i, float x) { st<S, kHalf && !kF32State>(a, i, x); };
  for (int64_t i = b; i < e; ++i) {
    float pi = get(p, i);
    float gi = get(g, i) * signed_inv_scale;
    if (kDecoupled) pi *= decay;
    else if (l2) gi = std::fma(pi, wd, gi);  // grad.add(param, alpha=wd)
    float mi = sget(m, i);
    mi = std::fma(one_m_b1, gi - mi, mi);  // torch's lerp (weight 1 - beta1 < 0.5)
    float vi = sget(v, i) * b2;
    vi = vi + (one_m_b2 * gi) * gi;  // addcmul: self + value * t1 * t2
    float vd = vi;
    if (kAmsgrad) {
      vd = std::max(sget(vmax, i), vi);
      sput(vmax, i, vd);
    }
    const float denom = std::sqrt(vd) / bc2 + eps;
    pi = pi + (-step_size) * (mi / denom);  // addcdiv
    if constexpr (kSR) reinterpret_cast<uint16_t*>(p)[i] = sr_bf16(pi, sr_bits(i, t.sr_key));
    else put(p, i, pi);
    sput(m, i, mi);
    sput(v, i, vi);
  }
}

template <class T, bool kHalf, bool kMomentum, bool kFirst, bool kNesterov, bool kSR = false>
void sgd_loop(const SgdHyper& h, const SgdTensor& t, int64_t b, int64_t e) {
  if constexpr (kHalf && kF16C && !kSR) {
    float buf[3][kHalfChunk];
    for (int64_t c = b; c < e; c += kHalfChunk) {
      const int64_t n = std::min(kHalfChunk, e - c);
      SgdTensor f = t;
      f.param = float_view(buf[0]);
      f.grad = float_view(buf[1]);
      f.momentum_buffer = float_view(buf[2]);
      load_f16(t.param.data, c, buf[0], n);
      load_f16(t.grad.data, c, buf[1], n);
      if (kMomentum && !kFirst) load_f16(t.momentum_buffer.data, c, buf[2], n);
      sgd_loop<float, false, kMomentum, kFirst, kNesterov>(h, f, 0, n);
      store_f16(buf[0], t.param.data, c, n);
      if (kMomentum) store_f16(buf[2], t.momentum_buffer.data, c, n);
    }
    return;
  }
  T* p = static_cast<T*>(t.param.data);
  const T* g = static_cast<const T*>(t.grad.data);
  T* buf = static_cast<T*>(t.momentum_buffer.data);
  const float lr = h.lr, wd = h.weight_decay, mom = h.momentum, damp = h.one_minus_dampening;
  const bool l2 = wd != 0.f;  // torch adds no decay term at all otherwise (see adam_loop)
  // g * inv_scale * sign in one multiply: negation commutes with rounding, same bits.
  const float signed_inv_scale = h.maximize ? -h.inv_grad_scale : h.inv_grad_scale;
  auto get = [](const T* a, int64_t i) { return ld<T, kHalf>(a, i); };
  auto put = [](T* a, int64_t i, float x) { st<T, kHalf>(a, i, x); };
  int64_t i = b;
#if defined(__AVX512F__) || defined(__AVX2__)
  // bfloat16 in intrinsics: the compiler's vectorization of the conversions left this loop
  // compute-bound (0.63x torch's fused SGD with AVX-512; one thread, 1M values, AVX2:
  // 0.66 -> 0.48 ns each). The same operations as the scalar loop.
  if constexpr (std::is_same_v<T, uint16_t> && !kHalf && !kSR) {
    using S = Simd;
    const S::V v_sis = S::set1(signed_inv_scale), v_wd = S::set1(wd);
    const S::V v_mom = S::set1(mom), v_damp = S::set1(damp), v_nlr = S::set1(-lr);
    // new parameter of pi, gi (and the buffer's bi, replaced by its new value)
    auto update = [&](S::V pi, S::V gi, S::V& bi) {
      S::V d = S::mul(gi, v_sis);
      if (l2) d = S::fmadd(pi, v_wd, d);
      if constexpr (kMomentum) {
        bi = kFirst ? d : S::fmadd(d, v_damp, S::mul(bi, v_mom));
        d = kNesterov ? S::fmadd(bi, v_mom, d) : bi;
      }
      return S::fmadd(d, v_nlr, pi);
    };
    // pairs of vectors in pair order (load_pair; one thread, 64K values with momentum in cache
    // on a Zen 4: AVX2 0.35 -> 0.25 ns each, AVX512-BF16 0.19 -> 0.16), then a lone vector
    for (; i + 2 * S::kW <= e; i += 2 * S::kW) {
      S::V p0, p1, g0, g1, b0{}, b1{};
      S::load_pair<T, false>(p + i, p0, p1);
      S::load_pair<T, false>(g + i, g0, g1);
      if (kMomentum && !kFirst) S::load_pair<T, false>(buf + i, b0, b1);
      p0 = update(p0, g0, b0);
      p1 = update(p1, g1, b1);
      if constexpr (kMomentum) S::store_pair<T, false>(buf + i, b0, b1);
      S::store_pair<T, false>(p + i, p0, p1);
    }
    for (; i + S::kW <= e; i += S::kW) {
      S::V bi = kMomentum && !kFirst ? S::load<T, false>(buf + i) : S::V{};
      const S::V pn = update(S::load<T, false>(p + i), S::load<T, false>(g + i), bi);
      if constexpr (kMomentum) S::store<T, false>(buf + i, bi);
      S::store<T, false>(p + i, pn);
    }
  }
#endif
  for (; i < e; ++i) {
    const float pi = get(p, i);
    float d = get(g, i) * signed_inv_scale;
    if (l2) d = std::fma(pi, wd, d);  // grad.add(param, alpha=wd)
    if (kMomentum) {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      const float bi = kFirst ? d : std::fma(d, damp, get(buf, i) * mom);
      put(buf, i, bi);
      d = kNesterov ? std::fma(bi, mom, d) : bi;
    }
    const float pn = std::fma(d, -lr, pi);  // param.add_(grad, alpha=-lr)
    if constexpr (kSR) reinterpret_cast<uint16_t*>(p)[i] = sr_bf16(pn, sr_bits(i, t.sr_key));
    else put(p, i, pn);
  }
}

// 8-bit moment codes: the integer nearest (halves up) the square root of y = x * k.
// m codes are exact: c = f + (y >= (f + 1/2)^2) with f = floor(s) is exact for any s within
// 1/2 of sqrt(y) (the squares are exact in float32 up to 2^24), so each tier takes its
// cheapest estimate (AVX-512's 14-bit reciprocal square root, a sixth of the cost of a
// correctly rounded square root). v codes are int(sqrt(y) + 1/2) of the correctly rounded
// square root, which keeps AVX-512's otherwise idle divider busy in this loop. Every tier, the
// GPU kernels and the reference path agree bit for bit.
constexpr float kMCodeSq = 127.f * 127.f, kVCodeSq = 255.f * 255.f;
constexpr float kMUnit = 1.f / kMCodeSq, kVUnit = 1.f / kVCodeSq;

// m codes come from y = (|m| * pre) * m_k, m_k = (1 / (m_max * pre)) * 127^2: pre = 2^64 for
// blocks whose absmax is below 2^-64 (else 1, an exact no-op), where 1 / m_max * 127^2 would
// overflow (m_max < ~4.7e-35) and every path coded the infinite y its own way. Powers of two
// scale exactly, denormals included. (v's factor cannot overflow: sqrt(v_max) >= ~3.7e-23.)
constexpr float kTinyMax = 0x1p-64f, kTinyPre = 0x1p64f;

// y below 1/4 (and NaN) gives 0; y never exceeds max_code^2 by more than a few ulps.
inline int sqrt_code(float y, float s, int max_code) {
  if (!(y >= 0.25f)) return 0;
  const float f = std::floor(s), t = f + 0.5f;
  return std::min(int(f) + (y >= t * t ? 1 : 0), max_code);
}

// NaN and infinity give 0 (as the vector conversion's 0x80000000 does in its low byte).
inline int rounded_sqrt_code(float y) {
  if (!(y >= 0.f && y < 65536.f)) return 0;
  return std::min(int(std::sqrt(y) + 0.5f), 255);
}

// m codes (signed: m's sign) from (|m| * m_pre) * m_k, v codes from sqrt(v) * v_k, for len
// values. kPre: m_pre != 1 (tiny blocks only; otherwise the multiply is skipped, same bits).
template <bool kPre>
void encode_moments(const float* m, const float* root_v, int64_t len, float m_pre, float m_k,
                    float v_k, int8_t* mq, uint8_t* vq) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 mpre = _mm512_set1_ps(m_pre), mk = _mm512_set1_ps(m_k), vk = _mm512_set1_ps(v_k);
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
  // y = 0 or NaN: s is NaN, and so is f; its conversion, 0x80000000, keeps 0 as low byte: the
  // scalar code's 0. Finite y stays below (max_code + 1/2)^2: no clamp needed.
  auto code = [&](__m512 y) {
    const __m512 s = _mm512_mul_ps(y, _mm512_rsqrt14_ps(y));
    __m512 f = _mm512_roundscale_ps(s, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 t = _mm512_add_ps(f, half);
    f = _mm512_mask_add_ps(f, _mm512_cmp_ps_mask(y, _mm512_mul_ps(t, t), _CMP_GE_OQ), f, one);
    return _mm512_cvttps_epi32(f);
  };
  for (; k + 16 <= len; k += 16) {
    const __m512 mv = _mm512_loadu_ps(m + k);
    const __m512 am = _mm512_abs_ps(mv);
    __m512i cm = code(_mm512_mul_ps(kPre ? _mm512_mul_ps(am, mpre) : am, mk));
    cm = _mm512_mask_sub_epi32(cm, _mm512_cmp_ps_mask(mv, _mm512_setzero_ps(), _CMP_LT_OQ),
                               _mm512_setzero_si512(), cm);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(mq + k), _mm512_cvtepi32_epi8(cm));
    const __m512 yv = _mm512_mul_ps(_mm512_loadu_ps(root_v + k), vk);
    const __m512i cv = _mm512_cvttps_epi32(_mm512_add_ps(_mm512_sqrt_ps(yv), half));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(vq + k), _mm512_cvtepi32_epi8(cv));
  }
#elif defined(__AVX2__)
  // 32 values at a time, their 32-bit codes packed to bytes with saturating packs (the
  // compiler's vectorization of the scalar loop took twice the instructions).
  const __m256 mpre = _mm256_set1_ps(m_pre), mk = _mm256_set1_ps(m_k), vk = _mm256_set1_ps(v_k);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 quarter = _mm256_set1_ps(0.25f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lanes
  auto m_code = [&](int64_t at) {  // 8 signed codes; 0 for y < 1/4 and NaN, as sqrt_code
    const __m256 mv = _mm256_loadu_ps(m + at);
    const __m256 am = _mm256_and_ps(mv, abs_mask);
    const __m256 y = _mm256_mul_ps(kPre ? _mm256_mul_ps(am, mpre) : am, mk);
    __m256 f = _mm256_floor_ps(_mm256_mul_ps(y, _mm256_rsqrt_ps(y)));  // within 1/2 of sqrt(y)
    const __m256 t = _mm256_add_ps(f, half);
    f = _mm256_add_ps(f, _mm256_and_ps(_mm256_cmp_ps(y, _mm256_mul_ps(t, t), _CMP_GE_OQ), one));
    f = _mm256_and_ps(f, _mm256_cmp_ps(y, quarter, _CMP_GE_OQ));
    // m's sign: negated where its sign bit is set (m = 0 has code 0 either way)
    return _mm256_sign_epi32(_mm256_cvttps_epi32(f), _mm256_castps_si256(mv));
  };
  // v codes: NaN and infinity convert to 0x80000000, which the unsigned packs make 0 (as
  // rounded_sqrt_code does).
  auto v_code = [&](int64_t at) {
    const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(root_v + at), vk);
    return _mm256_cvttps_epi32(_mm256_add_ps(_mm256_sqrt_ps(y), half));
  };
  for (; k + 32 <= len; k += 32) {
    const __m256i m16a = _mm256_packs_epi32(m_code(k), m_code(k + 8));
    const __m256i m16b = _mm256_packs_epi32(m_code(k + 16), m_code(k + 24));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(mq + k),
                        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(m16a, m16b), order));
    const __m256i v16a = _mm256_packus_epi32(v_code(k), v_code(k + 8));
    const __m256i v16b = _mm256_packus_epi32(v_code(k + 16), v_code(k + 24));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(vq + k),
                        _mm256_permutevar8x32_epi32(_mm256_packus_epi16(v16a, v16b), order));
  }
#endif
  for (; k < len; ++k) {
    const float ym = (kPre ? std::fabs(m[k]) * m_pre : std::fabs(m[k])) * m_k;
    const float yv = root_v[k] * v_k;
    const int cm = sqrt_code(ym, std::sqrt(ym), 127);
    mq[k] = int8_t(m[k] < 0.f ? -cm : cm);
    vq[k] = uint8_t(rounded_sqrt_code(yv));
  }
}

// The per-block constants of the vector block updates.
struct BlockConsts {
  float m_unit, v_unit_b2, signed_inv_scale, decay, wd, one_m_b1, one_m_b2, inv_bc2, eps,
      step_size;
};

#if defined(__AVX512F__) || defined(__AVX2__)
// One block's update in intrinsics, whole vectors only (the caller's scalar loop does the
// rest: masked stores are slow on AMD), with the same float32 operations in the same order as
// that loop (so the same bits as every other tier); the compiler's vectorization of it spent
// ~15% more instructions (byte codes widened in steps, 16-bit values converted through
// buffers). m and root_v receive the new m and sqrt(v); m_bits / v_bits the running maxima of
// |m| and v as bit patterns. Returns the number of values done.
template <class T, bool kHalf, bool kDecoupled, bool kScaled>
inline int64_t block_update_vec(const BlockConsts& c, T* p, const T* g, const int8_t* mq,
                                const uint8_t* vq, int64_t len, float* m, float* root_v,
                                uint32_t& m_bits, uint32_t& v_bits) {
  using S = Simd;
  const S::V m_unit = S::set1(c.m_unit), v_unit_b2 = S::set1(c.v_unit_b2);
  const S::V sis = S::set1(c.signed_inv_scale), decay = S::set1(c.decay), wd = S::set1(c.wd);
  const S::V one_m_b1 = S::set1(c.one_m_b1), one_m_b2 = S::set1(c.one_m_b2);
  const S::V inv_bc2 = S::set1(c.inv_bc2), eps = S::set1(c.eps);
  const S::V neg_step = S::set1(-c.step_size);
  S::I mmax = S::izero(), vmax = S::izero();
  // The new parameters of the kW values at k.
  auto update = [&](int64_t k) {
    const S::V cq = S::from_i8(mq + k), uq = S::from_u8(vq + k);
    S::V mi = S::mul(S::mul(cq, S::abs(cq)), m_unit);
    const S::V uu = S::mul(uq, uq);
    S::V vi = S::mul(S::mul(uu, uu), v_unit_b2);  // beta2 * v
    S::V pi = S::load<T, kHalf>(p + k);
    S::V gi = S::load<T, kHalf>(g + k);
    if constexpr (kScaled) gi = S::mul(gi, sis);
    if constexpr (kDecoupled) pi = S::mul(pi, decay);
    else if (c.wd != 0.f) gi = S::fmadd(pi, wd, gi);
    mi = S::fmadd(one_m_b1, S::sub(gi, mi), mi);
    vi = S::add(vi, S::mul(S::mul(one_m_b2, gi), gi));
    const S::V rv = S::sqrt(vi);
    const S::V denom = S::add(S::mul(rv, inv_bc2), eps);
    S::storeu(m + k, mi);
    S::storeu(root_v + k, rv);
    mmax = S::max_abs_bits(mmax, mi);
    vmax = S::max_abs_bits(vmax, vi);
    return S::add(pi, S::mul(neg_step, S::div(mi, denom)));
  };
  int64_t k = 0;
  for (; k + 2 * S::kW <= len; k += 2 * S::kW) {  // pairs: see store2
    const S::V lo = update(k);
    S::store2<T, kHalf>(p + k, lo, update(k + S::kW));
  }
  for (; k + S::kW <= len; k += S::kW) S::store<T, kHalf>(p + k, update(k));
  m_bits = std::max(m_bits, S::hmax_bits(mmax));
  v_bits = std::max(v_bits, S::hmax_bits(vmax));
  return k;
}
#endif

template <class T, bool kHalf, bool kDecoupled, bool kScaled>
void adam8bit_loop(const AdamHyper& h, const Adam8bitTensor& t, int64_t b0, int64_t b1) {
  T* p = static_cast<T*>(t.param.data);
  const T* g = static_cast<const T*>(t.grad.data);
  int8_t* mq = static_cast<int8_t*>(t.m_codes.data);
  uint8_t* vq = static_cast<uint8_t*>(t.v_codes.data);
  float* ms = static_cast<float*>(t.m_scales.data);
  float* vs = static_cast<float*>(t.v_scales.data);
  const int64_t n = t.param.sizes[0];
  const float wd = h.weight_decay, b2 = h.beta2, eps = h.eps;
  const float one_m_b1 = h.one_minus_beta1, one_m_b2 = h.one_minus_beta2, decay = h.decay;
  const float step_size = t.step_size, bc2 = t.bias_correction2_sqrt;
  // g * inv_scale * sign in one multiply: negation commutes with rounding, same bits.
  const float signed_inv_scale = h.maximize ? -h.inv_grad_scale : h.inv_grad_scale;
  [[maybe_unused]] auto get = [](const T* a, int64_t i) { return ld<T, kHalf>(a, i); };
  [[maybe_unused]] auto put = [](T* a, int64_t i, float x) { st<T, kHalf>(a, i, x); };
  const float inv_bc2 = 1.f / bc2;
  // Blocks are software-pipelined: block b's codes are written after block b + 1's update, so
  // that the latency of b's maxima, reciprocal and square root (~50 cycles before its codes
  // can start) overlaps with b + 1's work. Two buffers of new m and sqrt(v) alternate.
  float m_buf[2][kBlock8], root_v_buf[2][kBlock8];
  struct Pending {
    int64_t blk = -1, len = 0;
    float m_pre = 1.f, m_k = 0.f, v_k = 0.f;
  } pending;
  auto flush = [&] {
    if (pending.blk < 0) return;
    const int64_t at = pending.blk * kBlock8;
    (pending.m_pre != 1.f ? encode_moments<true> : encode_moments<false>)(
        m_buf[pending.blk & 1], root_v_buf[pending.blk & 1], pending.len, pending.m_pre,
        pending.m_k, pending.v_k, mq + at, vq + at);
  };
  // float16 on F16C tiers: the block's parameters and gradients converted 8 at a time.
  constexpr bool kBlockF16 = kHalf && kF16C;
  [[maybe_unused]] float pf[kBlockF16 ? kBlock8 : 1], gf[kBlockF16 ? kBlock8 : 1];
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t base = blk * kBlock8, len = std::min(kBlock8, n - base);
    float* m = m_buf[blk & 1];
    float* root_v = root_v_buf[blk & 1];
    // Decoding: m = c|c| * scale / 127^2, v = (u^2)^2 * scale / 255^4 (c|c| and u^2 exact),
    // v times beta2 folded into its unit.
    // Block maxima on the bit patterns: for non-negative floats their order is the values'
    // order, and integer max reductions vectorize (float ones need -ffinite-math-only).
    const float m_unit = ms[blk] * kMUnit, v_unit_b2 = ((vs[blk] * kVUnit) * kVUnit) * b2;
    uint32_t m_bits = 0, v_bits = 0;
    int64_t k0 = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
    const BlockConsts consts{m_unit, v_unit_b2, signed_inv_scale, decay, wd, one_m_b1,
                             one_m_b2, inv_bc2, eps, step_size};
    k0 = block_update_vec<T, kHalf, kDecoupled, kScaled>(consts, p + base, g + base, mq + base,
                                                         vq + base, len, m, root_v, m_bits,
                                                         v_bits);
    constexpr bool kBufferF16 = false;  // the rest (under a vector) converts element-wise
#else
    constexpr bool kBufferF16 = kBlockF16;
#endif
    if constexpr (kBufferF16) {
      load_f16(t.param.data, base, pf, len);
      load_f16(t.grad.data, base, gf, len);
    }
    for (int64_t k = k0; k < len; ++k) {
      const int64_t i = base + k;
      const float c = float(mq[i]), u = float(vq[i]);
      float mi = (c * std::fabs(c)) * m_unit, vi = ((u * u) * (u * u)) * v_unit_b2;
      float pi = kBufferF16 ? pf[k] : get(p, i);
      float gi = kBufferF16 ? gf[k] : get(g, i);
      if constexpr (kScaled) gi *= signed_inv_scale;
      if (kDecoupled) pi *= decay;
      else if (wd != 0.f) gi = std::fma(pi, wd, gi);
      mi = std::fma(one_m_b1, gi - mi, mi);
      vi = vi + (one_m_b2 * gi) * gi;
      const float rv = std::sqrt(vi);
      const float denom = rv * inv_bc2 + eps;
      const float pn = pi + (-step_size) * (mi / denom);
      if constexpr (kBufferF16) pf[k] = pn;
      else put(p, i, pn);
      m[k] = mi;
      root_v[k] = rv;
      m_bits = std::max(m_bits, f32_to_bits(mi) & 0x7fffffffu);
      v_bits = std::max(v_bits, f32_to_bits(vi) & 0x7fffffffu);
    }
    if constexpr (kBufferF16) store_f16(pf, t.param.data, base, len);
    flush();  // the previous block's codes (its buffers are not this block's)
    const float m_max = bits_to_f32(m_bits), v_max = bits_to_f32(v_bits);
    // Requantize against the block's new absmax: codes are the square root of m / m_max and
    // the fourth root of v / v_max (the square root of sqrt(v) / sqrt(v_max)), scaled.
    pending.blk = blk;
    pending.len = len;
    pending.m_pre = m_max < kTinyMax ? kTinyPre : 1.f;
    pending.m_k = m_max > 0.f ? (1.f / (m_max * pending.m_pre)) * kMCodeSq : 0.f;
    pending.v_k = v_max > 0.f ? (1.f / std::sqrt(v_max)) * kVCodeSq : 0.f;
    ms[blk] = m_max;
    vs[blk] = v_max;
  }
  flush();
}

template <class T, bool kHalf, bool kDecoupled>
void adam8bit_scaled(const AdamHyper& h, const Adam8bitTensor& t, int64_t b0, int64_t b1) {
  if (h.inv_grad_scale == 1.f && !h.maximize) adam8bit_loop<T, kHalf, kDecoupled, false>(h, t, b0, b1);
  else adam8bit_loop<T, kHalf, kDecoupled, true>(h, t, b0, b1);
}

}  // namespace

template <class T, bool kHalf, bool kSR = false, bool kF32 = false>
void adam_flags(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
  if (h.decoupled) {
    if (h.amsgrad) adam_loop<T, kHalf, true, true, kSR, kF32>(h, t, b, e);
    else adam_loop<T, kHalf, true, false, kSR, kF32>(h, t, b, e);
  } else {
    if (h.amsgrad) adam_loop<T, kHalf, false, true, kSR, kF32>(h, t, b, e);
    else adam_loop<T, kHalf, false, false, kSR, kF32>(h, t, b, e);
  }
}

template <class T, bool kHalf, bool kSR = false>
void sgd_flags(const SgdHyper& h, const SgdTensor& t, int64_t b, int64_t e) {
  if (h.momentum == 0.f) return sgd_loop<T, kHalf, false, false, false, kSR>(h, t, b, e);
  if (t.first_step) {
    if (h.nesterov) sgd_loop<T, kHalf, true, true, true, kSR>(h, t, b, e);
    else sgd_loop<T, kHalf, true, true, false, kSR>(h, t, b, e);
  } else {
    if (h.nesterov) sgd_loop<T, kHalf, true, false, true, kSR>(h, t, b, e);
    else sgd_loop<T, kHalf, true, false, false, kSR>(h, t, b, e);
  }
}

void adam8bit_blocks(const AdamHyper& h, const Adam8bitTensor& t, int64_t b0, int64_t b1) {
  switch (t.param.dtype) {
    case DType::f32:
      return h.decoupled ? adam8bit_scaled<float, false, true>(h, t, b0, b1)
                         : adam8bit_scaled<float, false, false>(h, t, b0, b1);
    case DType::bf16:
      return h.decoupled ? adam8bit_scaled<uint16_t, false, true>(h, t, b0, b1)
                         : adam8bit_scaled<uint16_t, false, false>(h, t, b0, b1);
    default:
      return h.decoupled ? adam8bit_scaled<uint16_t, true, true>(h, t, b0, b1)
                         : adam8bit_scaled<uint16_t, true, false>(h, t, b0, b1);
  }
}

void adam_range(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
  switch (t.param.dtype) {
    case DType::f32: return adam_flags<float, false>(h, t, b, e);
    case DType::bf16:
      if (t.exp_avg.dtype == DType::f32) {
        if (h.stochastic_rounding) return adam_flags<uint16_t, false, true, true>(h, t, b, e);
        return adam_flags<uint16_t, false, false, true>(h, t, b, e);
      }
      if (h.stochastic_rounding) return adam_flags<uint16_t, false, true>(h, t, b, e);
      return adam_flags<uint16_t, false>(h, t, b, e);
    default:
      if (t.exp_avg.dtype == DType::f32) return adam_flags<uint16_t, true, false, true>(h, t, b, e);
      return adam_flags<uint16_t, true>(h, t, b, e);
  }
}

void sgd_range(const SgdHyper& h, const SgdTensor& t, int64_t b, int64_t e) {
  switch (t.param.dtype) {
    case DType::f32: return sgd_flags<float, false>(h, t, b, e);
    case DType::bf16:
      if (h.stochastic_rounding) return sgd_flags<uint16_t, false, true>(h, t, b, e);
      return sgd_flags<uint16_t, false>(h, t, b, e);
    default: return sgd_flags<uint16_t, true>(h, t, b, e);
  }
}

}  // namespace LLMK_ISA_NS
}  // namespace llmk

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
inline uint32_t sr_bits(int64_t i, uint32_t key) {
  uint32_t h = uint32_t(i) * 0x9E3779B1u + key;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}
inline uint16_t sr_bf16(float f, uint32_t bits) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t quiet = u | 0x400000u;
  const uint32_t noisy = u + (bits & 0xFFFFu);
  return uint16_t(((u & 0x7fffffffu) > 0x7f800000u ? quiet : noisy) >> 16);
}

// The flags are template arguments so that each loop body is branch-free (vectorizable).
// kF32State: 16-bit parameters with float32 moments (AdamW8bit's small tensors).
#if defined(__AVX512F__)
// to_bf16 of 16 values: round to nearest even, NaN kept quiet.
inline __m256i to_bf16x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
#if defined(__AVX512BF16__)
  // The instruction rounds and quiets NaN as to_bf16 does, but flushes float32 denormals to
  // zero: vectors holding one (rare) take the integer path.
  if (_mm512_fpclass_ps_mask(x, 0x20) == 0)  // class 0x20: denormal
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#endif
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// Masked memory operations cost ~10% of the loop on Zen 4: kMasked only for a tensor's last,
// partial vector.
template <class T, bool kHalf, bool kMasked>
inline __m512 load16(const T* a, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return kMasked ? _mm512_maskz_loadu_ps(k, a) : _mm512_loadu_ps(a);
  } else {
    const __m256i h = kMasked ? _mm256_maskz_loadu_epi16(k, a)
                              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    if constexpr (kHalf) return _mm512_cvtph_ps(h);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}
template <class T, bool kHalf, bool kMasked>
inline void store16(T* a, __m512 x, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (kMasked) _mm512_mask_storeu_ps(a, k, x);
    else _mm512_storeu_ps(a, x);
    return;
  } else {
    __m256i h;
    if constexpr (kHalf) {
      h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      h = to_bf16x16(x);
    }
    if constexpr (kMasked) _mm256_mask_storeu_epi16(a, k, h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), h);
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
template <class T, bool kHalf>
inline void store8(T* a, __m256 x) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(a, x);
    return;
  } else {
    __m128i h;
    if constexpr (kHalf) {
      h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {  // to_bf16: round to nearest even, NaN kept quiet
      const __m256i u = _mm256_castps_si256(x);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
      // NaN: |u| > 0x7f800000 as signed integers (|u| < 2^31)
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                             _mm256_set1_epi32(0x7f800000));
      const __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
      const __m256i bits = _mm256_srli_epi32(_mm256_blendv_epi8(r, q, nan), 16);
      // 8 x 16 bits, in lane order: packus keeps them (< 2^16), permute4x64 joins the halves
      h = _mm256_castsi256_si128(
          _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), _MM_SHUFFLE(3, 1, 2, 0)));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a), h);
  }
}

#endif

// 16-bit parameters with moments of their dtype, rounded to nearest: the element loop in
// intrinsics, whole vectors from b on; returns where it stopped (the scalar loop does the
// rest). The compiler's vectorization of the 16-bit conversions left this loop compute-bound
// (one thread, 1M bf16 values: 0.79 ns each on AVX-512, 1.36 on AVX2). The same operations in
// the same order as the scalar loop below; max as std::max (the first operand unless the
// second is larger).
#if defined(__AVX512F__)
template <class T, bool kHalf, bool kDecoupled, bool kAmsgrad>
int64_t adam_vec(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
  T* p = static_cast<T*>(t.param.data);
  const T* g = static_cast<const T*>(t.grad.data);
  T* m = static_cast<T*>(t.exp_avg.data);
  T* v = static_cast<T*>(t.exp_avg_sq.data);
  T* vmax = static_cast<T*>(t.max_exp_avg_sq.data);
  const __m512 inv_scale = _mm512_set1_ps(h.inv_grad_scale);
  const __m512 sign = _mm512_set1_ps(h.maximize ? -1.f : 1.f);
  const __m512 wd = _mm512_set1_ps(h.weight_decay), decay = _mm512_set1_ps(h.decay);
  const __m512 b2 = _mm512_set1_ps(h.beta2), eps = _mm512_set1_ps(h.eps);
  const __m512 one_m_b1 = _mm512_set1_ps(h.one_minus_beta1);
  const __m512 one_m_b2 = _mm512_set1_ps(h.one_minus_beta2);
  const __m512 neg_step = _mm512_set1_ps(-t.step_size);
  const __m512 bc2 = _mm512_set1_ps(t.bias_correction2_sqrt);
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    __m512 pi = load16<T, kHalf, false>(p + i, 0);
    __m512 gi = _mm512_mul_ps(_mm512_mul_ps(load16<T, kHalf, false>(g + i, 0), inv_scale), sign);
    if constexpr (kDecoupled) pi = _mm512_mul_ps(pi, decay);
    else gi = _mm512_fmadd_ps(pi, wd, gi);
    __m512 mi = load16<T, kHalf, false>(m + i, 0);
    mi = _mm512_fmadd_ps(one_m_b1, _mm512_sub_ps(gi, mi), mi);
    __m512 vi = _mm512_mul_ps(load16<T, kHalf, false>(v + i, 0), b2);
    vi = _mm512_add_ps(vi, _mm512_mul_ps(_mm512_mul_ps(one_m_b2, gi), gi));
    __m512 vd = vi;
    if constexpr (kAmsgrad) {
      const __m512 old = load16<T, kHalf, false>(vmax + i, 0);
      vd = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(old, vi, _CMP_LT_OQ), old, vi);
      store16<T, kHalf, false>(vmax + i, vd, 0);
    }
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vd), bc2), eps);
    pi = _mm512_add_ps(pi, _mm512_mul_ps(neg_step, _mm512_div_ps(mi, denom)));
    store16<T, kHalf, false>(p + i, pi, 0);
    store16<T, kHalf, false>(m + i, mi, 0);
    store16<T, kHalf, false>(v + i, vi, 0);
  }
  return i;
}
#elif defined(__AVX2__)
template <class T, bool kHalf, bool kDecoupled, bool kAmsgrad>
int64_t adam_vec(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
  T* p = static_cast<T*>(t.param.data);
  const T* g = static_cast<const T*>(t.grad.data);
  T* m = static_cast<T*>(t.exp_avg.data);
  T* v = static_cast<T*>(t.exp_avg_sq.data);
  T* vmax = static_cast<T*>(t.max_exp_avg_sq.data);
  const __m256 inv_scale = _mm256_set1_ps(h.inv_grad_scale);
  const __m256 sign = _mm256_set1_ps(h.maximize ? -1.f : 1.f);
  const __m256 wd = _mm256_set1_ps(h.weight_decay), decay = _mm256_set1_ps(h.decay);
  const __m256 b2 = _mm256_set1_ps(h.beta2), eps = _mm256_set1_ps(h.eps);
  const __m256 one_m_b1 = _mm256_set1_ps(h.one_minus_beta1);
  const __m256 one_m_b2 = _mm256_set1_ps(h.one_minus_beta2);
  const __m256 neg_step = _mm256_set1_ps(-t.step_size);
  const __m256 bc2 = _mm256_set1_ps(t.bias_correction2_sqrt);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    __m256 pi = load8<T, kHalf>(p + i);
    __m256 gi = _mm256_mul_ps(_mm256_mul_ps(load8<T, kHalf>(g + i), inv_scale), sign);
    if constexpr (kDecoupled) pi = _mm256_mul_ps(pi, decay);
    else gi = _mm256_fmadd_ps(pi, wd, gi);
    __m256 mi = load8<T, kHalf>(m + i);
    mi = _mm256_fmadd_ps(one_m_b1, _mm256_sub_ps(gi, mi), mi);
    __m256 vi = _mm256_mul_ps(load8<T, kHalf>(v + i), b2);
    vi = _mm256_add_ps(vi, _mm256_mul_ps(_mm256_mul_ps(one_m_b2, gi), gi));
    __m256 vd = vi;
    if constexpr (kAmsgrad) {
      const __m256 old = load8<T, kHalf>(vmax + i);
      vd = _mm256_blendv_ps(old, vi, _mm256_cmp_ps(old, vi, _CMP_LT_OQ));
      store8<T, kHalf>(vmax + i, vd);
    }
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vd), bc2), eps);
    pi = _mm256_add_ps(pi, _mm256_mul_ps(neg_step, _mm256_div_ps(mi, denom)));
    store8<T, kHalf>(p + i, pi);
    store8<T, kHalf>(m + i, mi);
    store8<T, kHalf>(v + i, vi);
  }
  return i;
}
#endif

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
  const float one_m_b1 = h.one_minus_beta1, one_m_b2 = h.one_minus_beta2, decay = h.decay;
  const float step_size = t.step_size, bc2 = t.bias_correction2_sqrt;
  const float sign = h.maximize ? -1.f : 1.f, inv_scale = h.inv_grad_scale;
  auto get = [](const T* a, int64_t i) { return ld<T, kHalf>(a, i); };
  auto put = [](T* a, int64_t i, float x) { st<T, kHalf>(a, i, x); };
  auto sget = [](const S* a, int64_t i) { return ld<S, kHalf && !kF32State>(a, i); };
  auto sput = [](S* a, int64_t i, float x) { st<S, kHalf && !kF32State>(a, i, x); };
  for (int64_t i = b; i < e; ++i) {
    float pi = get(p, i);
    float gi = get(g, i) * inv_scale * sign;
    if (kDecoupled) pi *= decay;
    else gi = std::fma(pi, wd, gi);  // grad.add(param, alpha=wd)
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
  const float sign = h.maximize ? -1.f : 1.f, inv_scale = h.inv_grad_scale;
  auto get = [](const T* a, int64_t i) { return ld<T, kHalf>(a, i); };
  auto put = [](T* a, int64_t i, float x) { st<T, kHalf>(a, i, x); };
  int64_t i = b;
#if defined(__AVX512F__)
  // bfloat16 in intrinsics: the compiler's vectorization of the conversions left this loop
  // compute-bound at 0.63x torch's fused SGD. The same operations as the scalar loop.
  if constexpr (std::is_same_v<T, uint16_t> && !kHalf && !kSR) {
    const __m512 v_inv = _mm512_set1_ps(inv_scale), v_sign = _mm512_set1_ps(sign);
    const __m512 v_wd = _mm512_set1_ps(wd), v_mom = _mm512_set1_ps(mom);
    const __m512 v_damp = _mm512_set1_ps(damp), v_nlr = _mm512_set1_ps(-lr);
    for (; i + 16 <= e; i += 16) {
      const __m512 pi = load16<T, false, false>(p + i, 0);
      __m512 d = _mm512_mul_ps(_mm512_mul_ps(load16<T, false, false>(g + i, 0), v_inv), v_sign);
      d = _mm512_fmadd_ps(pi, v_wd, d);
      if constexpr (kMomentum) {
        const __m512 bi = kFirst ? d
                                 : _mm512_fmadd_ps(d, v_damp, _mm512_mul_ps(
                                       load16<T, false, false>(buf + i, 0), v_mom));
        store16<T, false, false>(buf + i, bi, 0);
        d = kNesterov ? _mm512_fmadd_ps(bi, v_mom, d) : bi;
      }
      store16<T, false, false>(p + i, _mm512_fmadd_ps(d, v_nlr, pi), 0);
    }
  }
#elif defined(__AVX2__)
  // The same on AVX2, 8 values per vector (one thread, 1M values: 0.66 -> 0.48 ns each).
  if constexpr (std::is_same_v<T, uint16_t> && !kHalf && !kSR) {
    const __m256 v_inv = _mm256_set1_ps(inv_scale), v_sign = _mm256_set1_ps(sign);
    const __m256 v_wd = _mm256_set1_ps(wd), v_mom = _mm256_set1_ps(mom);
    const __m256 v_damp = _mm256_set1_ps(damp), v_nlr = _mm256_set1_ps(-lr);
    for (; i + 8 <= e; i += 8) {
      const __m256 pi = load8<T, false>(p + i);
      __m256 d = _mm256_mul_ps(_mm256_mul_ps(load8<T, false>(g + i), v_inv), v_sign);
      d = _mm256_fmadd_ps(pi, v_wd, d);
      if constexpr (kMomentum) {
        const __m256 bi = kFirst ? d
                                 : _mm256_fmadd_ps(d, v_damp,
                                                   _mm256_mul_ps(load8<T, false>(buf + i), v_mom));
        store8<T, false>(buf + i, bi);
        d = kNesterov ? _mm256_fmadd_ps(bi, v_mom, d) : bi;
      }
      store8<T, false>(p + i, _mm256_fmadd_ps(d, v_nlr, pi));
    }
  }
#endif
  for (; i < e; ++i) {
    const float pi = get(p, i);
    float d = get(g, i) * inv_scale * sign;
    d = std::fma(pi, wd, d);  // grad.add(param, alpha=wd); exact when wd = 0
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

// m codes (signed: m's sign) from m * m_k, v codes from sqrt(v) * v_k, for len values.
inline void encode_moments(const float* m, const float* root_v, int64_t len, float m_k,
                           float v_k, int8_t* mq, uint8_t* vq) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 mk = _mm512_set1_ps(m_k), vk = _mm512_set1_ps(v_k);
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
    __m512i cm = code(_mm512_mul_ps(_mm512_abs_ps(mv), mk));
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
  const __m256 mk = _mm256_set1_ps(m_k), vk = _mm256_set1_ps(v_k);
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 quarter = _mm256_set1_ps(0.25f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lanes
  auto m_code = [&](int64_t at) {  // 8 signed codes; 0 for y < 1/4 and NaN, as sqrt_code
    const __m256 mv = _mm256_loadu_ps(m + at);
    const __m256 y = _mm256_mul_ps(_mm256_and_ps(mv, abs_mask), mk);
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
    const float ym = std::fabs(m[k]) * m_k, yv = root_v[k] * v_k;
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

#if defined(__AVX512F__)
// AVX-512: one block's update in intrinsics, 16 values per vector, the same float32
// operations in the same order as the scalar loop below (so the same bits as every other
// tier). Written out because the compiler's vectorization of the scalar loop spends ~15% more
// instructions (byte codes widened in steps, float16 converted through a buffer).

// Updates len <= kBlock8 values at p, g, mq, vq; m and root_v receive the new m and sqrt(v);
// returns the bit patterns of max |m| and max v.
template <class T, bool kHalf, bool kDecoupled, bool kScaled>
inline void block_update_avx512(const BlockConsts& c, T* p, const T* g, const int8_t* mq,
                                const uint8_t* vq, int64_t len, float* m, float* root_v,
                                uint32_t& m_bits, uint32_t& v_bits) {
  const __m512 m_unit = _mm512_set1_ps(c.m_unit), v_unit_b2 = _mm512_set1_ps(c.v_unit_b2);
  const __m512 sis = _mm512_set1_ps(c.signed_inv_scale), decay = _mm512_set1_ps(c.decay);
  const __m512 wd = _mm512_set1_ps(c.wd), one_m_b1 = _mm512_set1_ps(c.one_m_b1);
  const __m512 one_m_b2 = _mm512_set1_ps(c.one_m_b2);
  const __m512 inv_bc2 = _mm512_set1_ps(c.inv_bc2), eps = _mm512_set1_ps(c.eps);
  const __m512 neg_step = _mm512_set1_ps(-c.step_size);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i mmax = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
  auto step = [&](int64_t k, auto masked, __mmask16 live) {
    constexpr bool kMasked = decltype(masked)::value;
    const __m128i cb = kMasked ? _mm_maskz_loadu_epi8(live, mq + k)
                               : _mm_loadu_si128(reinterpret_cast<const __m128i*>(mq + k));
    const __m128i ub = kMasked ? _mm_maskz_loadu_epi8(live, vq + k)
                               : _mm_loadu_si128(reinterpret_cast<const __m128i*>(vq + k));
    const __m512 cq = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(cb));
    const __m512 uq = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(ub));
    __m512 mi = _mm512_mul_ps(_mm512_mul_ps(cq, _mm512_abs_ps(cq)), m_unit);
    const __m512 uu = _mm512_mul_ps(uq, uq);
    __m512 vi = _mm512_mul_ps(_mm512_mul_ps(uu, uu), v_unit_b2);  // beta2 * v
    __m512 pi = load16<T, kHalf, kMasked>(p + k, live);
    __m512 gi = load16<T, kHalf, kMasked>(g + k, live);
    if constexpr (kScaled) gi = _mm512_mul_ps(gi, sis);
    if constexpr (kDecoupled) pi = _mm512_mul_ps(pi, decay);
    else gi = _mm512_fmadd_ps(pi, wd, gi);
    mi = _mm512_fmadd_ps(one_m_b1, _mm512_sub_ps(gi, mi), mi);
    vi = _mm512_add_ps(vi, _mm512_mul_ps(_mm512_mul_ps(one_m_b2, gi), gi));
    const __m512 rv = _mm512_sqrt_ps(vi);
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(rv, inv_bc2), eps);
    const __m512 pn = _mm512_add_ps(pi, _mm512_mul_ps(neg_step, _mm512_div_ps(mi, denom)));
    store16<T, kHalf, kMasked>(p + k, pn, live);
    _mm512_storeu_ps(m + k, mi);  // the arrays hold kBlock8 values: the full vector fits
    _mm512_storeu_ps(root_v + k, rv);
    // masked-off lanes computed from zeros: m = 0, v = 0, no effect on the maxima
    mmax = _mm512_max_epu32(mmax, _mm512_and_si512(_mm512_castps_si512(mi), abs_mask));
    vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(vi), abs_mask));
  };
  int64_t k = 0;
  for (; k + 16 <= len; k += 16) step(k, std::false_type{}, __mmask16(0xffff));
  if (k < len) step(k, std::true_type{}, __mmask16((1u << (len - k)) - 1));
  m_bits = std::max(m_bits, uint32_t(_mm512_reduce_max_epu32(mmax)));
  v_bits = std::max(v_bits, uint32_t(_mm512_reduce_max_epu32(vmax)));
}
#endif

// One AdamW step over 8-bit blocks [b0, b1) of a tensor. kScaled: gradients multiplied by
// inv_grad_scale * (maximize ? -1 : 1); without it that factor is 1 (the same bits: x * 1 = x).
#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: the block update of block_update_avx512, 8 values per vector, whole vectors only (the
// caller runs the scalar loop on the rest: masked AVX2 stores are slow on AMD). Returns the
// number of values done; m_bits / v_bits as there.
template <class T, bool kHalf, bool kDecoupled, bool kScaled>
inline int64_t block_update_avx2(const BlockConsts& c, T* p, const T* g, const int8_t* mq,
                                 const uint8_t* vq, int64_t len, float* m, float* root_v,
                                 uint32_t& m_bits, uint32_t& v_bits) {
  const __m256 m_unit = _mm256_set1_ps(c.m_unit), v_unit_b2 = _mm256_set1_ps(c.v_unit_b2);
  const __m256 sis = _mm256_set1_ps(c.signed_inv_scale), decay = _mm256_set1_ps(c.decay);
  const __m256 wd = _mm256_set1_ps(c.wd), one_m_b1 = _mm256_set1_ps(c.one_m_b1);
  const __m256 one_m_b2 = _mm256_set1_ps(c.one_m_b2);
  const __m256 inv_bc2 = _mm256_set1_ps(c.inv_bc2), eps = _mm256_set1_ps(c.eps);
  const __m256 neg_step = _mm256_set1_ps(-c.step_size);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256i mmax = _mm256_setzero_si256(), vmax = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m128i cb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mq + k));
    const __m128i ub = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vq + k));
    const __m256 cq = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(cb));
    const __m256 uq = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ub));
    __m256 mi = _mm256_mul_ps(_mm256_mul_ps(cq, _mm256_and_ps(cq, abs_mask)), m_unit);
    const __m256 uu = _mm256_mul_ps(uq, uq);
    __m256 vi = _mm256_mul_ps(_mm256_mul_ps(uu, uu), v_unit_b2);  // beta2 * v
    __m256 pi = load8<T, kHalf>(p + k);
    __m256 gi = load8<T, kHalf>(g + k);
    if constexpr (kScaled) gi = _mm256_mul_ps(gi, sis);
    if constexpr (kDecoupled) pi = _mm256_mul_ps(pi, decay);
    else gi = _mm256_fmadd_ps(pi, wd, gi);
    mi = _mm256_fmadd_ps(one_m_b1, _mm256_sub_ps(gi, mi), mi);
    vi = _mm256_add_ps(vi, _mm256_mul_ps(_mm256_mul_ps(one_m_b2, gi), gi));
    const __m256 rv = _mm256_sqrt_ps(vi);
    const __m256 denom = _mm256_add_ps(_mm256_mul_ps(rv, inv_bc2), eps);
    const __m256 pn = _mm256_add_ps(pi, _mm256_mul_ps(neg_step, _mm256_div_ps(mi, denom)));
    store8<T, kHalf>(p + k, pn);
    _mm256_storeu_ps(m + k, mi);
    _mm256_storeu_ps(root_v + k, rv);
    mmax = _mm256_max_epu32(mmax, _mm256_castps_si256(_mm256_and_ps(mi, abs_mask)));
    vmax = _mm256_max_epu32(vmax, _mm256_castps_si256(_mm256_and_ps(vi, abs_mask)));
  }
  alignas(32) uint32_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), mmax);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 8), vmax);
  for (int i = 0; i < 8; ++i) {
    m_bits = std::max(m_bits, lanes[i]);
    v_bits = std::max(v_bits, lanes[8 + i]);
  }
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
    float m_k = 0.f, v_k = 0.f;
  } pending;
  auto flush = [&] {
    if (pending.blk < 0) return;
    const int64_t at = pending.blk * kBlock8;
    encode_moments(m_buf[pending.blk & 1], root_v_buf[pending.blk & 1], pending.len, pending.m_k,
                   pending.v_k, mq + at, vq + at);
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
#if defined(__AVX512F__)
    const BlockConsts consts{m_unit, v_unit_b2, signed_inv_scale, decay, wd, one_m_b1,
                             one_m_b2, inv_bc2, eps, step_size};
    block_update_avx512<T, kHalf, kDecoupled, kScaled>(consts, p + base, g + base, mq + base,
                                                       vq + base, len, m, root_v, m_bits, v_bits);
#else
    int64_t k0 = 0;
#if defined(__AVX2__)
    const BlockConsts consts{m_unit, v_unit_b2, signed_inv_scale, decay, wd, one_m_b1,
                             one_m_b2, inv_bc2, eps, step_size};
    k0 = block_update_avx2<T, kHalf, kDecoupled, kScaled>(consts, p + base, g + base, mq + base,
                                                          vq + base, len, m, root_v, m_bits,
                                                          v_bits);
    constexpr bool kBufferF16 = false;  // the rest (under 8 values) converts element-wise
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
      else gi = std::fma(pi, wd, gi);
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
#endif
    flush();  // the previous block's codes (its buffers are not this block's)
    const float m_max = bits_to_f32(m_bits), v_max = bits_to_f32(v_bits);
    // Requantize against the block's new absmax: codes are the square root of m / m_max and
    // the fourth root of v / v_max (the square root of sqrt(v) / sqrt(v_max)), scaled.
    pending.blk = blk;
    pending.len = len;
    pending.m_k = m_max > 0.f ? (1.f / m_max) * kMCodeSq : 0.f;
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

// Per-tier element loops of the fused optimizers (compiled once per tier: see vec.h). The
// loops are plain scalar code over contiguous arrays, written so that the compiler
// vectorizes them for the tier's instruction set (float32 math, -fno-math-errno sqrt).
// These files compile without FMA contraction: each operation rounds as torch's does (its
// lerp is the one fused multiply-add), so trajectories follow torch.optim's to a few ulps.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../common/half.h"
#if defined(__F16C__)
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
template <class T, bool kHalf, bool kDecoupled, bool kAmsgrad, bool kSR = false,
          bool kF32State = false>
void adam_loop(const AdamHyper& h, const AdamTensor& t, int64_t b, int64_t e) {
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
  for (int64_t i = b; i < e; ++i) {
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

// Cube root of a in [0, 1] with neither a libm call nor a division, so that the
// requantization loop vectorizes into cheap instructions: the inverse cube root r by Newton's
// r <- r (4 - a r^3) / 3 from a bit-level first guess (3.4% off), then a r^2. Relative error
// ~2e-5: about one code in 2000 lands on the neighbouring code, far below a code's width.
// The guess divides a's bits by 3 with shifts and adds (x/3 = x * 0.010101...b, to a few
// units: plenty for a guess): an integer division by 3 kept AVX2's loop scalar (no 32-bit
// high multiply there), 4.7x slower than AVX-512's.
inline uint32_t div3_approx(uint32_t x) {
  uint32_t q = (x >> 2) + (x >> 4);
  q += q >> 4;
  q += q >> 8;
  return q + (q >> 16);
}
inline float cbrt01(float a) {
  a = std::max(a, 1e-30f);
  float r = bits_to_f32(0x54a23000u - div3_approx(f32_to_bits(a)));
  r = r * (4.f - a * (r * r * r)) * (1.f / 3.f);
  r = r * (4.f - a * (r * r * r)) * (1.f / 3.f);
  return a * (r * r);
}

template <class T, bool kHalf, bool kDecoupled>
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
  const float sign = h.maximize ? -1.f : 1.f, inv_scale = h.inv_grad_scale;
  auto get = [](const T* a, int64_t i) { return ld<T, kHalf>(a, i); };
  auto put = [](T* a, int64_t i, float x) { st<T, kHalf>(a, i, x); };
  // Divisions and square roots dominate this loop (it is compute-bound where AdamW is not):
  // one of each per element in the update, one square root in the requantization.
  const float inv_bc2 = 1.f / bc2;
  float m[kBlock8], v[kBlock8], root_v[kBlock8];
  // float16 on F16C tiers: the block's parameters and gradients converted 8 at a time.
  constexpr bool kBlockF16 = kHalf && kF16C;
  float pf[kBlockF16 ? kBlock8 : 1], gf[kBlockF16 ? kBlock8 : 1];
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t base = blk * kBlock8, len = std::min(kBlock8, n - base);
    const float m_scale = ms[blk], v_scale = vs[blk];
    if constexpr (kBlockF16) {
      load_f16(t.param.data, base, pf, len);
      load_f16(t.grad.data, base, gf, len);
    }
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = base + k;
      const float qm = float(mq[i]) * (1.f / 127.f), qv = float(vq[i]) * (1.f / 255.f);
      float mi = m_scale * (qm * qm * qm), vi = v_scale * ((qv * qv) * (qv * qv));
      float pi = kBlockF16 ? pf[k] : get(p, i);
      float gi = (kBlockF16 ? gf[k] : get(g, i)) * inv_scale * sign;
      if (kDecoupled) pi *= decay;
      else gi = std::fma(pi, wd, gi);
      mi = std::fma(one_m_b1, gi - mi, mi);
      vi = vi * b2;
      vi = vi + (one_m_b2 * gi) * gi;
      const float rv = std::sqrt(vi);
      const float denom = rv * inv_bc2 + eps;
      const float pn = pi + (-step_size) * (mi / denom);
      if constexpr (kBlockF16) pf[k] = pn;
      else put(p, i, pn);
      m[k] = mi;
      v[k] = vi;
      root_v[k] = rv;
    }
    if constexpr (kBlockF16) store_f16(pf, t.param.data, base, len);
    // Block maxima on the bit patterns: for non-negative floats their order is the values'
    // order, and integer max reductions vectorize (float ones need -ffinite-math-only).
    uint32_t m_bits = 0, v_bits = 0;
    for (int64_t k = 0; k < len; ++k) {
      m_bits = std::max(m_bits, f32_to_bits(m[k]) & 0x7fffffffu);
      v_bits = std::max(v_bits, f32_to_bits(v[k]) & 0x7fffffffu);
    }
    const float m_max = bits_to_f32(m_bits), v_max = bits_to_f32(v_bits);
    // Requantize against the block's new absmax.
    // The fourth root of v / v_max is the square root of sqrt(v) / sqrt(v_max).
    const float m_inv = m_max > 0.f ? 1.f / m_max : 0.f;
    const float root_v_inv = v_max > 0.f ? 1.f / std::sqrt(v_max) : 0.f;
    for (int64_t k = 0; k < len; ++k) {  // codes: round half up of the scaled roots
      const float a = cbrt01(std::fabs(m[k]) * m_inv);
      const int code = int(std::min(a, 1.f) * 127.f + 0.5f);
      mq[base + k] = int8_t(m[k] < 0.f ? -code : code);
      const float b = std::sqrt(root_v[k] * root_v_inv);
      vq[base + k] = uint8_t(int(std::min(b, 1.f) * 255.f + 0.5f));
    }
    ms[blk] = m_max;
    vs[blk] = v_max;
  }
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
      return h.decoupled ? adam8bit_loop<float, false, true>(h, t, b0, b1)
                         : adam8bit_loop<float, false, false>(h, t, b0, b1);
    case DType::bf16:
      return h.decoupled ? adam8bit_loop<uint16_t, false, true>(h, t, b0, b1)
                         : adam8bit_loop<uint16_t, false, false>(h, t, b0, b1);
    default:
      return h.decoupled ? adam8bit_loop<uint16_t, true, true>(h, t, b0, b1)
                         : adam8bit_loop<uint16_t, true, false>(h, t, b0, b1);
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

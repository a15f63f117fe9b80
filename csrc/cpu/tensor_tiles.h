// Reading and writing strided float32 / bfloat16 / float16 tensor views as float32 tiles,
// one copy per tier (included after LLMK_VEC_BYTES / LLMK_ISA_NS are defined).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/checks.h"
#include "../common/tensor_view.h"
#include "vec.h"

namespace llmk {
namespace LLMK_ISA_NS {

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

LLMK_INLINE float to_f32(float x) { return x; }
LLMK_INLINE float to_f32(BF16 x) { return bf16_to_f32(x.bits); }
LLMK_INLINE float to_f32(F16 x) { return f16_scalar(x.bits); }
LLMK_INLINE void from_f32(float* d, float x) { *d = x; }
LLMK_INLINE void from_f32(BF16* d, float x) { d->bits = f32_to_bf16(x); }
LLMK_INLINE void from_f32(F16* d, float x) { d->bits = f32_to_f16(x); }

// Calls f(T{}) with T the element type of a float tensor.
template <class F>
LLMK_INLINE void with_float_type(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); break;
    case DType::bf16: f(BF16{}); break;
    case DType::f16: f(F16{}); break;
    default: LLMK_CHECK(false, "unsupported dtype " << dtype_name(dt));
  }
}

// Pointer to element [b][h][row][0] of a 4-D view (3-D for lse-like views: col ignored).
template <class T>
LLMK_INLINE T* at4(const TensorView& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<T*>(t.data) + b * t.strides[0] + h * t.strides[1] + row * t.strides[2];
}

// W consecutive values as float32 (exact). bf16 widens by GCC's generic vector code: on the
// Zen 3 that beat AVX2's one-instruction widening (vpmovzxwd ymm, m128) when decoding from
// DRAM (2 threads: 1.1-1.25x faster), though it was slower from L3. fp16 uses F16C.
LLMK_INLINE vf load_f32(const BF16* s) {  // bf16 is the top half of a float
  typedef uint16_t vh __attribute__((vector_size(2 * W)));
  vh x;
  std::memcpy(&x, s, sizeof x);
  return as_vf(__builtin_convertvector(x, vi) << 16);
}
LLMK_INLINE vf load_f32(const F16* s) {
#if LLMK_VEC_BYTES == 64 && defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#elif LLMK_VEC_BYTES == 32 && defined(__F16C__)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#else
  vf v;
  for (int i = 0; i < W; ++i) v[i] = to_f32(s[i]);
  return v;
#endif
}

// d[c] = mul * s[c] for a contiguous row, whole vectors at a time: streaming K and V rows
// (decoding) is bound by this conversion, not by the products (fp16 converted one value at
// a time took 2.1-3.0x as long to decode as with F16C vectors, Zen 3).
template <class T>
LLMK_INLINE void load_contiguous(const T* s, float* d, int64_t n, float mul) {
  int64_t c = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; c + W <= n; c += W) storeu(d + c, loadu(s + c) * splat(mul));
  } else {
    for (; c + W <= n; c += W) storeu(d + c, load_f32(s + c) * splat(mul));
  }
  for (; c < n; ++c) d[c] = mul * to_f32(s[c]);
}

// dst[r * ld + c] = mul * src[row0 + r][c] for r < nrows, c < ncols; zero up to ld_pad.
template <class T>
void load_rows(const TensorView& t, int64_t b, int64_t h, int64_t row0, int64_t nrows,
               int64_t ncols, float mul, float* dst, int64_t ld, int64_t ld_pad) {
  const T* src = at4<const T>(t, b, h, row0);
  const int64_t rs = t.strides[2], cs = t.strides[3];
  for (int64_t r = 0; r < nrows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    if (cs == 1)
      load_contiguous(s, d, ncols, mul);
    else
      for (int64_t c = 0; c < ncols; ++c) d[c] = mul * to_f32(s[c * cs]);
    for (int64_t c = ncols; c < ld_pad; ++c) d[c] = 0.f;
  }
}

// dst[c * ld + r] = src[row0 + r][c] for r < nrows, c < ncols; columns nrows..pad_to
// zeroed (only what the products will read: tiny calls must not pay for a full tile).
template <class T>
void load_rows_transposed(const TensorView& t, int64_t b, int64_t h, int64_t row0, int64_t nrows,
                          int64_t ncols, float* dst, int64_t ld, int64_t pad_to) {
  const T* src = at4<const T>(t, b, h, row0);
  const int64_t rs = t.strides[2], cs = t.strides[3];
  for (int64_t r = 0; r < nrows; ++r) {
    const T* s = src + r * rs;
    for (int64_t c = 0; c < ncols; ++c) dst[c * ld + r] = to_f32(s[c * cs]);
  }
  for (int64_t c = 0; c < ncols; ++c)
    for (int64_t r = nrows; r < pad_to; ++r) dst[c * ld + r] = 0.f;
}

LLMK_INLINE void load_rows_any(const TensorView& t, int64_t b, int64_t h, int64_t row0,
                               int64_t nrows, int64_t ncols, float mul, float* dst, int64_t ld,
                               int64_t ld_pad) {
  with_float_type(t.dtype, [&](auto tag) {
    load_rows<decltype(tag)>(t, b, h, row0, nrows, ncols, mul, dst, ld, ld_pad);
  });
}

// Rows [row0, row0 + nrows) of t's (b, h) slice to prefetch into L2 (rows of contiguous
// values only; none otherwise). A KV cache laid out (B, S, H, D) puts one head's consecutive
// keys H * D values apart: each row on another 4 KiB page, a stride the hardware prefetchers
// do not follow, so a decoding step that streams one head's keys waited on memory row after
// row. Rows that follow each other in memory are left to the hardware prefetchers, which
// stream them (software prefetches there only cost: bf16 decoding from a (B, H, S, D) cache
// took ~15% longer with them on a Zen 3).
struct RowPrefetch {
  const char* base = nullptr;  // row0 (null: nothing to prefetch)
  int64_t ld = 0, bytes = 0, rows = 0;
  // rows [r0, r0 + n) of them
  LLMK_INLINE void rows_from(int64_t r0, int64_t n) const {
    if (!base) return;
    for (int64_t r = r0; r < min_(r0 + n, rows); ++r)
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(base + r * ld + o, 0, 2);
  }
};

LLMK_INLINE RowPrefetch rows_to_prefetch(const TensorView& t, int64_t b, int64_t h, int64_t row0,
                                         int64_t nrows, int64_t ncols) {
  if (t.strides[3] != 1 || t.strides[2] == ncols) return RowPrefetch{};
  const int64_t es = dtype_bytes(t.dtype);
  const char* base = static_cast<const char*>(t.data) +
                     es * (b * t.strides[0] + h * t.strides[1] + row0 * t.strides[2]);
  return RowPrefetch{base, t.strides[2] * es, ncols * es, nrows};
}

LLMK_INLINE void load_rows_transposed_any(const TensorView& t, int64_t b, int64_t h, int64_t row0,
                                          int64_t nrows, int64_t ncols, float* dst, int64_t ld,
                                          int64_t pad_to) {
  with_float_type(t.dtype, [&](auto tag) {
    load_rows_transposed<decltype(tag)>(t, b, h, row0, nrows, ncols, dst, ld, pad_to);
  });
}

// out[row0 + r][c] = mul_all * row_mul[r] * src[r * ld + c] (row_mul may be null), and, if
// residual is given, what rounding to the output dtype lost (x - out) in it; returns how many rows hold a NaN or Inf.
template <class T>
int64_t store_rows(const TensorView& t, int64_t b, int64_t h, int64_t row0, int64_t nrows,
                   int64_t ncols, const float* src, int64_t ld, float mul_all,
                   const float* row_mul, const TensorView* residual) {
  T* dst = at4<T>(t, b, h, row0);
  const int64_t rs = t.strides[2], cs = t.strides[3];
  T* lo = residual ? at4<T>(*residual, b, h, row0) : nullptr;
  const int64_t lrs = residual ? residual->strides[2] : 0, lcs = residual ? residual->strides[3] : 0;
  int64_t bad_rows = 0;
  for (int64_t r = 0; r < nrows; ++r) {
    const float mul = row_mul ? row_mul[r] * mul_all : mul_all;
    bool bad = false;
    for (int64_t c = 0; c < ncols; ++c) {
      const float x = mul * src[r * ld + c];
      bad |= !(std::fabs(x) <= 3.40282347e38f);
      T* d = dst + r * rs + c * cs;
      from_f32(d, x);
      if (lo) from_f32(lo + r * lrs + c * lcs, x - to_f32(*d));
    }
    bad_rows += bad;
  }
  return bad_rows;
}

LLMK_INLINE int64_t store_rows_any(const TensorView& t, int64_t b, int64_t h, int64_t row0,
                                   int64_t nrows, int64_t ncols, const float* src, int64_t ld,
                                   float mul_all, const float* row_mul,
                                   const TensorView* residual = nullptr) {
  int64_t bad = 0;
  with_float_type(t.dtype, [&](auto tag) {
    bad = store_rows<decltype(tag)>(t, b, h, row0, nrows, ncols, src, ld, mul_all, row_mul,
                                    residual);
  });
  return bad;
}


// bf16 rows [row0, row0 + n) of a 4-D view, element (r, c) as raw bits (0 past the edges).
struct Bf16Rows {
  const uint16_t* base;
  int64_t rs, cs, n, ncols;
  Bf16Rows(const TensorView& t, int64_t b, int64_t h, int64_t row0, int64_t n_, int64_t ncols_)
      : base(at4<const uint16_t>(t, b, h, row0)), rs(t.strides[2]), cs(t.strides[3]), n(n_),
        ncols(ncols_) {}
  LLMK_INLINE uint16_t operator()(int64_t r, int64_t c) const {
    return (r < n && c < ncols) ? base[r * rs + c * cs] : uint16_t(0);
  }
};

}  // namespace LLMK_ISA_NS
}  // namespace llmk

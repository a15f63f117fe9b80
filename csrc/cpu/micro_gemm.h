// Register-tiled small matrix products for the CPU kernels, one copy per tier (included
// after LLMK_VEC_BYTES / LLMK_ISA_NS are defined, like vec.h): float32 FMA everywhere, bf16
// pair dot products (vdpbf16ps) where the tier is built with AVX512-BF16, and AMX tiles for
// them on the amx tier (LLMK_AMX).
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/checks.h"
#include "../common/tensor_view.h"
#include "vec.h"

namespace llmk {
namespace LLMK_ISA_NS {

constexpr int kMR = 6;                   // rows of a register tile
constexpr int kNV = (W >= 16) ? 4 : 2;   // vectors per row of a register tile

// C[R x V*W] (+)= A[R x K] B[K x V*W]; A read through two strides so that A^T needs no copy.
template <int R, int V>
__attribute__((noinline)) void micro(int64_t K, const float* A, int64_t sam, int64_t sak,
                                     const float* B, int64_t ldb, float* C, int64_t ldc,
                                     bool accumulate) {
  // The K products are summed from zero and added to C once at the end: long
  // accumulations (dK, dV over every query tile) then round like a blocked sum, not like
  // one sequential sum of thousands of terms.
  vf c[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = loadu(B + k * ldb + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vf a = splat(A[r * sam + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      storeu(C + r * ldc + v * W, accumulate ? c[r][v] + loadu(C + r * ldc + v * W) : c[r][v]);
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*,
                         int64_t, bool);

template <int R>
MicroFn micro_for(int v) {
  if constexpr (kNV >= 4) {
    if (v == 4) return micro<R, 4>;
    if (v == 3) return micro<R, 3>;
  }
  return v == 2 ? micro<R, 2> : micro<R, 1>;
}

inline MicroFn pick_micro(int r, int v) {
  switch (r) {
    case 1: return micro_for<1>(v);
    case 2: return micro_for<2>(v);
    case 3: return micro_for<3>(v);
    case 4: return micro_for<4>(v);
    case 5: return micro_for<5>(v);
    default: return micro_for<6>(v);
  }
}

// C[M x N] (+)= A[M x K] B[K x N], N a multiple of W; B and C rows are contiguous.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                 const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kNV * W) {
    const int nv = int(min_<int64_t>(kNV, (N - n0) / W));
    const MicroFn full = pick_micro(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR)
      full(K, A + m0 * sam, sam, sak, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    if (m0 < M)
      pick_micro(int(M - m0), nv)(K, A + m0 * sam, sam, sak, B + n0, ldb, C + m0 * ldc + n0, ldc,
                                  accumulate);
  }
}

// ---------------------------------------------------------------- bfloat16 dot products
// With AVX512-BF16, bf16 inputs multiply as bf16 pairs (vdpbf16ps: twice the float32 FMA
// rate) with float32 accumulation. Operands are pairs packed in 32-bit words: A2[r][k2]
// holds A[r][2k2], A[r][2k2+1]; B2[k2][c] holds B[2k2][c], B[2k2+1][c] (the VNNI layout).
#if defined(__AVX512BF16__)
constexpr bool kHasBf16Dot = true;

template <int R, int V>
__attribute__((noinline)) void micro_bf16(int64_t K2, const uint32_t* A, int64_t sam, int64_t sak,
                                          const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                          bool accumulate) {
  __m512 c[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = _mm512_setzero_ps();  // see micro(): blocked sums
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + k * ldb + v * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[r * sam + k * sak]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(C + r * ldc + v * 16,
                       accumulate ? _mm512_add_ps(c[r][v], _mm512_loadu_ps(C + r * ldc + v * 16))
                                  : c[r][v]);
}

using MicroBf16Fn = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t,
                             float*, int64_t, bool);

template <int R>
MicroBf16Fn micro_bf16_for(int v) {
  switch (v) {
    case 4: return micro_bf16<R, 4>;
    case 3: return micro_bf16<R, 3>;
    case 2: return micro_bf16<R, 2>;
    default: return micro_bf16<R, 1>;
  }
}

inline MicroBf16Fn pick_micro_bf16(int r, int v) {
  switch (r) {
    case 1: return micro_bf16_for<1>(v);
    case 2: return micro_bf16_for<2>(v);
    case 3: return micro_bf16_for<3>(v);
    case 4: return micro_bf16_for<4>(v);
    case 5: return micro_bf16_for<5>(v);
    default: return micro_bf16_for<6>(v);
  }
}

// C[M x N] (+)= A2 B2 over K2 pairs; N a multiple of 16, B2 rows of ldb words; A2[r][k2]
// at A[r * sam + k2 * sak].
inline void gemm_bf16_dot(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t sam,
                          int64_t sak, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                          bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int nv = int(min_<int64_t>(4, (N - n0) / 16));
    const MicroBf16Fn full = pick_micro_bf16(kMR, nv);
    int64_t m0 = 0;
    for (; m0 + kMR <= M; m0 += kMR)
      full(K2, A + m0 * sam, sam, sak, B + n0, ldb, C + m0 * ldc + n0, ldc, accumulate);
    if (m0 < M)
      pick_micro_bf16(int(M - m0), nv)(K2, A + m0 * sam, sam, sak, B + n0, ldb,
                                       C + m0 * ldc + n0, ldc, accumulate);
  }
}


// float32 row -> bf16 (round to nearest even), n a multiple of 16.
LLMK_INLINE void row_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
}

// A float32 tile [m x n] as bf16 pairs along its rows: dst[i2][j] = (src[2 i2][j],
// src[2 i2 + 1][j]); a missing last row (m odd) counts as zeros. n a multiple of 16.
inline void rows_to_bf16_pairs(const float* src, int64_t ld, int64_t m, int64_t n, uint32_t* dst,
                               int64_t ldd) {
  for (int64_t i2 = 0; 2 * i2 < m; ++i2) {
    const float* r0 = src + 2 * i2 * ld;
    const bool has_r1 = 2 * i2 + 1 < m;
    for (int64_t j = 0; j < n; j += 16) {
      const __m512i lo =
          _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + j)));
      __m512i hi = _mm512_setzero_si512();
      if (has_r1)
        hi = _mm512_slli_epi32(
            _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + ld + j))), 16);
      _mm512_storeu_si512(dst + i2 * ldd + j, _mm512_or_si512(lo, hi));
    }
  }
}
#else
constexpr bool kHasBf16Dot = false;
inline void gemm_bf16_dot(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t,
                          const uint32_t*, int64_t, float*, int64_t, bool) {
  LLMK_CHECK(false, "bf16 dot products are not built into this tier");
}
inline void rows_to_bf16_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  LLMK_CHECK(false, "bf16 dot products are not built into this tier");
}
inline void row_to_bf16(const float*, uint16_t*, int64_t) {
  LLMK_CHECK(false, "bf16 dot products are not built into this tier");
}
#endif

LLMK_INLINE uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

}  // namespace LLMK_ISA_NS
}  // namespace llmk

// gemm_bf16: the products the kernels call, with the tiles of a TileScope on the amx tier.
#if LLMK_AMX
#include "amx_gemm.h"
#else
namespace llmk {
namespace LLMK_ISA_NS {
constexpr bool kHasAmx = false;
class TileScope {
 public:
  explicit TileScope(bool) {}
};
inline void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t sam,
                      int64_t sak, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                      bool accumulate, const TileScope&) {
  gemm_bf16_dot(M, N, K2, A, sam, sak, B, ldb, C, ldc, accumulate);
}
}  // namespace LLMK_ISA_NS
}  // namespace llmk
#endif

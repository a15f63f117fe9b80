// The amx tier's matrix products on AMX tiles (included by micro_gemm.h where LLMK_AMX is
// defined, after gemm_bf16_dot): tile products of bf16 pairs or of bytes (tile_zero_c /
// tile_dots / tile_store_c_block, and tile_gemm over whole operands), the TileScope that
// configures the tiles for a work item, and gemm_bf16 for the attention kernels.
#pragma once
#include <cstdint>

#include "amx_tiles.h"
#include "micro_gemm.h"

namespace llmk {
namespace LLMK_ISA_NS {

// gemm_bf16_dot's product on tiles: blocks of 32 x 32 of C in tiles 0-3 (tile 2i + j holds rows
// 16i.., columns 16j..), A in tiles 4-5, B in tiles 6-7, K in steps of 16 words (pairs of
// bf16, or quads of bytes for TileDot::s8u8: signed A, unsigned B, int32 C). Operands that
// do not fill a tile (M, K edges) are copied into zero-padded buffers: the tiles never read
// or write past the caller's data. Like micro_bf16, C's products start from zero and are
// added to C once (float32 C only).
constexpr bool kHasAmx = true;
enum class TileDot { bf16, s8u8 };

template <class O, TileDot D, int C, int A, int B>
LLMK_INLINE void tile_dot() {
  if constexpr (D == TileDot::bf16) O::template dp<C, A, B>(); else O::template dp_s8u8<C, A, B>();
}

template <class O>
LLMK_INLINE void tile_load_a(int i, const void* p, int64_t stride) {
  if (i == 0) O::template load<4>(p, stride); else O::template load<5>(p, stride);
}
template <class O>
LLMK_INLINE void tile_load_b(int j, const void* p, int64_t stride) {
  if (j == 0) O::template load<6>(p, stride); else O::template load<7>(p, stride);
}
template <class O>
LLMK_INLINE void tile_store_c(int t, void* p, int64_t stride) {
  switch (t) {
    case 0: O::template store<0>(p, stride); break;
    case 1: O::template store<1>(p, stride); break;
    case 2: O::template store<2>(p, stride); break;
    default: O::template store<3>(p, stride); break;
  }
}

// tile_block in three pieces, for a product summed over several calls: a kernel that stages
// an operand in chunks of K keeps C in the tiles from tile_zero_c to tile_store_c_block.
// mb, nb: tiles of 16 rows / columns of C (1 or 2 each).
template <class O>
LLMK_INLINE void tile_zero_c(int mb, int nb) {
  O::template zero<0>();
  if (nb > 1) O::template zero<1>();
  if (mb > 1) {
    O::template zero<2>();
    if (nb > 1) O::template zero<3>();
  }
}

// C's tiles += A B over K2 words (a multiple of 16, or padded): rows in [1, 32] of A.
template <class O, TileDot D>
void tile_dots(int64_t rows, int nb, int64_t K2, const uint32_t* A, int64_t sam,
               const uint32_t* B, int64_t ldb) {
  constexpr int TR = amx::kTileRows, TW = amx::kTileWords;
  const int mb = rows > TR ? 2 : 1;
  alignas(64) uint32_t pad[TR * TW];
  for (int64_t k0 = 0; k0 < K2; k0 += TW) {
    const int64_t kk = min_<int64_t>(TW, K2 - k0);
    for (int i = 0; i < mb; ++i) {
      const uint32_t* a = A + i * TR * sam + k0;
      const int64_t ri = min_<int64_t>(TR, rows - i * TR);
      if (ri == TR && kk == TW) {
        tile_load_a<O>(i, a, sam * 4);
      } else {
        for (int64_t r = 0; r < TR; ++r)
          for (int64_t w = 0; w < TW; ++w) pad[r * TW + w] = r < ri && w < kk ? a[r * sam + w] : 0u;
        tile_load_a<O>(i, pad, TW * 4);
      }
    }
    for (int j = 0; j < nb; ++j) {
      const uint32_t* b = B + k0 * ldb + j * TW;
      if (kk == TW) {
        tile_load_b<O>(j, b, ldb * 4);
      } else {
        for (int64_t r = 0; r < TR; ++r)
          for (int64_t w = 0; w < TW; ++w) pad[r * TW + w] = r < kk ? b[r * ldb + w] : 0u;
        tile_load_b<O>(j, pad, TW * 4);
      }
    }
    tile_dot<O, D, 0, 4, 6>();
    if (nb > 1) tile_dot<O, D, 1, 4, 7>();
    if (mb > 1) {
      tile_dot<O, D, 2, 5, 6>();
      if (nb > 1) tile_dot<O, D, 3, 5, 7>();
    }
  }
}

// C (rows in [1, 32], nb tiles of columns) = or += C's tiles (int32 sums: added as integers).
template <class O>
void tile_store_c_block(int64_t rows, int nb, float* C, int64_t ldc, bool accumulate,
                        bool int32 = false) {
  constexpr int TR = amx::kTileRows, TW = amx::kTileWords;
  const int mb = rows > TR ? 2 : 1;
  alignas(64) float out[TR * TW];
  for (int i = 0; i < mb; ++i) {
    const int64_t ri = min_<int64_t>(TR, rows - i * TR);
    for (int j = 0; j < nb; ++j) {
      float* c = C + i * TR * ldc + j * TW;
      if (!accumulate && ri == TR) {
        tile_store_c<O>(2 * i + j, c, ldc * 4);
        continue;
      }
      tile_store_c<O>(2 * i + j, out, TW * 4);
      for (int64_t r = 0; r < ri; ++r) {
        __m512 v = _mm512_load_ps(out + r * TW);
        if (accumulate) {
          const __m512 old = _mm512_loadu_ps(c + r * ldc);
          v = int32 ? _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(v), _mm512_castps_si512(old)))
                    : _mm512_add_ps(v, old);
        }
        _mm512_storeu_ps(c + r * ldc, v);
      }
    }
  }
}

// rows in [1, 32] of C, nb (1 or 2) tiles of 16 columns, all K2 words.
template <class O, TileDot D>
void tile_block(int64_t rows, int nb, int64_t K2, const uint32_t* A, int64_t sam,
                const uint32_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  tile_zero_c<O>(rows > amx::kTileRows ? 2 : 1, nb);
  tile_dots<O, D>(rows, nb, K2, A, sam, B, ldb);
  tile_store_c_block<O>(rows, nb, C, ldc, accumulate);
}

template <class O, TileDot D>
void tile_gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t sam,
               const uint32_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t TR = amx::kTileRows, TW = amx::kTileWords;
  for (int64_t n0 = 0; n0 < N; n0 += 2 * TW) {
    const int nb = int(min_<int64_t>(2, (N - n0) / TW));
    for (int64_t m0 = 0; m0 < M; m0 += 2 * TR)
      tile_block<O, D>(min_<int64_t>(2 * TR, M - m0), nb, K2, A + m0 * sam, sam, B + n0, ldb,
                       C + m0 * ldc + n0, ldc, accumulate);
  }
}

// The tiles of one work item of a kernel: configured at its start, and at its end the
// thread's previous configuration is put back (or the tiles released if there was none):
// code that shares the thread may keep its own configuration across calls (torch's
// cpublas::brgemm skips ldtilecfg while its thread-local "current" kernel is unchanged).
class TileScope {
 public:
  explicit TileScope(bool use) : on_(use), emulated_(use && amx::emulated()) {
    if (on_) saved_ = amx::scope_begin(emulated_);
  }
  ~TileScope() {
    if (on_) amx::scope_end(emulated_, saved_);
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
  bool emulated() const { return emulated_; }

 private:
  bool on_, emulated_;
  amx::TileConfig saved_;
};

// Tiles when A's pairs are contiguous along K (the tiles load rows); inside a TileScope.
inline void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t sam,
                      int64_t sak, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                      bool accumulate, const TileScope& tiles) {
  if (sak != 1) return gemm_bf16_dot(M, N, K2, A, sam, sak, B, ldb, C, ldc, accumulate);
  if (tiles.emulated())
    tile_gemm<amx::Emulated, TileDot::bf16>(M, N, K2, A, sam, B, ldb, C, ldc, accumulate);
  else
    tile_gemm<amx::Hardware, TileDot::bf16>(M, N, K2, A, sam, B, ldb, C, ldc, accumulate);
}

}  // namespace LLMK_ISA_NS
}  // namespace llmk

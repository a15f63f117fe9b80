// The amx tier's quantized matmul: over a prefill-sized number of rows of x, int8 and int4
// weights with bfloat16 x multiply on AMX bf16 tiles and w8a8 on int8 tiles; every other
// call runs the avx512_bf16 kernels.
//
// The product is taken transposed, out^T = W x^T, so that the weight needs no transposing: a
// block of 32 channels is copied into tile rows (int8: widened to bf16; int4: q - zero
// widened to bf16; both exact, pairs along K; w8a8: the bytes as they are, quads along K) a
// chunk of K at a time, just before the tiles use it, while the next chunk's bytes are
// prefetched: the weights' reads from memory run alongside the tile products (a block staged
// whole first left memory idle during them: M = 16, 4096 x 4096 w8a8 took 1.6x the VNNI
// kernel's time on a Xeon, 2026-11-27). x is packed once per call (per slab of up to 512
// rows) as x^T words (XT[k][m] holds word k of row m: two bf16 values, or four bytes of x
// quantized per row by the avx512_bf16 tier's own code, stored + 128), and the scales and bias
// are applied when the block's sums are written out (int4: each group's sums times the
// group's scale, added up in float32). The same arithmetic as the
// avx512_bf16 tier's bf16 panels (bf16 products, float32 sums), summed in another order;
// w8a8: the same integers.
#define LLMK_VEC_BYTES 64
#define LLMK_ISA_NS qmm_amx_isa
#if defined(__x86_64__) && defined(__AVX512BF16__)
#define LLMK_AMX 1
#endif
#include <algorithm>
#include <cstring>

#include "../common/half.h"
#include "../common/thread_pool.h"
#include "micro_gemm.h"
#include "quant_matmul.h"
#include "tensor_tiles.h"

namespace llmk {
namespace qmm_amx {

#if LLMK_AMX
using namespace qmm_amx_isa;

namespace {

constexpr int64_t kMinRows = 8;          // as the other tiers' many-rows kernels
// Rows of x per slab: a slab's x^T stays a few MiB; more rows run in slabs of equal size, each
// reading the weight again (by 512 rows the tile products, not those reads, take the time).
constexpr int64_t kSlabRows = 512;
constexpr int64_t kBlockChannels = 32;   // channels per work item (two tile rows of out^T)
constexpr int64_t kPackWords = 64;       // words of K per x-packing item
// Words of K per staged chunk: while all of out^T's block stays in the tiles (x rows <= 32), a
// chunk of 32 rows fits L1 (16 KiB); with more rows the block's sums are added up in memory
// once per chunk, so chunks are longer (64 KiB, in L2) to keep that a few percent.
constexpr int64_t kChunkWordsInTiles = 128;
constexpr int64_t kChunkWords = 512;

enum class Path { none, int8_bf16, int4_bf16, w8a8 };

Path path_for(const QuantMatmulParams& p) {
  const int64_t M = p.x.sizes[0];
  if (M < kMinRows) return Path::none;
  if (p.scheme == QuantScheme::w8a8) return Path::w8a8;
  if (p.x.dtype != DType::bf16) return Path::none;  // float32 / float16 x: not rounded to bf16
  if (p.scheme == QuantScheme::int8) return Path::int8_bf16;
  // int4 groups (multiples of 32 values) fill whole tile rows of K
  if (p.scheme == QuantScheme::int4 && p.group_size % 32 == 0) return Path::int4_bf16;
  return Path::none;
}

struct Geometry {
  Path path;
  int64_t M, N, K, Mp, Kw;  // Mp: rows of x rounded to a tile row's 16 words; Kw: words of K, too
  int64_t per_word;         // values of K per word: 2 (bf16) or 4 (bytes)
  int64_t chunk;            // words of K staged at a time (int4: whole groups)
  bool in_tiles;            // out^T's block stays in the tiles over all of K
  // p: one slab of the call's rows; path: the whole call's
  Geometry(const QuantMatmulParams& p, Path path_)
      : path(path_), M(p.x.sizes[0]), N(p.qdata.sizes[0]), K(p.x.sizes[1]),
        Mp(round_up(M, amx::kTileRows)), per_word(path == Path::w8a8 ? 4 : 2) {
    Kw = round_up((K + per_word - 1) / per_word, amx::kTileWords);
    // int4: each group's sums are scaled on their own, so they leave the tiles per group
    in_tiles = Mp <= 2 * amx::kTileWords && path != Path::int4_bf16;
    chunk = in_tiles ? kChunkWordsInTiles : kChunkWords;
    if (path == Path::int4_bf16) {
      const int64_t gw = p.group_size / 2;
      chunk = std::max<int64_t>(1, chunk / gw) * gw;
    }
    chunk = std::min(chunk, Kw);
  }
  int64_t kx() const { return Kw * 4; }  // w8a8: bytes per quantized row of x
};

// x^T (and w8a8's quantized rows and their scales), then per thread: the staged chunk of the
// item's weight rows, the channels' weight sums (w8a8), its block of out^T sums, and (int4)
// one group's sums.
struct Layout {
  int64_t xt, xq, xscale, scratch, per_thread, total;
  int64_t wsum, sums, group_sums;  // offsets inside a thread's scratch (the chunk at 0)
  Layout(const Geometry& g, int nthreads) {
    int64_t off = 0;
    auto take = [&](int64_t bytes) { const int64_t at = off; off += round_up(bytes, 64); return at; };
    xt = take(g.Kw * g.Mp * 4);
    xq = take(g.path == Path::w8a8 ? g.M * g.kx() : 0);
    xscale = take(g.path == Path::w8a8 ? g.M * 4 : 0);
    scratch = off;
    wsum = round_up(kBlockChannels * g.chunk * 4, 64);
    sums = wsum + round_up(kBlockChannels * 4, 64);
    const int64_t block = round_up(kBlockChannels * g.Mp * 4, 64);
    group_sums = sums + block;
    per_thread = group_sums + (g.path == Path::int4_bf16 ? block : 0);
    total = scratch + per_thread * nthreads + 64;  // room to align the base
  }
};

struct Ctx {
  const QuantMatmulParams* p;
  Geometry g;
  Layout lay;
  char* base;
  uint32_t* xt() const { return reinterpret_cast<uint32_t*>(base + lay.xt); }
  int8_t* xq() const { return reinterpret_cast<int8_t*>(base + lay.xq); }
  float* xscale() const { return reinterpret_cast<float*>(base + lay.xscale); }
  char* scratch(int tid) const { return base + lay.scratch + lay.per_thread * tid; }
};

// XT[k][m] for words k in [item * kPackWords, +kPackWords), every m < Mp. Past M and K:
// zeros (bf16), or quantized zeros (+128 bytes).
void pack_x_item(void* vctx, int64_t item, int) {
  const Ctx& c = *static_cast<const Ctx*>(vctx);
  const Geometry& g = c.g;
  const int64_t ka = item * kPackWords, kb = std::min(g.Kw, ka + kPackWords);
  uint32_t* xt = c.xt();
  if (g.path == Path::w8a8) {
    const int8_t* xq = c.xq();
    for (int64_t m = 0; m < g.Mp; ++m)
      for (int64_t k = ka; k < kb; ++k) {
        uint32_t w = 0x80808080u;
        if (m < g.M) std::memcpy(&w, xq + m * g.kx() + 4 * k, 4);
        xt[k * g.Mp + m] = w;
      }
    return;
  }
  const TensorView& x = c.p->x;
  const uint16_t* xd = static_cast<const uint16_t*>(x.data);
  const int64_t sm = x.strides[0], sk = x.strides[1];
  for (int64_t m = 0; m < g.Mp; ++m)
    for (int64_t k = ka; k < kb; ++k) {
      uint32_t w = 0;
      if (m < g.M) {
        const int64_t e = 2 * k;
        const uint16_t lo = e < g.K ? xd[m * sm + e * sk] : 0;
        const uint16_t hi = e + 1 < g.K ? xd[m * sm + (e + 1) * sk] : 0;
        w = pair(lo, hi);
      }
      xt[k * g.Mp + m] = w;
    }
}

// The source bytes [from, to) of a weight row into the caches, ahead of their staging.
LLMK_INLINE void prefetch_bytes(const void* row, int64_t from, int64_t to) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = from; b < to; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// One staged chunk: channels [n0, n0 + nc), words [k0, k0 + kc) of K (zeros past K), rows of
// kc words; each function also prefetches the chunk after it (the same rows, K onwards).

// int8 as bf16 pairs.
void stage_int8(const Ctx& c, int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint16_t* wb) {
  const Geometry& g = c.g;
  const int8_t* w = c.p->qdata.ptr<int8_t>();
  const int64_t e0 = 2 * k0, e1 = 2 * (k0 + kc), ev = std::min(e1, g.K / 32 * 32);
  for (int64_t r = 0; r < nc; ++r) {
    const int8_t* src = w + (n0 + r) * g.K;
    uint16_t* dst = wb + r * 2 * kc - e0;
    prefetch_bytes(src, e1, std::min(g.K, 2 * e1 - e0));
    int64_t e = e0;
    for (; e < ev; e += 32) {
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e + 16))));
      // cvtne2ps: the second operand fills the low half (exact: int8 fits bf16)
      _mm512_storeu_si512(dst + e, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; e < e1; ++e) dst[e] = e < g.K ? f32_to_bf16(float(src[e])) : 0;
  }
}

// int4 as bf16 pairs of q - zero (the chunk is whole groups, K a multiple of 32): 16 bytes
// hold 16 pairs; a small integer's float32 bits end in 16 zeros, so its bf16 is the top half,
// exactly.
void stage_int4(const Ctx& c, int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint32_t* wb) {
  const Geometry& g = c.g;
  const QuantMatmulParams& p = *c.p;
  const int64_t gw = p.group_size / 2, groups = g.K / p.group_size;
  const int64_t k1 = std::min(k0 + kc, g.K / 2);  // words past K / 2: zeros
  const uint8_t* q = p.qdata.ptr<uint8_t>();
  const uint8_t* zeros = p.zeros.ptr<uint8_t>();
  const __m512i nibble = _mm512_set1_epi32(15), top = _mm512_set1_epi32(int(0xffff0000u));
  for (int64_t r = 0; r < nc; ++r) {
    const uint8_t* src = q + (n0 + r) * (g.K / 2);
    uint32_t* dst = wb + r * kc - k0;
    prefetch_bytes(src, k0 + kc, std::min(g.K / 2, k0 + 2 * kc));
    for (int64_t grp = k0 / gw; grp * gw < k1; ++grp) {
      const __m512i z = _mm512_set1_epi32(zeros[(n0 + r) * groups + grp]);
      for (int64_t j = grp * gw; j < (grp + 1) * gw; j += 16) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, nibble), z));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), z));
        const __m512i w = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16),
                                          _mm512_and_si512(_mm512_castps_si512(hi), top));
        _mm512_storeu_si512(dst + j, w);
      }
    }
    for (int64_t j = k1; j < k0 + kc; ++j) dst[j] = 0;
  }
}

// w8a8: the bytes as they are, and each row's sum added to wsum.
void stage_bytes(const Ctx& c, int64_t n0, int64_t nc, int64_t k0, int64_t kc, int8_t* wb,
                 int32_t* wsum) {
  const Geometry& g = c.g;
  const int8_t* w = c.p->qdata.ptr<int8_t>();
  const int64_t b0 = 4 * k0, b1 = std::min(g.K, 4 * (k0 + kc));
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int64_t r = 0; r < nc; ++r) {
    const int8_t* src = w + (n0 + r) * g.K;
    int8_t* dst = wb + r * 4 * kc - b0;
    prefetch_bytes(src, 4 * (k0 + kc), std::min(g.K, 4 * (k0 + 2 * kc)));
    // sum of the bytes + 128 each (sad against zero sums unsigned bytes), less 128 per byte
    __m512i acc = _mm512_setzero_si512();
    int64_t b = b0;
    for (; b + 64 <= b1; b += 64) {
      const __m512i v = _mm512_loadu_si512(src + b);
      _mm512_storeu_si512(dst + b, v);
      acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_xor_si512(v, flip), _mm512_setzero_si512()));
    }
    int64_t s = _mm512_reduce_add_epi64(acc) - 128 * (b - b0);
    for (; b < b1; ++b) {
      dst[b] = src[b];
      s += src[b];
    }
    std::memset(dst + b1, 0, size_t(4 * (k0 + kc) - b1));
    wsum[r] += int32_t(s);
  }
}

// out^T's block [nc x Mp] for channels from n0 into sums, over all of K, a chunk at a time.
template <class O>
void block_sums(const Ctx& c, int64_t n0, int64_t nc, char* scratch, int32_t* wsum, float* sums) {
  const Geometry& g = c.g;
  const QuantMatmulParams& p = *c.p;
  constexpr int64_t TW = amx::kTileWords;
  const int mb = nc > amx::kTileRows ? 2 : 1;
  float* group_sums = reinterpret_cast<float*>(scratch + c.lay.group_sums);
  const uint32_t* wrows = reinterpret_cast<const uint32_t*>(scratch);
  const uint32_t* xt = c.xt();
  const int64_t groups = g.path == Path::int4_bf16 ? g.K / p.group_size : 0;
  const float* scale = p.scales.ptr<float>();
  if (g.path == Path::w8a8) std::memset(wsum, 0, sizeof(int32_t) * size_t(nc));
  if (g.path == Path::int4_bf16) std::memset(sums, 0, sizeof(float) * size_t(nc * g.Mp));
  // C's tiles += the staged rows' words [ks, ks + len) times x^T's from k, columns from m0
  auto dots = [&](int nb, int64_t len, int64_t ks, int64_t k, int64_t m0, int64_t ld) {
    if (g.path == Path::w8a8)
      tile_dots<O, TileDot::s8u8>(nc, nb, len, wrows + ks, ld, xt + k * g.Mp + m0, g.Mp);
    else
      tile_dots<O, TileDot::bf16>(nc, nb, len, wrows + ks, ld, xt + k * g.Mp + m0, g.Mp);
  };
  if (g.in_tiles) tile_zero_c<O>(mb, int(g.Mp / TW));
  for (int64_t k0 = 0; k0 < g.Kw; k0 += g.chunk) {
    const int64_t kc = std::min(g.chunk, g.Kw - k0);
    if (g.path == Path::w8a8) {
      stage_bytes(c, n0, nc, k0, kc, reinterpret_cast<int8_t*>(scratch), wsum);
    } else if (g.path == Path::int4_bf16) {
      stage_int4(c, n0, nc, k0, kc, reinterpret_cast<uint32_t*>(scratch));
    } else {
      stage_int8(c, n0, nc, k0, kc, reinterpret_cast<uint16_t*>(scratch));
    }
    if (g.in_tiles) {
      dots(int(g.Mp / TW), kc, 0, k0, 0, kc);
      continue;
    }
    // the sums over this chunk (int4: over each of its groups, scaled) added to the block's
    const int64_t step = g.path == Path::int4_bf16 ? p.group_size / 2 : kc;
    for (int64_t ks = 0; ks < kc; ks += step) {
      for (int64_t m0 = 0; m0 < g.Mp; m0 += 2 * TW) {
        const int nb = int(std::min<int64_t>(2, (g.Mp - m0) / TW));
        tile_zero_c<O>(mb, nb);
        dots(nb, step, ks, k0 + ks, m0, kc);
        if (g.path == Path::int4_bf16)
          tile_store_c_block<O>(nc, nb, group_sums + m0, g.Mp, false);
        else  // w8a8's int32 sums added as integers
          tile_store_c_block<O>(nc, nb, sums + m0, g.Mp, k0 > 0, g.path == Path::w8a8);
      }
      if (g.path == Path::int4_bf16) {
        const int64_t grp = (k0 + ks) / step;
        for (int64_t r = 0; r < nc; ++r) {
          const __m512 s = _mm512_set1_ps(scale[(n0 + r) * groups + grp]);
          for (int64_t m = 0; m < g.Mp; m += 16)
            _mm512_storeu_ps(sums + r * g.Mp + m,
                             _mm512_fmadd_ps(s, _mm512_loadu_ps(group_sums + r * g.Mp + m),
                                             _mm512_loadu_ps(sums + r * g.Mp + m)));
        }
      }
    }
  }
  if (g.in_tiles) tile_store_c_block<O>(nc, int(g.Mp / TW), sums, g.Mp, false);
}

void channel_block_item(void* vctx, int64_t item, int tid) {
  const Ctx& c = *static_cast<const Ctx*>(vctx);
  const Geometry& g = c.g;
  const QuantMatmulParams& p = *c.p;
  const int64_t n0 = item * kBlockChannels, nc = std::min(kBlockChannels, g.N - n0);
  const bool w8a8 = g.path == Path::w8a8;
  const bool int4 = g.path == Path::int4_bf16;
  char* scratch = c.scratch(tid);
  int32_t* wsum = reinterpret_cast<int32_t*>(scratch + c.lay.wsum);
  float* sums = reinterpret_cast<float*>(scratch + c.lay.sums);
  {
    const TileScope tiles(true);
    if (tiles.emulated())
      block_sums<amx::Emulated>(c, n0, nc, scratch, wsum, sums);
    else
      block_sums<amx::Hardware>(c, n0, nc, scratch, wsum, sums);
  }
  const float* scale = p.scales.ptr<float>();
  with_float_type(p.out.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(p.out.data);
    const T* bias = static_cast<const T*>(p.bias.data);
    for (int64_t r = 0; r < nc; ++r) {
      const int64_t n = n0 + r;
      const float b = p.bias.defined() ? to_f32(bias[n * p.bias.strides[0]]) : 0.f;
      for (int64_t m = 0; m < g.M; ++m) {
        float v;
        if (w8a8) {  // the reference's (acc * x_scale) * w_scale, x stored + 128
          const int32_t s = reinterpret_cast<const int32_t*>(sums)[r * g.Mp + m];
          v = float(s - 128 * wsum[r]) * c.xscale()[m] * scale[n];
        } else {
          v = int4 ? sums[r * g.Mp + m] : sums[r * g.Mp + m] * scale[n];
        }
        from_f32(out + m * p.out.strides[0] + n * p.out.strides[1], v + b);
      }
    }
  });
}

int64_t slab_rows(int64_t M) {
  const int64_t slabs = (M + kSlabRows - 1) / kSlabRows;
  return (M + slabs - 1) / slabs;
}

// Rows [m0, m0 + rows) of the call: x and out offset, everything else as it is.
QuantMatmulParams slab(const QuantMatmulParams& p, int64_t m0, int64_t rows) {
  QuantMatmulParams s = p;
  s.x.data = static_cast<char*>(p.x.data) + m0 * p.x.strides[0] * dtype_bytes(p.x.dtype);
  s.x.sizes[0] = rows;
  s.out.data = static_cast<char*>(p.out.data) + m0 * p.out.strides[0] * dtype_bytes(p.out.dtype);
  s.out.sizes[0] = rows;
  return s;
}

}  // namespace

int64_t workspace_bytes(const QuantMatmulParams& p) {
  const Path path = path_for(p);
  if (path == Path::none) return qmm_avx512bf16::workspace_bytes(p);
  const QuantMatmulParams first = slab(p, 0, slab_rows(p.x.sizes[0]));
  return Layout(Geometry(first, path), std::max(p.num_threads, 1)).total;
}

const char* describe(const QuantMatmulParams& p) {
  switch (path_for(p)) {
    case Path::int8_bf16:
      return "AMX bf16 tiles: out^T = W x^T, weights widened to bf16 per 32 channels, x packed "
             "as x^T pairs";
    case Path::int4_bf16:
      return "AMX bf16 tiles: out^T = W x^T, q - zero widened to bf16 per 32 channels, group "
             "sums scaled, x packed as x^T pairs";
    case Path::w8a8:
      return "AMX int8 tiles: out^T = W x^T, x quantized per row and packed as x^T quads";
    default: return qmm_avx512bf16::describe(p);
  }
}

namespace {

// One slab of rows (its own x^T, w8a8's quantized rows), all channels.
void run_slab(const QuantMatmulParams& p, Path path, void* workspace) {
  const int nthreads = std::max(p.num_threads, 1);
  Ctx c{&p, Geometry(p, path), Layout(Geometry(p, path), nthreads),
        reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(workspace), 64))};
  // Weight bytes times rows stands for the work, as in the other tiers.
  const int threads = threads_for(p.qdata.numel() * c.g.M, nthreads, quant_bytes_per_thread());
  if (c.g.path == Path::w8a8) {
    const bool biased =
        qmm_avx512bf16::quantize_rows_w8a8(p, c.xq(), c.xscale(), c.g.kx(), threads);
    LLMK_CHECK(biased, "the amx tier expects x quantized + 128 (VNNI tiers)");
  }
  const int64_t pack_items = (c.g.Kw + kPackWords - 1) / kPackWords;
  parallel_for(pack_items, int(std::min<int64_t>(threads, pack_items)), pack_x_item, &c);
  const int64_t blocks = (c.g.N + kBlockChannels - 1) / kBlockChannels;
  parallel_for(blocks, int(std::min<int64_t>(threads, blocks)), channel_block_item, &c);
}

}  // namespace

void run(const QuantMatmulParams& p, void* workspace) {
  const Path path = path_for(p);
  if (path == Path::none) return qmm_avx512bf16::run(p, workspace);
  const int64_t M = p.x.sizes[0], rows = slab_rows(M);
  for (int64_t m0 = 0; m0 < M; m0 += rows) run_slab(slab(p, m0, std::min(rows, M - m0)), path, workspace);
}

#else  // no AVX512-BF16 in this build (not x86-64): the tier is never supported

int64_t workspace_bytes(const QuantMatmulParams& p) { return qmm_avx512bf16::workspace_bytes(p); }
const char* describe(const QuantMatmulParams& p) { return qmm_avx512bf16::describe(p); }
void run(const QuantMatmulParams& p, void* workspace) { qmm_avx512bf16::run(p, workspace); }

#endif

}  // namespace qmm_amx
}  // namespace llmk

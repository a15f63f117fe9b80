// The amx tier's quantized matmul: over a prefill-sized number of rows of x, int8 and int4
// weights with bfloat16 x multiply on AMX bf16 tiles and w8a8 on int8 tiles; every other
// call runs the avx512_bf16 kernels.
//
// The product is taken transposed, out^T = W x^T, so that the weight needs no transposing: a
// block of 32 channels is copied into tile rows once per item (int8: widened to bf16; int4:
// q - zero widened to bf16; both exact, pairs along K; w8a8: the bytes as they are, quads
// along K), x is packed once per call as x^T words (XT[k][m] holds word k of row m: two bf16
// values, or four bytes of x quantized per row by the avx512_bf16 tier's own code, stored +
// 128), and the scales and bias are applied when the block's sums are written out (int4: each
// group's sums times the group's scale, added up in float32). The same arithmetic as the
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

constexpr int64_t kMinRows = 12;         // as the other tiers' many-rows kernels
constexpr int64_t kMaxRows = 512;        // x^T stays a few MiB; larger M: the avx512_bf16 path
constexpr int64_t kBlockChannels = 32;   // channels per work item (two tile rows of out^T)
constexpr int64_t kBlockRows = 256;      // x rows per product inside an item
constexpr int64_t kPackWords = 64;       // words of K per x-packing item

enum class Path { none, int8_bf16, int4_bf16, w8a8 };

Path path_for(const QuantMatmulParams& p) {
  const int64_t M = p.x.sizes[0];
  if (M < kMinRows || M > kMaxRows) return Path::none;
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
  explicit Geometry(const QuantMatmulParams& p)
      : path(path_for(p)), M(p.x.sizes[0]), N(p.qdata.sizes[0]), K(p.x.sizes[1]),
        Mp(round_up(M, amx::kTileRows)), per_word(path == Path::w8a8 ? 4 : 2) {
    Kw = round_up((K + per_word - 1) / per_word, amx::kTileWords);
  }
  int64_t kx() const { return Kw * 4; }  // w8a8: bytes per quantized row of x
};

// x^T (and w8a8's quantized rows and their scales), then per thread: the item's weight rows,
// the channels' weight sums (w8a8), its block of out^T sums, and (int4) one group's sums.
struct Layout {
  int64_t xt, xq, xscale, scratch, per_thread, total;
  int64_t wsum, sums, group_sums;  // offsets inside a thread's scratch (its weight rows at 0)
  Layout(const Geometry& g, int nthreads) {
    int64_t off = 0;
    auto take = [&](int64_t bytes) { const int64_t at = off; off += round_up(bytes, 64); return at; };
    xt = take(g.Kw * g.Mp * 4);
    xq = take(g.path == Path::w8a8 ? g.M * g.kx() : 0);
    xscale = take(g.path == Path::w8a8 ? g.M * 4 : 0);
    scratch = off;
    wsum = round_up(kBlockChannels * g.Kw * 4, 64);
    sums = wsum + round_up(kBlockChannels * 4, 64);
    const int64_t block = round_up(kBlockChannels * std::min(g.Mp, kBlockRows) * 4, 64);
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

// Channels [n0, n0 + nc) of W as bf16 rows of 2 Kw values (zeros past K).
void widen_weights(const Ctx& c, int64_t n0, int64_t nc, uint16_t* wb) {
  const Geometry& g = c.g;
  const int64_t ld = 2 * g.Kw;
  const int8_t* w = c.p->qdata.ptr<int8_t>();
  const int64_t kv = g.K / 32 * 32;
  for (int64_t r = 0; r < nc; ++r) {
    const int8_t* src = w + (n0 + r) * g.K;
    uint16_t* dst = wb + r * ld;
    for (int64_t k = 0; k < kv; k += 32) {
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k + 16))));
      // cvtne2ps: the second operand fills the low half (exact: int8 fits bf16)
      _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (int64_t k = kv; k < ld; ++k) dst[k] = k < g.K ? f32_to_bf16(float(src[k])) : 0;
  }
}

// Channels [n0, n0 + nc) of an int4 W as bf16 rows of q - zero (K a multiple of 32): 16
// bytes hold 16 pairs; a small integer's float32 bits end in 16 zeros, so its bf16 is the
// top half, exactly.
void widen_int4_weights(const Ctx& c, int64_t n0, int64_t nc, uint32_t* wb) {
  const Geometry& g = c.g;
  const QuantMatmulParams& p = *c.p;
  const int64_t gs = p.group_size, groups = g.K / gs;
  const uint8_t* q = p.qdata.ptr<uint8_t>();
  const uint8_t* zeros = p.zeros.ptr<uint8_t>();
  const __m512i nibble = _mm512_set1_epi32(15), top = _mm512_set1_epi32(int(0xffff0000u));
  for (int64_t r = 0; r < nc; ++r) {
    const uint8_t* src = q + (n0 + r) * (g.K / 2);
    uint32_t* dst = wb + r * g.Kw;
    for (int64_t grp = 0; grp < groups; ++grp) {
      const __m512i z = _mm512_set1_epi32(zeros[(n0 + r) * groups + grp]);
      for (int64_t j = grp * gs / 2; j < (grp + 1) * gs / 2; j += 16) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, nibble), z));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), z));
        const __m512i w = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16),
                                          _mm512_and_si512(_mm512_castps_si512(hi), top));
        _mm512_storeu_si512(dst + j, w);
      }
    }
    for (int64_t j = g.K / 2; j < g.Kw; ++j) dst[j] = 0;
  }
}

// Channels [n0, n0 + nc) of W as rows of 4 Kw bytes (zeros past K), and each row's sum.
void copy_weights(const Ctx& c, int64_t n0, int64_t nc, int8_t* wb, int32_t* wsum) {
  const Geometry& g = c.g;
  const int8_t* w = c.p->qdata.ptr<int8_t>();
  for (int64_t r = 0; r < nc; ++r) {
    const int8_t* src = w + (n0 + r) * g.K;
    int8_t* dst = wb + r * g.kx();
    std::memcpy(dst, src, size_t(g.K));
    std::memset(dst + g.K, 0, size_t(g.kx() - g.K));
    int32_t s = 0;
    for (int64_t k = 0; k < g.K; ++k) s += src[k];
    wsum[r] = s;
  }
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
  float* group_sums = reinterpret_cast<float*>(scratch + c.lay.group_sums);
  if (w8a8)
    copy_weights(c, n0, nc, reinterpret_cast<int8_t*>(scratch), wsum);
  else if (int4)
    widen_int4_weights(c, n0, nc, reinterpret_cast<uint32_t*>(scratch));
  else
    widen_weights(c, n0, nc, reinterpret_cast<uint16_t*>(scratch));
  const uint32_t* wrows = reinterpret_cast<const uint32_t*>(scratch);
  const TileScope tiles(true);
  const float* scale = p.scales.ptr<float>();
  for (int64_t m0 = 0; m0 < g.M; m0 += kBlockRows) {
    const int64_t mc = std::min(kBlockRows, g.M - m0), mcp = round_up(mc, amx::kTileWords);
    // out^T [nc x mcp] = W [nc x K] x^T [K x mcp]
    if (w8a8) {
      gemm_s8u8(nc, mcp, g.Kw, wrows, g.Kw, c.xt() + m0, g.Mp, reinterpret_cast<int32_t*>(sums),
                mcp, tiles);
    } else if (int4) {  // per group: its sums times the channel's group scale
      const int64_t gw = p.group_size / 2, groups = g.K / p.group_size;
      for (int64_t x = 0; x < nc * mcp; ++x) sums[x] = 0.f;
      for (int64_t grp = 0; grp < groups; ++grp) {
        gemm_bf16(nc, mcp, gw, wrows + grp * gw, g.Kw, 1, c.xt() + grp * gw * g.Mp + m0, g.Mp,
                  group_sums, mcp, false, tiles);
        for (int64_t r = 0; r < nc; ++r) {
          const __m512 s = _mm512_set1_ps(scale[(n0 + r) * groups + grp]);
          for (int64_t m = 0; m < mcp; m += 16)
            _mm512_storeu_ps(sums + r * mcp + m,
                             _mm512_fmadd_ps(s, _mm512_loadu_ps(group_sums + r * mcp + m),
                                             _mm512_loadu_ps(sums + r * mcp + m)));
        }
      }
    } else {
      gemm_bf16(nc, mcp, g.Kw, wrows, g.Kw, 1, c.xt() + m0, g.Mp, sums, mcp, false, tiles);
    }
    with_float_type(p.out.dtype, [&](auto tag) {
      using T = decltype(tag);
      T* out = static_cast<T*>(p.out.data);
      const T* bias = static_cast<const T*>(p.bias.data);
      for (int64_t r = 0; r < nc; ++r) {
        const int64_t n = n0 + r;
        const float b = p.bias.defined() ? to_f32(bias[n * p.bias.strides[0]]) : 0.f;
        for (int64_t m = 0; m < mc; ++m) {
          float v;
          if (w8a8) {  // the reference's (acc * x_scale) * w_scale, x stored + 128
            const int32_t s = reinterpret_cast<const int32_t*>(sums)[r * mcp + m];
            v = float(s - 128 * wsum[r]) * c.xscale()[m0 + m] * scale[n];
          } else {
            v = int4 ? sums[r * mcp + m] : sums[r * mcp + m] * scale[n];
          }
          from_f32(out + (m0 + m) * p.out.strides[0] + n * p.out.strides[1], v + b);
        }
      }
    });
  }
}

}  // namespace

int64_t workspace_bytes(const QuantMatmulParams& p) {
  if (path_for(p) == Path::none) return qmm_avx512bf16::workspace_bytes(p);
  return Layout(Geometry(p), std::max(p.num_threads, 1)).total;
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

void run(const QuantMatmulParams& p, void* workspace) {
  if (path_for(p) == Path::none) return qmm_avx512bf16::run(p, workspace);
  const int nthreads = std::max(p.num_threads, 1);
  Ctx c{&p, Geometry(p), Layout(Geometry(p), nthreads),
        reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(workspace), 64))};
  // Weight bytes times rows stands for the work, as in the other tiers (512 KiB per thread).
  const int threads = threads_for(p.qdata.numel() * c.g.M, nthreads, int64_t(512) << 10);
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

#else  // no AVX512-BF16 in this build (not x86-64): the tier is never supported

int64_t workspace_bytes(const QuantMatmulParams& p) { return qmm_avx512bf16::workspace_bytes(p); }
const char* describe(const QuantMatmulParams& p) { return qmm_avx512bf16::describe(p); }
void run(const QuantMatmulParams& p, void* workspace) { qmm_avx512bf16::run(p, workspace); }

#endif

}  // namespace qmm_amx
}  // namespace llmk

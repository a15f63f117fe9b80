// The fused attention kernel (FlashAttention-2 schedule), written once for every CPU tier.
// Included by attention_<tier>.cpp after it defines LLMK_VEC_BYTES and LLMK_ISA_NS.
//
// Forward, per (batch, head, tile of kBQ queries): S = Q K^T for one tile of kBK keys at a
// time, online softmax in base 2 (running max m, running sum l), O += P V; the log-sum-exp
// (natural units) is saved for the backward. K^T and V are packed once per round of heads
// (float32, or bf16 pairs on the avx512_bf16 tier), so the inner loop only multiplies; few
// queries against many keys pack them a segment at a time, carrying each tile's state.
// Backward, per (batch, kv head, chunk of key tiles): recompute P from the log-sum-exp,
// accumulate dK, dV for the tile in scratch and dQ into a float32 buffer per chunk (summed
// at the end), so no two threads ever write the same memory. Tiles the causal/window band
// hides are skipped in both directions; boundary tiles are masked element by element.
#pragma once
#include <cmath>

#include "../common/checks.h"
#include "../common/thread_pool.h"
#include "attention.h"
#include "attention_dropout.h"
#include "micro_gemm.h"
#include "tensor_tiles.h"
#include "vec.h"

namespace llmk {
namespace LLMK_ISA_NS {

constexpr int64_t kBQ = 64;              // queries per tile
constexpr int64_t kBK = 64;              // keys per tile (a multiple of every W)
constexpr int64_t kDiagChunk = 4 * kMR;  // rows per product on tiles the causal diagonal cuts
// ... and with bf16 products on AMX tiles (16 rows each).
constexpr int64_t kDiagChunkBf16 = kHasAmx ? 32 : kDiagChunk;
constexpr float kNegInf = -INFINITY;
// The forward works in base 2 (scores times log2 e, weights 2^(s - m)): exp2 is cheaper.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------- scores

struct Geometry {
  int64_t B, Hq, Hk, L, S, D, Dv, Dp, Dvp, group, nqt, nkt;
  int64_t D2, Dv2;  // head dims rounded up to pairs (bf16 dot products)
  bool bf16dot;  // bf16 inputs on a tier with bf16 dot products: forward multiplies in bf16
  explicit Geometry(const AttentionParams& p) {
    B = p.q.sizes[0]; Hq = p.q.sizes[1]; L = p.q.sizes[2]; D = p.q.sizes[3];
    Hk = p.k.sizes[1]; S = p.k.sizes[2]; Dv = p.v.sizes[3];
    Dp = round_up(D, W); Dvp = round_up(Dv, W);
    group = Hq / Hk;
    nqt = (L + kBQ - 1) / kBQ; nkt = (S + kBK - 1) / kBK;
    D2 = round_up(D, 2);
    Dv2 = round_up(Dv, 2);
    bf16dot = kHasBf16Dot && p.q.dtype == DType::bf16;
  }
};

// Applies attn_mask to the scores of query (b, h, i) against keys j0 .. j0 + n, stored at
// out[j * stride]: a bool mask hides keys (-inf), a float one is added (times `unit`, the
// scores' units per nat).
inline void apply_mask_row(const TensorView& m, int64_t b, int64_t h, int64_t i, int64_t j0,
                           int64_t n, float* out, int64_t stride, float unit) {
  const int64_t js = m.strides[3];
  if (m.dtype == DType::boolean) {
    const uint8_t* mp = at4<const uint8_t>(m, b, h, i) + j0 * js;
    for (int64_t j = 0; j < n; ++j)
      if (!mp[j * js]) out[j * stride] = kNegInf;
    return;
  }
  with_float_type(m.dtype, [&](auto tag) {
    using MT = decltype(tag);
    const MT* mp = at4<const MT>(m, b, h, i) + j0 * js;
    for (int64_t j = 0; j < n; ++j) out[j * stride] += unit * to_f32(mp[j * js]);
  });
}

// Turns raw scores u = (scale q) . k of a tile into s: softcap, additive or bool mask,
// the causal/window band and the padding columns [nk, nkp) (-inf). If T is given it
// receives tanh(u / softcap), which the backward needs. Scores are first multiplied by
// pre_mul (the scale, when it was not folded into Q). Scores are in units of `unit` nats
// (log2(e) when the forward works in base 2, 1 in the backward): softcap and additive
// masks, given in nats, are converted.
void transform_scores(const AttentionParams& p, int64_t b, int64_t h, float* S, int64_t ld,
                      int64_t i0, int64_t mq, int64_t j0, int64_t nk, int64_t nkp, float* T,
                      float pre_mul, float unit) {
  const int64_t off = p.diag_offset, left = p.window_left, right = p.window_right;
  const bool clip_left = left >= 0 && j0 < (i0 + mq - 1) + off - left;
  const bool clip_right = right >= 0 && (j0 + nk - 1) > i0 + off + right;
  const bool cap = p.softcap > 0.f;
  const vf vcap = splat(p.softcap * unit), vinv = splat(1.f / (p.softcap * unit));
  for (int64_t r = 0; r < mq; ++r) {
    float* row = S + r * ld;
    const int64_t i = i0 + r;
    if (pre_mul != 1.f)
      for (int64_t c = 0; c < nkp; c += W) storeu(row + c, loadu(row + c) * splat(pre_mul));
    if (cap) {
      for (int64_t c = 0; c < nkp; c += W) {
        const vf t = vtanh(loadu(row + c) * vinv);
        if (T) storeu(T + r * ld + c, t);
        storeu(row + c, t * vcap);
      }
    }
    if (p.mask.data) apply_mask_row(p.mask, b, h, i, j0, nk, row, 1, unit);
    if (clip_left) {
      const int64_t lo = min_<int64_t>(i + off - left - j0, nk);
      for (int64_t c = 0; c < lo; ++c) row[c] = kNegInf;
    }
    if (clip_right) {
      for (int64_t c = max_<int64_t>(i + off + right + 1 - j0, 0); c < nk; ++c) row[c] = kNegInf;
    }
    for (int64_t c = nk; c < nkp; ++c) row[c] = kNegInf;
  }
}

// Inclusive range of keys some query in [i0, i0 + mq) may see among S keys with this diagonal
// offset; empty when lo > hi.
LLMK_INLINE void key_range(const AttentionParams& p, int64_t S, int64_t diag, int64_t i0,
                           int64_t mq, int64_t* lo, int64_t* hi) {
  *lo = 0; *hi = S - 1;
  if (p.window_left >= 0) *lo = max_<int64_t>(*lo, i0 + diag - p.window_left);
  if (p.window_right >= 0) *hi = min_<int64_t>(*hi, i0 + mq - 1 + diag + p.window_right);
}
LLMK_INLINE void key_range(const AttentionParams& p, int64_t S, int64_t i0, int64_t mq,
                           int64_t* lo, int64_t* hi) {
  key_range(p, S, p.diag_offset, i0, mq, lo, hi);
}

// ---------------------------------------------------------------- keys a mask hides
// A mask hides a key from a row with false (bool) or a float value the forward's scaling to
// base 2 takes to -inf: -inf, and anything below about -2.36e38 (float32's and bfloat16's
// finfo.min, the padding value of models' float masks); NaN stays visible. Key tiles a mask
// hides from every row of a query tile are skipped like the band's: the padding of a batch,
// causal masks given as masks, packed sequences, sliding windows (transformers passes all of
// these as masks). Their weights would be exactly 0, so skipping them changes no result.

// The first key in [from, to) the row leaves visible, or `to` (down: the last in [to, from],
// scanning from `from` down, or to - 1).
template <class Visible>
LLMK_INLINE int64_t first_visible(const Visible& visible, int64_t from, int64_t to) {
  constexpr int64_t kRun = 16;  // keys checked without a branch (vectorizable)
  int64_t j = from;
  for (; j + kRun <= to; j += kRun) {
    bool any = false;
    for (int64_t x = 0; x < kRun; ++x) any |= visible(j + x);
    if (any) break;
  }
  for (; j < to; ++j)
    if (visible(j)) return j;
  return to;
}
template <class Visible>
LLMK_INLINE int64_t last_visible(const Visible& visible, int64_t from, int64_t to) {
  constexpr int64_t kRun = 16;
  int64_t j = from;
  for (; j - kRun + 1 >= to; j -= kRun) {
    bool any = false;
    for (int64_t x = 0; x < kRun; ++x) any |= visible(j - x);
    if (any) break;
  }
  for (; j >= to; --j)
    if (visible(j)) return j;
  return to - 1;
}

// Widens [*first, *last] (empty: first > last) to the visible keys of mask row (b, h, i) in
// [lo, hi]; only the keys outside the current range are read.
inline void widen_to_visible(const TensorView& m, int64_t b, int64_t h, int64_t i, int64_t lo,
                             int64_t hi, int64_t* first, int64_t* last) {
  const int64_t js = m.strides[3];
  auto widen = [&](auto visible) {
    const int64_t f = first_visible(visible, lo, min_(*first, hi + 1));
    if (f < *first) *first = f;
    if (*first > hi) return;  // nothing visible yet
    const int64_t l = last_visible(visible, hi, max_(*last + 1, *first));
    if (l > *last) *last = l;
  };
  if (m.dtype == DType::boolean) {
    const uint8_t* mp = at4<const uint8_t>(m, b, h, i);
    return widen([&](int64_t j) { return mp[j * js] != 0; });
  }
  with_float_type(m.dtype, [&](auto tag) {
    using MT = decltype(tag);
    const MT* mp = at4<const MT>(m, b, h, i);
    widen([&](int64_t j) { return to_f32(mp[j * js]) * kLog2e != kNegInf; });
  });
}

// Narrows [*lo, *hi] to the keys the mask leaves visible to some row (b, h, i), h in [h0,
// h1), i in [i0, i1): rows the mask broadcasts (stride 0) are read once.
inline void mask_visible_keys(const TensorView& m, int64_t b, int64_t h0, int64_t h1, int64_t i0,
                              int64_t i1, int64_t* lo, int64_t* hi) {
  if (m.strides[1] == 0) h1 = min_(h1, h0 + 1);
  if (m.strides[2] == 0) i1 = min_(i1, i0 + 1);
  int64_t first = *hi + 1, last = *lo - 1;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t i = i0; i < i1 && !(first == *lo && last == *hi); ++i)
      widen_to_visible(m, b, h, i, *lo, *hi, &first, &last);
  *lo = first;
  *hi = last;
}

// The tiled paths' table of those ranges: one per (mask batch, mask head, query tile), where
// the mask's batch and heads count once if it broadcasts them. Filled before the products,
// so the heads a mask broadcasts over scan it once.
struct MaskKeyTable {
  int64_t Bm = 0, Hm = 0, nqt = 0;
  MaskKeyTable(const AttentionParams& p, int64_t B, int64_t Hq, int64_t nqt_)
      : Bm(p.mask.data ? (p.mask.strides[0] ? B : 1) : 0),
        Hm(p.mask.data && p.mask.strides[1] ? Hq : 1), nqt(nqt_) {}
  int64_t entries() const { return Bm * Hm * nqt; }
  int64_t index(const AttentionParams& p, int64_t b, int64_t h, int64_t qt) const {
    return ((p.mask.strides[0] ? b : 0) * Hm + (p.mask.strides[1] ? h : 0)) * nqt + qt;
  }
};

// Inclusive range of queries that may see some key in [j0, j0 + nk).
LLMK_INLINE void query_range(const AttentionParams& p, int64_t L, int64_t j0, int64_t nk,
                             int64_t* lo, int64_t* hi) {
  *lo = 0; *hi = L - 1;
  if (p.window_right >= 0) *lo = max_<int64_t>(*lo, j0 - p.diag_offset - p.window_right);
  if (p.window_left >= 0) *hi = min_<int64_t>(*hi, j0 + nk - 1 - p.diag_offset + p.window_left);
}

// ---------------------------------------------------------------- workspace layout

struct Bump {
  int64_t bytes = 0;
  int64_t take_floats(int64_t n) {
    const int64_t o = round_up(bytes, 64);
    bytes = o + n * 4;
    return o;
  }
};

LLMK_INLINE int64_t kt_tile_words(const Geometry& g) {
  return g.bf16dot ? g.D2 / 2 * kBK : g.D * kBK;
}
LLMK_INLINE int64_t v_tile_words(const Geometry& g) {
  return g.bf16dot ? kBK / 2 * g.Dvp : kBK * g.Dvp;
}

// Batch x kv-head pairs are processed in rounds, and the packed operands and float32
// buffers are sized for one round: the workspace stays near kRoundBytes (or what 2 heads
// per thread need), whatever the batch size and head count.
constexpr int64_t kRoundBytes = int64_t(8) << 20;

LLMK_INLINE int64_t heads_per_round(const AttentionParams& p, int64_t heads,
                                    int64_t bytes_per_head, int nthreads) {
  const int64_t budget = p.round_bytes > 0 ? p.round_bytes : kRoundBytes;
  const int64_t by_memory = budget / max_<int64_t>(bytes_per_head, 1);
  // An explicit budget (tests) may go down to one head per round.
  const int64_t min_heads = p.round_bytes > 0 ? 1 : 2 * int64_t(nthreads);
  return max_<int64_t>(1, min_<int64_t>(heads, max_<int64_t>(by_memory, min_heads)));
}

// A query tile's running softmax state: O rows, W partial row sums and the row max.
LLMK_INLINE int64_t carried_words(const Geometry& g) { return kBQ * (g.Dvp + W + 1); }

struct ForwardLayout {
  int64_t hpr;        // kv heads per round
  int64_t seg_tiles;  // key tiles packed at a time: all of them, or a segment
  int64_t kt_all, v_all, carried, scratch, per_thread, bad_rows, mask_keys, total;
  ForwardLayout(const AttentionParams& p, const Geometry& g, int nthreads) {
    const int64_t tile_bytes = (kt_tile_words(g) + v_tile_words(g)) * 4;
    hpr = heads_per_round(p, g.B * g.Hk, g.nkt * tile_bytes, nthreads);
    // Few queries against many keys (a chunk of a prompt against a long cache): packing the
    // round's whole K and V (a 64-query chunk against 64K keys: 268 MB on 2 threads) far
    // outgrows the budget while the queries' softmax state is small. Then the keys are packed
    // a segment at a time and each query tile's state is carried between segments.
    const int64_t budget = p.round_bytes > 0 ? p.round_bytes : kRoundBytes;
    const int64_t whole = hpr * g.nkt * tile_bytes;
    const int64_t state = hpr * g.group * g.nqt * carried_words(g) * 4;
    seg_tiles = max_<int64_t>(g.nkt, 1);
    if (whole > budget && 2 * state <= whole)
      seg_tiles = min_<int64_t>(seg_tiles, max_<int64_t>(1, (budget - min_(state, budget / 2)) /
                                                                (hpr * tile_bytes)));
    Bump a;
    // float32 tiles, or bf16 pairs (half the words) on the bf16 dot-product path
    kt_all = a.take_floats(hpr * seg_tiles * kt_tile_words(g));
    v_all = a.take_floats(hpr * seg_tiles * v_tile_words(g));
    carried = a.take_floats(seg_tiles < g.nkt ? hpr * g.group * g.nqt * carried_words(g) : 0);
    per_thread = round_up((kBQ * g.Dp + kBQ * kBK + kBQ * g.Dvp + kBQ * W + 5 * kBQ) * 4 +
                          (g.bf16dot ? kBQ * kBK * 2 : 0), 64);
    scratch = a.take_floats(0);
    a.bytes = scratch + per_thread * nthreads;
    bad_rows = a.take_floats(2 * int64_t(nthreads));  // one int64 per thread
    mask_keys = a.take_floats(4 * MaskKeyTable(p, g.B, g.Hq, g.nqt).entries());  // int64 pairs
    total = a.bytes;
  }
};

struct BackwardLayout {
  int64_t hpr;    // kv heads per round
  int64_t rows;   // query rows of one round (hpr x group x L)
  int64_t tiles;  // query tiles of one round (hpr x group x nqt)
  int64_t nchunks, tiles_per_chunk;
  int64_t qp, q2, dop, delta, dq_acc, scratch, per_thread, mask_keys, total;
  BackwardLayout(const AttentionParams& p, const Geometry& g, int nthreads) {
    hpr = heads_per_round(p, g.B * g.Hk, g.group * g.L * (2 * g.Dp + g.Dvp + 1) * 4, nthreads);
    rows = hpr * g.group * g.L;
    // Enough chunks of key tiles to keep every thread busy when a round has few heads.
    nchunks = min_<int64_t>(max_<int64_t>(g.nkt, 1), max_<int64_t>(1, (4 * nthreads + hpr - 1) / hpr));
    tiles_per_chunk = (g.nkt + nchunks - 1) / max_<int64_t>(nchunks, 1);
    if (tiles_per_chunk > 0) nchunks = (g.nkt + tiles_per_chunk - 1) / tiles_per_chunk;
    nchunks = max_<int64_t>(nchunks, 1);
    Bump a;
    // float32 rows of scaled Q (and of dO off the bf16 path); on the bf16 dot-product path,
    // per query tile, Q as bf16 pairs along the head dim (Q2) and dO along the head dim and
    // along the queries (dO2, dOv).
    tiles = hpr * g.group * g.nqt;
    qp = a.take_floats(rows * g.Dp);
    q2 = a.take_floats(g.bf16dot ? tiles * kBQ * g.D2 / 2 : 0);
    dop = a.take_floats(g.bf16dot ? tiles * (kBQ * g.Dv2 / 2 + kBQ / 2 * g.Dvp) : rows * g.Dvp);
    delta = a.take_floats(rows);
    dq_acc = a.take_floats(nchunks * rows * g.Dp);
    // amx: dV is summed transposed on the tiles, and turned into rows before its store
    per_thread = round_up((g.D * kBK + kBK * g.Dp + g.Dv * kBK + 3 * kBQ * kBK + kBK * g.Dp +
                           kBK * g.Dvp + (g.bf16dot ? kBQ / 2 * kBK : 0) +
                           (g.bf16dot && kHasAmx ? kBK * g.Dvp : 0)) * 4, 64);
    scratch = a.take_floats(0);
    a.bytes = scratch + per_thread * nthreads;
    mask_keys = a.take_floats(4 * MaskKeyTable(p, g.B, g.Hq, g.nqt).entries());  // int64 pairs
    total = a.bytes;
  }
};

// Fills the MaskKeyTable at ws + offset: per entry the keys [lo, hi] within the band some row
// of the query tile may see (lo > hi: none).
struct MaskKeysCtx {
  const AttentionParams* p;
  const Geometry* g;
  MaskKeyTable t;
  int64_t* keys;
};

void mask_keys_item(void* vctx, int64_t item, int) {
  const MaskKeysCtx& c = *static_cast<const MaskKeysCtx*>(vctx);
  const Geometry& g = *c.g;
  const int64_t qt = item % c.t.nqt, bh = item / c.t.nqt, hm = bh % c.t.Hm, bm = bh / c.t.Hm;
  const int64_t i0 = qt * kBQ, mq = min_(kBQ, g.L - i0);
  int64_t lo, hi;
  key_range(*c.p, g.S, i0, mq, &lo, &hi);
  if (lo <= hi) mask_visible_keys(c.p->mask, bm, hm, hm + 1, i0, i0 + mq, &lo, &hi);
  c.keys[2 * item] = lo;
  c.keys[2 * item + 1] = hi;
}

LLMK_INLINE const int64_t* mask_keys_at(char* ws, int64_t offset) {
  return reinterpret_cast<const int64_t*>(ws + offset);
}

void fill_mask_keys(const AttentionParams& p, const Geometry& g, char* ws, int64_t offset, int run) {
  const MaskKeyTable t(p, g.B, g.Hq, g.nqt);
  if (t.entries() == 0) return;
  MaskKeysCtx c{&p, &g, t, reinterpret_cast<int64_t*>(ws + offset)};
  parallel_for(t.entries(), run, mask_keys_item, &c);
}

// The keys [lo, hi] query tile qt of head (b, h) may see by the mask (and the band).
LLMK_INLINE const int64_t* tile_mask_keys(const AttentionParams& p, const Geometry& g, char* ws,
                                          int64_t offset, int64_t b, int64_t h, int64_t qt) {
  return mask_keys_at(ws, offset) + 2 * MaskKeyTable(p, g.B, g.Hq, g.nqt).index(p, b, h, qt);
}

// Waking pool threads costs tens of microseconds: a call with less work than about
// kMinWorkPerThread multiply-adds per thread (decoding one token, say) uses fewer threads.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;

inline int threads_for_work(const Geometry& g, int nthreads) {
  return threads_for(g.B * g.Hq * g.L * g.S * (g.D + g.Dv), nthreads, kMinWorkPerThread);
}


int64_t backward_workspace_bytes(const AttentionParams& p) {
  return BackwardLayout(p, Geometry(p), max_(p.num_threads, 1)).total;
}

// ---------------------------------------------------------------- forward

struct ForwardCtx {
  const AttentionParams* p;
  const ForwardIO* io;
  Geometry g;
  ForwardLayout lay;
  char* ws;
  int64_t h0 = 0;  // first flat (batch x kv-head) index of the current round
  int64_t seg_lo = 0, seg_hi = 0;  // key tiles of the current segment
  // Packed tiles of the round's kv head `local` (kt in the current segment).
  float* kt_tile(int64_t local, int64_t kt) const {
    return reinterpret_cast<float*>(ws + lay.kt_all) +
           (local * lay.seg_tiles + kt - seg_lo) * kt_tile_words(g);
  }
  float* v_tile(int64_t local, int64_t kt) const {
    return reinterpret_cast<float*>(ws + lay.v_all) +
           (local * lay.seg_tiles + kt - seg_lo) * v_tile_words(g);
  }
  // The carried softmax state of a round's item, when keys come in segments.
  float* carried(int64_t item) const {
    return reinterpret_cast<float*>(ws + lay.carried) + item * carried_words(g);
  }
  bool segmented() const { return lay.seg_tiles < g.nkt; }
};


// K^T tile as pairs along the head dim: Kt2[d2][j] = (K[j][2 d2], K[j][2 d2 + 1]).
// V tile as pairs along keys: V2[j2][e] = (V[2 j2][e], V[2 j2 + 1][e]).
void forward_pack_bf16(const ForwardCtx& c, int64_t b, int64_t hk, int64_t local, int64_t kt,
                       int64_t j0, int64_t nk) {
  const Geometry& g = c.g;
  const Bf16Rows K(c.p->k, b, hk, j0, nk, g.D), V(c.p->v, b, hk, j0, nk, g.Dv);
  const int64_t nkp = round_up(nk, W);  // the products read no further
  uint32_t* kt2 = reinterpret_cast<uint32_t*>(c.kt_tile(local, kt));
  for (int64_t d2 = 0; d2 < g.D2 / 2; ++d2)
    for (int64_t j = 0; j < nkp; ++j) kt2[d2 * kBK + j] = pair(K(j, 2 * d2), K(j, 2 * d2 + 1));
  uint32_t* v2 = reinterpret_cast<uint32_t*>(c.v_tile(local, kt));
  for (int64_t j2 = 0; j2 < nkp / 2; ++j2)
    for (int64_t e = 0; e < g.Dvp; ++e) v2[j2 * g.Dvp + e] = pair(V(2 * j2, e), V(2 * j2 + 1, e));
}

void forward_pack_item(void* vctx, int64_t item, int) {
  const ForwardCtx& c = *static_cast<const ForwardCtx*>(vctx);
  const Geometry& g = c.g;
  const int64_t n = c.seg_hi - c.seg_lo;
  const int64_t kt = c.seg_lo + item % n, local = item / n, flat = c.h0 + local;
  const int64_t b = flat / g.Hk, hk = flat % g.Hk;
  const int64_t j0 = kt * kBK, nk = min_(kBK, g.S - j0);
  if (g.bf16dot) return forward_pack_bf16(c, b, hk, local, kt, j0, nk);
  // Zero padding only as far as the products read: K^T to a multiple of W; V not at all
  // (P V sums over the tile's real keys only).
  load_rows_transposed_any(c.p->k, b, hk, j0, nk, g.D, c.kt_tile(local, kt), kBK, round_up(nk, W));
  load_rows_any(c.p->v, b, hk, j0, nk, g.Dv, 1.f, c.v_tile(local, kt), g.Dvp, g.Dvp);
}

template <bool BF>
void forward_item(void* vctx, int64_t item, int tid) {
  const ForwardCtx& c = *static_cast<const ForwardCtx*>(vctx);
  const AttentionParams& p = *c.p;
  const Geometry& g = c.g;
  // Heaviest (last, under a causal mask) query tiles first: shorter tail.
  const int64_t qt = g.nqt - 1 - item % g.nqt, rest = item / g.nqt;
  const int64_t local = rest / g.group, flat = c.h0 + local;
  const int64_t b = flat / g.Hk, hk = flat % g.Hk, h = hk * g.group + rest % g.group;
  const int64_t i0 = qt * kBQ, mq = min_(kBQ, g.L - i0);

  float* Q = reinterpret_cast<float*>(c.ws + c.lay.scratch + c.lay.per_thread * tid);
  float* S = Q + kBQ * g.Dp;
  float* O = S + kBQ * kBK;
  float* lsum = O + kBQ * g.Dvp;  // per row, W partial sums: one horizontal add at the end
  float* m = lsum + kBQ * W;      // running max
  float* m_new = m + kBQ;
  const bool segmented = c.segmented(), first = c.seg_lo == 0, last = c.seg_hi >= g.nkt;
  if (segmented) {  // O, lsum and m live on between the segments of keys
    O = c.carried(item);
    lsum = O + kBQ * g.Dvp;
    m = lsum + kBQ * W;
  }
  float* m_use = m_new + kBQ;     // m_new, or 0 while every key so far is masked (P = 0)
  float* alpha = m_use + kBQ;     // exp(m - m_use): rescales O and lsum when the max grows
  float* inv = alpha + kBQ;
  uint16_t* Pb = reinterpret_cast<uint16_t*>(inv + kBQ);  // P in bf16 (BF only)
  uint32_t* Q2 = reinterpret_cast<uint32_t*>(Q);          // Q as bf16 pairs, unscaled (BF only)
  const TileScope tiles(BF && kHasAmx);
  const DropoutKeep drop(p.dropout_p);  // weights dropped after the row sums: lse is undropped

  if constexpr (BF) {
    const Bf16Rows Qr(p.q, b, h, i0, mq, g.D);
    for (int64_t r = 0; r < mq; ++r)
      for (int64_t d2 = 0; d2 < g.D2 / 2; ++d2)
        Q2[r * (g.D2 / 2) + d2] = pair(Qr(r, 2 * d2), Qr(r, 2 * d2 + 1));
  } else {
    load_rows_any(p.q, b, h, i0, mq, g.D, p.scale * kLog2e, Q, g.Dp, g.Dp);
  }
  for (int64_t r = 0; r < round_up(mq, W); ++r) {  // the vector passes read whole vectors
    m_use[r] = 0.f;
    if (!first) continue;
    m[r] = kNegInf;
    storeu(lsum + r * W, vf{});
  }
  if (first)
    for (int64_t x = 0; x < mq * g.Dvp; ++x) O[x] = 0.f;

  int64_t klo, khi;
  key_range(p, g.S, i0, mq, &klo, &khi);
  if (p.mask.data) {
    const int64_t* mk = tile_mask_keys(p, g, c.ws, c.lay.mask_keys, b, h, qt);
    klo = mk[0];
    khi = mk[1];
  }
  if (klo <= khi) {
    const int64_t kt_end = min_(khi / kBK, c.seg_hi - 1);
    for (int64_t kt = max_(klo / kBK, c.seg_lo); kt <= kt_end; ++kt) {
      const int64_t j0 = kt * kBK, nk = min_(kBK, g.S - j0), nkp = round_up(nk, W);
      // A tile the band cuts on the right (the causal diagonal) is multiplied in row chunks,
      // each only as wide as the keys its last row may see; transform_scores masks the rest.
      const bool cut = p.window_right >= 0 && (j0 + nk - 1) > i0 + p.diag_offset + p.window_right;
      const int64_t chunk = cut ? (BF ? kDiagChunkBf16 : kDiagChunk) : mq;
      auto chunk_cols = [&](int64_t r_end) {
        if (!cut) return nkp;
        const int64_t seen = i0 + r_end - 1 + p.diag_offset + p.window_right + 1 - j0;
        return min_(nkp, round_up(max_<int64_t>(seen, 0), W));
      };
      for (int64_t r0 = 0; r0 < mq; r0 += chunk) {
        const int64_t rows = min_(chunk, mq - r0), cols = chunk_cols(r0 + rows);
        if (cols == 0) continue;
        if constexpr (BF) {
          gemm_bf16(rows, cols, g.D2 / 2, Q2 + r0 * (g.D2 / 2), g.D2 / 2, 1,
                    reinterpret_cast<const uint32_t*>(c.kt_tile(local, kt)), kBK, S + r0 * kBK,
                    kBK, false, tiles);
        } else {
          gemm(rows, cols, g.D, Q + r0 * g.Dp, g.Dp, 1, c.kt_tile(local, kt), kBK, S + r0 * kBK,
               kBK, false);
        }
      }
      transform_scores(p, b, h, S, kBK, i0, mq, j0, nk, nkp, nullptr, BF ? p.scale * kLog2e : 1.f,
                       kLog2e);
      for (int64_t r = 0; r < mq; ++r) {
        const float* row = S + r * kBK;
        vf mx = loadu(row);
        for (int64_t j = W; j < nkp; j += W) mx = vmax(mx, loadu(row + j));
        const float tile_max = hmax(mx);
        m_new[r] = tile_max > m[r] ? tile_max : m[r];
        m_use[r] = m_new[r] == kNegInf ? 0.f : m_new[r];
      }
      for (int64_t r = 0; r < mq; r += W)  // rows past mq hold m = -inf, m_use = 0: harmless
        storeu(alpha + r, vexp2_nonpos(loadu(m + r) - loadu(m_use + r)));
      for (int64_t r = 0; r < mq; ++r) {
        float* row = S + r * kBK;
        const vf vm = splat(m_use[r]);
        vf sum = vf{};
        for (int64_t j = 0; j < nkp; j += W) {
          const vf e = vexp2_nonpos(loadu(row + j) - vm);
          storeu(row + j, e);
          sum += e;
        }
        m[r] = m_new[r];
        if (drop.active())
          drop.apply(row, nkp, dropout_row_key(p.dropout_seed, uint64_t((b * g.Hq + h) * g.L + i0 + r)),
                     j0);
        const float a = alpha[r];
        if (a != 1.f) {
          const vf va = splat(a);
          storeu(lsum + r * W, loadu(lsum + r * W) * va + sum);
          float* o = O + r * g.Dvp;
          for (int64_t e = 0; e < g.Dvp; e += W) storeu(o + e, loadu(o + e) * va);
        } else {
          storeu(lsum + r * W, loadu(lsum + r * W) + sum);
        }
      }
      for (int64_t r0 = 0; r0 < mq; r0 += chunk) {
        const int64_t rows = min_(chunk, mq - r0), cols = chunk_cols(r0 + rows);
        if (cols == 0) continue;  // P = 0 on these rows
        if constexpr (BF) {
          for (int64_t r = r0; r < r0 + rows; ++r) row_to_bf16(S + r * kBK, Pb + r * kBK, cols);
          gemm_bf16(rows, g.Dvp, cols / 2, reinterpret_cast<const uint32_t*>(Pb + r0 * kBK),
                    kBK / 2, 1, reinterpret_cast<const uint32_t*>(c.v_tile(local, kt)), g.Dvp,
                    O + r0 * g.Dvp, g.Dvp, true, tiles);
        } else {
          gemm(rows, g.Dvp, min_(nk, cols), S + r0 * kBK, kBK, 1, c.v_tile(local, kt), g.Dvp,
               O + r0 * g.Dvp, g.Dvp, true);
        }
      }
    }
  }
  if (!last) return;  // the state waits for the next segment of keys

  float* lse = at4<float>(c.io->lse, b, h, i0);
  const int64_t lse_stride = c.io->lse.strides[2];
  for (int64_t r = 0; r < mq; ++r) {
    const float lr = hsum(loadu(lsum + r * W));
    if (lr > 0.f) {
      inv[r] = 1.f / lr;
      lse[r * lse_stride] = (m[r] + std::log2(lr)) * kLn2;
    } else if (lr == 0.f) {  // every key masked: zeros, never NaN
      inv[r] = 0.f;
      lse[r * lse_stride] = kNegInf;
    } else {
      inv[r] = NAN;
      lse[r * lse_stride] = NAN;
    }
  }
  int64_t* bad = reinterpret_cast<int64_t*>(c.ws + c.lay.bad_rows);
  const TensorView* residual = c.io->out_residual.data ? &c.io->out_residual : nullptr;
  bad[tid] += store_rows_any(c.io->out, b, h, i0, mq, g.Dv, O, g.Dvp, 1.f, inv, residual);
}

// ---------------------------------------------------------------- decode-shaped forward
// A few queries (decoding one token, or a few speculative ones) against many keys: packing
// K and V into tiles would cost more than the attention. Instead each (batch, kv heads,
// chunk of keys) item streams its keys once in blocks, reading float32 rows in place,
// and keeps the keys in the vector lanes throughout: scores of W keys at a time (one
// accumulator per key, so no FMA waits on the one before, then one transposing sum), the
// online softmax on whole vectors of keys, and P V with enough accumulators to keep the FMA
// units busy for one query row. Chunks of keys (flash-decoding) keep every thread busy when
// batch x heads is small; their partial results are merged at the end.

constexpr int64_t kDecodeMinChunk = 512; // keys per chunk, at least
// Keys per block (32 measured within noise of 64 on the Zen 3: 0.9-1.1x over 8 cases).
constexpr int64_t kDecodeBK = 64;
constexpr int kDecodeAcc = 8;            // independent accumulators in P V (FMA latency x ports)

LLMK_INLINE bool use_decode(const AttentionParams& p, const Geometry& g) {
  return p.dropout_p == 0.0 && attention_decode_shaped(g.L, g.group);
}

// Per-thread counts of output rows holding NaN/Inf (each thread adds to its own slot).
LLMK_INLINE int64_t* reset_bad_rows(char* ws, int64_t offset, int nthreads) {
  int64_t* bad = reinterpret_cast<int64_t*>(ws + offset);
  for (int t = 0; t < nthreads; ++t) bad[t] = 0;
  return bad;
}

LLMK_INLINE int64_t total_bad_rows(const int64_t* bad, int nthreads) {
  int64_t total = 0;
  for (int t = 0; t < nthreads; ++t) total += bad[t];
  return total;
}

// Heads of one item are taken together, key block by key block: a cache laid out (B, S, H, D)
// keeps a key's heads side by side, so the item reads nh heads' rows of each 4 KiB page where
// it read one head's few hundred bytes (Zen 3, 2 threads, bf16, 32 heads, 2K / 8K keys, these
// same products: one head an item 4.2 / 23 ms, groups of 8 heads 2.2 / 10 ms).
constexpr int64_t kDecodeGroupBytes = int64_t(256) << 10;  // K and V of one block, all heads

struct DecodeLayout {
  int64_t R;                   // query rows per kv head
  int64_t nh, ngroups;         // kv heads per item, and groups of them per batch entry
  int64_t nchunks, chunk_len;  // key chunks per kv head
  int64_t head_state;          // floats of one head's state: Q rows, O rows, m, l, alpha, inv
  int64_t partial, scratch, per_thread, bad_rows, total;
  DecodeLayout(const Geometry& g, int elem_bytes, int nthreads) {
    R = g.group * g.L;
    head_state = round_up(R * g.Dp + R * g.Dvp + 4 * R, 16);
    // As many heads as fit the block budget (and their state the same), but so few that
    // batch x groups x key chunks can still give each thread 2 items (then chunks aim at 4).
    const int64_t block_bytes = max_<int64_t>(kDecodeBK * (g.D + g.Dv) * elem_bytes, 1);
    const int64_t max_chunks = max_<int64_t>(1, g.S / kDecodeMinChunk);
    const int64_t want = 4 * int64_t(nthreads), enough = 2 * int64_t(nthreads);
    const int64_t min_groups = (enough + g.B * max_chunks - 1) / max_<int64_t>(g.B * max_chunks, 1);
    nh = min_<int64_t>(kDecodeGroupBytes / block_bytes,
                       kDecodeGroupBytes / max_<int64_t>(head_state * 4, 1));
    nh = max_<int64_t>(1, min_<int64_t>(nh, g.Hk / max_<int64_t>(min_groups, 1)));
    ngroups = (g.Hk + nh - 1) / nh;
    nh = max_<int64_t>(1, (g.Hk + ngroups - 1) / max_<int64_t>(ngroups, 1));  // equal groups
    const int64_t items = max_<int64_t>(g.B * ngroups, 1);
    nchunks = min_<int64_t>(max_chunks, max_<int64_t>(1, (want + items - 1) / items));
    chunk_len = round_up((g.S + nchunks - 1) / nchunks, kDecodeBK);
    nchunks = max_<int64_t>(1, (g.S + chunk_len - 1) / max_<int64_t>(chunk_len, 1));
    Bump a;
    // per (kv head, chunk): O rows, then m and l per row
    partial = a.take_floats(nchunks > 1 ? g.B * g.Hk * nchunks * R * (g.Dvp + 2) : 0);
    per_thread = round_up((kDecodeBK * (g.Dp + g.Dvp + R) + nh * head_state) * 4, 64);
    scratch = a.take_floats(0);
    a.bytes = scratch + per_thread * nthreads;
    bad_rows = a.take_floats(2 * int64_t(nthreads));
    total = a.bytes;
  }
};

struct DecodeCtx {
  const AttentionParams* p;
  const ForwardIO* io;
  Geometry g;
  DecodeLayout lay;
  char* ws;
  bool in_place;  // decode_in_place
  float* partial(int64_t bh, int64_t ch) const {
    return reinterpret_cast<float*>(ws + lay.partial) +
           (bh * lay.nchunks + ch) * lay.R * (g.Dvp + 2);
  }
};

// Where the products read K and V: rows in the cache itself (its dtype T converted as it is
// read), or float32 copies in a per-thread tile (T float) for rows whose head dims the in-place
// reads do not cover (a strided last dim, a head dim not a multiple of the pairs below, K and
// V of different dtypes).
LLMK_INLINE bool decode_in_place(const AttentionParams& p, const Geometry& g) {
  if (p.k.dtype != p.v.dtype || p.k.strides[3] != 1 || p.v.strides[3] != 1) return false;
  const int64_t m = p.k.dtype == DType::f32 ? W : 2 * W;
  return g.D % m == 0 && g.Dv % m == 0;
}

// 2W values of a row as two float32 vectors. bf16 takes a row's 32-bit words whole: shifted
// left they are the even elements, masked the odd ones (two integer operations for 2W
// values, where widening in order takes shuffles, the conversion's bottleneck: it cost more
// than the products when each block was widened into a float32 tile first). Q rows are
// stored split the same way (split_pairs) and O rows come out split (join_pairs): a dot
// product or an axpy does not care about the order of its terms.
LLMK_INLINE void load_pair(const float* s, vf* a, vf* b) { *a = loadu(s); *b = loadu(s + W); }
LLMK_INLINE void load_pair(const BF16* s, vf* a, vf* b) {
  typedef uint32_t vu __attribute__((vector_size(LLMK_VEC_BYTES)));
  vu w;
  std::memcpy(&w, s, sizeof w);
  *a = (vf)(w << 16);
  *b = (vf)(w & 0xFFFF0000u);
}
LLMK_INLINE void load_pair(const F16* s, vf* a, vf* b) { *a = load_f32(s); *b = load_f32(s + W); }

template <class T> constexpr bool kSplitPairs = std::is_same<T, BF16>::value;

// row[0, n) (n a multiple of 2W) from element order into load_pair's, and back.
LLMK_INLINE void split_pairs(float* row, int64_t n) {
  for (int64_t x = 0; x < n; x += 2 * W) {
    const vf a = loadu(row + x), b = loadu(row + x + W);
    storeu(row + x, even_lanes(a, b));
    storeu(row + x + W, odd_lanes(a, b));
  }
}
LLMK_INLINE void join_pairs(float* row, int64_t n) {
  for (int64_t x = 0; x < n; x += 2 * W) {
    float t[2 * W];
    for (int i = 0; i < W; ++i) { t[2 * i] = row[x + i]; t[2 * i + 1] = row[x + W + i]; }
    std::memcpy(row + x, t, sizeof t);
  }
}

// ST[r * ld + j] = Q[r] . K[j] for RB query rows and the nb keys, W / RB keys at a time:
// RB x W / RB accumulators, so each key vector read serves RB rows and each query vector
// W / RB keys (a key at a time per row needed a load per product, the loads' limit), summed
// across lanes by one transposition (lane r * KB + j is row r, key j). D: a multiple of W
// for float32 rows, of 2W (load_pair's pairs) otherwise.
template <class T, int RB>
void decode_scores_rows(const float* Q, int64_t ldq, const T* K, int64_t ldk, int64_t nb,
                        int64_t D, float* ST, int64_t ld, const RowPrefetch* next) {
  constexpr int KB = W / RB;
  for (int64_t j0 = 0; j0 < nb; j0 += KB) {
    if (next) next->rows_from(j0, KB);
    const T* k[KB];
#pragma GCC unroll 16
    for (int jj = 0; jj < KB; ++jj) k[jj] = K + min_<int64_t>(j0 + jj, nb - 1) * ldk;
    vf acc[W];
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) acc[i] = vf{};
    if constexpr (std::is_same<T, float>::value) {
      // a vector at a time: nothing to split, and tiles' head dims are whole vectors only
      for (int64_t d = 0; d < D; d += W) {
        vf kv[KB];
#pragma GCC unroll 16
        for (int jj = 0; jj < KB; ++jj) kv[jj] = loadu(k[jj] + d);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          const vf qv = loadu(Q + r * ldq + d);
#pragma GCC unroll 16
          for (int jj = 0; jj < KB; ++jj) acc[r * KB + jj] += kv[jj] * qv;
        }
      }
    } else {
      for (int64_t d = 0; d < D; d += 2 * W) {
        vf ka[KB], kb[KB];
#pragma GCC unroll 16
        for (int jj = 0; jj < KB; ++jj) load_pair(k[jj] + d, &ka[jj], &kb[jj]);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) {
          const vf qa = loadu(Q + r * ldq + d), qb = loadu(Q + r * ldq + d + W);
#pragma GCC unroll 16
          for (int jj = 0; jj < KB; ++jj) {
            acc[r * KB + jj] += ka[jj] * qa;
            acc[r * KB + jj] += kb[jj] * qb;
          }
        }
      }
    }
    const vf sums = transpose_sums(acc);
    if (j0 + KB <= nb) {
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) std::memcpy(ST + r * ld + j0, &sums[r * KB], KB * sizeof(float));
    } else {
      for (int r = 0; r < RB; ++r)
        for (int64_t jj = 0; jj < nb - j0; ++jj) ST[r * ld + j0 + jj] = sums[r * KB + jj];
    }
  }
}

// next: rows to prefetch along the way (null: none), with the first rows' keys.
template <class T>
void decode_scores(const float* Q, int64_t ldq, int64_t R, const T* K, int64_t ldk, int64_t nb,
                   int64_t D, float* ST, int64_t ld, const RowPrefetch* next) {
  for (int64_t r0 = 0; r0 < R;) {
    const int64_t left = R - r0;
    const float* q = Q + r0 * ldq;
    float* st = ST + r0 * ld;
    if (left >= 4 && W >= 4) {
      decode_scores_rows<T, 4>(q, ldq, K, ldk, nb, D, st, ld, r0 == 0 ? next : nullptr);
      r0 += 4;
    } else if (left >= 2) {
      decode_scores_rows<T, 2>(q, ldq, K, ldk, nb, D, st, ld, r0 == 0 ? next : nullptr);
      r0 += 2;
    } else {
      decode_scores_rows<T, 1>(q, ldq, K, ldk, nb, D, st, ld, r0 == 0 ? next : nullptr);
      r0 += 1;
    }
  }
}

// O[r][e] = alpha[r] O[r][e] + sum_j P[r][j] V[j][e] for RB rows and EV vectors of e (EV
// even: load_pair's pairs): the block's products are summed from zero and added once (a
// blocked sum, as micro() does).
template <class T, int RB, int EV>
__attribute__((noinline)) void decode_pv(int64_t nb, const float* P, int64_t ldp, const T* V,
                                         int64_t ldv, float* O, int64_t ldo, const float* alpha,
                                         const RowPrefetch* next) {
  static_assert(EV % 2 == 0, "EV counts whole pairs");
  vf acc[RB][EV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < EV; ++v) acc[r][v] = vf{};
  for (int64_t j = 0; j < nb; ++j) {
    if (next) next->rows_from(j, 1);
    vf pj[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) pj[r] = splat(P[r * ldp + j]);
#pragma GCC unroll 8
    for (int v = 0; v < EV; v += 2) {
      vf a, b;
      load_pair(V + j * ldv + v * W, &a, &b);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        acc[r][v] += pj[r] * a;
        acc[r][v + 1] += pj[r] * b;
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < EV; ++v)
      storeu(O + r * ldo + v * W, loadu(O + r * ldo + v * W) * splat(alpha[r]) + acc[r][v]);
}

// One vector of e for float32 rows (in place or tiles) whose head dim is an odd number of
// vectors.
template <int RB>
void decode_pv_last(int64_t nb, const float* P, int64_t ldp, const float* V, int64_t ldv,
                    float* O, int64_t ldo, const float* alpha) {
  vf acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = vf{};
  for (int64_t j = 0; j < nb; ++j) {
    const vf x = loadu(V + j * ldv);
    for (int r = 0; r < RB; ++r) acc[r] += splat(P[r * ldp + j]) * x;
  }
  for (int r = 0; r < RB; ++r) storeu(O + r * ldo, loadu(O + r * ldo) * splat(alpha[r]) + acc[r]);
}

template <class T, int RB>
void decode_pv_block(int64_t Dvp, int64_t nb, const float* P, int64_t ldp, const T* V,
                     int64_t ldv, float* O, int64_t ldo, const float* alpha,
                     const RowPrefetch* next) {
  constexpr int kMax = kDecodeAcc / RB;
  int64_t e0 = 0;
  while (e0 + 2 * W <= Dvp) {
    const RowPrefetch* pf = e0 == 0 ? next : nullptr;  // with the first call's values
    const int64_t left = (Dvp - e0) / W;
    if (kMax >= 8 && left >= 8) {
      decode_pv<T, RB, (kMax >= 8 ? 8 : 2)>(nb, P, ldp, V + e0, ldv, O + e0, ldo, alpha, pf);
      e0 += (kMax >= 8 ? 8 : 2) * W;
    } else if (kMax >= 4 && left >= 4) {
      decode_pv<T, RB, (kMax >= 4 ? 4 : 2)>(nb, P, ldp, V + e0, ldv, O + e0, ldo, alpha, pf);
      e0 += (kMax >= 4 ? 4 : 2) * W;
    } else {
      decode_pv<T, RB, 2>(nb, P, ldp, V + e0, ldv, O + e0, ldo, alpha, pf);
      e0 += 2 * W;
    }
  }
  if constexpr (std::is_same<T, float>::value) {
    if (e0 < Dvp) decode_pv_last<RB>(nb, P, ldp, V + e0, ldv, O + e0, ldo, alpha);
  }
}

// next: as decode_scores', with the first rows' first values.
template <class T>
void decode_pv_rows(int64_t R, int64_t Dvp, int64_t nb, const float* P, int64_t ldp,
                    const T* V, int64_t ldv, float* O, const float* alpha,
                    const RowPrefetch* next) {
  for (int64_t r0 = 0; r0 < R;) {
    const int64_t rows = R - r0 >= 4 ? 4 : (R - r0 >= 2 ? 2 : 1);
    const float* p = P + r0 * ldp;
    float* o = O + r0 * Dvp;
    const RowPrefetch* pf = r0 == 0 ? next : nullptr;
    if (rows == 4) decode_pv_block<T, 4>(Dvp, nb, p, ldp, V, ldv, o, Dvp, alpha + r0, pf);
    else if (rows == 2) decode_pv_block<T, 2>(Dvp, nb, p, ldp, V, ldv, o, Dvp, alpha + r0, pf);
    else decode_pv_block<T, 1>(Dvp, nb, p, ldp, V, ldv, o, Dvp, alpha + r0, pf);
    r0 += rows;
  }
}

// Scores of one key block, a row of keys per query row (st[r * ld + j]): softcap, mask,
// band (diagonal offset diag), and -inf for the lanes past the block's nb keys (up to nbp).
void decode_transform(const DecodeCtx& c, int64_t b, int64_t hk, int64_t diag, float* st,
                      int64_t ld, int64_t j0, int64_t nb, int64_t nbp) {
  const AttentionParams& p = *c.p;
  const Geometry& g = c.g;
  const int64_t R = c.lay.R;
  const bool band = p.window_left >= 0 || p.window_right >= 0;
  const vf vcap = splat(p.softcap * kLog2e), vinv = splat(1.f / (p.softcap * kLog2e));
  for (int64_t r = 0; r < R; ++r) {
    float* row = st + r * ld;
    const int64_t h = hk * g.group + r / g.L, i = r % g.L;
    if (p.softcap > 0.f)
      for (int64_t x = 0; x < nbp; x += W) storeu(row + x, vcap * vtanh(loadu(row + x) * vinv));
    if (p.mask.data) apply_mask_row(p.mask, b, h, i, j0, nb, row, 1, kLog2e);
    if (band) {
      const int64_t lo = p.window_left >= 0 ? i + diag - p.window_left : INT64_MIN;
      const int64_t hi = p.window_right >= 0 ? i + diag + p.window_right : INT64_MAX;
      for (int64_t j = 0; j < nb; ++j)
        if (j0 + j < lo || j0 + j > hi) row[j] = kNegInf;
    }
    for (int64_t j = nb; j < nbp; ++j) row[j] = kNegInf;
  }
}

// Online softmax over one block for each query row, in place: st becomes 2^(s - m_new),
// l and m are updated and alpha[r] = 2^(m_old - m_new) rescales the row's O.
LLMK_INLINE void decode_softmax(int64_t R, float* st, int64_t ld, int64_t nbp, float* m, float* l,
                                float* alpha) {
  for (int64_t r = 0; r < R; ++r) {
    float* row = st + r * ld;
    vf mx = loadu(row);
    vi nan = mx != mx;
    for (int64_t x = W; x < nbp; x += W) {
      const vf y = loadu(row + x);
      mx = vmax(mx, y);
      nan |= y != y;
    }
    bool any_nan = false;  // then the row's maximum is NaN, and so is every weight of it
    for (int i = 0; i < W; ++i) any_nan |= nan[i] != 0;
    const float m_new = any_nan ? NAN : max_(m[r], hmax(mx));
    const vf mu = splat(m_new == kNegInf ? 0.f : m_new);
    vf sum = vf{};
    for (int64_t x = 0; x < nbp; x += W) {
      const vf e = vexp2_nonpos(loadu(row + x) - mu);
      storeu(row + x, e);
      sum += e;
    }
    const float a = vexp2_nonpos(splat(m[r]) - mu)[0];
    l[r] = l[r] * a + hsum(sum);
    m[r] = m_new;
    alpha[r] = a;
  }
}

// One head's running state in an item: its query rows (scaled into base-2 units: row r holds
// query r % L of head hk * group + r / L), O rows, and per row m, l, alpha and 1 / l.
struct DecodeHead {
  float *Q, *O, *m, *l, *alpha, *inv;
  DecodeHead(float* base, const Geometry& g, int64_t R)
      : Q(base), O(Q + R * g.Dp), m(O + R * g.Dvp), l(m + R), alpha(l + R), inv(alpha + R) {}
};

// T: the element type the products read K and V in (the cache's, read in place; float for
// float32 tiles).
template <class T>
void decode_item_as(const DecodeCtx& c, int64_t item, int tid) {
  const AttentionParams& p = *c.p;
  const Geometry& g = c.g;
  const int64_t R = c.lay.R;
  const int64_t ch = item % c.lay.nchunks, bg = item / c.lay.nchunks;
  const int64_t b = bg / c.lay.ngroups, hk0 = (bg % c.lay.ngroups) * c.lay.nh;
  const int64_t nh = min_(c.lay.nh, g.Hk - hk0);

  float* Kb = reinterpret_cast<float*>(c.ws + c.lay.scratch + c.lay.per_thread * tid);
  float* Vb = Kb + kDecodeBK * g.Dp;
  float* ST = Vb + kDecodeBK * g.Dvp;
  float* states = ST + kDecodeBK * R;
  auto head = [&](int64_t x) { return DecodeHead(states + x * c.lay.head_state, g, R); };

  for (int64_t x = 0; x < nh; ++x) {
    const DecodeHead s = head(x);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = (hk0 + x) * g.group + r / g.L, i = r % g.L;
      load_rows_any(p.q, b, h, i, 1, g.D, p.scale * kLog2e, s.Q + r * g.Dp, g.Dp, g.Dp);
      if constexpr (kSplitPairs<T>) split_pairs(s.Q + r * g.Dp, g.Dp);
      s.m[r] = kNegInf;
      s.l[r] = 0.f;
    }
    for (int64_t e = 0; e < R * g.Dvp; ++e) s.O[e] = 0.f;
  }

  // Keys any of the rows may see, within this chunk (and this entry's keys, if it has fewer).
  const int64_t keys = p.key_lens ? p.key_lens[b] : g.S;
  const int64_t diag = p.diag_offset + (keys - g.S);
  int64_t klo, khi;
  key_range(p, keys, diag, 0, g.L, &klo, &khi);
  klo = max_(klo, ch * c.lay.chunk_len);
  khi = min_(khi, (ch + 1) * c.lay.chunk_len - 1);
  if (p.mask.data && klo <= khi) {  // keys the mask hides from every row of the item
    const int64_t start = klo;
    mask_visible_keys(p.mask, b, hk0 * g.group, (hk0 + nh) * g.group, 0, g.L, &klo, &khi);
    // Blocks keep their places: the sums group as they would without the skip, bit for bit.
    if (klo > start) klo = start + (klo - start) / kDecodeBK * kDecodeBK;
  }
  for (int64_t j0 = klo; j0 <= khi; j0 += kDecodeBK) {
    const int64_t nb = min_(kDecodeBK, khi + 1 - j0), nbp = round_up(nb, W);
    for (int64_t x = 0; x < nh; ++x) {
      const int64_t hk = hk0 + x;
      const DecodeHead s = head(x);
      // With more than one query row a kv head, this head's next keys and values are
      // prefetched while these compute, spread over the products (the keys' over the scores,
      // the values' over P V). With one row the products are short, and the hardware
      // prefetchers keep up with the heads' side-by-side rows on their own (Zen 3, 2 threads,
      // (B, S, H, D) caches, 2K / 8K keys, against SDPA, alternated runs: 32 / 32 heads fp32
      // 1.25-1.34x without, 1.03-1.15x with the whole next block prefetched first, 0.97-1.11x
      // spread; 32 / 8 heads fp32 0.89-1.13x spread, 0.68-0.88x without, 0.88-0.94x first).
      const RowPrefetch *next_k = nullptr, *next_v = nullptr;
      RowPrefetch k_rows, v_rows;
      if (R > 1 && j0 + kDecodeBK <= khi) {
        const int64_t next = min_(kDecodeBK, khi + 1 - j0 - kDecodeBK);
        k_rows = rows_to_prefetch(p.k, b, hk, j0 + kDecodeBK, next, g.D);
        v_rows = rows_to_prefetch(p.v, b, hk, j0 + kDecodeBK, next, g.Dv);
        next_k = &k_rows;
        next_v = &v_rows;
      }
      const T *K, *V;
      int64_t ldk, ldv;
      if (c.in_place) {
        K = at4<const T>(p.k, b, hk, j0);
        V = at4<const T>(p.v, b, hk, j0);
        ldk = p.k.strides[2];
        ldv = p.v.strides[2];
      } else {
        load_rows_any(p.k, b, hk, j0, nb, g.D, 1.f, Kb, g.Dp, g.Dp);
        load_rows_any(p.v, b, hk, j0, nb, g.Dv, 1.f, Vb, g.Dvp, g.Dvp);
        K = reinterpret_cast<const T*>(Kb);  // (T is float here)
        V = reinterpret_cast<const T*>(Vb);
        ldk = g.Dp;
        ldv = g.Dvp;
      }
      decode_scores(s.Q, g.Dp, R, K, ldk, nb, g.Dp, ST, kDecodeBK, next_k);
      decode_transform(c, b, hk, diag, ST, kDecodeBK, j0, nb, nbp);
      decode_softmax(R, ST, kDecodeBK, nbp, s.m, s.l, s.alpha);
      decode_pv_rows(R, g.Dvp, nb, ST, kDecodeBK, V, ldv, s.O, s.alpha, next_v);
    }
  }

  int64_t* bad = reinterpret_cast<int64_t*>(c.ws + c.lay.bad_rows);
  const TensorView* residual = c.io->out_residual.data ? &c.io->out_residual : nullptr;
  for (int64_t x = 0; x < nh; ++x) {
    const int64_t hk = hk0 + x;
    const DecodeHead s = head(x);
    if constexpr (kSplitPairs<T>)
      for (int64_t r = 0; r < R; ++r) join_pairs(s.O + r * g.Dvp, g.Dvp);
    if (c.lay.nchunks > 1) {
      float* part = c.partial(b * g.Hk + hk, ch);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t e = 0; e < g.Dvp; ++e) part[r * (g.Dvp + 2) + e] = s.O[r * g.Dvp + e];
        part[r * (g.Dvp + 2) + g.Dvp] = s.m[r];
        part[r * (g.Dvp + 2) + g.Dvp + 1] = s.l[r];
      }
      continue;
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = hk * g.group + r / g.L, i = r % g.L;
      float* lse = at4<float>(c.io->lse, b, h, i);
      const float lr = s.l[r];
      s.inv[r] = lr > 0.f ? 1.f / lr : (lr == 0.f ? 0.f : NAN);
      *lse = lr > 0.f ? (s.m[r] + std::log2(lr)) * kLn2 : (lr == 0.f ? kNegInf : NAN);
      bad[tid] += store_rows_any(c.io->out, b, h, i, 1, g.Dv, s.O + r * g.Dvp, g.Dvp, 1.f,
                                 s.inv + r, residual);
    }
  }
}

void decode_item(void* vctx, int64_t item, int tid) {
  const DecodeCtx& c = *static_cast<const DecodeCtx*>(vctx);
  if (!c.in_place) return decode_item_as<float>(c, item, tid);
  with_float_type(c.p->k.dtype, [&](auto tag) { decode_item_as<decltype(tag)>(c, item, tid); });
}

// Merges the key chunks of one (batch, kv head): O = sum_c 2^(m_c - M) O_c, same for l.
void decode_combine_item(void* vctx, int64_t bh, int tid) {
  const DecodeCtx& c = *static_cast<const DecodeCtx*>(vctx);
  const Geometry& g = c.g;
  const int64_t b = bh / g.Hk, hk = bh % g.Hk;
  float* O = reinterpret_cast<float*>(c.ws + c.lay.scratch + c.lay.per_thread * tid);
  int64_t* bad = reinterpret_cast<int64_t*>(c.ws + c.lay.bad_rows);
  const TensorView* residual = c.io->out_residual.data ? &c.io->out_residual : nullptr;
  const int64_t stride = g.Dvp + 2;
  for (int64_t r = 0; r < c.lay.R; ++r) {
    float M = kNegInf;
    bool nan = false;
    for (int64_t ch = 0; ch < c.lay.nchunks; ++ch) {
      const float mc = c.partial(bh, ch)[r * stride + g.Dvp];
      nan |= mc != mc;
      M = mc > M ? mc : M;
    }
    const float mu = (M == kNegInf) ? 0.f : M;
    float l = nan ? NAN : 0.f;
    for (int64_t e = 0; e < g.Dvp; ++e) O[e] = 0.f;
    for (int64_t ch = 0; ch < c.lay.nchunks; ++ch) {
      const float* part = c.partial(bh, ch) + r * stride;
      const float w = part[g.Dvp] == kNegInf ? 0.f : std::exp2(part[g.Dvp] - mu);
      l += w * part[g.Dvp + 1];
      for (int64_t e = 0; e < g.Dvp; ++e) O[e] += w * part[e];
    }
    const int64_t h = hk * g.group + r / g.L, i = r % g.L;
    const float inv = l > 0.f ? 1.f / l : (l == 0.f ? 0.f : NAN);
    *at4<float>(c.io->lse, b, h, i) = l > 0.f ? (M + std::log2(l)) * kLn2 : (l == 0.f ? kNegInf : NAN);
    bad[tid] += store_rows_any(c.io->out, b, h, i, 1, g.Dv, O, g.Dvp, 1.f, &inv, residual);
  }
}

int64_t forward_decode(const AttentionParams& p, const ForwardIO& io, const Geometry& g,
                       int nthreads) {
  DecodeCtx c{&p, &io, g, DecodeLayout(g, dtype_bytes(p.k.dtype), nthreads),
              static_cast<char*>(io.workspace), decode_in_place(p, g)};
  LLMK_CHECK(io.workspace_bytes >= c.lay.total, "attention forward workspace too small: "
                                                    << io.workspace_bytes << " < " << c.lay.total);
  const int run = threads_for_work(g, nthreads);
  const int64_t* bad = reset_bad_rows(c.ws, c.lay.bad_rows, nthreads);
  parallel_for(g.B * c.lay.ngroups * c.lay.nchunks, run, decode_item, &c);
  if (c.lay.nchunks > 1) parallel_for(g.B * g.Hk, run, decode_combine_item, &c);
  return total_bad_rows(bad, nthreads);
}

int64_t forward_workspace_bytes(const AttentionParams& p) {
  const Geometry g(p);
  const int nthreads = max_(p.num_threads, 1);
  return use_decode(p, g) ? DecodeLayout(g, dtype_bytes(p.k.dtype), nthreads).total : ForwardLayout(p, g, nthreads).total;
}

int64_t forward(const AttentionParams& p, const ForwardIO& io) {
  const Geometry geometry(p);
  const int nthreads = max_(p.num_threads, 1);
  if (geometry.B * geometry.Hq * geometry.L == 0) return 0;
  if (use_decode(p, geometry)) return forward_decode(p, io, geometry, nthreads);
  ForwardCtx c{&p, &io, geometry, ForwardLayout(p, geometry, nthreads),
               static_cast<char*>(io.workspace)};
  LLMK_CHECK(io.workspace_bytes >= c.lay.total, "attention forward workspace too small: "
                                                    << io.workspace_bytes << " < " << c.lay.total);
  const Geometry& g = c.g;
  const int run = threads_for_work(g, nthreads);
  const int64_t* bad = reset_bad_rows(c.ws, c.lay.bad_rows, nthreads);
  fill_mask_keys(p, g, c.ws, c.lay.mask_keys, run);
  for (c.h0 = 0; c.h0 < g.B * g.Hk; c.h0 += c.lay.hpr) {
    const int64_t heads = min_(c.lay.hpr, g.B * g.Hk - c.h0);
    for (c.seg_lo = 0;;) {  // once, unless the keys come in segments (and once for no keys)
      c.seg_hi = min_(c.seg_lo + c.lay.seg_tiles, g.nkt);
      parallel_for(heads * (c.seg_hi - c.seg_lo), run, forward_pack_item, &c);
      parallel_for(heads * g.group * g.nqt, run,
                   g.bf16dot ? forward_item<true> : forward_item<false>, &c);
      c.seg_lo = c.seg_hi;
      if (c.seg_lo >= g.nkt) break;
    }
  }
  return total_bad_rows(bad, nthreads);
}

// ---------------------------------------------------------------- backward

struct BackwardCtx {
  const AttentionParams* p;
  const BackwardIO* io;
  Geometry g;
  BackwardLayout lay;
  char* ws;
  int64_t h0 = 0;  // first flat (batch x kv-head) index of the current round
  float* f(int64_t off) const { return reinterpret_cast<float*>(ws + off); }
  // Row of query i of head gi of the round's kv head `local` in the round's buffers.
  int64_t row(int64_t local, int64_t gi, int64_t i) const { return (local * g.group + gi) * g.L + i; }
  // Splits a round item (local kv head, head in its group, query tile) into coordinates.
  void query_item(int64_t item, int64_t* local, int64_t* gi, int64_t* qt, int64_t* b,
                  int64_t* h) const {
    *qt = item % g.nqt;
    const int64_t rest = item / g.nqt;
    *local = rest / g.group;
    *gi = rest % g.group;
    const int64_t flat = h0 + *local;
    *b = flat / g.Hk;
    *h = (flat % g.Hk) * g.group + *gi;
  }
};

// The bf16 backward multiplies S = Q K^T, dP = dO V^T and dV += P^T dO in bf16 pairs (P
// rounded to bf16, as PyTorch's bf16 kernels do), and dQ, dK in float32 from the float32
// dU: rounding dU to bf16 loses too much where its terms cancel (found by fuzzing: head
// dim 1, where PyTorch falls back to float32 math).
struct Bf16Tile {  // one query tile's Q and dO in the layouts the bf16 products read
  uint32_t *Q2, *dO2, *dOv;  // dOv: pairs along queries, [q2][e] (amx tier: [e][q2], dO^T)
};

LLMK_INLINE Bf16Tile bf16_tile(const BackwardCtx& c, int64_t local, int64_t gi, int64_t qt) {
  const Geometry& g = c.g;
  const int64_t t = (local * g.group + gi) * g.nqt + qt;
  uint32_t* q2 = reinterpret_cast<uint32_t*>(c.ws + c.lay.q2);
  uint32_t* dop = reinterpret_cast<uint32_t*>(c.ws + c.lay.dop);
  return {q2 + t * kBQ * (g.D2 / 2), dop + t * kBQ * (g.Dv2 / 2),
          dop + c.lay.tiles * kBQ * (g.Dv2 / 2) + t * (kBQ / 2) * g.Dvp};
}

// Pairs of x(r, c) along columns: dst[r][c2] = (x(r, 2 c2), x(r, 2 c2 + 1)).
template <class X>
LLMK_INLINE void pairs_along_cols(const X& x, int64_t rows, int64_t cols2, uint32_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c2 = 0; c2 < cols2; ++c2) dst[r * cols2 + c2] = pair(x(r, 2 * c2), x(r, 2 * c2 + 1));
}

// Pairs of x(r, c) along rows: dst[r2][c] = (x(2 r2, c), x(2 r2 + 1, c)), or transposed
// (dst[c][r2]) for the tiles, which read A row-major.
template <class X>
LLMK_INLINE void pairs_along_rows(const X& x, int64_t rows2, int64_t cols, uint32_t* dst,
                                  bool transposed = false) {
  for (int64_t r2 = 0; r2 < rows2; ++r2)
    for (int64_t c = 0; c < cols; ++c)
      dst[transposed ? c * rows2 + r2 : r2 * cols + c] = pair(x(2 * r2, c), x(2 * r2 + 1, c));
}

// Per (batch, head, query tile): delta = rowsum(dO * O); scaled Q as float32 rows, and Q, dO
// in the layouts the products read (BF: bf16 pairs, see Bf16Tile; else float32 rows); the
// chunks' dQ accumulators zeroed.
template <bool BF>
void backward_prep_item(void* vctx, int64_t item, int) {
  const BackwardCtx& c = *static_cast<const BackwardCtx*>(vctx);
  const AttentionParams& p = *c.p;
  const Geometry& g = c.g;
  int64_t local, gi, qt, b, h;
  c.query_item(item, &local, &gi, &qt, &b, &h);
  const int64_t i0 = qt * kBQ, mq = min_(kBQ, g.L - i0), r0 = c.row(local, gi, i0);
  load_rows_any(p.q, b, h, i0, mq, g.D, p.scale, c.f(c.lay.qp) + r0 * g.Dp, g.Dp, g.Dp);
  if constexpr (BF) {
    const Bf16Tile t = bf16_tile(c, local, gi, qt);
    const Bf16Rows Q(p.q, b, h, i0, mq, g.D), dO(c.io->dout, b, h, i0, mq, g.Dv);
    pairs_along_cols(Q, kBQ, g.D2 / 2, t.Q2);
    pairs_along_cols(dO, kBQ, g.Dv2 / 2, t.dO2);
    pairs_along_rows(dO, kBQ / 2, g.Dvp, t.dOv, kHasAmx);
  } else {
    load_rows_any(c.io->dout, b, h, i0, mq, g.Dv, 1.f, c.f(c.lay.dop) + r0 * g.Dvp, g.Dvp, g.Dvp);
  }
  float* delta = c.f(c.lay.delta) + r0;
  const TensorView &out = c.io->out, &dout = c.io->dout, &res = c.io->out_residual;
  with_float_type(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r = 0; r < mq; ++r) {
      const T* o = at4<const T>(out, b, h, i0 + r);
      const T* d = at4<const T>(dout, b, h, i0 + r);
      const T* lo = res.data ? at4<const T>(res, b, h, i0 + r) : nullptr;
      float s = 0.f;
      for (int64_t e = 0; e < g.Dv; ++e) {
        float oe = to_f32(o[e * out.strides[3]]);
        if (lo) oe += to_f32(lo[e * res.strides[3]]);
        s += oe * to_f32(d[e * dout.strides[3]]);
      }
      delta[r] = s;
    }
  });
  for (int64_t ch = 0; ch < c.lay.nchunks; ++ch) {
    float* acc = c.f(c.lay.dq_acc) + (ch * c.lay.rows + r0) * g.Dp;
    for (int64_t x = 0; x < mq * g.Dp; ++x) acc[x] = 0.f;
  }
}

// One (batch x kv head, chunk of key tiles) of the backward. BF (the avx512_bf16 tier with
// bf16 inputs): S, dP and dV in bf16 pairs, dK and dQ in float32; else all in float32.
template <bool BF>
void backward_item(void* vctx, int64_t item, int tid) {
  const BackwardCtx& c = *static_cast<const BackwardCtx*>(vctx);
  const AttentionParams& p = *c.p;
  const Geometry& g = c.g;
  const int64_t ch = item % c.lay.nchunks, local = item / c.lay.nchunks, flat = c.h0 + local;
  const int64_t b = flat / g.Hk, hk = flat % g.Hk;

  float* Kt = reinterpret_cast<float*>(c.ws + c.lay.scratch + c.lay.per_thread * tid);
  float* Kr = Kt + g.D * kBK;
  float* Vt = Kr + kBK * g.Dp;
  float* S = Vt + g.Dv * kBK;
  float* dP = S + kBQ * kBK;
  float* T = dP + kBQ * kBK;
  float* dK = T + kBQ * kBK;
  float* dV = dK + kBK * g.Dp;
  // BF: K^T and V^T as bf16 pairs in the float32 tiles' space ([d2][j], [e2][j]), and P as
  // pairs along queries (PT2).
  uint32_t* Kt2 = reinterpret_cast<uint32_t*>(Kt);
  uint32_t* Vt2 = reinterpret_cast<uint32_t*>(Vt);
  uint32_t* PT2 = reinterpret_cast<uint32_t*>(dV + kBK * g.Dvp);
  // amx: dV^T [Dvp][kBK] sums here (dV^T += dO^T P on the tiles), dV's rows made at the end
  float* dV_rows = reinterpret_cast<float*>(PT2 + kBQ / 2 * kBK);
  constexpr bool kTransposedDV = BF && kHasAmx;
  const bool cap = p.softcap > 0.f;
  const TensorView& lv = c.io->lse;
  const TileScope tiles(BF && kHasAmx);
  const float* lse_base = static_cast<const float*>(lv.data);
  // With dropout, O = (P Z) V for Z the scaled keep pattern: dV takes P Z (made in dP's
  // space, free until dP is), and dU = P (dP Z - delta), delta = rowsum(dO O) as without.
  const DropoutKeep drop(p.dropout_p);
  const TensorView* dmask = c.io->dmask.data ? &c.io->dmask : nullptr;

  auto row_key = [&](int64_t bb, int64_t hh, int64_t i) {
    return dropout_row_key(p.dropout_seed, uint64_t((bb * g.Hq + hh) * g.L + i));
  };

  const int64_t kt_end = min_(g.nkt, (ch + 1) * c.lay.tiles_per_chunk);
  for (int64_t kt = ch * c.lay.tiles_per_chunk; kt < kt_end; ++kt) {
    const int64_t j0 = kt * kBK, nk = min_(kBK, g.S - j0), nkp = round_up(nk, W);
    if constexpr (BF) {
      const Bf16Rows K(p.k, b, hk, j0, nk, g.D), V(p.v, b, hk, j0, nk, g.Dv);
      for (int64_t d2 = 0; d2 < g.D2 / 2; ++d2)
        for (int64_t j = 0; j < nkp; ++j) Kt2[d2 * kBK + j] = pair(K(j, 2 * d2), K(j, 2 * d2 + 1));
      for (int64_t e2 = 0; e2 < g.Dv2 / 2; ++e2)
        for (int64_t j = 0; j < nkp; ++j) Vt2[e2 * kBK + j] = pair(V(j, 2 * e2), V(j, 2 * e2 + 1));
    } else {
      load_rows_transposed_any(p.k, b, hk, j0, nk, g.D, Kt, kBK, nkp);
      load_rows_transposed_any(p.v, b, hk, j0, nk, g.Dv, Vt, kBK, nkp);
    }
    load_rows_any(p.k, b, hk, j0, nk, g.D, 1.f, Kr, g.Dp, g.Dp);
    for (int64_t x = 0; x < nk * g.Dp; ++x) dK[x] = 0.f;
    for (int64_t x = 0; x < (kTransposedDV ? g.Dvp * kBK : nk * g.Dvp); ++x) dV[x] = 0.f;

    int64_t qlo, qhi;
    query_range(p, g.L, j0, nk, &qlo, &qhi);
    for (int64_t gi = 0; gi < g.group && qlo <= qhi; ++gi) {
      const int64_t h = hk * g.group + gi;
      for (int64_t qt = qlo / kBQ; qt <= qhi / kBQ; ++qt) {
        if (p.mask.data) {  // the mask hides this key tile from the whole query tile
          const int64_t* mk = tile_mask_keys(p, g, c.ws, c.lay.mask_keys, b, h, qt);
          if (mk[0] > mk[1] || mk[1] < j0 || mk[0] >= j0 + nk) continue;
        }
        const int64_t i0 = qt * kBQ, mq = min_(kBQ, g.L - i0), r0 = c.row(local, gi, i0);
        const int64_t mq2 = (mq + 1) / 2;
        const float* Q = c.f(c.lay.qp) + r0 * g.Dp;
        const float* dO = BF ? nullptr : c.f(c.lay.dop) + r0 * g.Dvp;
        const Bf16Tile t = BF ? bf16_tile(c, local, gi, qt) : Bf16Tile{};
        const float* delta = c.f(c.lay.delta) + r0;
        if constexpr (BF)
          gemm_bf16(mq, nkp, g.D2 / 2, t.Q2, g.D2 / 2, 1, Kt2, kBK, S, kBK, false, tiles);
        else
          gemm(mq, nkp, g.D, Q, g.Dp, 1, Kt, kBK, S, kBK, false);
        transform_scores(p, b, h, S, kBK, i0, mq, j0, nk, nkp, cap ? T : nullptr,
                         BF ? p.scale : 1.f, 1.f);
        for (int64_t r = 0; r < mq; ++r) {
          const float lse = lse_base[b * lv.strides[0] + h * lv.strides[1] + (i0 + r) * lv.strides[2]];
          const vf vl = splat(lse == kNegInf ? INFINITY : lse);  // fully masked row: P = 0
          float* row = S + r * kBK;
          for (int64_t j = 0; j < nkp; j += W) storeu(row + j, vexp(loadu(row + j) - vl));
        }
        const float* PZ = S;  // the weights O was made of
        if (drop.active()) {
          for (int64_t r = 0; r < mq; ++r) {
            for (int64_t j = 0; j < nkp; ++j) dP[r * kBK + j] = S[r * kBK + j];
            drop.apply(dP + r * kBK, nkp, row_key(b, h, i0 + r), j0);
          }
          PZ = dP;
        }
        if constexpr (BF) {
          rows_to_bf16_pairs(PZ, kBK, mq, nkp, PT2, kBK);
          if constexpr (kTransposedDV)  // dV^T += dO^T P
            gemm_bf16(g.Dvp, nkp, mq2, t.dOv, kBQ / 2, 1, PT2, kBK, dV, kBK, true, tiles);
          else  // dV += P^T dO
            gemm_bf16(nk, g.Dvp, mq2, PT2, 1, kBK, t.dOv, g.Dvp, dV, g.Dvp, true, tiles);
          gemm_bf16(mq, nkp, g.Dv2 / 2, t.dO2, g.Dv2 / 2, 1, Vt2, kBK, dP, kBK, false,  // dP = dO V^T
                    tiles);
        } else {
          gemm(nk, g.Dvp, mq, PZ, 1, kBK, dO, g.Dvp, dV, g.Dvp, true);      // dV += P^T dO
          gemm(mq, nkp, g.Dv, dO, g.Dvp, 1, Vt, kBK, dP, kBK, false);        // dP = dO V^T
        }
        if (drop.active())
          for (int64_t r = 0; r < mq; ++r) drop.apply(dP + r * kBK, nkp, row_key(b, h, i0 + r), j0);
        for (int64_t r = 0; r < mq; ++r) {                                 // dU = P (dP - delta)
          const vf vd = splat(delta[r]);
          float* dpr = dP + r * kBK;
          const float* pr = S + r * kBK;
          for (int64_t j = 0; j < nkp; j += W) {
            vf du = loadu(pr + j) * (loadu(dpr + j) - vd);
            if (cap) {
              const vf tt = loadu(T + r * kBK + j);
              if (dmask) storeu(T + r * kBK + j, du);  // the mask is added after the cap
              du = du * (splat(1.f) - tt * tt);
            }
            storeu(dpr + j, du);
          }
        }
        if (dmask) {  // the scores' gradient, before the softcap's factor
          const float* src = cap ? T : dP;
          for (int64_t r = 0; r < mq; ++r) {
            float* dst = at4<float>(*dmask, b, h, i0 + r) + j0;
            for (int64_t j = 0; j < nk; ++j) dst[j] = src[r * kBK + j];
          }
        }
        float* dq = c.f(c.lay.dq_acc) + (ch * c.lay.rows + r0) * g.Dp;
        gemm(nk, g.Dp, mq, dP, 1, kBK, Q, g.Dp, dK, g.Dp, true);          // dK += dU^T (scale Q)
        gemm(mq, g.Dp, nk, dP, kBK, 1, Kr, g.Dp, dq, g.Dp, true);          // dQ += dU K
      }
    }
    store_rows_any(c.io->dk, b, hk, j0, nk, g.D, dK, g.Dp, 1.f, nullptr);
    if constexpr (kTransposedDV) {
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t e = 0; e < g.Dvp; ++e) dV_rows[j * g.Dvp + e] = dV[e * kBK + j];
    }
    store_rows_any(c.io->dv, b, hk, j0, nk, g.Dv, kTransposedDV ? dV_rows : dV, g.Dvp, 1.f,
                   nullptr);
  }
}

// dQ = scale * sum over chunks of the float32 accumulators.
void backward_dq_item(void* vctx, int64_t item, int) {
  const BackwardCtx& c = *static_cast<const BackwardCtx*>(vctx);
  const Geometry& g = c.g;
  int64_t local, gi, qt, b, h;
  c.query_item(item, &local, &gi, &qt, &b, &h);
  const int64_t i0 = qt * kBQ, mq = min_(kBQ, g.L - i0), r0 = c.row(local, gi, i0);
  float* acc = c.f(c.lay.dq_acc) + r0 * g.Dp;
  for (int64_t ch = 1; ch < c.lay.nchunks; ++ch) {
    const float* part = c.f(c.lay.dq_acc) + (ch * c.lay.rows + r0) * g.Dp;
    for (int64_t x = 0; x < mq * g.Dp; x += W) storeu(acc + x, loadu(acc + x) + loadu(part + x));
  }
  store_rows_any(c.io->dq, b, h, i0, mq, g.D, acc, g.Dp, c.p->scale, nullptr);
}

void backward(const AttentionParams& p, const BackwardIO& io) {
  const int nthreads = max_(p.num_threads, 1);
  BackwardCtx c{&p, &io, Geometry(p), BackwardLayout(p, Geometry(p), nthreads),
                static_cast<char*>(io.workspace)};
  LLMK_CHECK(io.workspace_bytes >= c.lay.total, "attention backward workspace too small: "
                                                    << io.workspace_bytes << " < " << c.lay.total);
  const Geometry& g = c.g;
  const int run = threads_for_work(g, nthreads);
  fill_mask_keys(p, g, c.ws, c.lay.mask_keys, run);
  for (c.h0 = 0; c.h0 < g.B * g.Hk; c.h0 += c.lay.hpr) {
    const int64_t heads = min_(c.lay.hpr, g.B * g.Hk - c.h0);
    parallel_for(heads * g.group * g.nqt, run,
                 g.bf16dot ? backward_prep_item<true> : backward_prep_item<false>, &c);
    parallel_for(heads * c.lay.nchunks, run,
                 g.bf16dot ? backward_item<true> : backward_item<false>, &c);
    parallel_for(heads * g.group * g.nqt, run, backward_dq_item, &c);
  }
}

}  // namespace LLMK_ISA_NS
}  // namespace llmk

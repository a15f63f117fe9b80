// Many rows of x on AVX2 / AVX-512 CPUs: rows of x in the lanes of a vector (8 or 16).
// Included by quant_matmul_impl.h inside its tier namespace (it uses Ctx and the fills).
//
// The K-in-lanes panels of quant_matmul_impl.h end every (row, channel) pair in a horizontal
// sum: with 512-wide K chunks those sums cost about as much as a third of the products (int8
// M = 16 ran at ~32% of vdpbf16ps's peak, w8a8 at ~18% of vpdpbusd's). Here x is packed once
// per call so that one 64-byte load holds one 32-bit word of K (2 bf16 or 4 int8 values) of 16
// rows; each weight word of the panel is broadcast, and one vdpbf16ps (vpdpbusd) adds the
// products of 16 rows with one channel: no sums across lanes, one load per instruction.
//   xp[(group * words + q) * W + r] = 32-bit word q of row W * group + r (rows past M: 0)
// words = Kx * element bytes / 4. The panel holds NB weight rows of one K chunk (the same
// element order as x: int4's permuted order), D::kPanelWords words apart, zero-padded to Kx.
// Paired (the int8 paths with 6-8 rows, Ctx::pair_half): x's rows are read as twice as many
// rows of half the length (row r's halves are rows 2r and 2r + 1: the same bytes), and the
// panel holds word q of either half of a weight row side by side (Paired<D>).
// Where the CPU lacks AVX512-BF16, the products are float32 FMAs: W = 8 (AVX2) or 16 rows
// to a vector, float x and a float panel (int8: q; int4: (q - zero) * scale), which also
// serve float32 / float16 x on AVX512-BF16 CPUs.
#pragma once

#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
constexpr bool kPackedX = true;
constexpr int64_t kLaneRows = kLaneRowsAll;             // = W: rows per vector
constexpr int64_t kTileVecs = kChunkRows / kLaneRows;  // vectors of rows in one tile
constexpr int64_t kPrefetchChunks = 2;  // how far ahead the weights are prefetched

// The products. kChunk: K values per panel row (a chunk); kPanelWords: 32-bit words per panel
// row. FloatDots: float32 x (any x dtype, converted once) with the weights as float (int8 q;
// int4 (q - zero) * scale), FMA; every AVX2 / AVX-512 tier.
struct FloatDots {
  using V = vf;
  using X = vf;
  static constexpr int64_t kElemBytes = 4;
  static constexpr int64_t kChunk = 256;  // panel and x's chunk: 16 KiB each at 16 rows
  static constexpr int64_t kPanelWords = kChunk;
  static constexpr int64_t kBlockWords = 0;  // one scale for every word (see Q8BlockDots)
  static constexpr int64_t kLaneWords = 1;   // panel words per word of x (see Q8PairDots)
  static V zero() { return vf{}; }
  static LLMK_INLINE X load(const uint32_t* p) { X v; std::memcpy(&v, p, sizeof v); return v; }
  static LLMK_INLINE X bcast(const uint32_t* p) { float f; std::memcpy(&f, p, 4); return splat(f); }
#if LLMK_VEC_BYTES == 64
  static LLMK_INLINE V dot(V acc, X x, X w) { return (V)_mm512_fmadd_ps((__m512)x, (__m512)w, (__m512)acc); }
#else
  static LLMK_INLINE V dot(V acc, X x, X w) { return (V)_mm256_fmadd_ps((__m256)x, (__m256)w, (__m256)acc); }
#endif
};

static_assert(kMaxPackedNB * FloatDots::kPanelWords * 4 <= kPanelBytes, "panel too small");

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
constexpr bool kPackedBf16 = true;
// bf16 x with the weights as exact bf16 values (int8 q; int4 q - zero), and w8a8's x + 128
// (unsigned) with int8 weights.
struct Bf16Dots {
  using V = __m512;
  using X = __m512i;
  static constexpr int64_t kElemBytes = 2;
  static constexpr int64_t kChunk = 512;
  static constexpr int64_t kPanelWords = kChunk * kElemBytes / 4;
  static constexpr int64_t kBlockWords = 0;
  static constexpr int64_t kLaneWords = 1;
  static V zero() { return _mm512_setzero_ps(); }
  static LLMK_INLINE X load(const uint32_t* p) { return _mm512_load_si512(p); }
  static LLMK_INLINE X bcast(const uint32_t* p) { return _mm512_set1_epi32(int(*p)); }
  static LLMK_INLINE V dot(V acc, X x, X w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
};
struct U8S8Dots {
  using V = __m512i;
  using X = __m512i;
  static constexpr int64_t kElemBytes = 1;
  static constexpr int64_t kChunk = 1024;
  static constexpr int64_t kPanelWords = kChunk * kElemBytes / 4;
  static constexpr int64_t kBlockWords = 0;
  static constexpr int64_t kLaneWords = 1;
  static V zero() { return _mm512_setzero_si512(); }
  static LLMK_INLINE X load(const uint32_t* p) { return _mm512_load_si512(p); }
  static LLMK_INLINE X bcast(const uint32_t* p) { return _mm512_set1_epi32(int(*p)); }
  static LLMK_INLINE V dot(V acc, X x, X w) { return _mm512_dpbusd_epi32(acc, x, w); }
};
// int8 / int4 weights with bf16 x: x quantized per 32-value block (signed, a float scale per
// block and row, packed like x: 16 rows' scales to a vector), the panel holds unsigned bytes:
// int8 weights + 128, int4's q (in x's permuted order). Each block's int32 sums are scaled by
// its x scales into float sums (V); int8's start at -128 * (the block's sum of q) per row
// (Ctx::xpb), which takes the +128 out exactly; int4's group scales and zero points are
// applied per group (packed_dots_blocks with Q8Groups).
struct Q8BlockDots : U8S8Dots {  // its bytes, chunks, loads and broadcasts
  using V = __m512;
  static constexpr int64_t kBlockWords = 32 / 4;
  static V zero() { return _mm512_setzero_ps(); }
  static LLMK_INLINE X dot(X acc, X x, X w) { return _mm512_dpbusd_epi32(acc, w, x); }
};
// The paired layout (use_paired_x) of Base's products: x's even lanes hold the first half of K,
// the odd lanes the second; panel word pair 2q, 2q + 1 holds the weights of word q of either
// half.
template <class Base>
struct Paired : Base {
  using X = typename Base::X;
  static constexpr int64_t kLaneWords = 2;
  static constexpr int64_t kPanelWords = kLaneWords * Base::kPanelWords;
  static LLMK_INLINE X bcast(const uint32_t* p) {
    long long pair;
    std::memcpy(&pair, p, 8);
    return _mm512_set1_epi64(pair);
  }
};
using Q8PairDots = Paired<Q8BlockDots>;
using U8S8PairDots = Paired<U8S8Dots>;
static_assert(kMaxPackedNB * Bf16Dots::kPanelWords * 4 <= kPanelBytes, "panel too small");
static_assert(kMaxPackedNB * U8S8Dots::kPanelWords * 4 <= kPanelBytes, "panel too small");
static_assert(kMaxPackedNB * Q8BlockDots::kPanelWords * 4 <= kPanelBytes, "panel too small");
static_assert(8 * Q8PairDots::kPanelWords * 4 <= kPanelBytes, "panel too small");  // NB <= 8
static_assert(8 * U8S8PairDots::kPanelWords * 4 <= kPanelBytes, "panel too small");
#else
constexpr bool kPackedBf16 = false;
#endif

// The sums of row vector v (x: its words, vec_stride words apart) with panel row j over the
// words [q0, q1) of the chunk, to part[j * MV + v]. With ahead: while it computes, line q of
// the NB rows' next chunk (ahead[j] + 64 * line, row j = q >> log2_lines) goes to L2 (all at
// once, the prefetches would queue behind each other). Not inlined: in the tile's body GCC
// spilled x's vectors to the stack (int4 M = 64: 53% of peak), alone it keeps all in registers.
template <class D, int MV, int NB>
__attribute__((noinline)) void packed_dots(const uint32_t* x, int64_t vec_stride,
                                           const uint32_t* panel, int64_t q0, int64_t q1,
                                           typename D::V* part, const uint8_t* const* ahead,
                                           int n_ahead, int log2_lines) {
  typename D::V acc[NB][MV];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = D::zero();
  for (int64_t q = q0; q < q1; ++q) {
    if (ahead != nullptr && (q >> log2_lines) < n_ahead)
      prefetch_l2(ahead[q >> log2_lines] + ((q & ((int64_t(1) << log2_lines) - 1)) << 6));
    typename D::X xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = D::load(x + v * vec_stride + q * kLaneRows);
    for (int j = 0; j < NB; ++j) {
      const typename D::X w = D::bcast(panel + j * D::kPanelWords + q * D::kLaneWords);
      for (int v = 0; v < MV; ++v) acc[j][v] = D::dot(acc[j][v], xv[v], w);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) part[j * MV + v] = acc[j][v];
}

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
// packed_dots for Q8BlockDots and Q8PairDots (D): q0 and q1 on block boundaries; n_ahead
// prefetch rows (ahead); xs: the scales of row vector
// 0's block at q0 (the next block's 16 floats on, row vector v's xs_stride floats on); xb
// (int8, else null): the blocks' starting sums, laid out as xs.
// Registers: NB * MV int sums of the block, as many float sums, MV vectors of x.
// Groups (int4): g.words words a group, q0 on a group boundary; each block's sums also times
// the group's scale of the channel, and at the group's end scale * zero * (the rows' group
// sums of x) subtracted, in registers (a call and a flush through memory per group cost int4
// M = 16 ~20% over int8).
struct Q8Groups {
  const float* const* scale;   // per channel: its scales from q0's group on
  const uint8_t* const* zero;  // and zero points
  int64_t words;
  const float* xg;             // row vector 0's group sums from q0's group on (16 floats each)
  int64_t xg_stride;           // row vector v's: xg_stride floats on
  int64_t pair;                // Q8PairDots: the second half's groups, this many on
};

// A float for every lane: first; Q8PairDots: first in the even lanes (the first half of K),
// second in the odd ones.
template <class D>
LLMK_INLINE __m512 lane_floats(float first, float second) {
  if constexpr (D::kLaneWords == 2) {
    uint32_t a, b;
    std::memcpy(&a, &first, 4);
    std::memcpy(&b, &second, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi64((long long)((uint64_t(b) << 32) | a)));
  } else {
    return _mm512_set1_ps(first);
  }
}
template <class D, int MV, int NB, bool Groups>
__attribute__((noinline)) void packed_dots_blocks(const uint32_t* x, int64_t vec_stride,
                                                  const uint32_t* panel, int64_t q0, int64_t q1,
                                                  __m512* part, const uint8_t* const* ahead,
                                                  int n_ahead, int log2_lines, const float* xs,
                                                  const int32_t* xb, int64_t xs_stride,
                                                  const Q8Groups& g) {
  __m512 acc[NB][MV];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = _mm512_setzero_ps();
  __m512 gs[Groups ? NB : 1];
  for (int64_t qb = q0; qb < q1; qb += D::kBlockWords, xs += kLaneRows, xb += xb ? kLaneRows : 0) {
    const int64_t grp = Groups ? (qb - q0) / g.words : 0;
    if (Groups && (qb - q0) % g.words == 0)
      for (int j = 0; j < NB; ++j)
        gs[j] = lane_floats<D>(g.scale[j][grp], g.scale[j][grp + g.pair]);
    __m512i blk[NB][MV];
    for (int v = 0; v < MV; ++v) {
      const __m512i start = xb ? _mm512_load_si512(xb + v * xs_stride) : _mm512_setzero_si512();
      for (int j = 0; j < NB; ++j) blk[j][v] = start;
    }
    for (int64_t q = qb; q < qb + D::kBlockWords; ++q) {
      if (ahead != nullptr && (q >> log2_lines) < n_ahead)
        prefetch_l2(ahead[q >> log2_lines] + ((q & ((int64_t(1) << log2_lines) - 1)) << 6));
      __m512i xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = D::load(x + v * vec_stride + q * kLaneRows);
      for (int j = 0; j < NB; ++j) {
        const __m512i w = D::bcast(panel + j * D::kPanelWords + q * D::kLaneWords);
        for (int v = 0; v < MV; ++v) blk[j][v] = D::dot(blk[j][v], xv[v], w);
      }
    }
    for (int v = 0; v < MV; ++v) {
      const __m512 s = _mm512_load_ps(xs + v * xs_stride);
      for (int j = 0; j < NB; ++j)
        acc[j][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(blk[j][v]),
                                    Groups ? _mm512_mul_ps(s, gs[j]) : s, acc[j][v]);
    }
    if (Groups && (qb + D::kBlockWords - q0) % g.words == 0) {
      for (int j = 0; j < NB; ++j) {
        const __m512 zs = lane_floats<D>(g.scale[j][grp] * float(g.zero[j][grp]),
                                         g.scale[j][grp + g.pair] * float(g.zero[j][grp + g.pair]));
        for (int v = 0; v < MV; ++v)
          acc[j][v] = _mm512_fnmadd_ps(
              zs, _mm512_load_ps(g.xg + v * g.xg_stride + grp * kLaneRows), acc[j][v]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) part[j * MV + v] = acc[j][v];
}
#endif

// One tile (rows m0..m1, channels n0..n1) into acc: kChunkChannels x kTileVecs vectors,
// channel-major. Every seg_words words of a chunk, flush(part, a, chans, n, k, v) moves the
// sums of the panel's channels (n: the first, chans: clamped, k: the segment's first element,
// v: the first of the MV row vectors) to acc (a: at channel n, vector v);
// fill(NB as a type, chans, n, k0, k1) writes the panel of the chunk [k0, k1).
template <class D, int MV, int NB, class Fill, class Flush>
void packed_tile(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 typename D::V* acc, void* panel, int64_t seg_words, Fill fill, Flush flush) {
  using V = typename D::V;
  static_assert(NB * D::kPanelWords * 4 <= kPanelBytes, "the panel overflows");
  const int64_t vecs = (m1 - m0 + kLaneRows - 1) / kLaneRows;  // a multiple of MV
  std::fill(acc, acc + kChunkChannels * kTileVecs, D::zero());
  const int64_t kc = D::kChunk;
  const int64_t vec_stride = c.Kx * D::kElemBytes / 4 * kLaneRows;
  const uint32_t* xt = c.xp + m0 / kLaneRows * vec_stride;
  const uint32_t* pw = static_cast<const uint32_t*>(panel);
  const uint8_t* w = c.p->qdata.ptr<uint8_t>();
  const int64_t row_bytes = c.p->qdata.sizes[1];
  const int64_t chunks = (c.K + kc - 1) / kc;  // per weight row
  // Paired (c.pair_half): both halves of each row prefetched, each half a row of its own. K
  // here: the weight rows' (c.K is a half's when paired).
  constexpr int kHalves = int(D::kLaneWords);
  const int64_t K = c.p->x.sizes[1];
  int log2_lines = 0;  // 64-byte lines of a weight row (half) per chunk: 4 (int4), 8, 16
  while ((int64_t(64) << log2_lines) < kc * row_bytes / K) ++log2_lines;
  for (int64_t n = n0; n < n1; n += NB) {
    int64_t chans[NB];
    for (int j = 0; j < NB; ++j) chans[j] = std::min(n + j, n1 - 1);  // repeats: discarded
    // Each weight row end to end (the hardware prefetchers follow NB streams), x from L2.
    for (int64_t k0 = 0; k0 < c.K; k0 += kc) {
      const int64_t k1 = std::min(c.K, k0 + kc);
      const int64_t words = (std::min(c.Kx, k0 + kc) - k0) * D::kElemBytes / 4;
      const uint32_t* xk = xt + k0 * D::kElemBytes / 4 * kLaneRows;
      fill(std::integral_constant<int, NB>{}, chans, n, k0, k1);
      // The weights of the chunk after next, in the tile's order (these rows' chunks, then the
      // next channels'): one chunk ahead left the panel fills waiting on DRAM (4096x4096,
      // M = 16, two threads: int8 2.3-2.7 -> 2.0-2.2 ms, w8a8 1.85-1.98 -> 1.55 ms; Zen 4).
      const int64_t chunk = k0 / kc + kPrefetchChunks;
      const int64_t ahead_n = n + chunk / chunks * NB, ahead_k = chunk % chunks * kc;
      const uint8_t* next[NB * kHalves];
      for (int j = 0; j < NB; ++j) {
        const uint8_t* row = w + std::min(ahead_n + j, n1 - 1) * row_bytes;
        for (int h = 0; h < kHalves; ++h)
          next[kHalves * j + h] = row + (h * c.pair_half + ahead_k) * row_bytes / K;
      }
      const bool more = ahead_n < n1;
      for (int64_t v = 0; v < vecs; v += MV) {
        for (int64_t s = 0; s < words; s += seg_words) {
          V part[NB][MV];
          const uint8_t* const* pre = v == 0 && more ? next : nullptr;
          const int64_t s1 = std::min(words, s + seg_words);
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
          if constexpr (D::kBlockWords > 0) {
            const int64_t xs_stride = c.Kx / (D::kBlockWords * 4) * kLaneRows;
            const int64_t xs_at = (m0 / kLaneRows + v) * xs_stride +
                                  (k0 * D::kElemBytes / 4 + s) / D::kBlockWords * kLaneRows;
            const float* xs = c.xps + xs_at;
            if (c.xpg != nullptr) {  // int4: its groups' scales and zero points
              const int64_t gsize = c.p->group_size, g0 = (k0 + s * 4) / gsize;
              const float* scale[NB];
              const uint8_t* zero[NB];
              for (int j = 0; j < NB; ++j) {  // rows of kHalves * c.groups (paired: a half's)
                scale[j] = c.p->scales.ptr<float>() + chans[j] * kHalves * c.groups + g0;
                zero[j] = c.p->zeros.ptr<uint8_t>() + chans[j] * kHalves * c.groups + g0;
              }
              const int64_t xg_stride = c.groups * kLaneRows;
              const Q8Groups g{scale, zero, gsize / 4,
                               c.xpg + (m0 / kLaneRows + v) * xg_stride + g0 * kLaneRows,
                               xg_stride, kHalves == 2 ? c.groups : 0};
              packed_dots_blocks<D, MV, NB, true>(xk + v * vec_stride, vec_stride, pw, s, s1,
                                                  &part[0][0], pre, NB * kHalves, log2_lines,
                                                  xs, nullptr, xs_stride, g);
            } else {
              packed_dots_blocks<D, MV, NB, false>(xk + v * vec_stride, vec_stride, pw, s, s1,
                                                   &part[0][0], pre, NB * kHalves, log2_lines,
                                                   xs, c.xpb ? c.xpb + xs_at : nullptr,
                                                   xs_stride, Q8Groups{});
            }
          } else
#endif
          packed_dots<D, MV, NB>(xk + v * vec_stride, vec_stride, pw, s, s1, &part[0][0], pre,
                                 NB * kHalves, log2_lines);
          V* a = acc + (n - n0) * kTileVecs + v;
          flush(part, a, chans, n, k0 + s * 4 / D::kElemBytes, v);
        }
      }
    }
  }
}

// The tile's register blocks, as many rows as the tile has: 16 sums (rows x channels) in
// AVX-512's 32 registers; 12 in AVX2's 16 (8 left the FMAs waiting on their latency: int8
// M = 64, AVX2 tier on a Zen 4, 48% of the FMA peak).
template <class D, class Fill, class Flush>
void packed_tile_any(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                     typename D::V* acc, void* panel, int64_t seg_words, Fill fill,
                     Flush flush) {
  const int64_t vecs = (m1 - m0 + kLaneRows - 1) / kLaneRows;
  if constexpr (W == 16) {
    // Q8BlockDots keeps twice the sums (int32 per block, float over blocks): half as many.
    // 4096 x 4096 / 11008, M = 64, 2 Zen 4 threads: 4 x 3 and 2 x 6 were no faster (4.7 / 10.9
    // ms against 4.5 / 10.5), and their channel blocks do not divide the tile's 64. Paired
    // panels are twice as long: 8 channels fill the panel.
    constexpr int sums = D::kBlockWords > 0 || D::kLaneWords == 2 ? 8 : 16;
    if (vecs % 4 == 0)
      packed_tile<D, 4, sums / 4>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
    else if (vecs % 2 == 0)
      packed_tile<D, 2, sums / 2>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
    else
      packed_tile<D, 1, sums>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
  } else {
    if (vecs % 2 == 0)
      packed_tile<D, 2, 6>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
    else
      packed_tile<D, 1, 12>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
  }
}

// Adds part to the valid channels' sums (channels n + j < n1); flush_scaled: times scale(j),
// a vector (int4's group scales on the bf16 products).
template <int MV, int NB, class V>
LLMK_INLINE void flush_plain(V (&part)[NB][MV], V* a, int64_t valid) {  // float vectors
  for (int j = 0; j < NB && j < valid; ++j)
    for (int v = 0; v < MV; ++v) a[j * kTileVecs + v] += part[j][v];
}
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
template <int MV, int NB>
LLMK_INLINE void flush_plain(__m512i (&part)[NB][MV], __m512i* a, int64_t valid) {  // int32
  for (int j = 0; j < NB && j < valid; ++j)
    for (int v = 0; v < MV; ++v)
      a[j * kTileVecs + v] = _mm512_add_epi32(a[j * kTileVecs + v], part[j][v]);
}
template <int MV, int NB, class Scale>
LLMK_INLINE void flush_scaled(__m512 (&part)[NB][MV], __m512* a, int64_t valid, Scale scale) {
  for (int j = 0; j < NB && j < valid; ++j) {
    const __m512 s = scale(j);
    for (int v = 0; v < MV; ++v)
      a[j * kTileVecs + v] = _mm512_fmadd_ps(part[j][v], s, a[j * kTileVecs + v]);
  }
}

// w8a8's panel: the weight rows' bytes [k0, k1), zero-padded to a multiple of 64; the sums of
// the valid channels' weights go to wsum (vpdpbusd's x + 128 adds 128 * that sum).
template <int NB>
void fill_w8a8(const Ctx& c, const int64_t* chans, int64_t valid, int64_t k0, int64_t k1,
               int8_t* panel, int32_t* wsum) {
  const int64_t len = k1 - k0, lenv = round_up(len, 64);
  const __m512i ones = _mm512_set1_epi8(1);
  for (int j = 0; j < NB && j < valid; ++j) {
    const int8_t* w = c.p->qdata.ptr<int8_t>() + chans[j] * c.K + k0;
    int8_t* dst = panel + j * U8S8Dots::kPanelWords * 4;
    __m512i s = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= len; k += 64) {
      const __m512i v = _mm512_loadu_si512(w + k);
      _mm512_store_si512(dst + k, v);
      s = _mm512_dpbusd_epi32(s, ones, v);
    }
    int32_t tail = 0;
    for (; k < len; ++k) {
      dst[k] = w[k];
      tail += w[k];
    }
    for (; k < lenv; ++k) dst[k] = 0;
    wsum[j] += _mm512_reduce_add_epi32(s) + tail;
  }
}

// Q8BlockDots' panel: the weight rows' bytes [k0, k1) + 128 (unsigned), padded with 128 (a
// zero weight) to a multiple of 32 (x's padding is 0 anyway).
template <int NB>
void fill_int8_u8(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1, uint8_t* panel) {
  const int64_t len = k1 - k0, lenv = round_up(len, 32);
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int j = 0; j < NB; ++j) {
    const int8_t* w = c.p->qdata.ptr<int8_t>() + chans[j] * c.K + k0;
    uint8_t* dst = panel + j * Q8BlockDots::kPanelWords * 4;
    int64_t k = 0;
    for (; k + 64 <= len; k += 64)
      _mm512_store_si512(dst + k, _mm512_xor_si512(_mm512_loadu_si512(w + k), flip));
    for (; k < len; ++k) dst[k] = uint8_t(w[k]) ^ 0x80;
    for (; k < lenv; ++k) dst[k] = 0x80;
  }
}

// Paired panels: words 2q and 2q + 1 from word q of a and of b (16 of each; both = false: the
// first 8 only).
LLMK_INLINE void store_word_pairs(uint32_t* dst, __m512i a, __m512i b, bool both = true) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  _mm512_store_si512(dst, _mm512_permutex2var_epi32(a, lo, b));
  if (both)
    _mm512_store_si512(dst + 16, _mm512_permutex2var_epi32(
                                     a, _mm512_add_epi32(lo, _mm512_set1_epi32(8)), b));
}

// The paired panels of byte weights (Q8PairDots' int8 + 128: flip 0x80; U8S8PairDots' w8a8:
// flip 0): words 2q and 2q + 1 of a row hold the bytes (xor flip) of word q of the chunk
// [k0, k1) in either half of the weight row (c.pair_half values apart); bytes past the row's
// end hold flip (a zero weight; x is 0 there). wsum (w8a8): += the sums of the first valid
// channels' weights.
template <int NB>
void fill_bytes_pairs(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1,
                      uint8_t* panel, uint8_t flip, int64_t valid = 0, int32_t* wsum = nullptr) {
  const int64_t K = c.p->qdata.sizes[1], words = round_up(k1 - k0, 32) / 4;
  const __m512i flips = _mm512_set1_epi8(char(flip)), ones = _mm512_set1_epi8(1);
  for (int j = 0; j < NB; ++j) {
    const int8_t* w = c.p->qdata.ptr<int8_t>() + chans[j] * K;
    const int64_t first[2] = {k0, c.pair_half + k0};  // each half's byte at word 0
    uint32_t* dst = reinterpret_cast<uint32_t*>(panel + j * 2 * U8S8Dots::kPanelWords * 4);
    __m512i sums = _mm512_setzero_si512();
    int32_t tail = 0;
    int64_t q = 0;
    for (; q + 16 <= words && first[1] + 4 * q + 64 <= K; q += 16) {  // both halves whole
      const __m512i a = _mm512_loadu_si512(w + first[0] + 4 * q);
      const __m512i b = _mm512_loadu_si512(w + first[1] + 4 * q);
      if (wsum != nullptr)
        sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sums, ones, a), ones, b);
      store_word_pairs(dst + 2 * q, _mm512_xor_si512(a, flips), _mm512_xor_si512(b, flips));
    }
    for (; q < words; ++q)
      for (int h = 0; h < 2; ++h) {
        uint8_t bytes[4];
        for (int e = 0; e < 4; ++e) {
          const int64_t k = first[h] + 4 * q + e;
          bytes[e] = k < K ? uint8_t(w[k]) ^ flip : flip;
          if (k < K) tail += w[k];
        }
        std::memcpy(dst + 2 * q + h, bytes, 4);
      }
    if (wsum != nullptr && j < valid) wsum[j] += _mm512_reduce_add_epi32(sums) + tail;
  }
}

// int4 on the int8-x path, as bytes in x's order: per 32-value block its 16 low nibbles (the
// even elements), then its 16 high ones. expand_int4_64: the 64 values of 32 packed bytes;
// expand_int4_32: the 32 of 16 (the upper half of the vector undefined).
LLMK_INLINE __m512i expand_int4_64(const uint8_t* src) {
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(lo, hi, 0x20)),
                            _mm256_permute2x128_si256(lo, hi, 0x31), 1);
}
LLMK_INLINE __m512i expand_int4_32(const uint8_t* src) {
  const __m128i low = _mm_set1_epi8(15);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm512_castsi256_si512(
      _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low)));
}

// The weight rows' values [k0, k1) (multiples of 32) as bytes (expand_int4_64).
template <int NB>
void fill_int4_u8(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1, uint8_t* panel) {
  const int64_t len = k1 - k0, row_bytes = c.p->qdata.sizes[1];
  for (int j = 0; j < NB; ++j) {
    const uint8_t* w = c.p->qdata.ptr<uint8_t>() + chans[j] * row_bytes + k0 / 2;
    uint8_t* dst = panel + j * Q8BlockDots::kPanelWords * 4;
    int64_t k = 0;
    for (; k + 64 <= len; k += 64) _mm512_store_si512(dst + k, expand_int4_64(w + k / 2));
    if (k < len)  // one block left
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + k),
                         _mm512_castsi512_si256(expand_int4_32(w + k / 2)));
  }
}

// fill_int4_u8 for Q8PairDots: both halves (whole groups each: use_paired_x) expanded and their
// words interleaved (store_word_pairs).
template <int NB>
void fill_int4_u8_pairs(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1,
                        uint8_t* panel) {
  const int64_t len = k1 - k0, row_bytes = c.p->qdata.sizes[1];
  for (int j = 0; j < NB; ++j) {
    const uint8_t* w = c.p->qdata.ptr<uint8_t>() + chans[j] * row_bytes;
    const uint8_t* a = w + k0 / 2;                  // the first half's chunk
    const uint8_t* b = w + (c.pair_half + k0) / 2;  // the second's
    uint32_t* dst = reinterpret_cast<uint32_t*>(panel + j * Q8PairDots::kPanelWords * 4);
    int64_t k = 0;  // 4 values a word: word pair k / 4 at dst + k / 2
    for (; k + 64 <= len; k += 64)
      store_word_pairs(dst + k / 2, expand_int4_64(a + k / 2), expand_int4_64(b + k / 2));
    if (k < len)
      store_word_pairs(dst + k / 2, expand_int4_32(a + k / 2), expand_int4_32(b + k / 2), false);
  }
}
#endif

struct PackCtx {
  const Ctx* c;
  const uint32_t* src;  // row-major prepared x: words per row
  int64_t words, chunks;
  uint32_t* xp;
};
constexpr int64_t kPackWords = 1024;  // words of one packing work item

// One (group of 16 rows, chunk of words) of the packed x.
void pack_item(void* ctx, int64_t item, int) {
  const PackCtx& pc = *static_cast<const PackCtx*>(ctx);
  const int64_t grp = item / pc.chunks, q0 = item % pc.chunks * kPackWords;
  const int64_t q1 = std::min(pc.words, q0 + kPackWords);
  uint32_t* dst = pc.xp + grp * pc.words * kLaneRows;
  for (int64_t r = 0; r < kLaneRows; ++r) {
    const int64_t m = grp * kLaneRows + r;
    if (m < pc.c->M) {
      const uint32_t* s = pc.src + m * pc.words;
      for (int64_t q = q0; q < q1; ++q) dst[q * kLaneRows + r] = s[q];
    } else {
      for (int64_t q = q0; q < q1; ++q) dst[q * kLaneRows + r] = 0;
    }
  }
}
#else
constexpr bool kPackedX = false;
constexpr bool kPackedBf16 = false;
#endif

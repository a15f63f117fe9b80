// Many rows of x on AVX512-BF16 + VNNI CPUs: sixteen rows of x in the lanes of a vector.
// Included by quant_matmul_impl.h inside its tier namespace (it uses Ctx and the fills).
//
// The K-in-lanes panels of quant_matmul_impl.h end every (row, channel) pair in a horizontal
// sum: with 512-wide K chunks those sums cost about as much as a third of the products (int8
// M = 16 ran at ~32% of vdpbf16ps's peak, w8a8 at ~18% of vpdpbusd's). Here x is packed once
// per call so that one 64-byte load holds one 32-bit word of K (2 bf16 or 4 int8 values) of 16
// rows; each weight word of the panel is broadcast, and one vdpbf16ps (vpdpbusd) adds the
// products of 16 rows with one channel: no sums across lanes, one load per instruction.
//   xp[(group * words + q) * 16 + r] = 32-bit word q of row 16 * group + r (rows past M: 0)
// words = Kx * element bytes / 4. The panel holds NB weight rows of one K chunk (the same
// element order as x: int4's permuted order), kPanelRowBytes apart, zero-padded to Kx.
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
constexpr bool kPackedX = true;
constexpr int64_t kLaneRows = kLaneRowsAll;
constexpr int64_t kTileVecs = kChunkRows / kLaneRows;  // vectors of rows in one tile
constexpr int64_t kPanelRowBytes = kChunkK * 2;  // one chunk: 512 bf16 or 1024 int8 values
constexpr int64_t kPanelWords = kPanelRowBytes / 4;

// The two products: bf16 x with the weights as exact bf16 values (int8 q; int4 q - zero),
// and w8a8's x + 128 (unsigned) with int8 weights.
struct Bf16Dots {
  using V = __m512;
  static constexpr int64_t kElemBytes = 2;
  static V zero() { return _mm512_setzero_ps(); }
  static LLMK_INLINE V dot(V acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
};
struct U8S8Dots {
  using V = __m512i;
  static constexpr int64_t kElemBytes = 1;
  static V zero() { return _mm512_setzero_si512(); }
  static LLMK_INLINE V dot(V acc, __m512i x, __m512i w) { return _mm512_dpbusd_epi32(acc, x, w); }
};

// part[j][v] += the products of row vector v (x: its words, vec_stride words apart) with panel
// row j over the words [q0, q1) of the chunk.
// The sums of row vector v (x: its words, vec_stride words apart) with panel row j over the
// words [q0, q1) of the chunk, to part[j * MV + v]. With ahead: while it computes, line q of
// the NB rows' next chunk (ahead[j] + 64 * line, row j = q >> log2_lines) goes to L2 (all at
// once, the prefetches would queue behind each other). Not inlined: in the tile's body GCC
// spilled x's vectors to the stack (int4 M = 64: 53% of peak), alone it keeps all in registers.
template <class D, int MV, int NB>
__attribute__((noinline)) void packed_dots(const uint32_t* x, int64_t vec_stride,
                                           const uint32_t* panel, int64_t q0, int64_t q1,
                                           typename D::V* part, const uint8_t* const* ahead,
                                           int log2_lines) {
  typename D::V acc[NB][MV];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) acc[j][v] = D::zero();
  for (int64_t q = q0; q < q1; ++q) {
    if (ahead != nullptr && (q >> log2_lines) < NB)
      prefetch_l2(ahead[q >> log2_lines] + ((q & ((int64_t(1) << log2_lines) - 1)) << 6));
    __m512i xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_load_si512(x + v * vec_stride + q * kLaneRows);
    for (int j = 0; j < NB; ++j) {
      const __m512i w = _mm512_set1_epi32(int(panel[j * kPanelWords + q]));
      for (int v = 0; v < MV; ++v) acc[j][v] = D::dot(acc[j][v], xv[v], w);
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < MV; ++v) part[j * MV + v] = acc[j][v];
}

// One tile (rows m0..m1, channels n0..n1) into acc: kChunkChannels x kTileVecs vectors,
// channel-major. Every seg_words words of a chunk, flush(part, chans, n, k) moves the sums of
// the panel's channels (n: the first, chans: clamped, k: the segment's first element) to acc;
// fill(NB as a type, chans, n, k0, k1) writes the panel of the chunk [k0, k1).
template <class D, int MV, int NB, class Fill, class Flush>
void packed_tile(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 typename D::V* acc, void* panel, int64_t seg_words, Fill fill, Flush flush) {
  using V = typename D::V;
  const int64_t vecs = (m1 - m0 + kLaneRows - 1) / kLaneRows;  // a multiple of MV
  std::fill(acc, acc + kChunkChannels * kTileVecs, D::zero());
  const int64_t kc = kPanelRowBytes / D::kElemBytes;
  const int64_t vec_stride = c.Kx * D::kElemBytes / 4 * kLaneRows;
  const uint32_t* xt = c.xp + m0 / kLaneRows * vec_stride;
  const uint32_t* pw = static_cast<const uint32_t*>(panel);
  const uint8_t* w = c.p->qdata.ptr<uint8_t>();
  const int64_t row_bytes = c.p->qdata.sizes[1];
  int log2_lines = 0;  // 64-byte lines of a weight row per chunk: 4 (int4), 8, 16 (w8a8)
  while ((int64_t(64) << log2_lines) < kc * row_bytes / c.K) ++log2_lines;
  for (int64_t n = n0; n < n1; n += NB) {
    int64_t chans[NB];
    for (int j = 0; j < NB; ++j) chans[j] = std::min(n + j, n1 - 1);  // repeats: discarded
    // Each weight row end to end (the hardware prefetchers follow NB streams), x from L2.
    for (int64_t k0 = 0; k0 < c.K; k0 += kc) {
      const int64_t k1 = std::min(c.K, k0 + kc);
      const int64_t words = (std::min(c.Kx, k0 + kc) - k0) * D::kElemBytes / 4;
      const uint32_t* xk = xt + k0 * D::kElemBytes / 4 * kLaneRows;
      fill(std::integral_constant<int, NB>{}, chans, n, k0, k1);
      // The next chunk's weights: these rows' next one, or the next channels' first one.
      const uint8_t* next[NB];
      for (int j = 0; j < NB; ++j)
        next[j] = k1 < c.K ? w + chans[j] * row_bytes + k1 * row_bytes / c.K
                           : w + std::min(n + NB + j, n1 - 1) * row_bytes;
      const bool more = k1 < c.K || n + NB < n1;
      for (int64_t v = 0; v < vecs; v += MV) {
        for (int64_t s = 0; s < words; s += seg_words) {
          V part[NB][MV];
          packed_dots<D, MV, NB>(xk + v * vec_stride, vec_stride, pw, s,
                                 std::min(words, s + seg_words), &part[0][0],
                                 v == 0 && more ? next : nullptr, log2_lines);
          V* a = acc + (n - n0) * kTileVecs + v;
          flush(part, a, chans, n, k0 + s * 4 / D::kElemBytes);
        }
      }
    }
  }
}

// The tile's register blocks: 16 sums each (rows x channels), as many rows as the tile has.
template <class D, class Fill, class Flush>
void packed_tile_any(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                     typename D::V* acc, void* panel, int64_t seg_words, Fill fill,
                     Flush flush) {
  const int64_t vecs = (m1 - m0 + kLaneRows - 1) / kLaneRows;
  if (vecs == 4)
    packed_tile<D, 4, 4>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
  else if (vecs == 2)
    packed_tile<D, 2, 8>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
  else
    packed_tile<D, 1, 16>(c, m0, m1, n0, n1, acc, panel, seg_words, fill, flush);
}

// Adds part to the valid channels' sums (channels n + j < n1), times scale(j) (a float
// vector) for the bf16 products; exact int32 sums for w8a8.
template <int MV, int NB, class Scale>
LLMK_INLINE void flush_scaled(__m512 (&part)[NB][MV], __m512* a, int64_t valid, Scale scale) {
  for (int j = 0; j < NB && j < valid; ++j) {
    const __m512 s = scale(j);
    for (int v = 0; v < MV; ++v)
      a[j * kTileVecs + v] = _mm512_fmadd_ps(part[j][v], s, a[j * kTileVecs + v]);
  }
}
template <int MV, int NB>
LLMK_INLINE void flush_plain(__m512 (&part)[NB][MV], __m512* a, int64_t valid) {
  for (int j = 0; j < NB && j < valid; ++j)
    for (int v = 0; v < MV; ++v) a[j * kTileVecs + v] = _mm512_add_ps(a[j * kTileVecs + v], part[j][v]);
}
template <int MV, int NB>
LLMK_INLINE void flush_plain(__m512i (&part)[NB][MV], __m512i* a, int64_t valid) {
  for (int j = 0; j < NB && j < valid; ++j)
    for (int v = 0; v < MV; ++v)
      a[j * kTileVecs + v] = _mm512_add_epi32(a[j * kTileVecs + v], part[j][v]);
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
    int8_t* dst = panel + j * kPanelRowBytes;
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
#endif

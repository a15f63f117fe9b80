// Kernels of the CPU quantized matmul, compiled once per tier (see vec.h for the scheme).
//
// Work items are (rows chunk, channels chunk) tiles of the output; an item walks K in chunks
// so that its slice of x stays in L2 while every channel of the chunk streams its weights
// past it, and keeps partial sums in a small per-thread buffer between K chunks.
//  - int8 / int4 (weight-only): x is converted once per call to float32 rows (int4: each
//    32-wide block stored as its 16 even then 16 odd elements, the order of the low and high
//    nibbles, so unpacking needs no shuffles). Weights are widened to float in registers and
//    multiplied with FMA; int8 applies the channel scale once at the end, int4 applies each
//    group's scale to the group's partial sum and subtracts zero * scale * sum(x over the
//    group) with per-row group sums computed once.
//  - int4 with bfloat16 x and few rows (decoding): x is quantized to int8 per 32-element
//    block (a float scale each, as llama.cpp's Q8 activations), and the unsigned nibbles
//    meet it in integer dot products (vpdpbusd, or maddubs + madd: |15 * 127| * 2 fits int16);
//    each block's int32 lanes are scaled to float by its x scale, each group's sum by the
//    group's weight scale, and zero * scale * (the group's sum of dequantized x) is
//    subtracted. Several times fewer instructions per weight than widening nibbles to float.
//  - w8a8: x is quantized per row to int8 (exactly as the reference), products are int8 x
//    int8 -> int32: AVX-512 VNNI vpdpbusd (x biased to unsigned, the bias removed with the
//    channel's weight sum), AVX-512BW / AVX2 maddubs + madd (|x| times sign-adjusted w, as
//    llama.cpp does: no int16 saturation for |values| <= 127), or plain int32 lanes.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../common/checks.h"
#include "../common/thread_pool.h"
#include "quant_matmul.h"
#include "vec.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace llmk {
namespace LLMK_ISA_NS {

namespace {

constexpr int64_t kChunkRows = 64;       // rows of x per work item
constexpr int64_t kChunkChannels = 64;   // output channels per work item
constexpr int64_t kChunkK = 512;         // multiple of every group size and vector width
constexpr int64_t kLaneRowsAll = W;      // rows per vector of packed x (quant_matmul_packed_x.h)
constexpr int64_t kPrefetch = 1024;      // bytes ahead in a weight row (one line per 64 B)

// Widening W bytes to W floats. GCC 12 turns __builtin_convertvector from int8 to float
// lanes into one scalar conversion per lane (measured 9x slower than the integer-dot path),
// so the x86 tiers say vpmovsxbd / vpmovzxbd + vcvtdq2ps themselves.
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
LLMK_INLINE vf widen_i8(const int8_t* p) {
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
LLMK_INLINE vf widen_u8(const uint8_t* p) {
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
// The low (high = false) or high nibbles of W packed bytes, as W floats.
LLMK_INLINE vf nibbles(const uint8_t* p, bool high) {
  __m128i b = _mm_loadu_si128((const __m128i*)p);
  if (high) b = _mm_srli_epi16(b, 4);
  b = _mm_and_si128(b, _mm_set1_epi8(15));
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#elif defined(__AVX2__) && LLMK_VEC_BYTES == 32
LLMK_INLINE vf widen_i8(const int8_t* p) {
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
LLMK_INLINE vf widen_u8(const uint8_t* p) {
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
LLMK_INLINE vf nibbles(const uint8_t* p, bool high) {
  __m128i b = _mm_loadl_epi64((const __m128i*)p);
  if (high) b = _mm_srli_epi16(b, 4);
  b = _mm_and_si128(b, _mm_set1_epi8(15));
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}
#else
LLMK_INLINE vf widen_i8(const int8_t* p) {
  vf v;
  for (int i = 0; i < W; ++i) v[i] = float(p[i]);
  return v;
}
LLMK_INLINE vf widen_u8(const uint8_t* p) {
  vf v;
  for (int i = 0; i < W; ++i) v[i] = float(p[i]);
  return v;
}
LLMK_INLINE vf nibbles(const uint8_t* p, bool high) {
  vf v;
  for (int i = 0; i < W; ++i) v[i] = float(high ? p[i] >> 4 : p[i] & 15);
  return v;
}
#endif

float read_float(DType t, const void* base, int64_t off) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(base)[off];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(base)[off]);
    default: return f16_to_f32(static_cast<const uint16_t*>(base)[off]);
  }
}

void write_float(DType t, void* base, int64_t off, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(base)[off] = v; break;
    case DType::bf16: static_cast<uint16_t*>(base)[off] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(base)[off] = f32_to_f16(v); break;
  }
}

// ------------------------------------------------------------------ int8 x int8 dot products

#if defined(__AVX512BW__)
constexpr int QB = 64;
typedef __m512i qv;
LLMK_INLINE qv qload(const int8_t* p) { return _mm512_loadu_si512(p); }
LLMK_INLINE qv qzero() { return _mm512_setzero_si512(); }
LLMK_INLINE int32_t qsum(qv v) { return _mm512_reduce_add_epi32(v); }
#if defined(__AVX512VNNI__)
constexpr bool kBiasedX = true;  // x stored as x + 128 (unsigned), as vpdpbusd wants
LLMK_INLINE qv qdot(qv acc, qv xu, qv w) { return _mm512_dpbusd_epi32(acc, xu, w); }
LLMK_INLINE qv qwsum(qv acc, qv w) { return _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), w); }
#else
constexpr bool kBiasedX = false;
// |w| (unsigned) times x with w's sign: x is within +-127 (quantize_rows_w8a8), w may be
// -128 (int8 checkpoints of other quantizers), whose negation wraps to -128 again: taking x's
// sign onto w turned -128 * (negative x) positive. |w| * |x| <= 128 * 127: pairs fit int16.
LLMK_INLINE qv qdot(qv acc, qv x, qv w) {
  const qv aw = _mm512_abs_epi8(w);
  const qv sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx),
                                                 _mm512_set1_epi16(1)));
}
LLMK_INLINE qv qwsum(qv acc, qv) { return acc; }
#endif
#elif defined(__AVX2__)
constexpr int QB = 32;
constexpr bool kBiasedX = false;
typedef __m256i qv;
LLMK_INLINE qv qload(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
LLMK_INLINE qv qzero() { return _mm256_setzero_si256(); }
LLMK_INLINE int32_t qsum(qv v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
LLMK_INLINE qv qdot(qv acc, qv x, qv w) {  // as the AVX-512BW one: |w| times x with w's sign
  return _mm256_add_epi32(acc, _mm256_madd_epi16(
      _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1)));
}
LLMK_INLINE qv qwsum(qv acc, qv) { return acc; }
#else
constexpr int QB = 16;
constexpr bool kBiasedX = false;
typedef int32_t qv __attribute__((vector_size(64)));
typedef int8_t q8 __attribute__((vector_size(16)));
LLMK_INLINE q8 qload(const int8_t* p) { q8 v; std::memcpy(&v, p, sizeof v); return v; }
LLMK_INLINE qv qzero() { return qv{}; }
LLMK_INLINE int32_t qsum(qv v) {
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
LLMK_INLINE qv qdot(qv acc, q8 x, q8 w) {
  return acc + __builtin_convertvector(x, qv) * __builtin_convertvector(w, qv);
}
LLMK_INLINE qv qwsum(qv acc, q8) { return acc; }
#endif

// ------------------------------------------------------------------ int4 x int8 dot products

// 4W packed nibbles (2W bytes) as 4W unsigned bytes in x's permuted order (per 32-block:
// the 16 low nibbles, then the 16 high ones), and their dot products with 4W int8 values
// of x: W int32 lanes (4 products each; on AVX-512, lanes 0-7 are the first 32-block's).
#if defined(__AVX512BW__) && LLMK_VEC_BYTES == 64
constexpr bool kInt4Q8 = true;
typedef __m512i n8;
// Two 32-blocks A, B: [lo A, lo B, hi A, hi B] (16 bytes each; x is prepared in this order):
// the 32 bytes broadcast to both halves, the lower half masked to its low nibbles. With VNNI
// the upper half is masked to its high nibbles in place (16 times the value, one instruction
// fewer than shifting: int4 decoding from cache 10% faster): vpdpbusd sums exactly (4 x 240 x
// 127 fits int32), and the high lanes' x scales carry the 1/16 (kHighNibbleScale), so each
// lane's float product is the same number (scales of 2^-122 or more: s / 16 stays normal).
// Without it, maddubs' int16 sums would saturate:
// the upper half is shifted down.
constexpr bool kPairedNibbles = true;
constexpr bool kPairableNibbles = false;  // (always paired)
#if defined(__AVX512VNNI__)
constexpr float kHighNibbleScale = 1.f / 16.f;
LLMK_INLINE n8 nibble_bytes(const uint8_t* p) {
  const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(b, _mm512_inserti64x4(_mm512_set1_epi8(0x0f), _mm256_set1_epi8(char(0xf0)), 1));
}
#else
constexpr float kHighNibbleScale = 1.f;
LLMK_INLINE n8 nibble_bytes(const uint8_t* p) {
  const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i z = _mm512_srlv_epi64(b, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
  return _mm512_and_si512(z, _mm512_set1_epi8(15));
}
#endif
LLMK_INLINE n8 load_x8(const int8_t* p) { return _mm512_loadu_si512(p); }
// acc + a * b in one rounding (the int4 decoding loop is bound by its vector instructions).
LLMK_INLINE vf fma_(vf a, vf b, vf acc) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc); }
LLMK_INLINE vf dot_u4_s8(n8 w, n8 x) {
#if defined(__AVX512VNNI__)
  return (vf)_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x));
#else
  return (vf)_mm512_cvtepi32_ps(
      _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
#endif
}
// int8 weights: 4W bytes of a weight row (n of them, the rest 0), and their dot products with
// 4W int8 values of x as W float lanes. VNNI: (w + 128) * x (vpdpbusd's unsigned operand)
// added to start, which holds -128 * (the lane's sum of x): exact int32 sums; otherwise |w| *
// (x * sign(w)) (maddubs: |w| <= 128, |x| <= 127: the pair sums fit int16, -128 weights too)
// and start is not read.
#if defined(__AVX512VNNI__)
constexpr bool kW8Biased = true;
#else
constexpr bool kW8Biased = false;
#endif
LLMK_INLINE n8 load_w8(const int8_t* p) { return _mm512_loadu_si512(p); }
LLMK_INLINE n8 load_w8_part(const int8_t* p, int64_t n) {
  return _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1, p);
}
LLMK_INLINE vf dot_s8_s8(n8 w, n8 x, n8 start) {
#if defined(__AVX512VNNI__)
  const __m512i wu = _mm512_xor_si512(w, _mm512_set1_epi8(char(0x80)));
  return (vf)_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, wu, x));
#else
  (void)start;
  const __m512i xs = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
  return (vf)_mm512_cvtepi32_ps(_mm512_madd_epi16(
      _mm512_maddubs_epi16(_mm512_abs_epi8(w), xs), _mm512_set1_epi16(1)));
#endif
}
// The lanes' x scales for 4W values from the blocks' scales (lanes 0-7: the first block's).
LLMK_INLINE vf block_lanes(const float* s) {
  const __m512 two = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))));
  return (vf)_mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), two);
}
#elif defined(__AVX2__) && LLMK_VEC_BYTES == 32
constexpr bool kInt4Q8 = true;
constexpr bool kPairedNibbles = false;  // one 32-block per vector: [lo, hi] ...
// ... unless the group holds whole pairs of blocks (pair_nibbles): then x is laid out as on
// AVX-512 and one 32-byte load of nibbles gives [lo A, lo B] and [hi A, hi B], whose maddubs
// sums (each |15 * 127| * 2, two of them 7620) add in int16 before one madd, one conversion
// and one FMA: 10 instructions per 64 weights instead of 16 (int4_q8_block).
constexpr bool kPairableNibbles = true;
constexpr float kHighNibbleScale = 1.f;
typedef __m256i n8;
LLMK_INLINE n8 nibble_bytes(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
  return _mm256_and_si256(z, _mm256_set1_epi8(15));  // [lo, hi] of one 32-block
}
// 64 values (two 32-blocks A, B; x paired): the int32 lanes of [A's 4 lanes, B's 4 lanes]
LLMK_INLINE __m256i dot_u4_s8_pair(const uint8_t* p, n8 xlo, n8 xhi) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  return _mm256_madd_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)),
      _mm256_set1_epi16(1));
}
LLMK_INLINE n8 load_x8(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
LLMK_INLINE vf fma_(vf a, vf b, vf acc) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc); }
LLMK_INLINE vf dot_u4_s8(n8 w, n8 x) {
  return (vf)_mm256_cvtepi32_ps(
      _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
constexpr bool kW8Biased = false;
LLMK_INLINE n8 load_w8(const int8_t* p) { return load_x8(p); }
LLMK_INLINE n8 load_w8_part(const int8_t* p, int64_t n) {
  alignas(32) int8_t b[32] = {};
  std::memcpy(b, p, size_t(std::min<int64_t>(n, 32)));
  return load_x8(b);
}
LLMK_INLINE vf dot_s8_s8(n8 w, n8 x, n8) {
  return (vf)_mm256_cvtepi32_ps(_mm256_madd_epi16(
      _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1)));
}
LLMK_INLINE vf block_lanes(const float* s) { return (vf)_mm256_broadcast_ss(s); }
#else
constexpr bool kInt4Q8 = false;
constexpr bool kPairedNibbles = false;
constexpr bool kPairableNibbles = false;
constexpr float kHighNibbleScale = 1.f;
constexpr bool kW8Biased = false;
LLMK_INLINE vf fma_(vf a, vf b, vf acc) { return a * b + acc; }
#endif

// Whether int4's int8-x rows are laid out in pairs of 32-blocks (see nibble_bytes).
LLMK_INLINE bool pair_nibbles(int64_t group_size) {
  return kPairedNibbles || (kPairableNibbles && group_size % 64 == 0);
}

// ------------------------------------------------------------------ the call's shared state

struct Ctx {
  const QuantMatmulParams* p;
  int64_t M, N, K, Kx;        // Kx: floats (or bytes, w8a8) per prepared row of x
  int64_t groups;             // int4: K / group_size
  const float* xf;            // int8/int4: prepared float rows
  const uint16_t* xb;         // int8 with bf16 x on BF16 CPUs: the rows as bf16 (Kx wide)
  const uint32_t* xp;         // many rows: x packed 16 rows per vector (quant_matmul_packed_x.h)
  const float* xsum;          // int4: (M, groups) sums of x over each group
  const int8_t* xq;           // w8a8: quantized rows (biased when kBiasedX)
  const float* xscale;        // w8a8: per-row scales
  const int8_t* x4q;          // int4 on the int8-x path: x per 32-block as int8 (permuted)
  const float* x4s;           // its block scales, each repeated for the block's 8 lanes
  const float* x4sum;         // (M, groups): sums of the dequantized x over each group
  const float* x8s;           // int8 on the int8-x paths: xq's block scales, (M, Kx / 32)
  const float* xps;           // the packed int8-x path: xq's block scales, packed as xp
  // int8 weights on VNNI (kW8Biased): -128 * sums of xq where vpdpbusd's sums start, so that
  // the (weights + 128) * x products come out exact (a float correction afterwards left a
  // zero weight row at ~1e-3 and every output that far off): int8_q8_block's per lane (4
  // values, (M, Kx / 4)), the packed path's per block, packed as xps. Cost: 2048 x 256 in
  // cache, one Zen 4 thread, 1-16 rows the same, 64 rows 342-349 -> 352-356 us (2026-11-28).
  const int32_t* x8lane;
  const int32_t* xpb;
  const float* xpg;           // its int4: (rows, groups) sums of the dequantized x, packed as xp
  int64_t pair_half;          // the paired int8-x path (use_paired_x): K values of a half, else 0
  char* scratch;              // per-thread partial sums
  int64_t scratch_stride;
  int64_t chunks_n;
};

// How far ahead a block of NB weight rows (row_bytes each) prefetches while it reads [k0, k1).
// Whole rows (decoding): the same place in the next block of NB rows, or kMinRowsAhead bytes
// on if that is further (the weight is one array, read block after block): a row's own
// next bytes would be too close (a 2 KiB int4 row is read in ~0.2 us, about a DRAM latency),
// and so is the next block when rows are short (K = 768: int4 one-thread GEMVs of weights not
// in cache went 9-10 -> 13.7-14.6 GB/s with 8 KiB, 16 KiB was worse; Zen 4 VM, 2026-11-26).
// Chunks of rows (many rows of x): kPrefetch further along the row.
constexpr int64_t kMinRowsAhead = 8192;

// Weight prefetches go to L2 (prefetcht1): L2 keeps more misses in flight than L1's fill
// buffers, and a decoding GEMV that streams its weight from DRAM needs them (int4 4096x4096,
// one thread, weights not cached: 10 -> 13.6 GB/s against 16.5 GB/s from cache; AMD EPYC Zen 4
// VM, 2026-11-26). The hardware's L1 prefetcher brings the lines on from L2.
LLMK_INLINE void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

template <int NB>
LLMK_INLINE int64_t prefetch_ahead(const Ctx& c, int64_t row_bytes, int64_t k0, int64_t k1) {
  return k0 == 0 && k1 == c.K ? std::max<int64_t>(NB * row_bytes, kMinRowsAhead) : kPrefetch;
}

bool use_int8_q8_rows(const QuantMatmulParams& p);  // below
bool use_paired_x(const QuantMatmulParams& p);

// Values per prepared row of x: its int8-x row blocks step 4W values at a time.
int64_t padded_k(const QuantMatmulParams& p) {
  const int64_t K = std::max<int64_t>(p.x.sizes[1], 1);
  if (use_int8_q8_rows(p)) return round_up(K, 4 * W);
  if (use_paired_x(p)) return round_up(K, 64);  // two halves of whole 32-value blocks
  return p.scheme == QuantScheme::w8a8 ? round_up(K, 64) : round_up(K, 32);
}

constexpr int kMaxNB = 4;
constexpr int kMaxPackedNB = 16;  // quant_matmul_packed_x.h: bf16 or int8 panel rows
constexpr int64_t kPanelBytes = std::max<int64_t>(kMaxNB * kChunkK * 4, kMaxPackedNB * kChunkK * 2);
constexpr int64_t kWsumBytes = kChunkChannels * 4;
// Per thread: the tile's partial sums, a weight panel, w8a8's channel weight sums.
int64_t scratch_bytes() { return kChunkRows * kChunkChannels * 4 + kPanelBytes + kWsumBytes + 128; }

// Output rows [m0, m1), channels [n0, n1) (at most kChunkChannels): value(m, n) + bias, in
// out's dtype. The dtype switch and the bias reads stay out of the loops (a function call per
// element with both was ~6% of int8 M = 64 and ~5% of a 768-wide int4 GEMV), and each row of
// out is written in order (column by column, 64 rows' lines were written two bytes at a time:
// ~9% of int8 M = 64, one thread).
template <class Value>
void store_tile(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, Value value) {
  const QuantMatmulParams& p = *c.p;
  const int64_t so = p.out.strides[0], sn = p.out.strides[1];
  float bias[kChunkChannels];
  for (int64_t n = n0; n < n1; ++n)
    bias[n - n0] = p.bias.defined() ? read_float(p.bias.dtype, p.bias.data, n * p.bias.strides[0])
                                    : 0.f;
  auto rows = [&](auto* out, auto convert) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = n0; n < n1; ++n) out[m * so + n * sn] = convert(value(m, n) + bias[n - n0]);
  };
  switch (p.out.dtype) {  // lambdas, not function pointers: inlined
    case DType::f32: rows(static_cast<float*>(p.out.data), [](float v) { return v; }); break;
    case DType::bf16:
      rows(static_cast<uint16_t*>(p.out.data), [](float v) { return f32_to_bf16(v); });
      break;
    default:
      rows(static_cast<uint16_t*>(p.out.data), [](float v) { return f32_to_f16(v); });
      break;
  }
}

// ------------------------------------------------------------------ weight-only blocks

// Partial sums over keys [k0, k1) for MB rows x NB channels, added into acc (row stride ld).
template <int MB, int NB>
void int8_block(const Ctx& c, const int64_t* rows, const int64_t* chans, int64_t k0, int64_t k1,
                float* acc, int64_t ld) {
  const int8_t* w[NB];
  for (int j = 0; j < NB; ++j) w[j] = c.p->qdata.ptr<int8_t>() + chans[j] * c.K;
  const float* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = c.xf + rows[i] * c.Kx;
  vf a[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) a[i][j] = vf{};
  const int64_t ahead = prefetch_ahead<NB>(c, c.K, k0, k1);
  const int64_t kv = k0 + (k1 - k0) / W * W;
  for (int64_t k = k0; k < kv; k += W) {
    vf xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = loadu(x[i] + k);
    for (int j = 0; j < NB; ++j) {
      if ((k & 63) == 0) prefetch_l2(w[j] + k + ahead);
      const vf wv = widen_i8(w[j] + k);
      for (int i = 0; i < MB; ++i) a[i][j] += xv[i] * wv;
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(a[i][j]);
      for (int64_t k = kv; k < k1; ++k) s += x[i][k] * float(w[j][k]);
      acc[i * ld + j] += s;
    }
}

// The int4 blocks' group loop, whatever form x takes: group_dot(w, kg, ahead, part) adds the
// products of the MB rows and NB weight rows w over the group [kg, kg + g) to part; each
// group's sums are then scaled by its scale, and zero * scale * (the row's sum of x over the
// group, xsum) is subtracted.
template <int MB, int NB, class GroupDot>
void int4_groups(const Ctx& c, const int64_t* rows, const int64_t* chans, int64_t k0,
                 int64_t k1, float* acc, int64_t ld, const float* xsum, GroupDot group_dot) {
  const int64_t g = c.p->group_size;
  const uint8_t* w[NB];
  const float* sc[NB];
  const uint8_t* zp[NB];
  for (int j = 0; j < NB; ++j) {
    w[j] = c.p->qdata.ptr<uint8_t>() + chans[j] * (c.K / 2);
    sc[j] = c.p->scales.ptr<float>() + chans[j] * c.groups;
    zp[j] = c.p->zeros.ptr<uint8_t>() + chans[j] * c.groups;
  }
  const float* xs[MB];
  for (int i = 0; i < MB; ++i) xs[i] = xsum + rows[i] * c.groups;
  const int64_t ahead = prefetch_ahead<NB>(c, c.K / 2, k0, k1);
  vf total[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) total[i][j] = vf{};
  for (int64_t kg = k0, grp = k0 / g; kg < k1; kg += g, ++grp) {
    vf part[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) part[i][j] = vf{};
    group_dot(w, kg, ahead, part);
    for (int j = 0; j < NB; ++j) {
      const vf s = splat(sc[j][grp]);
      for (int i = 0; i < MB; ++i) total[i][j] = fma_(s, part[i][j], total[i][j]);
    }
  }
  // The zero points' term, W groups at a time (per group and channel, scalar, it was ~a
  // quarter of a decoding GEMV's instructions). The groups left over (all of them in the
  // short rows of small models: 768 / 128 = 6) take one more vector, the lanes past the row
  // dropped, where its W reads stay inside the zeros and scales (contiguous rows: all but the
  // last row, or the last few where a row has fewer than W groups; the x sums' buffers have W
  // floats to spare); scalar, they cost a 768-wide int4 GEMV ~13% of its time.
  const int64_t g0 = k0 / g, g1 = k1 / g, gv = g0 + (g1 - g0) / W * W;
  vi tail_lanes;  // lanes [0, g1 - gv)
  for (int l = 0; l < W; ++l) tail_lanes[l] = l < g1 - gv ? -1 : 0;
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) {
      vf zv = vf{};
      for (int64_t q = g0; q < gv; q += W)
        zv += (widen_u8(zp[j] + q) * loadu(sc[j] + q)) * loadu(xs[i] + q);
      float zero_term;
      if (gv < g1 && chans[j] * c.groups + gv + W <= c.N * c.groups) {  // (N, groups) each
        zv += select(tail_lanes, (widen_u8(zp[j] + gv) * loadu(sc[j] + gv)) * loadu(xs[i] + gv),
                     vf{});
        zero_term = hsum(zv);
      } else {
        zero_term = hsum(zv);
        for (int64_t q = gv; q < g1; ++q) zero_term += (float(zp[j][q]) * sc[j][q]) * xs[i][q];
      }
      acc[i * ld + j] += hsum(total[i][j]) - zero_term;
    }
}

template <int MB, int NB>
void int4_block(const Ctx& c, const int64_t* rows, const int64_t* chans, int64_t k0, int64_t k1,
                float* acc, int64_t ld) {
  const int64_t g = c.p->group_size;
  const float* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = c.xf + rows[i] * c.Kx;
  int4_groups<MB, NB>(c, rows, chans, k0, k1, acc, ld, c.xsum,
                      [&](const uint8_t* const* w, int64_t kg, int64_t ahead, vf (*part)[NB]) {
    for (int64_t kb = kg; kb < kg + g; kb += 32) {  // 32 values: 16 packed bytes
      if ((kb & 127) == 0)
        for (int j = 0; j < NB; ++j) prefetch_l2(w[j] + kb / 2 + ahead);
      for (int s = 0; s < 32 / W; ++s) {
        // sub-vector s: the low nibbles (even elements) first, then the high ones
        const bool high = s >= 16 / W;
        const int64_t byte0 = kb / 2 + (high ? s - 16 / W : s) * W;
        vf xv[MB];
        for (int i = 0; i < MB; ++i) xv[i] = loadu(x[i] + kb + s * W);
        for (int j = 0; j < NB; ++j) {
          const vf wv = nibbles(w[j] + byte0, high);
          for (int i = 0; i < MB; ++i) part[i][j] += xv[i] * wv;
        }
      }
    }
  });
}

#if defined(__AVX512BW__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
// int4_block on int8 x (see the top of the file): the same groups, integer dot products.
// k0, k1: multiples of the group size, itself a multiple of 4W.
template <int MB, int NB>
void int4_q8_block(const Ctx& c, const int64_t* rows, const int64_t* chans, int64_t k0,
                   int64_t k1, float* acc, int64_t ld) {
  const int64_t g = c.p->group_size;
  const int8_t* x[MB];
  const float* xl[MB];
  for (int i = 0; i < MB; ++i) {
    x[i] = c.x4q + rows[i] * c.Kx;
    xl[i] = c.x4s + rows[i] * (c.Kx / 4);
  }
#if defined(__AVX2__) && LLMK_VEC_BYTES == 32
  if (pair_nibbles(g)) {
    int4_groups<MB, NB>(c, rows, chans, k0, k1, acc, ld, c.x4sum,
                        [&](const uint8_t* const* w, int64_t kg, int64_t ahead, vf (*part)[NB]) {
      // The lines starting in the group (one per 128 values; g is 64 or a multiple of 128)
      // are prefetched before its loop, which then holds the products alone: from cache,
      // decoding is bound by the instructions issued (~3.5 a cycle on the Zen 3).
      const uint64_t kgu = uint64_t(kg);  // (k >= 0: shifts, not signed divisions)
      for (uint64_t kp = (kgu + 127) & ~uint64_t(127); kp < kgu + uint64_t(g); kp += 128)
        for (int j = 0; j < NB; ++j) prefetch_l2(w[j] + (kp >> 1) + ahead);
      for (uint64_t kb = kgu; kb < kgu + uint64_t(g); kb += 64) {
        n8 xlo[MB], xhi[MB];
        vf sv[MB];
        for (int i = 0; i < MB; ++i) {
          xlo[i] = load_x8(x[i] + kb);
          xhi[i] = load_x8(x[i] + kb + 32);
          sv[i] = loadu(xl[i] + (kb >> 2));  // [A's scale x 4, B's x 4]
        }
        for (int j = 0; j < NB; ++j)
          for (int i = 0; i < MB; ++i)
            part[i][j] = fma_((vf)_mm256_cvtepi32_ps(dot_u4_s8_pair(w[j] + (kb >> 1), xlo[i], xhi[i])),
                              sv[i], part[i][j]);
      }
    });
    return;
  }
#endif
  int4_groups<MB, NB>(c, rows, chans, k0, k1, acc, ld, c.x4sum,
                      [&](const uint8_t* const* w, int64_t kg, int64_t ahead, vf (*part)[NB]) {
    for (int64_t kb = kg; kb < kg + g; kb += 4 * W) {
      if ((kb & 127) == 0)
        for (int j = 0; j < NB; ++j) prefetch_l2(w[j] + kb / 2 + ahead);
      n8 xv[MB];
      vf sv[MB];
      for (int i = 0; i < MB; ++i) {
        xv[i] = load_x8(x[i] + kb);
        sv[i] = loadu(xl[i] + kb / 4);
      }
      for (int j = 0; j < NB; ++j) {
        const n8 wv = nibble_bytes(w[j] + kb / 2);
        for (int i = 0; i < MB; ++i) part[i][j] = fma_(dot_u4_s8(wv, xv[i]), sv[i], part[i][j]);
      }
    }
  });
}
#endif

#if defined(__AVX512BW__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
// int8_block on int8 x (decoding rows, use_int8_q8_rows): whole weight rows, 4W values a step
// (the last step's weight bytes past K read as 0; x's padding is 0), each lane's int32 products
// times its block's x scale summed in float lanes.
template <int MB, int NB>
void int8_q8_block(const Ctx& c, const int64_t* rows, const int64_t* chans, int64_t k0,
                   int64_t k1, float* acc, int64_t ld) {
  constexpr int64_t step = 4 * W;
  const int8_t* w[NB];
  for (int j = 0; j < NB; ++j) w[j] = c.p->qdata.ptr<int8_t>() + chans[j] * c.K;
  const int8_t* x[MB];
  const float* xs[MB];
  const int32_t* xl[MB];  // VNNI: the lanes' starting sums
  for (int i = 0; i < MB; ++i) {
    x[i] = c.xq + rows[i] * c.Kx;
    xs[i] = c.x8s + rows[i] * (c.Kx / 32);
    xl[i] = kW8Biased ? c.x8lane + rows[i] * (c.Kx / 4) : nullptr;
  }
  vf a[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) a[i][j] = vf{};
  const int64_t ahead = prefetch_ahead<NB>(c, c.K, k0, k1);
  auto body = [&](int64_t k, auto load) {
    n8 xv[MB], start[MB];
    vf sv[MB];
    for (int i = 0; i < MB; ++i) {
      xv[i] = load_x8(x[i] + k);
      sv[i] = block_lanes(xs[i] + k / 32);
      start[i] = kW8Biased ? load_x8(reinterpret_cast<const int8_t*>(xl[i] + k / 4)) : n8{};
    }
    for (int j = 0; j < NB; ++j) {
      const n8 wv = load(w[j] + k);
      for (int i = 0; i < MB; ++i) a[i][j] = fma_(dot_s8_s8(wv, xv[i], start[i]), sv[i], a[i][j]);
    }
  };
  const int64_t kv = k0 + (k1 - k0) / step * step;
  for (int64_t k = k0; k < kv; k += step) {
    if ((k & 63) == 0)
      for (int j = 0; j < NB; ++j) prefetch_l2(w[j] + k + ahead);
    body(k, [](const int8_t* p) { return load_w8(p); });
  }
  // the rest (x: zeros up to Kx, a multiple of 4W; weights: k1 - kv bytes, the others read 0)
  for (int64_t k = kv; k < k1; k += step)
    body(k, [&](const int8_t* p) { return load_w8_part(p, k1 - k); });
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j)
      acc[i * ld + j] += hsum(a[i][j]);
}
#endif

template <int MB, int NB>
void w8a8_block(const Ctx& c, const int64_t* rows, const int64_t* chans, int64_t k0, int64_t k1,
                int32_t* acc, int64_t ld) {
  const int8_t* w[NB];
  for (int j = 0; j < NB; ++j) w[j] = c.p->qdata.ptr<int8_t>() + chans[j] * c.K;
  const int8_t* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = c.xq + rows[i] * c.Kx;
  qv a[MB][NB];
  qv ws[NB];
  for (int j = 0; j < NB; ++j) {
    ws[j] = qzero();
    for (int i = 0; i < MB; ++i) a[i][j] = qzero();
  }
  const int64_t kv = k0 + (k1 - k0) / QB * QB;
  for (int64_t k = k0; k < kv; k += QB) {
    decltype(qload(x[0])) xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = qload(x[i] + k);
    for (int j = 0; j < NB; ++j) {
      const auto wv = qload(w[j] + k);
      for (int i = 0; i < MB; ++i) a[i][j] = qdot(a[i][j], xv[i], wv);
      if (kBiasedX) ws[j] = qwsum(ws[j], wv);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int32_t bias = kBiasedX ? 128 * qsum(ws[j]) : 0;
    for (int i = 0; i < MB; ++i) {
      int32_t s = qsum(a[i][j]) - bias;
      if (kBiasedX) {
        // (u8 - 128) * s8 summed in one loop was vectorized wrongly by GCC 12 with
        // -mavx512vnni (tails of 32+ values); two plain sums are right.
        int32_t su = 0, sw = 0;
        for (int64_t k = kv; k < k1; ++k) {
          su += int32_t(uint8_t(x[i][k])) * int32_t(w[j][k]);
          sw += int32_t(w[j][k]);
        }
        s += su - 128 * sw;
      } else {
        for (int64_t k = kv; k < k1; ++k) s += int32_t(x[i][k]) * int32_t(w[j][k]);
      }
      acc[i * ld + j] += s;
    }
  }
}

// Register tiles per tier: accumulators must fit the vector registers (16 or 32).
constexpr int kMB = W >= 16 ? 4 : 2;
constexpr int kNB = W >= 8 ? 4 : 2;
constexpr int kMB4 = W >= 16 ? 2 : (W >= 8 ? 2 : 1);  // int4 keeps two sets of sums
constexpr int kNB4 = W >= 16 ? 4 : 2;
// int4's int8-x decoding row (M = 1): AVX2 too takes 4 weight rows a block, x's 64 values
// and their scales loaded once for the 4 (Zen 3, one thread, weights in L2, K 2048 / 4096:
// 7.1 / 6.7 -> 5.2 / 4.9 cycles per 64 weights; 4096 x 4096 from L3 590 -> 450 us; from DRAM
// no change measured: 2 threads stream at ~20 GB/s either way).
constexpr int kNB4Row = W >= 8 ? 4 : kNB4;
// ... and from 4 rows (a batch of sequences decoding together) AVX2 takes 4 rows of x against
// one weight row a block: the nibbles are unpacked once for 4 rows instead of 2 (Zen 3, 2
// threads, weights in cache, bf16 x, alternated 3 times, one round noisy: 768 x 2048 / 2048 x
// 768, 4 rows 98-102 / 78 -> 95-98 / 68-71 us, 8 rows 186-190 / 153-157 -> 172-177 / 142-144;
// 2 rows lose with it: one thread 63-65 -> 52-53 GF/s).
constexpr int kMB4Rows = W == 8 ? 4 : kMB4;
constexpr int kNB4Rows = W == 8 ? 1 : kNB4;
constexpr int kMBq = W >= 16 ? 4 : 2;
// int8_q8_block: AVX2 takes 3 rows a block (6 sums, 3 x and 3 scale vectors: its 16
// registers). Zen 3, 4096 x 4096 int8, bf16 x, 2 threads, alternated twice against 2-row
// blocks: 3 rows 962-1062 -> 835-853 us, 6 rows 1517-1722 -> 1477-1576, 8 rows 2629-2909 ->
// 2512-2539, 11 rows 3758-4785 -> 3258-3353.
constexpr int kMB8q = W >= 16 ? 4 : 3;
constexpr int kNB8q = W >= 16 ? 4 : 2;
// ... and one row (decoding) 4 weight rows, x and its scales loaded once for the 4 (Zen 3,
// 4096 x 4096 / 11008 and 11008 x 4096, bf16 x, env switch alternated in one process,
// 2026-11-29: one thread, weights in L3, K 2048 / 4096: 7.4-7.6 / 6.8-7.0 -> 6.3 / 6.3 cycles
// per 64 weights; 2 threads from DRAM, medians of 9-11 rounds: 2-11% less time).
constexpr int kNB8Row = W >= 8 ? 4 : kNB8q;
constexpr int kNBq = W >= 16 ? 4 : 2;

// ------------------------------------------------------------------ panels (many rows)
// With more rows than one register block, widening the same weights once per row block
// costs more than the products; so each (channel block, K chunk) is dequantized once into a
// float panel in L1 (int8: q; int4: (q - zero) * scale, in x's permuted order) and every
// row block runs plain FMA against it.

// Rows zero-padded to a multiple of 32 values: the panels read to a multiple of W, the
// packed-x path to Kx (K rounded up to 32); stale values there could be NaN.
template <int NB>
void fill_int8(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1, float* panel,
               int64_t ld = kChunkK) {
  const int64_t len = k1 - k0, lenv = round_up(len, 32);
  for (int j = 0; j < NB; ++j) {
    const int8_t* w = c.p->qdata.ptr<int8_t>() + chans[j] * c.K + k0;
    float* dst = panel + j * ld;
    int64_t k = 0;
    for (; k + W <= len; k += W) storeu(dst + k, widen_i8(w + k));
    for (; k < len; ++k) dst[k] = float(w[k]);
    for (; k < lenv; ++k) dst[k] = 0.f;
  }
}

template <int NB>
void fill_int4(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1, float* panel,
               int64_t ld = kChunkK) {
  const int64_t g = c.p->group_size;
  for (int j = 0; j < NB; ++j) {
    const uint8_t* w = c.p->qdata.ptr<uint8_t>() + chans[j] * (c.K / 2);
    const float* sc = c.p->scales.ptr<float>() + chans[j] * c.groups;
    const uint8_t* zp = c.p->zeros.ptr<uint8_t>() + chans[j] * c.groups;
    float* dst = panel + j * ld - k0;
    for (int64_t kg = k0; kg < k1; kg += g) {  // k0, k1: multiples of the group size
      const vf s = splat(sc[kg / g]), z = splat(float(zp[kg / g]));
      for (int64_t kb = kg; kb < kg + g; kb += 32)
        for (int sv = 0; sv < 32 / W; ++sv) {
          const bool high = sv >= 16 / W;
          const int64_t byte0 = kb / 2 + (high ? sv - 16 / W : sv) * W;
          storeu(dst + kb + sv * W, (nibbles(w + byte0, high) - z) * s);
        }
    }
  }
}

template <int MB, int NB>
void panel_block(const Ctx& c, const int64_t* rows, const float* panel, int64_t k0,
                 int64_t len, float* out) {
  const float* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = c.xf + rows[i] * c.Kx + k0;
  vf a[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) a[i][j] = vf{};
  const int64_t lenv = round_up(len, W);  // panel and x rows are zero-padded that far
  for (int64_t k = 0; k < lenv; k += W) {
    vf xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = loadu(x[i] + k);
    for (int j = 0; j < NB; ++j) {
      const vf wv = loadu(panel + j * kChunkK + k);
      for (int i = 0; i < MB; ++i) a[i][j] += xv[i] * wv;
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * NB + j] = hsum(a[i][j]);
}

template <int MB, int NB, class Fill>
void run_tile_panel(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* acc,
                    float* panel, Fill fill) {
  const int64_t ld = kChunkChannels;
  std::fill(acc, acc + (m1 - m0) * ld, 0.f);  // the tile's rows only (decoding: one)
  for (int64_t k0 = 0; k0 < c.K; k0 += kChunkK) {
    const int64_t k1 = std::min(c.K, k0 + kChunkK);
    for (int64_t n = n0; n < n1; n += NB) {
      int64_t chans[NB];
      for (int j = 0; j < NB; ++j) chans[j] = std::min(n + j, n1 - 1);
      fill(c, chans, k0, k1, panel, kChunkK);
      int64_t m = m0;
      for (; m + MB <= m1; m += MB) {
        int64_t rows[MB];
        for (int i = 0; i < MB; ++i) rows[i] = m + i;
        float tmp[MB * NB];
        panel_block<MB, NB>(c, rows, panel, k0, k1 - k0, tmp);
        for (int i = 0; i < MB; ++i)
          for (int j = 0; j < NB && n + j < n1; ++j)
            acc[(m + i - m0) * ld + (n + j - n0)] += tmp[i * NB + j];
      }
      for (; m < m1; ++m) {
        float tmp[NB];
        panel_block<1, NB>(c, &m, panel, k0, k1 - k0, tmp);
        for (int j = 0; j < NB && n + j < n1; ++j) acc[(m - m0) * ld + (n + j - n0)] += tmp[j];
      }
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 activations times int8 / int4 weights: q (or q - zero) is exact in bf16, and vdpbf16ps
// multiplies pairs exactly and accumulates in float32, so this computes what the float
// panels compute (up to summation order) at twice the products per instruction.
// fill_int8_bf16 fills the packed-x path's panels (quant_matmul_packed_x.h).
constexpr bool kBf16Dot = true;

template <int NB>
void fill_int8_bf16(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1,
                    uint16_t* panel, int64_t ld = kChunkK) {
  const int64_t len = k1 - k0, lenv = round_up(len, 32);
  for (int j = 0; j < NB; ++j) {
    const int8_t* w = c.p->qdata.ptr<int8_t>() + chans[j] * c.K + k0;
    uint16_t* dst = panel + j * ld;
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16))));
      const __m512bh b = _mm512_cvtne2ps_pbh(hi, lo);
      std::memcpy(dst + k, &b, 64);
    }
    for (; k < len; ++k) dst[k] = f32_to_bf16(float(w[k]));
    for (; k < lenv; ++k) dst[k] = 0;
  }
}

// bf16 activations times int4 weights: the panel holds q - zero (exact in bf16, in x's
// permuted order), each group's dot products are summed exactly and then scaled by
// the group's float32 scale (the float panel scales each weight first: same result up to
// rounding, at twice the products per instruction).
template <int NB>
void fill_int4_bf16(const Ctx& c, const int64_t* chans, int64_t k0, int64_t k1,
                    uint16_t* panel, int64_t ld = kChunkK) {
  const int64_t g = c.p->group_size;
  const __m128i low4 = _mm_set1_epi8(15);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int j = 0; j < NB; ++j) {
    const uint8_t* w = c.p->qdata.ptr<uint8_t>() + chans[j] * (c.K / 2);
    const uint8_t* zp = c.p->zeros.ptr<uint8_t>() + chans[j] * c.groups;
    uint16_t* dst = panel + j * ld - k0;
    for (int64_t kg = k0; kg < k1; kg += g) {  // k0, k1: multiples of the group size
      // The group's 16 values q - zero as bf16 (exact), looked up by q: one vpermw per 32.
      const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(
          _mm512_sub_ps(iota, _mm512_set1_ps(float(zp[kg / g])))));
      for (int64_t kb = kg; kb < kg + g; kb += 32) {  // 16 bytes: 16 low nibbles, 16 high ones
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + kb / 2));
        const __m256i q = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_and_si128(b, low4)),
            _mm_and_si128(_mm_srli_epi16(b, 4), low4), 1);
        const __m512i v = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table);
        std::memcpy(dst + kb, &v, 64);
      }
    }
  }
}

template <int MB, int NB>
void panel_block_int4_bf16(const Ctx& c, const int64_t* rows, const int64_t* chans,
                           const uint16_t* panel, int64_t k0, int64_t len, float* out) {
  const int64_t g = c.p->group_size;
  const uint16_t* x[MB];
  for (int i = 0; i < MB; ++i) x[i] = c.xb + rows[i] * c.Kx + k0;
  const float* sc[NB];
  for (int j = 0; j < NB; ++j) sc[j] = c.p->scales.ptr<float>() + chans[j] * c.groups + k0 / g;
  __m512 a[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) a[i][j] = _mm512_setzero_ps();
  for (int64_t gk = 0; gk < len; gk += g) {  // k0 and len: multiples of the group size
    __m512 part[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) part[i][j] = _mm512_setzero_ps();
    for (int64_t k = gk; k < gk + g; k += 32) {
      __m512bh xv[MB];
      for (int i = 0; i < MB; ++i) std::memcpy(&xv[i], x[i] + k, 64);
      for (int j = 0; j < NB; ++j) {
        __m512bh wv;
        std::memcpy(&wv, panel + j * kChunkK + k, 64);
        for (int i = 0; i < MB; ++i) part[i][j] = _mm512_dpbf16_ps(part[i][j], xv[i], wv);
      }
    }
    for (int j = 0; j < NB; ++j) {
      const __m512 s = _mm512_set1_ps(sc[j][gk / g]);
      for (int i = 0; i < MB; ++i) a[i][j] = _mm512_fmadd_ps(part[i][j], s, a[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out[i * NB + j] = _mm512_reduce_add_ps(a[i][j]);
}

// int4 weights, bf16 x, panels of q - zero: each group's sums scaled by its scale.
template <int MB, int NB>
void run_tile_panel_int4_bf16(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                         float* acc, uint16_t* panel) {
  const int64_t ld = kChunkChannels;
  std::fill(acc, acc + (m1 - m0) * ld, 0.f);  // the tile's rows only (decoding: one)
  for (int64_t k0 = 0; k0 < c.K; k0 += kChunkK) {
    const int64_t k1 = std::min(c.K, k0 + kChunkK);
    for (int64_t n = n0; n < n1; n += NB) {
      int64_t chans[NB];
      for (int j = 0; j < NB; ++j) chans[j] = std::min(n + j, n1 - 1);
      fill_int4_bf16<NB>(c, chans, k0, k1, panel);
      int64_t m = m0;
      for (; m + MB <= m1; m += MB) {
        int64_t rows[MB];
        for (int i = 0; i < MB; ++i) rows[i] = m + i;
        float tmp[MB * NB];
        panel_block_int4_bf16<MB, NB>(c, rows, chans, panel, k0, k1 - k0, tmp);
        for (int i = 0; i < MB; ++i)
          for (int j = 0; j < NB && n + j < n1; ++j)
            acc[(m + i - m0) * ld + (n + j - n0)] += tmp[i * NB + j];
      }
      for (; m < m1; ++m) {
        float tmp[NB];
        panel_block_int4_bf16<1, NB>(c, &m, chans, panel, k0, k1 - k0, tmp);
        for (int j = 0; j < NB && n + j < n1; ++j) acc[(m - m0) * ld + (n + j - n0)] += tmp[j];
      }
    }
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

#include "quant_matmul_packed_x.h"

// Rows from which x packed into vector lanes beats the K-in-lanes panels and register blocks
// (a vector of rows computes zeros for the rows a group lacks). 4096 x 4096, two Zen 4 threads,
// alternated, 2026-11-27: at M = 8 packed vs not, avx512_bf16 tier int8 1.97-2.00 vs
// 2.11-2.28 ms, int4 2.11-2.18 vs 2.14-2.35, w8a8 1.04-1.16 vs 1.39-1.51; avx2 tier int8
// 2.75-3.00 vs 3.42-3.55; M = 11 w8a8 1.08-1.21 vs 1.67-1.88; at M = 6 about even (avx2 int4:
// 10% slower packed), at M = 3-4 the blocks win.
constexpr int64_t kPackedMinRows = 8;

// The int8-x int4 path: bfloat16 x (its tolerance; float16 and float32 x keep float
// products), few rows (decoding, batched too: fewer than kInt4Q8Rows, taken from the packed
// path's bf16 x as well; 4096 x 4096, 2 Zen 4 threads, 2026-11-27: 3-7 rows took 1.2-2.2 ms in
// bf16 panels and 0.55-1.2 here, 8-11 rows 2.0-2.3 packed and 1.3-1.9 here), groups that hold
// whole vectors of 4W values. VNNI CPUs pack int8 x from kInt4Q8RowsVnni rows (use_packed_q8:
// 4096 x 4096 / 11008, 2 Zen 4 threads, 2026-11-27: 8 rows 1.14 / 3.09 ms here against 1.22 /
// 3.23 packed, 11 rows 1.54 / 4.12 against 1.29 / 3.22; packed, 8 to 16 rows cost the same).
// int8 weights' rows (use_int8_q8_rows) stop at kInt8Q8Rows without VNNI.
constexpr int64_t kInt8Q8Rows = 12;
// AVX2's int4 row blocks (4 rows a block since) cost in proportion to the rows, the packed
// path by vectors of 8: the blocks win up to 31 rows (Zen 3, 2 threads, alternated twice,
// 768x2048 / 2048x768 / 4096x4096: 12 rows 434-487 / 418-505 / 4168-4418 -> 277-284 /
// 255-260 / 2728-2943 us, 16 rows 424-469 / 478-516 / 4154-4204 -> 340-368 / 334-342 /
// 3611-4167, 24 rows 767-821 / 774-858 / 7249-8417 -> 555-571 / 505-510 / 5354-6758; 32 rows
// even, 48 rows packed 8-15% faster at 4096x4096). int8 weights do not gain: from 16 rows
// at 4096x4096 its packed path is faster (3.7 against 4.5-5.8 ms).
constexpr int64_t kInt4Q8Rows = W == 8 ? 32 : kInt8Q8Rows;
constexpr int64_t kInt4Q8RowsVnni = 9;
bool use_int4_q8(const QuantMatmulParams& p) {
  return kInt4Q8 && p.scheme == QuantScheme::int4 && p.x.dtype == DType::bf16 &&
         p.x.sizes[0] < (kPackedBf16 ? kInt4Q8RowsVnni : kInt4Q8Rows) &&
         p.group_size % (4 * W) == 0 && !use_paired_x(p);
}

// The packed int8-x path: bfloat16 x (its tolerance, as int4's above), the rows the packed
// path takes (int4: beyond int4's row blocks above), VNNI CPUs: x quantized to int8 per
// 32-value block meets int8 weights (+ 128) or int4's q in vpdpbusd (Q8BlockDots), at twice
// vdpbf16ps's products per instruction, and the weights need no conversion to bf16.
// int8 packs from fewer rows than the packed path's (a vector of 16 rows costs about the same
// from 5 to 16 rows). 4096 x 4096 / 11008, 2 Zen 4 threads, 2026-11-27: packed 5-8 rows
// 0.99-1.02 / 2.61-2.69 ms; register blocks 4 rows 0.83 / 2.15, 6 rows 1.19 (4096 x 4096).
// 6-8 rows take the paired layout (use_paired_x; weights from memory, alternated with the
// 16-lane build, 2026-11-27): 6 rows 1.05-1.43 -> 0.80-0.91 / 3.35-4.00 -> 2.24-2.50 ms, 8 rows
// 1.11-1.34 -> 0.81-0.91 / 3.11-3.39 -> 2.12-2.40 ms; 5 rows stay in register blocks
// (0.67-0.73 ms, 76-78% of the read bandwidth).
constexpr int64_t kPackedQ8MinRowsInt8 = 6;
// int8 weights, bfloat16 x, fewer rows than the packed int8-x path takes (without VNNI: as
// int4's decoding rows): x quantized to int8 per 32 values as int4's rows (int8_q8_block), a
// few times fewer instructions per weight than widening it to float.
bool use_int8_q8_rows(const QuantMatmulParams& p) {
  return kInt4Q8 && p.scheme == QuantScheme::int8 && p.x.dtype == DType::bf16 &&
         p.x.sizes[0] < (kPackedBf16 ? kPackedQ8MinRowsInt8 : kInt8Q8Rows);
}

bool use_packed_q8(const QuantMatmulParams& p) {
  const int64_t M = p.x.sizes[0];
  return kPackedBf16 && p.x.dtype == DType::bf16 &&
         ((p.scheme == QuantScheme::int8 && M >= kPackedQ8MinRowsInt8) ||
          (p.scheme == QuantScheme::int4 &&
           ((M >= kPackedMinRows && !use_int4_q8(p)) || use_paired_x(p))));
}

// The paired layout, on VNNI CPUs' packed int8 paths from 6 rows to half a vector: each row's
// two halves of K (padded to 64) take two lanes of the vector (x as 2M rows of K / 2: the same
// bytes), the panel holds the two halves' weight words side by side, one 64-bit broadcast
// feeds both, and the two lanes' sums add up at the end. One vpdpbusd then does the products of
// 16 lanes, not of 6-8 rows and 8-10 lanes of zeros. int8 and int4 with bf16 x (int4 where
// each half of K holds whole groups, else its row blocks), w8a8 with any x. 4096 x 4096, 2 Zen
// 4 threads, weights from memory, runs alternating with the previous builds, 2026-11-27: int4
// g128 against int4pack in the same runs, 6 rows 1.45-1.60x -> 1.60-1.68x, 7 rows 1.31-1.38x
// -> 1.52-1.53x, 8 rows 1.22-1.31x -> 1.63-1.70x (its row blocks before); w8a8 6-8 rows
// 1.01-1.18 -> 0.74-0.80 ms (row blocks up to 7 rows, 16 rows to a vector from 8 before); int8:
// see kPackedQ8MinRowsInt8.
bool use_paired_x(const QuantMatmulParams& p) {
  const int64_t M = p.x.sizes[0];
  if (!kPackedBf16 || M < kPackedQ8MinRowsInt8 || 2 * M > kLaneRowsAll) return false;
  const bool bf16 = p.x.dtype == DType::bf16;
  switch (p.scheme) {
    case QuantScheme::w8a8: return true;
    case QuantScheme::int8: return bf16;
    default: return bf16 && p.x.sizes[1] % (2 * p.group_size) == 0;  // int4
  }
}

// The packed-x path's bytes per element of x (quant_matmul_packed_x.h), 0 where it does not
// serve: w8a8's int8 (1, VNNI CPUs), int8 / int4 weights with bf16 x on AVX512-BF16 CPUs (2),
// with any other x on AVX2 / AVX-512 (float, 4).
int64_t packed_elem_bytes(const QuantMatmulParams& p) {
  if (use_packed_q8(p) || use_paired_x(p)) return 1;
  if (!kPackedX || p.x.sizes[0] < kPackedMinRows || use_int4_q8(p) || use_int8_q8_rows(p))
    return 0;
  if (p.scheme == QuantScheme::w8a8) return kPackedBf16 ? 1 : 0;
  return kPackedBf16 && p.x.dtype == DType::bf16 ? 2 : 4;
}
bool use_packed_x(const QuantMatmulParams& p) { return packed_elem_bytes(p) != 0; }

// int4: x is also kept as bf16 in the permuted order of its float rows (the panel's); int8
// weights with few rows multiply in register blocks instead (see tile_item).
bool use_bf16_dot(const QuantMatmulParams& p) {
  return kBf16Dot && p.x.dtype == DType::bf16 && p.scheme == QuantScheme::int4;
}


// blocks(std::integral_constant<int, R>{}, c, rows, chans, k0, k1, out, ld): the R-row kernel
// (R = 1..MB). Rows go MB at a time, those left over in one block of their own (M = 1
// decoding must not pay for MB rows, and 2 or 3 rows read the weight once, not per row).
template <class Acc, int MB, int NB, int R, class Blocks>
LLMK_INLINE void tile_rows(const Ctx& c, Blocks& blocks, int64_t m, int64_t m0, int64_t n,
                           int64_t n0, int64_t n1, const int64_t* chans, int64_t k0, int64_t k1,
                           Acc* acc) {
  const int64_t ld = kChunkChannels;
  int64_t rows[R];
  for (int i = 0; i < R; ++i) rows[i] = m + i;
  Acc tmp[R * NB] = {};
  blocks(std::integral_constant<int, R>{}, c, rows, chans, k0, k1, tmp, int64_t(NB));
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB && n + j < n1; ++j) acc[(m + i - m0) * ld + (n + j - n0)] += tmp[i * NB + j];
}

template <class Acc, int MB, int NB, class Blocks>
void run_tile(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1, Acc* acc,
              Blocks blocks) {
  static_assert(MB >= 1 && MB <= 4, "left-over rows are dispatched up to 3");
  const int64_t ld = kChunkChannels;
  std::fill(acc, acc + (m1 - m0) * ld, Acc(0));  // the tile's rows only (decoding: one)
  // Few rows (fewer than the packed path takes, or int4's int8-x rows): x fits in L1 whole,
  // and walking each weight row end to end streams best (int4, 3-7 rows: twice as fast as
  // chunks of K).
  // int8 dot products reduce 64 lanes per instruction: longer chunks amortize the
  // horizontal sums (x's 64 rows x 2048 bytes still fit L2).
  const int64_t chunk = c.p->scheme == QuantScheme::w8a8 ? 4 * kChunkK : kChunkK;
  const int64_t kstep =
      m1 - m0 < kPackedMinRows || c.x4q != nullptr ? round_up(c.K, kChunkK) : chunk;
  for (int64_t k0 = 0; k0 < c.K; k0 += kstep) {
    const int64_t k1 = std::min(c.K, k0 + kstep);
    for (int64_t n = n0; n < n1; n += NB) {
      int64_t chans[NB];
      for (int j = 0; j < NB; ++j) chans[j] = std::min(n + j, n1 - 1);  // repeats: discarded
      int64_t m = m0;
      for (; m + MB <= m1; m += MB) tile_rows<Acc, MB, NB, MB>(c, blocks, m, m0, n, n0, n1, chans, k0, k1, acc);
      switch (m1 - m) {
        case 3:
          if constexpr (MB > 3) tile_rows<Acc, MB, NB, 3>(c, blocks, m, m0, n, n0, n1, chans, k0, k1, acc);
          break;
        case 2:
          if constexpr (MB > 2) tile_rows<Acc, MB, NB, 2>(c, blocks, m, m0, n, n0, n1, chans, k0, k1, acc);
          break;
        case 1:
          if constexpr (MB > 1) tile_rows<Acc, MB, NB, 1>(c, blocks, m, m0, n, n0, n1, chans, k0, k1, acc);
          break;
        default: break;
      }
    }
  }
}

#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
// A tile on the packed-x path: sums over every chunk, then scales and stores.
void packed_tile_item(const Ctx& c, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                      char* scratch, void* panel) {
  const QuantMatmulParams& p = *c.p;
  const float* sc = p.scales.ptr<float>();
  // out(m, n) = value(m, n, sum) + bias[n] (store_tile): the sum is lane m - m0 of the
  // channel's vectors. Paired (c.pair_half, one tile of all rows): row m's sum is lanes 2m
  // and 2m + 1.
  auto each = [&](auto* acc, auto lane, auto value) {  // lane: float or int32_t
    using Lane = decltype(lane);
    const Lane* sums = reinterpret_cast<const Lane*>(acc);
    const bool paired = c.pair_half > 0;
    constexpr int64_t ld = kTileVecs * kLaneRows;  // a channel's sums
    store_tile(c, m0, paired ? p.x.sizes[0] : m1, n0, n1, [&](int64_t m, int64_t n) {
      const int64_t r = paired ? 2 * m : m - m0;  // the row's (first) lane
      const Lane* col = sums + (n - n0) * ld;
      return value(m, n, paired ? col[r] + col[r + 1] : col[r]);
    });
  };
  auto plain = [&](auto& part, auto* a, const int64_t*, int64_t n, int64_t, int64_t) {
    flush_plain(part, a, n1 - n);
  };
  if (packed_elem_bytes(p) == 4) {  // float products: int4's panel holds (q - zero) * scale
    vf* acc = reinterpret_cast<vf*>(scratch);
    float* pan = static_cast<float*>(panel);
    constexpr int64_t ld = FloatDots::kPanelWords;
    if (p.scheme == QuantScheme::int8) {
      packed_tile_any<FloatDots>(
          c, m0, m1, n0, n1, acc, panel, ld,
          [&](auto nb, const int64_t* chans, int64_t, int64_t k0, int64_t k1) {
            fill_int8<decltype(nb)::value>(c, chans, k0, k1, pan, ld);
          }, plain);
      each(acc, float{}, [&](int64_t, int64_t n, float s) { return s * sc[n]; });
    } else {
      packed_tile_any<FloatDots>(
          c, m0, m1, n0, n1, acc, panel, ld,
          [&](auto nb, const int64_t* chans, int64_t, int64_t k0, int64_t k1) {
            fill_int4<decltype(nb)::value>(c, chans, k0, k1, pan, ld);
          }, plain);
      each(acc, float{}, [&](int64_t, int64_t, float s) { return s; });
    }
    return;
  }
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  if (c.xps != nullptr) {  // x quantized per block (int4: groups scaled in packed_dots_blocks)
    __m512* acc = reinterpret_cast<__m512*>(scratch);
    uint8_t* pan = static_cast<uint8_t*>(panel);
    const bool int8 = p.scheme == QuantScheme::int8;
    auto tiles = [&](auto dots) {  // Q8BlockDots, or Q8PairDots: two halves of K to a row
      using D = decltype(dots);
      packed_tile_any<D>(
          c, m0, m1, n0, n1, acc, panel, Q8BlockDots::kPanelWords,
          [&](auto nb, const int64_t* chans, int64_t, int64_t k0, int64_t k1) {
            constexpr int NB = decltype(nb)::value;
            if constexpr (D::kLaneWords == 2) {
              if (int8) fill_bytes_pairs<NB>(c, chans, k0, k1, pan, 0x80);
              else fill_int4_u8_pairs<NB>(c, chans, k0, k1, pan);
            } else {
              if (int8) fill_int8_u8<NB>(c, chans, k0, k1, pan);
              else fill_int4_u8<NB>(c, chans, k0, k1, pan);
            }
          }, plain);
    };
    if (c.pair_half > 0) tiles(Q8PairDots{});
    else tiles(Q8BlockDots{});
    if (int8)
      each(acc, float{}, [&](int64_t, int64_t n, float s) { return s * sc[n]; });
    else
      each(acc, float{}, [&](int64_t, int64_t, float s) { return s; });
    return;
  }
  if (p.scheme == QuantScheme::w8a8) {
    __m512i* acc = reinterpret_cast<__m512i*>(scratch);
    int32_t* wsum = reinterpret_cast<int32_t*>(static_cast<char*>(panel) + kPanelBytes);
    std::fill(wsum, wsum + kChunkChannels, 0);
    auto tiles = [&](auto dots) {  // U8S8Dots, or U8S8PairDots: two halves of K to a row
      using D = decltype(dots);
      packed_tile_any<D>(
          c, m0, m1, n0, n1, acc, panel, U8S8Dots::kPanelWords,
          [&](auto nb, const int64_t* chans, int64_t n, int64_t k0, int64_t k1) {
            constexpr int NB = decltype(nb)::value;
            if constexpr (D::kLaneWords == 2)
              fill_bytes_pairs<NB>(c, chans, k0, k1, static_cast<uint8_t*>(panel), 0,
                                   n1 - n, wsum + (n - n0));
            else
              fill_w8a8<NB>(c, chans, n1 - n, k0, k1, static_cast<int8_t*>(panel),
                            wsum + (n - n0));
          }, plain);
    };
    if (c.pair_half > 0) tiles(U8S8PairDots{});
    else tiles(U8S8Dots{});
    each(acc, int32_t{}, [&](int64_t m, int64_t n, int32_t s) {  // the reference's (acc * x_scale) * w_scale
      return float(s - 128 * wsum[n - n0]) * c.xscale[m] * sc[n];
    });
    return;
  }
  __m512* acc = reinterpret_cast<__m512*>(scratch);
  uint16_t* pan = static_cast<uint16_t*>(panel);
  constexpr int64_t ld = Bf16Dots::kChunk;  // bf16 values per panel row
  if (p.scheme == QuantScheme::int8) {
    packed_tile_any<Bf16Dots>(
        c, m0, m1, n0, n1, acc, panel, Bf16Dots::kPanelWords,
        [&](auto nb, const int64_t* chans, int64_t, int64_t k0, int64_t k1) {
          fill_int8_bf16<decltype(nb)::value>(c, chans, k0, k1, pan, ld);
        }, plain);
    each(acc, float{}, [&](int64_t, int64_t n, float s) { return s * sc[n]; });
    return;
  }
  const int64_t g = p.group_size;  // int4: each group's sums times its scale
  packed_tile_any<Bf16Dots>(
      c, m0, m1, n0, n1, acc, panel, g / 2,
      [&](auto nb, const int64_t* chans, int64_t, int64_t k0, int64_t k1) {
        fill_int4_bf16<decltype(nb)::value>(c, chans, k0, k1, pan, ld);
      },
      [&](auto& part, __m512* a, const int64_t* chans, int64_t n, int64_t k, int64_t) {
        flush_scaled(part, a, n1 - n,
                     [&](int j) { return _mm512_set1_ps(sc[chans[j] * c.groups + k / g]); });
      });
  each(acc, float{}, [&](int64_t, int64_t, float s) { return s; });
#endif
}
#endif

void tile_item(void* ctx, int64_t item, int thread) {
  const Ctx& c = *static_cast<const Ctx*>(ctx);
  const int64_t m0 = item / c.chunks_n * kChunkRows, n0 = item % c.chunks_n * kChunkChannels;
  const int64_t m1 = std::min(c.M, m0 + kChunkRows), n1 = std::min(c.N, n0 + kChunkChannels);
  char* scratch = c.scratch + thread * c.scratch_stride;
  float* panel = reinterpret_cast<float*>(
      round_up(reinterpret_cast<int64_t>(scratch + kChunkRows * kChunkChannels * 4), 64));
  const int64_t ld = kChunkChannels;
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
  if (c.xp != nullptr) return packed_tile_item(c, m0, m1, n0, n1, scratch, panel);
#endif
  switch (c.p->scheme) {
    case QuantScheme::int8: {
      float* acc = reinterpret_cast<float*>(scratch);
      // More rows than a block, fewer than the packed path's: AVX-512 keeps to register
      // blocks (4096 x 4096, 5-7 rows, 2 Zen 4 threads: bf16 x 1.18-1.54 ms against 1.35-1.67
      // in float panels and 1.75-2.3 in bf16 panels; float32 x 2.5-2.9 against 2.9-3.4); AVX2's
      // 2-row blocks lose to the panels (5 rows: 3.3 against 2.8 ms).
#if defined(__AVX512BW__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
      if (c.x8s != nullptr && m1 - m0 == 1)
        run_tile<float, 1, kNB8Row>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int8_q8_block<decltype(r)::value, kNB8Row>(a...);
        });
      else if (c.x8s != nullptr)
        run_tile<float, kMB8q, kNB8q>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int8_q8_block<decltype(r)::value, kNB8q>(a...);
        });
      else
#endif
      if (m1 - m0 > kMB && W < 16) {
        run_tile_panel<kMB, kNB>(c, m0, m1, n0, n1, acc, panel, fill_int8<kNB>);
      } else
        run_tile<float, kMB, kNB>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int8_block<decltype(r)::value, kNB>(a...);
        });
      const float* sc = c.p->scales.ptr<float>();
      store_tile(c, m0, m1, n0, n1,
                 [&](int64_t m, int64_t n) { return acc[(m - m0) * ld + (n - n0)] * sc[n]; });
      break;
    }
    case QuantScheme::int4: {
      float* acc = reinterpret_cast<float*>(scratch);
#if defined(__AVX512BW__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
      if (c.x4q != nullptr && m1 - m0 == 1)
        run_tile<float, 1, kNB4Row>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int4_q8_block<decltype(r)::value, kNB4Row>(a...);
        });
      else if (c.x4q != nullptr && m1 - m0 >= kMB4Rows)
        run_tile<float, kMB4Rows, kNB4Rows>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int4_q8_block<decltype(r)::value, kNB4Rows>(a...);
        });
      else if (c.x4q != nullptr)
        run_tile<float, kMB4, kNB4>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int4_q8_block<decltype(r)::value, kNB4>(a...);
        });
      else
#endif
      if (m1 - m0 > kMB4 && c.xb != nullptr) {
#if defined(__AVX512BF16__)
        run_tile_panel_int4_bf16<kMB, 2>(c, m0, m1, n0, n1, acc,
                                         reinterpret_cast<uint16_t*>(panel));
#endif
      } else if (m1 - m0 > kMB4)
        run_tile_panel<kMB, kNB>(c, m0, m1, n0, n1, acc, panel, fill_int4<kNB>);
      else
        run_tile<float, kMB4, kNB4>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
          int4_block<decltype(r)::value, kNB4>(a...);
        });
      store_tile(c, m0, m1, n0, n1,
                 [&](int64_t m, int64_t n) { return acc[(m - m0) * ld + (n - n0)]; });
      break;
    }
    case QuantScheme::w8a8: {
      int32_t* acc = reinterpret_cast<int32_t*>(scratch);
      run_tile<int32_t, kMBq, kNBq>(c, m0, m1, n0, n1, acc, [](auto r, auto&&... a) {
        w8a8_block<decltype(r)::value, kNBq>(a...);
      });
      const float* sc = c.p->scales.ptr<float>();
      store_tile(c, m0, m1, n0, n1, [&](int64_t m, int64_t n) {
        // the reference's order: (acc * x_scale) * w_scale
        return float(acc[(m - m0) * ld + (n - n0)]) * c.xscale[m] * sc[n];
      });
      break;
    }
  }
}

// ------------------------------------------------------------------ preparing x

struct PrepCtx {
  const QuantMatmulParams* p;
  Ctx* c;
  float* xf;
  float* xsum;
  int8_t* xq;
  float* xscale;
  uint16_t* xb;
  int8_t* x4q;
  float* x4s;
  float* x4sum;
  float* x8s;      // prep_row_q8: block scales, row-major (its q go to xq)
  int32_t* x8lane; // and int8's starting sums (Ctx::x8lane) per lane of 4 values
  int32_t* x8blk;  // or per block of 32, (M, Kx / 32), row-major (packed to Ctx::xpb)
  float* x8g;    // packed int4's (M, groups) group sums
};

#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
#include "load16.h"
// 16 consecutive values of a contiguous row of x (its dtype known at run time) as float32.
LLMK_INLINE __m512 load16_float(DType t, const void* base, int64_t off) {
  const uint16_t* h = static_cast<const uint16_t*>(base) + off;
  if (t == DType::bf16) return load16<uint16_t, false>(h);
  if (t == DType::f16) return load16<uint16_t, true>(h);
  return load16<float, false>(static_cast<const float*>(base) + off);
}
#endif

#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
// A 32-value block of x (halves a, b) for the int8-x paths: scale = max|x| / 127, NaN if a
// value is not finite (its outputs are then NaN, not numbers made of the other values).
LLMK_INLINE float block_scale(__m512 a, __m512 b) {
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  const __m512 aa = _mm512_abs_ps(a), ab = _mm512_abs_ps(b);
  const bool finite = (_mm512_cmp_ps_mask(aa, big, _CMP_LE_OQ) &
                       _mm512_cmp_ps_mask(ab, big, _CMP_LE_OQ)) == 0xffff;
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
  return finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
}
// v / s rounded half to even, clamped to [-127, 127], as int32 lanes; 0 for a zero or NaN s.
LLMK_INLINE __m512i quantize16(__m512 v, float s) {
  if (!(s > 0.f)) return _mm512_setzero_si512();
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(s)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
}
#endif

#if defined(__AVX2__) && LLMK_VEC_BYTES == 32
// AVX2's block_scale and quantize16 on a 32-value block in four vectors (the same
// arithmetic): q to q[0..32) in the vectors' order; returns the sum of q. One value at a
// time this cost ~6 cycles a value, ~9 us of a 4096-wide decoding call's x (Zen 3).
LLMK_INLINE int32_t quantize32(const __m256* v, int8_t* q, float* scale) {
  const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int i = 0; i < 4; ++i) {
    const __m256 a = _mm256_andnot_ps(sign, v[i]);
    amax = _mm256_max_ps(amax, a);
    ok = _mm256_and_ps(ok, _mm256_cmp_ps(a, big, _CMP_LE_OQ));  // false for NaN and infinity
  }
  const float s = _mm256_movemask_ps(ok) == 0xff ? hmax(vf(amax)) / 127.f
                                                 : std::numeric_limits<float>::quiet_NaN();
  *scale = s;
  if (!(s > 0.f)) {
    std::memset(q, 0, 32);
    return 0;
  }
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], vs),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    qi[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
  }
  // packs interleave 128-bit halves: the permutation puts the 32 bytes back in order
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]),
                                       _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i t = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
  const __m128i h2 = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(h2, _mm_shuffle_epi32(h2, 0xb1)));
}
#endif

// One 32-value block of x (v) to int8 as the int8-x paths take it (block_scale, quantize16:
// scale = max|x| / 127, NaN with a non-finite value, q = v / scale rounded half to even):
// q, the scale; returns the sum of q.
int32_t quantize_block32(const float* v, int8_t* q, float* scale) {
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  const float s = block_scale(a, b);
  const __m512i qa = quantize16(a, s), qb = quantize16(b, s);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  *scale = s;
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#elif defined(__AVX2__) && LLMK_VEC_BYTES == 32
  const __m256 vv[4] = {_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8), _mm256_loadu_ps(v + 16),
                        _mm256_loadu_ps(v + 24)};
  return quantize32(vv, q, scale);
#else
  float amax = 0.f;
  bool finite = true;
  for (int e = 0; e < 32; ++e) {
    amax = std::max(amax, std::fabs(v[e]));
    finite &= std::fabs(v[e]) <= std::numeric_limits<float>::max();
  }
  const float s = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
  int32_t sum = 0;
  for (int e = 0; e < 32; ++e) {
    const int qi = s > 0.f ? int(std::min(127.f, std::max(-127.f, std::nearbyint(v[e] / s)))) : 0;
    q[e] = int8_t(qi);
    sum += qi;
  }
  *scale = s;
  return sum;
#endif
}

// One row of x for the int8-x int4 path: per 32-block, scale = max|x| / 127 and
// q = x / scale rounded to nearest even (an all-zero block has scale 0), in the order of
// nibble_bytes: per 32-block its 16 even elements, then its 16 odd ones; with paired nibbles
// (AVX-512; AVX2 where a group holds whole pairs) per two blocks A, B: A's even, B's even,
// A's odd, B's odd. lanes: the scale of each 4 values (an int32 lane of the dot products).
void prep_row_int4_q8(const PrepCtx& pc, int64_t m) {
  const QuantMatmulParams& p = *pc.p;
  const Ctx& c = *pc.c;
  const int64_t K = c.K, g = p.group_size;
  const int64_t base = m * p.x.strides[0], ks = p.x.strides[1];
  int8_t* q = pc.x4q + m * c.Kx;
  float* lanes = pc.x4s + m * (c.Kx / 4);
  float* gsum = pc.x4sum + m * c.groups;
  for (int64_t grp = 0; grp < c.groups; ++grp) gsum[grp] = 0.f;
  for (int64_t kb = 0; kb < K; kb += 32) {
    // where this block's evens (e < 16) and odds go
    int64_t even_at = kb, odd_at = kb + 16;
    if (pair_nibbles(g)) {
      const int64_t pair = kb & ~int64_t(63), second = (kb & 32) ? 16 : 0;
      even_at = pair + second;
      odd_at = pair + 32 + second;
    }
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
    if (ks == 1) {  // the same arithmetic, 16 values at a time
      const __m512 a = load16_float(p.x.dtype, p.x.data, base + kb);
      const __m512 b = load16_float(p.x.dtype, p.x.data, base + kb + 16);
      const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512 ev = _mm512_permutex2var_ps(a, even, b);
      const __m512 od = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
      const float s = block_scale(a, b);
      const __m512i qe = quantize16(ev, s), qo = quantize16(od, s);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + even_at), _mm512_cvtepi32_epi8(qe));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + odd_at), _mm512_cvtepi32_epi8(qo));
      for (int l = 0; l < 4; ++l) {
        lanes[even_at / 4 + l] = s;
        lanes[odd_at / 4 + l] = s * kHighNibbleScale;
      }
      gsum[kb / g] += s * float(_mm512_reduce_add_epi32(_mm512_add_epi32(qe, qo)));
      continue;
    }
#endif
    int8_t t[32];
    float s;
    int32_t qsum;
#if defined(__AVX2__) && LLMK_VEC_BYTES == 32
    if (ks == 1 && p.x.dtype == DType::bf16) {
      // A 32-bit lane of bf16 x holds an even element (low half) and an odd one (high half):
      // a shift and a mask make them float32 (as bf16_to_f32), evens and odds apart.
      const uint16_t* h = static_cast<const uint16_t*>(p.x.data) + base + kb;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16));
      const __m256i high = _mm256_set1_epi32(int32_t(0xffff0000u));
      const __m256 v[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
                           _mm256_castsi256_ps(_mm256_and_si256(a, high)),
                           _mm256_castsi256_ps(_mm256_and_si256(b, high))};
      qsum = quantize32(v, t, &s);
    } else
#endif
    {
      float v[32];
      for (int e = 0; e < 32; ++e) {  // 16 even elements, then 16 odd ones
        const int64_t k = kb + (e < 16 ? 2 * e : 2 * (e - 16) + 1);
        v[e] = read_float(p.x.dtype, p.x.data, base + k * ks);
      }
      qsum = quantize_block32(v, t, &s);
    }
    std::memcpy(q + even_at, t, 16);
    std::memcpy(q + odd_at, t + 16, 16);
    for (int l = 0; l < 4; ++l) {
      lanes[even_at / 4 + l] = s;
      lanes[odd_at / 4 + l] = s * kHighNibbleScale;
    }
    gsum[kb / g] += s * float(qsum);
  }
}


// One row of bf16 x for the int8-x paths of int8 weights (row blocks and packed) and int4's
// packed one: per 32-block (the padding to Kx included: zeros) q and scale, in x's order
// (int8) or the block's 16 even then 16 odd elements (int4: its panel's nibble order); int8:
// the sums where the (weights + 128) products start (VNNI, Ctx::x8lane / xpb); int4: the sums of the dequantized x over each
// group.
void prep_row_q8(const PrepCtx& pc, int64_t m) {
  const QuantMatmulParams& p = *pc.p;
  const Ctx& c = *pc.c;
  const int64_t K = c.K, ks = p.x.strides[1];
  const uint16_t* src = static_cast<const uint16_t*>(p.x.data) + m * p.x.strides[0];
  const bool int4 = p.scheme == QuantScheme::int4;
  int8_t* q = pc.xq + m * c.Kx;
  float* scales = pc.x8s + m * (c.Kx / 32);
  float* gsum = int4 ? pc.x8g + m * c.groups : nullptr;
  for (int64_t grp = 0; grp < c.groups; ++grp) gsum[grp] = 0.f;
  for (int64_t kb = 0; kb < c.Kx; kb += 32) {
    alignas(64) float v[32];
    if (ks == 1 && kb + 32 <= K) {
      for (int e = 0; e < 32; ++e) v[e] = bf16_to_f32(src[kb + e]);
    } else {
      for (int e = 0; e < 32; ++e) v[e] = kb + e < K ? bf16_to_f32(src[(kb + e) * ks]) : 0.f;
    }
    if (int4) {
      alignas(64) float in[32];
      std::memcpy(in, v, sizeof in);
      for (int e = 0; e < 16; ++e) {
        v[e] = in[2 * e];
        v[16 + e] = in[2 * e + 1];
      }
    }
    float sc;
    const int32_t qsum = quantize_block32(v, q + kb, &sc);
    scales[kb / 32] = sc;
    if (int4) {
      gsum[kb / p.group_size] += sc * float(qsum);
    } else if (pc.x8blk != nullptr) {
      pc.x8blk[m * (c.Kx / 32) + kb / 32] = -128 * qsum;
    } else if (pc.x8lane != nullptr) {
      int32_t* lane = pc.x8lane + m * (c.Kx / 4) + kb / 4;
      for (int l = 0; l < 8; ++l) {
        const int8_t* b = q + kb + 4 * l;
        lane[l] = -128 * (int32_t(b[0]) + b[1] + b[2] + b[3]);
      }
    }
  }
}

// w8a8's row quantization, as the reference: scale = max|x| * (1/127) (1 for an all-zero
// row), x / scale rounded half to even (nearbyint in the default rounding mode), clamped to
// [-127, 127]. A NaN or infinity in the row: NaN outputs (the reference's), never finite
// numbers. Stored + 128 where kBiasedX.
void prep_row_w8a8(const PrepCtx& pc, int64_t m) {
  const QuantMatmulParams& p = *pc.p;
  const Ctx& c = *pc.c;
  const int64_t K = c.K;
  const int64_t base = m * p.x.strides[0], ks = p.x.strides[1];
  int64_t kv = 0;  // the part done 16 at a time (contiguous rows on AVX-512)
  float amax = 0.f;
  bool finite = true;
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
  if (ks == 1) {
    kv = K / 16 * 16;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 ok = 0xffff;
    for (int64_t k = 0; k < kv; k += 16) {
      const __m512 a = _mm512_abs_ps(load16_float(p.x.dtype, p.x.data, base + k));
      ok &= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
      vmax = _mm512_max_ps(vmax, a);
    }
    amax = _mm512_reduce_max_ps(vmax);
    finite = ok == 0xffff;
  }
#endif
  for (int64_t k = kv; k < K; ++k) {
    const float a = std::fabs(read_float(p.x.dtype, p.x.data, base + k * ks));
    amax = std::max(amax, a);
    finite &= a <= std::numeric_limits<float>::max();
  }
  float s = amax * (1.0f / 127.0f);  // a reciprocal multiply, as the reference
  if (!(s > 0.f)) s = 1.0f;
  if (!finite) s = std::numeric_limits<float>::quiet_NaN();
  pc.xscale[m] = s;
  int8_t* row = pc.xq + m * c.Kx;
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t k = 0; k < kv; k += 16) {
    __m512 q = _mm512_roundscale_ps(
        _mm512_div_ps(load16_float(p.x.dtype, p.x.data, base + k), vs),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));  // NaN: -127
    __m512i v = _mm512_cvtps_epi32(q);
    if (kBiasedX) v = _mm512_add_epi32(v, _mm512_set1_epi32(128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + k), _mm512_cvtepi32_epi8(v));
  }
#endif
  for (int64_t k = kv; k < K; ++k) {
    float q = std::nearbyint(read_float(p.x.dtype, p.x.data, base + k * ks) / s);
    q = std::min(127.f, std::max(-127.f, q));
    const int v = int(q);
    row[k] = kBiasedX ? int8_t(uint8_t(v + 128)) : int8_t(v);
  }
  for (int64_t k = K; k < c.Kx; ++k) row[k] = kBiasedX ? int8_t(uint8_t(128)) : 0;
}

void prep_row(void* ctx, int64_t m, int) {
  const PrepCtx& pc = *static_cast<const PrepCtx*>(ctx);
  const QuantMatmulParams& p = *pc.p;
  const Ctx& c = *pc.c;
  const int64_t K = c.K;
  const int64_t base = m * p.x.strides[0], ks = p.x.strides[1];
  if (pc.x4q != nullptr) return prep_row_int4_q8(pc, m);
  if (pc.x8s != nullptr) return prep_row_q8(pc, m);
  if (p.scheme == QuantScheme::w8a8) return prep_row_w8a8(pc, m);
  float* row = pc.xf != nullptr ? pc.xf + m * c.Kx : nullptr;
  if (pc.xb != nullptr) {  // bf16 x for the dot-product panel path: copied as is (int4: permuted)
    uint16_t* brow = pc.xb + m * c.Kx;
    const uint16_t* src = static_cast<const uint16_t*>(p.x.data);
    if (p.scheme == QuantScheme::int4) {
      for (int64_t kb = 0; kb < K; kb += 32) {
        if (ks == 1) {  // contiguous rows: evens then odds, a form the compiler vectorizes
          const uint16_t* b = src + base + kb;
          for (int e = 0; e < 16; ++e) {
            brow[kb + e] = b[2 * e];
            brow[kb + 16 + e] = b[2 * e + 1];
          }
        } else {
          for (int e = 0; e < 32; ++e)
            brow[kb + e] = src[base + (kb + (e < 16 ? 2 * e : 2 * (e - 16) + 1)) * ks];
        }
      }
    } else if (ks == 1) {
      std::memcpy(brow, src + base, size_t(K) * 2);
    } else {
      for (int64_t k = 0; k < K; ++k) brow[k] = src[base + k * ks];
    }
    for (int64_t k = K; k < c.Kx; ++k) brow[k] = 0;
  }
  if (row == nullptr) return;  // the packed-x path reads xb alone
  if (p.scheme == QuantScheme::int4) {
    const int64_t g = p.group_size;
    for (int64_t kb = 0; kb < K; kb += 32)
      for (int e = 0; e < 32; ++e) {  // 16 even elements, then 16 odd ones
        const int64_t k = kb + (e < 16 ? 2 * e : 2 * (e - 16) + 1);
        row[kb + e] = read_float(p.x.dtype, p.x.data, base + k * ks);
      }
    for (int64_t grp = 0; pc.xsum != nullptr && grp < K / g; ++grp) {
      float s = 0.f;
      for (int64_t k = grp * g; k < (grp + 1) * g; ++k) s += row[k];  // any order: a sum
      pc.xsum[m * (K / g) + grp] = s;
    }
  } else if (ks == 1 && p.x.dtype == DType::f32) {  // contiguous rows: no per-value switch
    std::memcpy(row, static_cast<const float*>(p.x.data) + base, size_t(K) * 4);
  } else if (ks == 1 && p.x.dtype == DType::bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(p.x.data) + base;
    for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(src[k]);
  } else {
    for (int64_t k = 0; k < K; ++k) row[k] = read_float(p.x.dtype, p.x.data, base + k * ks);
  }
  for (int64_t k = K; k < c.Kx; ++k) row[k] = 0.f;
}

struct Layout {
  int64_t xf, xsum, xq, xscale, xb, x4q, x4s, x4sum, x8s, x8lane, x8blk, x8g, xps, xpb, xpg,
      xp, scratch, total;
};


Layout layout(const QuantMatmulParams& p) {
  const int64_t M = p.x.sizes[0], K = p.x.sizes[1], Kx = padded_k(p);
  Layout l{};
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += round_up(bytes, 64);
    return at;
  };
  if (p.scheme == QuantScheme::w8a8) {
    l.xq = take(M * Kx);
    l.xscale = take(M * 4);
  } else if (use_packed_q8(p)) {
    l.xq = take(M * Kx);
    l.x8s = take(M * (Kx / 32) * 4);
    l.xps = take(round_up(M, kLaneRowsAll) * (Kx / 32) * 4);
    if (p.scheme == QuantScheme::int8 && kW8Biased) {
      l.x8blk = take(M * (Kx / 32) * 4);
      l.xpb = take(round_up(M, kLaneRowsAll) * (Kx / 32) * 4);
    }
    if (p.scheme == QuantScheme::int4) {
      l.x8g = take(M * (K / p.group_size) * 4);
      l.xpg = take(round_up(M, kLaneRowsAll) * (K / p.group_size) * 4);
    }
  } else if (use_int8_q8_rows(p)) {
    l.xq = take(M * Kx);
    l.x8s = take(M * (Kx / 32) * 4);
    if (kW8Biased) l.x8lane = take(M * (Kx / 4) * 4);
  } else if (use_int4_q8(p)) {
    l.x4q = take(M * Kx);
    l.x4s = take(M * (Kx / 4) * 4);
    l.x4sum = take((M * (K / p.group_size) + W) * 4);  // + W: int4_groups' last vector
  } else if (packed_elem_bytes(p) == 2) {
    l.xb = take(M * Kx * 2);
  } else if (use_packed_x(p)) {  // float rows (int4: permuted), its panels hold scaled weights
    l.xf = take(M * Kx * 4);
  } else {
    l.xf = take(M * Kx * 4);
    if (p.scheme == QuantScheme::int4) l.xsum = take((M * (K / p.group_size) + W) * 4);
    if (use_bf16_dot(p)) l.xb = take(M * Kx * 2);
  }
  if (use_packed_x(p)) l.xp = take(round_up(M, kLaneRowsAll) * Kx * packed_elem_bytes(p));
  l.scratch = take(scratch_bytes() * int64_t(p.num_threads));
  l.total = off + 64;  // room to align the base
  return l;
}

}  // namespace

int64_t workspace_bytes(const QuantMatmulParams& p) { return layout(p).total; }

bool quantize_rows_w8a8(const QuantMatmulParams& p, int8_t* xq, float* xscale, int64_t Kx,
                        int nthreads) {
  Ctx c{};
  c.p = &p;
  c.M = p.x.sizes[0];
  c.N = p.qdata.sizes[0];
  c.K = p.x.sizes[1];
  c.Kx = Kx;
  PrepCtx pc{&p, &c, nullptr, nullptr, xq, xscale, nullptr, nullptr, nullptr, nullptr};
  parallel_for(c.M, int(std::min<int64_t>(std::max(nthreads, 1), std::max<int64_t>(c.M, 1))),
               prep_row, &pc);
  return kBiasedX;
}

const char* describe(const QuantMatmulParams& p) {
  if (use_int4_q8(p) || use_int8_q8_rows(p))
    return "decoding GEMV (row blocks), x quantized to int8 per 32 values for integer dot "
           "products";
  if (use_paired_x(p))
    return p.scheme == QuantScheme::w8a8
               ? "x packed 8 rows to a vector (two halves of K each), int8 dot products "
                 "(vpdpbusd)"
               : "x packed 8 rows to a vector (two halves of K each), x quantized to int8 per "
                 "32 values for int8 dot products (vpdpbusd)";
  if (use_packed_q8(p))
    return "x packed 16 rows to a vector, x quantized to int8 per 32 values for int8 dot "
           "products (vpdpbusd)";
  switch (packed_elem_bytes(p)) {
    case 1: return "x packed 16 rows to a vector, int8 dot products (vpdpbusd)";
    case 2: return "x packed 16 rows to a vector, bf16 dot products (vdpbf16ps)";
    case 4: return W == 16 ? "x packed 16 rows to a vector, float32 FMA"
                           : "x packed 8 rows to a vector, float32 FMA";
    default: break;
  }
  const int64_t block = p.scheme == QuantScheme::w8a8 ? kMBq
                        : p.scheme == QuantScheme::int4 ? kMB4 : kMB;
  if (p.scheme == QuantScheme::w8a8 || p.x.sizes[0] <= block)
    return "row blocks streaming the weights, K in vector lanes";
  return use_bf16_dot(p) ? "weights converted to bf16 panels, K in vector lanes"
                         : "dequantized float panels, K in vector lanes";
}

void run(const QuantMatmulParams& p, void* workspace) {
  const Layout l = layout(p);
  char* base = reinterpret_cast<char*>(round_up(reinterpret_cast<int64_t>(workspace), 64));
  Ctx c{};
  c.p = &p;
  c.M = p.x.sizes[0];
  c.N = p.qdata.sizes[0];
  c.K = p.x.sizes[1];
  c.Kx = padded_k(p);
  c.groups = p.scheme == QuantScheme::int4 ? c.K / p.group_size : 0;
  PrepCtx pc{&p, &c, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (p.scheme == QuantScheme::w8a8) {
    pc.xq = reinterpret_cast<int8_t*>(base + l.xq);
    pc.xscale = reinterpret_cast<float*>(base + l.xscale);
  } else if (use_packed_q8(p)) {
    pc.xq = reinterpret_cast<int8_t*>(base + l.xq);
    pc.x8s = reinterpret_cast<float*>(base + l.x8s);
    c.xps = reinterpret_cast<const float*>(base + l.xps);
    if (p.scheme == QuantScheme::int8 && kW8Biased) {
      pc.x8blk = reinterpret_cast<int32_t*>(base + l.x8blk);
      c.xpb = reinterpret_cast<const int32_t*>(base + l.xpb);
    }
    if (p.scheme == QuantScheme::int4) {
      pc.x8g = reinterpret_cast<float*>(base + l.x8g);
      c.xpg = reinterpret_cast<const float*>(base + l.xpg);
    }
  } else if (use_int8_q8_rows(p)) {
    pc.xq = reinterpret_cast<int8_t*>(base + l.xq);
    pc.x8s = reinterpret_cast<float*>(base + l.x8s);
    if (kW8Biased) pc.x8lane = reinterpret_cast<int32_t*>(base + l.x8lane);
  } else if (use_int4_q8(p)) {
    pc.x4q = reinterpret_cast<int8_t*>(base + l.x4q);
    pc.x4s = reinterpret_cast<float*>(base + l.x4s);
    pc.x4sum = reinterpret_cast<float*>(base + l.x4sum);
  } else if (packed_elem_bytes(p) == 2) {
    pc.xb = reinterpret_cast<uint16_t*>(base + l.xb);
  } else if (use_packed_x(p)) {
    pc.xf = reinterpret_cast<float*>(base + l.xf);
  } else {
    pc.xf = reinterpret_cast<float*>(base + l.xf);
    if (p.scheme == QuantScheme::int4) pc.xsum = reinterpret_cast<float*>(base + l.xsum);
    if (use_bf16_dot(p)) pc.xb = reinterpret_cast<uint16_t*>(base + l.xb);
  }
  if (use_packed_x(p)) c.xp = reinterpret_cast<const uint32_t*>(base + l.xp);
  c.xb = pc.xb;
  c.xf = pc.xf;
  c.xsum = pc.xsum;
  c.xq = pc.xq;
  c.xscale = pc.xscale;
  c.x4q = pc.x4q;
  c.x4s = pc.x4s;
  c.x4sum = pc.x4sum;
  c.x8lane = pc.x8lane;
  c.x8s = pc.x8s;
  c.scratch = base + l.scratch;
  c.scratch_stride = scratch_bytes();
  c.chunks_n = (c.N + kChunkChannels - 1) / kChunkChannels;
  // Weight bytes times rows stands for the work (decoding streams the weight once; more rows
  // reuse it, but compute grows with them).
  const int threads = threads_for(p.qdata.numel() * c.M, p.num_threads, quant_bytes_per_thread());
  parallel_for(c.M, std::min<int64_t>(threads, c.M), prep_row, &pc);
#if defined(__AVX512F__) && LLMK_VEC_BYTES == 64 || defined(__AVX2__) && LLMK_VEC_BYTES == 32
  if (use_paired_x(p)) {  // x as 2M rows of half its length (the same bytes, see the rule)
    c.pair_half = c.Kx / 2;
    c.M *= 2;
    c.K = c.Kx = c.pair_half;
    c.groups /= 2;  // int4: groups of a half (whole ones: use_paired_x)
  }
  if (c.xp != nullptr) {  // the prepared rows, W to a vector
    const int64_t bytes = packed_elem_bytes(p), words = c.Kx * bytes / 4;
    const void* rows = bytes == 1 ? static_cast<const void*>(pc.xq)
                       : bytes == 2 ? static_cast<const void*>(pc.xb) : pc.xf;
    PackCtx pk{&c, static_cast<const uint32_t*>(rows), words, (words + kPackWords - 1) / kPackWords,
               const_cast<uint32_t*>(c.xp)};
    const int64_t items = (c.M + kLaneRows - 1) / kLaneRows * pk.chunks;
    parallel_for(items, std::min<int64_t>(threads, items), pack_item, &pk);
    // and the int8-x path's block scales and int4's group sums, the same way (a float is a
    // word)
    auto pack_floats = [&](const float* src, int64_t per_row, const float* dst) {
      PackCtx pf{&c, reinterpret_cast<const uint32_t*>(src), per_row,
                 (per_row + kPackWords - 1) / kPackWords,
                 reinterpret_cast<uint32_t*>(const_cast<float*>(dst))};
      const int64_t n = (c.M + kLaneRows - 1) / kLaneRows * pf.chunks;
      parallel_for(n, std::min<int64_t>(threads, n), pack_item, &pf);
    };
    if (c.xps != nullptr) pack_floats(pc.x8s, c.Kx / 32, c.xps);
    if (c.xpb != nullptr)  // int32s: words as the floats
      pack_floats(reinterpret_cast<const float*>(pc.x8blk), c.Kx / 32,
                  reinterpret_cast<const float*>(c.xpb));
    if (c.xpg != nullptr) pack_floats(pc.x8g, c.groups, c.xpg);
  }
#endif
  const int64_t chunks_m = (c.M + kChunkRows - 1) / kChunkRows;
  parallel_for(chunks_m * c.chunks_n, threads, tile_item, &c);
}

}  // namespace LLMK_ISA_NS
}  // namespace llmk

#include "quant_matmul_grad.h"  // the input gradient, on this tier's fillers

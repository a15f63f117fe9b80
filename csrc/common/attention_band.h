// The band (sliding-window / causal) visibility rule of fused attention and the block-range
// math built on it. Plain C++ shared by the CUDA kernels and checked on the CPU
// (tests/test_attention_band.py), so the block skipping and the per-element mask cannot
// disagree.
//
// Within one sequence, key j is visible to query i iff
//   0 <= j < len_k  and  (left < 0 || j >= i + off - left)  and  (right < 0 || j <= i + off + right)
// where off = diag_offset (+ len_k - len_q for bottom-right alignment); a negative window
// side is unbounded (causal is right = 0).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LLMK_BAND_FN __host__ __device__ __forceinline__
#else
#define LLMK_BAND_FN inline
#endif

namespace llmk {
namespace band {

// Windows and offsets are clamped to +-2^42 (a window side that large is unbounded for any
// sequence shorter than 2^40), so the sums below never overflow int64.
constexpr int64_t kBandLimit = int64_t(1) << 42;

LLMK_BAND_FN int64_t clamp_window(int64_t w) { return w < 0 ? -1 : (w > kBandLimit ? kBandLimit : w); }
LLMK_BAND_FN int64_t clamp_offset(int64_t off) {
  return off < -kBandLimit ? -kBandLimit : (off > kBandLimit ? kBandLimit : off);
}

LLMK_BAND_FN bool visible(int64_t i, int64_t j, int64_t len_k, int64_t left, int64_t right,
                          int64_t off) {
  return j >= 0 && j < len_k && (left < 0 || j >= i + off - left) &&
         (right < 0 || j <= i + off + right);
}

struct Range {
  int64_t first;  // first index (row or block)
  int64_t end;    // one past the last; first == end == 0 when empty
};

// Every row's band is an interval of width left + right + 1 >= 1 that moves by one per row,
// so the union over consecutive rows is one interval: its ends come from the first and last
// row, and every key inside it is visible to some row (the ranges are tight).

// Keys visible to at least one query of rows [q_start, q_end) (clipped to [0, len_q)).
LLMK_BAND_FN Range key_range(int64_t q_start, int64_t q_end, int64_t len_q, int64_t len_k,
                             int64_t left, int64_t right, int64_t off) {
  if (q_start < 0) q_start = 0;
  if (q_end > len_q) q_end = len_q;
  if (q_start >= q_end || len_k <= 0) return {0, 0};
  int64_t lo = 0, hi = len_k;
  if (left >= 0 && q_start + off - left > lo) lo = q_start + off - left;
  if (right >= 0 && q_end + off + right < hi) hi = q_end + off + right;  // (q_end-1)+off+right+1
  if (lo >= hi) return {0, 0};
  return {lo, hi};
}

// Queries that see at least one key of rows [k_start, k_end) (clipped to [0, len_k)):
// i sees j iff j - off - right <= i <= j - off + left.
LLMK_BAND_FN Range query_range(int64_t k_start, int64_t k_end, int64_t len_q, int64_t len_k,
                               int64_t left, int64_t right, int64_t off) {
  if (k_start < 0) k_start = 0;
  if (k_end > len_k) k_end = len_k;
  if (k_start >= k_end || len_q <= 0) return {0, 0};
  int64_t lo = 0, hi = len_q;
  if (right >= 0 && k_start - off - right > lo) lo = k_start - off - right;
  if (left >= 0 && k_end - off + left < hi) hi = k_end - off + left;  // (k_end-1)-off+left+1
  if (lo >= hi) return {0, 0};
  return {lo, hi};
}

LLMK_BAND_FN Range to_blocks(Range r, int64_t block) {
  if (r.first >= r.end) return {0, 0};
  return {r.first / block, (r.end + block - 1) / block};
}

// Key blocks (of block_n keys) holding a key visible to some query of [q_start, q_end).
LLMK_BAND_FN Range key_block_range(int64_t q_start, int64_t q_end, int64_t len_q, int64_t len_k,
                                   int64_t left, int64_t right, int64_t off, int64_t block_n) {
  return to_blocks(key_range(q_start, q_end, len_q, len_k, left, right, off), block_n);
}

// Query blocks (of block_m queries) holding a query that sees some key of [k_start, k_end).
LLMK_BAND_FN Range query_block_range(int64_t k_start, int64_t k_end, int64_t len_q,
                                     int64_t len_k, int64_t left, int64_t right, int64_t off,
                                     int64_t block_m) {
  return to_blocks(query_range(k_start, k_end, len_q, len_k, left, right, off), block_m);
}

}  // namespace band
}  // namespace llmk

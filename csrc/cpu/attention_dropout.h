// Attention dropout without a stored mask: whether weight P[row][key] is kept is a hash of
// (seed, row, key), so the backward regenerates the forward's pattern whatever the tiling,
// the thread count or the order of the work. Rows count over the (B, Hq, L) view, keys from
// 0. llmkernels.ops.attention_dropout.keep_mask computes the same bits in torch (tests).
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/hash32.h"

namespace llmk {

// One row's key: distinct rows (below 2^32) of one seed get distinct keys (fmix32 is a
// bijection).
inline uint32_t dropout_row_key(uint64_t seed, uint64_t row) {
  const uint32_t h = fmix32(uint32_t(row) ^ uint32_t(seed));
  return fmix32(h ^ uint32_t(row >> 32) ^ uint32_t(seed >> 32));
}

struct DropoutKeep {
  uint32_t threshold = 0;  // key j is dropped iff (hash >> 8) < threshold (24-bit uniform)
  float scale = 1.f;       // 1 / (1 - p) for the kept weights
  explicit DropoutKeep(double p)
      : threshold(uint32_t(std::llround(p * 16777216.0))), scale(float(1.0 / (1.0 - p))) {}
  bool active() const { return threshold != 0; }

  // x[j] for keys j0 .. j0 + n of the row (finite): times scale where kept, else 0. A
  // multiply by a selected factor, not a branch: the loop vectorizes.
  void apply(float* x, int64_t n, uint32_t row_key, int64_t j0) const {
    const uint32_t start = row_key + uint32_t(j0) * 0x9E3779B1u;
    const uint32_t count = uint32_t(n), cut = threshold;
    const float kept = scale;  // locals: a store to x could alias the members
    for (uint32_t j = 0; j < count; ++j) {
      const uint32_t hash = fmix32(start + j * 0x9E3779B1u);
      x[j] *= (hash >> 8) >= cut ? kept : 0.f;
    }
  }
};

}  // namespace llmk

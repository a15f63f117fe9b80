// murmur3's 32-bit finalizer: a bijective mix of a counter into random-looking bits, a few
// multiplies and shifts that vectorize. The random streams of stochastic rounding and of
// attention dropout are it applied to (counter * odd constant + key); llmkernels/_hash.py
// and kernels/optim.py compute the same bits.
#pragma once
#include <cstdint>

namespace llmk {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

}  // namespace llmk

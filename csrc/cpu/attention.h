// Fused attention on the CPU: the arguments every tier's kernel takes, and the tiers.
#pragma once
#include <cstdint>

#include "../common/cpu_features.h"
#include "../common/tensor_view.h"

namespace llmk {

// All views are 4-D, already broadcast by Python (stride 0 where a dim is broadcast):
// q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), mask (B, Hq, L, S) or undefined.
// Hq is a multiple of Hk (grouped-query attention when larger).
struct AttentionParams {
  TensorView q, k, v, mask;
  float scale = 1.f;
  float softcap = 0.f;        // <= 0: off
  int64_t window_left = -1;   // key j is visible to query i iff
  int64_t window_right = -1;  //   i + diag_offset - left <= j <= i + diag_offset + right
  int64_t diag_offset = 0;    // (-1: that side unbounded)
  int num_threads = 1;
  int64_t round_bytes = 0;    // workspace budget of one round of heads; 0: the default
  // Optional, B entries (decode-shaped calls only, attention_decode_shaped): batch entry b
  // sees keys [0, key_lens[b]) alone, as if k and v ended there, and its band moves with
  // that end (its diagonal offset is diag_offset + key_lens[b] - S). Ragged KV caches then
  // take one call; keys past an entry's length are never read.
  const int64_t* key_lens = nullptr;
  // Attention dropout (training): each weight kept with probability 1 - dropout_p and scaled
  // by 1 / (1 - dropout_p), by a hash of (dropout_seed, row, key) (attention_dropout.h), so
  // the backward drops what the forward did. Such calls take the tiled forward.
  double dropout_p = 0.0;
  uint64_t dropout_seed = 0;
};

// Calls with few queries a kv head (L queries a head, group query heads a kv head) take the
// decode-shaped forward, which streams the keys once (without dropout: those take the tiles);
// only these accept key_lens.
constexpr int64_t kDecodeMaxL = 4;       // queries per head served this way
constexpr int64_t kDecodeMaxRows = 32;   // query rows per kv head (group x L)
inline bool attention_decode_shaped(int64_t L, int64_t group) {
  return L <= kDecodeMaxL && group * L <= kDecodeMaxRows;
}

struct ForwardIO {
  TensorView out;  // (B, Hq, L, Dv), q's dtype
  // Optional, shaped like out: what rounding out to a 16-bit dtype lost. The backward's
  // delta = rowsum(dO * O) then sees O to ~16 bits instead of bf16's 8.
  TensorView out_residual;
  TensorView lse;  // (B, Hq, L) float32; -inf for fully masked rows
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

struct BackwardIO {
  TensorView dout, out, lse;  // dout and out (B, Hq, L, Dv); lse as saved by forward
  TensorView out_residual;    // optional: the forward's out_residual
  TensorView dq, dk, dv;      // shaped like q, k, v
  // Optional: the gradient of a float mask (a learned bias), float32 (B, Hq, L, S),
  // contiguous, zeroed by the caller (torch.zeros: ~0.6x the time of zeroing it here, 2
  // threads): the kernel writes the pairs it visits; those it skips have weight 0, so
  // gradient 0. Broadcast dims are the caller's to sum.
  TensorView dmask;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// Validates shapes, dtypes and strides of the views (throws on anything memory-unsafe).
void check_attention_forward(const AttentionParams& p, const ForwardIO& io);
void check_attention_backward(const AttentionParams& p, const BackwardIO& io);

// The KV cache append of sequences of different lengths: token t of sequence b of src
// (B, n, H, E) goes to position starts[b] + t of dst (B, S, H, E), same dtype, each within
// [0, S - n] (checked first: nothing is written otherwise). One copy a (token, head) row.
void kvcache_append(const TensorView& dst, const TensorView& src, const int64_t* starts,
                    int64_t num_starts);

// Tests shrink the per-round workspace budget to exercise several rounds on small shapes.
void set_attention_round_bytes(int64_t bytes);

int64_t attention_forward_workspace_bytes(CpuTier tier, const AttentionParams& p);
int64_t attention_backward_workspace_bytes(CpuTier tier, const AttentionParams& p);
// Returns the number of output rows holding NaN or Inf (non-finite inputs).
int64_t attention_forward(CpuTier tier, const AttentionParams& p, const ForwardIO& io);
void attention_backward(CpuTier tier, const AttentionParams& p, const BackwardIO& io);

#define LLMK_DECLARE_ATTENTION_TIER(ns)                                            \
  namespace ns {                                                                   \
  int64_t forward_workspace_bytes(const AttentionParams& p);                       \
  int64_t backward_workspace_bytes(const AttentionParams& p);                      \
  int64_t forward(const AttentionParams& p, const ForwardIO& io);                  \
  void backward(const AttentionParams& p, const BackwardIO& io);                   \
  }
LLMK_DECLARE_ATTENTION_TIER(attn_generic)
LLMK_DECLARE_ATTENTION_TIER(attn_avx2)
LLMK_DECLARE_ATTENTION_TIER(attn_avx512)
LLMK_DECLARE_ATTENTION_TIER(attn_avx512bf16)
LLMK_DECLARE_ATTENTION_TIER(attn_amx)
#undef LLMK_DECLARE_ATTENTION_TIER

}  // namespace llmk

// Host API of the CUDA fused-attention kernels (csrc/cuda/attention.cu). Plain C++, no CUDA
// headers, so bindings.cpp can include it. Semantics: python/llmkernels/reference/attention.py
// and the comments in attention.cu. Views are validated here (throws std::runtime_error).
#pragma once
#include <cstdint>

#include "common/tensor_view.h"

namespace llmk {
namespace cuda {

struct AttentionCudaArgs {
  TensorView q, k, v;                          // (B, Hq, Lq, D), (Bk, Hk, Sk, D) x2
  TensorView cu_seqlens_q, cu_seqlens_k;       // int32 (nseq + 1) or undefined
  TensorView seqused_k;                        // int32 (nseq) or undefined
  // Grid bounds, used only with cu_seqlens (otherwise Lq and Sk): max_seqlen_q must be >= every
  // cu_seqlens_q[b+1] - cu_seqlens_q[b] and max_seqlen_k >= every cu_seqlens_k[b+1] - cu_seqlens_k[b]
  // (the rows a sequence owns, not seqused_k): rows past the bound are not computed/written.
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  float scale = 1.f, softcap = 0.f;
  int64_t window_left = -1, window_right = -1, diag_offset = 0;
  bool bottom_right = false;
  uintptr_t stream = 0;  // cudaStream_t as an integer
};

bool attention_cuda_supports(int dtype_code, int64_t head_dim);

// out: (B, Hq, Lq, D) same dtype as q; lse: float32 (B, Hq, Lq).
void attention_forward_cuda(const AttentionCudaArgs& a, const TensorView& out,
                            const TensorView& lse);

// delta: float32 (B, Hq, Lq) workspace written here; dq like q, dk/dv like k/v. Every row owned by
// a sequence is written (keys past seqused_k or seen by no query get zeros); in a packed layout,
// rows past cu_seqlens[nseq] belong to no sequence and are left untouched.
void attention_backward_cuda(const AttentionCudaArgs& a, const TensorView& out,
                             const TensorView& dout, const TensorView& lse,
                             const TensorView& delta, const TensorView& dq, const TensorView& dk,
                             const TensorView& dv);

}  // namespace cuda
}  // namespace llmk

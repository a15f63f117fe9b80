// Quantized matmul on the CPU: out (M, N) = x (M, K) times a quantized weight's transpose.
// Formats and numerics: python/llmkernels/reference/quant_matmul.py (the specification).
#pragma once
#include <cstdint>

#include "../common/cpu_features.h"
#include "../common/tensor_view.h"

namespace llmk {

enum class QuantScheme : int32_t { int8 = 0, int4 = 1, w8a8 = 2 };

// x: 2-D (M, K) float32/bfloat16/float16, any strides. qdata: int8 (N, K) for int8/w8a8,
// uint8 (N, K/2) for int4 (element 2j in the low nibble); contiguous. scales: float32 (N,)
// or (N, K/group) for int4; zeros: uint8 (N, K/group), int4 only. bias: (N,) in x's dtype
// or undefined. out: (M, N) in x's dtype, any strides.
struct QuantMatmulParams {
  TensorView x, qdata, scales, zeros, bias, out;
  QuantScheme scheme = QuantScheme::int8;
  int64_t group_size = 0;
  int num_threads = 1;
};

void check_quant_matmul(const QuantMatmulParams& p);  // throws on anything memory-unsafe
// Which kernel layout a tier runs for this call, in words (for llmkernels.explain); reads only
// scheme, group_size and x's rows (sizes[0]) and dtype.
const char* quant_matmul_kernel_name(CpuTier tier, const QuantMatmulParams& p);
int64_t quant_matmul_workspace_bytes(CpuTier tier, const QuantMatmulParams& p);
void quant_matmul(CpuTier tier, const QuantMatmulParams& p, void* workspace,
                  int64_t workspace_bytes);

// The input gradient, grad_x (M, K) = grad_out (M, N) @ dequantize(W) (N, K) (w8a8: straight
// through its activation rounding), in the same params: x holds grad_out (float32 or
// bfloat16), out grad_x (float32), any strides; no bias.
void check_quant_matmul_grad_x(const QuantMatmulParams& p);
int64_t quant_matmul_grad_x_workspace_bytes(CpuTier tier, const QuantMatmulParams& p);
void quant_matmul_grad_x(CpuTier tier, const QuantMatmulParams& p, void* workspace,
                         int64_t workspace_bytes);

#define LLMK_DECLARE_QUANT_TIER(ns)                                        \
  namespace ns {                                                           \
  int64_t workspace_bytes(const QuantMatmulParams& p);                     \
  const char* describe(const QuantMatmulParams& p);                        \
  void run(const QuantMatmulParams& p, void* workspace);                   \
  }
LLMK_DECLARE_QUANT_TIER(qmm_generic)
LLMK_DECLARE_QUANT_TIER(qmm_avx2)
LLMK_DECLARE_QUANT_TIER(qmm_avx512)
LLMK_DECLARE_QUANT_TIER(qmm_avx512bf16)
LLMK_DECLARE_QUANT_TIER(qmm_amx)
#undef LLMK_DECLARE_QUANT_TIER
// (the amx tier's gradient is avx512bf16's: float32 products)
#define LLMK_DECLARE_QUANT_GRAD_TIER(ns)                                   \
  namespace ns {                                                           \
  int64_t grad_x_workspace_bytes(const QuantMatmulParams& p);              \
  void run_grad_x(const QuantMatmulParams& p, void* workspace);            \
  }
LLMK_DECLARE_QUANT_GRAD_TIER(qmm_generic)
LLMK_DECLARE_QUANT_GRAD_TIER(qmm_avx2)
LLMK_DECLARE_QUANT_GRAD_TIER(qmm_avx512)
LLMK_DECLARE_QUANT_GRAD_TIER(qmm_avx512bf16)
#undef LLMK_DECLARE_QUANT_GRAD_TIER

namespace qmm_avx512bf16 {
// w8a8's x quantized per row exactly as this tier's kernels do (the amx tier's tiles reuse
// it): rows of Kx >= K bytes, padded with quantized zeros; returns whether stored + 128.
bool quantize_rows_w8a8(const QuantMatmulParams& p, int8_t* xq, float* xscale, int64_t Kx,
                        int nthreads);
}  // namespace qmm_avx512bf16

}  // namespace llmk

// Tier dispatch and argument checks for the CPU quantized matmul.
#include "quant_matmul.h"

#include "../common/checks.h"

namespace llmk {

namespace {

bool is_float(DType t) { return t == DType::f32 || t == DType::bf16 || t == DType::f16; }

void check_2d(const TensorView& t, const char* name, int64_t rows, int64_t cols) {
  LLMK_CHECK(t.ndim == 2, name << " must be 2-D, got " << t.ndim << "-D");
  LLMK_CHECK(t.sizes[0] == rows && t.sizes[1] == cols,
             name << " must be (" << rows << ", " << cols << "), got (" << t.sizes[0] << ", "
                  << t.sizes[1] << ")");
  LLMK_CHECK(t.strides[0] >= 0 && t.strides[1] >= 0, name << " has a negative stride");
  LLMK_CHECK(t.data != nullptr || t.numel() == 0, name << " has no data");
}

void check_contiguous(const TensorView& t, const char* name) {
  int64_t expect = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    LLMK_CHECK(t.sizes[i] <= 1 || t.strides[i] == expect, name << " must be contiguous");
    expect *= t.sizes[i];
  }
}

}  // namespace

namespace {

// The packed weight of an (N, K) matrix.
void check_weight(const QuantMatmulParams& p, int64_t N, int64_t K) {
  LLMK_CHECK(p.scales.dtype == DType::f32, "scales must be float32");
  switch (p.scheme) {
    case QuantScheme::int8:
    case QuantScheme::w8a8:
      LLMK_CHECK(p.qdata.dtype == DType::i8, "qdata must be int8");
      check_2d(p.qdata, "qdata", N, K);
      LLMK_CHECK(p.scales.ndim == 1 && p.scales.sizes[0] == N, "scales must be (N,)");
      break;
    case QuantScheme::int4: {
      const int64_t g = p.group_size;
      LLMK_CHECK(g == 32 || g == 64 || g == 128, "group_size must be 32, 64 or 128");
      LLMK_CHECK(K % g == 0, "K must be a multiple of group_size");
      LLMK_CHECK(p.qdata.dtype == DType::u8, "qdata must be uint8");
      check_2d(p.qdata, "qdata", N, K / 2);
      check_2d(p.scales, "scales", N, K / g);
      LLMK_CHECK(p.zeros.dtype == DType::u8, "zeros must be uint8");
      check_2d(p.zeros, "zeros", N, K / g);
      check_contiguous(p.zeros, "zeros");
      break;
    }
    default:
      LLMK_CHECK(false, "unknown quantization scheme " << int(p.scheme));
  }
  check_contiguous(p.qdata, "qdata");
  check_contiguous(p.scales, "scales");
}

}  // namespace

void check_quant_matmul(const QuantMatmulParams& p) {
  LLMK_CHECK(p.x.ndim == 2, "x must be 2-D (M, K)");
  const int64_t M = p.x.sizes[0], K = p.x.sizes[1];
  LLMK_CHECK(is_float(p.x.dtype), "x must be float32, bfloat16 or float16");
  check_2d(p.x, "x", M, K);
  LLMK_CHECK(p.qdata.ndim == 2, "qdata must be 2-D");
  const int64_t N = p.qdata.sizes[0];
  check_weight(p, N, K);
  if (p.bias.defined()) {
    LLMK_CHECK(p.bias.ndim == 1 && p.bias.sizes[0] == N, "bias must be (N,)");
    LLMK_CHECK(p.bias.dtype == p.x.dtype, "bias must have x's dtype");
    LLMK_CHECK(p.bias.data != nullptr || N == 0, "bias has no data");
  }
  LLMK_CHECK(p.out.dtype == p.x.dtype, "out must have x's dtype");
  check_2d(p.out, "out", M, N);
  LLMK_CHECK(p.num_threads >= 1, "num_threads must be >= 1");
}

void check_quant_matmul_grad_x(const QuantMatmulParams& p) {
  LLMK_CHECK(p.x.ndim == 2 && p.out.ndim == 2, "grad_out and grad_x must be 2-D");
  LLMK_CHECK(p.x.dtype == DType::f32 || p.x.dtype == DType::bf16,
             "grad_out must be float32 or bfloat16");
  LLMK_CHECK(p.out.dtype == DType::f32, "grad_x must be float32");
  LLMK_CHECK(p.qdata.ndim == 2, "qdata must be 2-D");
  const int64_t M = p.x.sizes[0], N = p.qdata.sizes[0];
  const int64_t K = p.qdata.sizes[1] * (p.scheme == QuantScheme::int4 ? 2 : 1);
  check_weight(p, N, K);
  check_2d(p.x, "grad_out", M, N);
  check_2d(p.out, "grad_x", M, K);
  LLMK_CHECK(!p.bias.defined(), "the input gradient takes no bias");
  LLMK_CHECK(p.num_threads >= 1, "num_threads must be >= 1");
}

#define LLMK_QMM_DISPATCH(call)                                      \
  switch (tier) {                                                    \
    case CpuTier::amx: return qmm_amx::call;                         \
    case CpuTier::avx512_bf16: return qmm_avx512bf16::call;          \
    case CpuTier::avx512: return qmm_avx512::call;                   \
    case CpuTier::avx2: return qmm_avx2::call;                       \
    default: return qmm_generic::call;                               \
  }

const char* quant_matmul_kernel_name(CpuTier tier, const QuantMatmulParams& p) {
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported here");
  LLMK_QMM_DISPATCH(describe(p));
}

int64_t quant_matmul_workspace_bytes(CpuTier tier, const QuantMatmulParams& p) {
  check_quant_matmul(p);
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported here");
  LLMK_QMM_DISPATCH(workspace_bytes(p));
}

// The amx tier's tiles serve the forward; the gradient's float32 products are avx512bf16's.
#define LLMK_QMM_GRAD_DISPATCH(call)                                 \
  switch (tier) {                                                    \
    case CpuTier::amx:                                               \
    case CpuTier::avx512_bf16: return qmm_avx512bf16::call;          \
    case CpuTier::avx512: return qmm_avx512::call;                   \
    case CpuTier::avx2: return qmm_avx2::call;                       \
    default: return qmm_generic::call;                               \
  }

int64_t quant_matmul_grad_x_workspace_bytes(CpuTier tier, const QuantMatmulParams& p) {
  check_quant_matmul_grad_x(p);
  LLMK_CHECK(tier_supported(tier), "CPU tier " << tier_name(tier) << " is not supported here");
  LLMK_QMM_GRAD_DISPATCH(grad_x_workspace_bytes(p));
}

void quant_matmul_grad_x(CpuTier tier, const QuantMatmulParams& p, void* workspace,
                         int64_t workspace_bytes) {
  const int64_t need = quant_matmul_grad_x_workspace_bytes(tier, p);
  LLMK_CHECK(workspace_bytes >= need && (workspace != nullptr || need == 0),
             "workspace too small: " << workspace_bytes << " < " << need);
  LLMK_QMM_GRAD_DISPATCH(run_grad_x(p, workspace));
}

void quant_matmul(CpuTier tier, const QuantMatmulParams& p, void* workspace,
                  int64_t workspace_bytes) {
  const int64_t need = quant_matmul_workspace_bytes(tier, p);
  LLMK_CHECK(workspace_bytes >= need && (workspace != nullptr || need == 0),
             "workspace too small: " << workspace_bytes << " < " << need);
  if (p.out.numel() == 0) return;
  LLMK_QMM_DISPATCH(run(p, workspace));
}

}  // namespace llmk

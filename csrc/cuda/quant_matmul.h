// Host API of the CUDA quantized matmul kernels (csrc/cuda/quant_matmul.cu). Plain C++, no CUDA
// headers, so bindings.cpp can include it. Formats and numerics:
// python/llmkernels/reference/quant_matmul.py. Views are validated here (throws std::runtime_error).
#pragma once
#include <cstdint>
#include <string>

#include "common/tensor_view.h"

namespace llmk {
namespace cuda {

// Scheme codes of quant_matmul_cuda (the Python side passes the index into SCHEMES).
constexpr int kQuantInt8 = 0;  // W8A16: int8 weights, per-channel float scales
constexpr int kQuantInt4 = 1;  // W4A16: packed uint4 weights, per-group scales and zero points
constexpr int kQuantW8A8 = 2;  // int8 weights, activations quantized per row on the fly

// Largest K of the w8a8 scheme: the int32 accumulators are exact while K * 127 * 127 < 2^31.
constexpr int64_t kW8A8MaxK = 133144;

// Bytes of device workspace quant_matmul_cuda needs (0 for int8/int4). w8a8: the quantized
// activations, int8 (M, round_up(K, 16)) zero-padded, then float32 per-row scales (M,).
int64_t quant_matmul_cuda_workspace_bytes(int scheme, int64_t M, int64_t K);

// out (M, N) = x (M, K) @ dequantize(W)^T (+ bias), in x's dtype (float16 or bfloat16), on the
// current device and the given stream (a cudaStream_t as an integer).
//   x      (M, K) float16/bfloat16, last stride 1, any row stride
//   qdata  contiguous: int8 (N, K) for int8/w8a8; uint8 (N, K/2) for int4 (low nibble = even k)
//   scales contiguous float32: (N,) for int8/w8a8; (N, K/group_size) for int4
//   zeros  contiguous uint8 (N, K/group_size) for int4; undefined otherwise
//   bias   undefined or (N,) in x's dtype, contiguous
//   out    (M, N) in x's dtype, last stride 1, rows not overlapping (must not alias x)
//   workspace  device pointer of quant_matmul_cuda_workspace_bytes(scheme, M, K) bytes, 16-byte
//              aligned (may be 0 when that is 0)
//   group_size 32, 64 or 128 for int4 (ignored otherwise)
void quant_matmul_cuda(int scheme, const TensorView& x, const TensorView& qdata,
                       const TensorView& scales, const TensorView& zeros, const TensorView& bias,
                       const TensorView& out, uintptr_t workspace, int64_t group_size,
                       uintptr_t stream);

// Runs, on the host, the index/unpacking helpers the kernels share (int4 nibble order, the exact
// int -> float conversions, the shared-memory padding, the workspace layout) against plain
// formulas. Returns "" when all agree, else a description of the first mismatch. Needs no GPU.
std::string quant_matmul_cuda_host_selftest();

}  // namespace cuda
}  // namespace llmk

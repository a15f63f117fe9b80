// Host API of the CUDA fused optimizer steps (csrc/cuda/optim.cu). Plain C++, no CUDA headers,
// so bindings.cpp can include it. The math is csrc/cpu/optim_impl.h's, operation for operation
// (IEEE division and square root, the same fused multiply-adds, nothing else contracted), so a
// step on the GPU gives the CPU kernel's bits; the tensors are the CPU kernels' (cpu/optim.h)
// with device pointers. Launches are multi_tensor_apply style: each CUDA block updates a run of
// consecutive chunks of one tensor, the tensor and chunk tables travel as kernel parameters (no
// host sync, no device buffers), as many launches as the tables need.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/optim.h"

namespace llmk {
namespace cuda {

// Stochastic rounding is not supported here (h.stochastic_rounding must be false); the state of
// an AdamTensor has the parameter's dtype. stream: a cudaStream_t as an integer.
//
// Capturable steps (llmkernels.optim's capturable=True): device_floats, a float32 table in
// device memory, row rows[i] (rows empty: row i) for tensors[i], holds what changes from step
// to step, read there by the kernels instead of from h and the tensors, so that a CUDA graph
// replays the step with the table's current values. Adam: kAdamFloats columns (step_size,
// bias_correction2_sqrt, unused, decay, the gradients' multiplier, skip); 8-bit AdamW:
// kAdam8Floats (step_size, bias_correction2_sqrt, decay, the gradients' multiplier with
// maximize's sign, skip). A nonzero skip leaves the tensor and its state as they are.
constexpr int kAdamFloats = 6, kAdam8Floats = 5;
void adam_step_cuda(const AdamHyper& h, const std::vector<AdamTensor>& tensors, uintptr_t stream,
                    const float* device_floats = nullptr, const std::vector<int32_t>& rows = {});
void adam8bit_step_cuda(const AdamHyper& h, const std::vector<Adam8bitTensor>& tensors,
                        uintptr_t stream, const float* device_floats = nullptr,
                        const std::vector<int32_t>& rows = {});
void sgd_step_cuda(const SgdHyper& h, const std::vector<SgdTensor>& tensors, uintptr_t stream);

// The launch plan's bookkeeping checked on the host: every chunk of every tensor is assigned to
// exactly one block of one launch, within the tables' limits. '' when it holds.
std::string optim_cuda_host_selftest();

}  // namespace cuda
}  // namespace llmk

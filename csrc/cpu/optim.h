// Fused optimizer steps on the CPU (multi-tensor: one call updates a whole param group).
// The math follows torch.optim.Adam / AdamW / SGD (their single-tensor code), computed in
// float32 whatever the tensors' dtype (float32, bfloat16, float16), state stored in the
// parameter's dtype as torch does.
#pragma once
#include <cstdint>
#include <vector>

#include "../common/cpu_features.h"
#include "../common/tensor_view.h"

namespace llmk {

struct AdamHyper {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
  bool decoupled = true;  // AdamW: decay the parameter; Adam: add wd * p to the gradient
  bool amsgrad = false, maximize = false;
  float inv_grad_scale = 1.f;  // GradScaler: gradients are divided by its scale
  // Rounded from double, as torch rounds Python floats: 1 - lr*wd, 1 - beta1, 1 - beta2.
  float decay = 1.f, one_minus_beta1 = 0.1f, one_minus_beta2 = 0.001f;
  bool stochastic_rounding = false;  // bfloat16 parameters only (see sr_bf16 in optim_impl.h)
  int num_threads = 1;
};

struct AdamTensor {  // contiguous 1-D views of equal length; max_exp_avg_sq only with amsgrad
  TensorView param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
  float step_size = 0.f;             // lr / (1 - beta1^step)
  float bias_correction2_sqrt = 1.f; // sqrt(1 - beta2^step)
  uint32_t sr_key = 0;               // stochastic rounding: this tensor's and step's stream
};

struct SgdHyper {
  float lr = 1e-3f, momentum = 0.f, dampening = 0.f, weight_decay = 0.f;
  float one_minus_dampening = 1.f;  // rounded from double, as torch does
  bool stochastic_rounding = false;
  bool nesterov = false, maximize = false;
  float inv_grad_scale = 1.f;
  int num_threads = 1;
};

struct SgdTensor {  // momentum_buffer undefined when momentum == 0
  TensorView param, grad, momentum_buffer;
  bool first_step = false;  // the buffer starts as a copy of the gradient
  uint32_t sr_key = 0;
};

// 8-bit AdamW state: blocks of kBlock8 elements, each with a float32 scale (its absmax).
// exp_avg m ~ scale * (c / 127)^2 with c's sign (c int8); exp_avg_sq v ~ scale * (u / 255)^4
// (u uint8). The power maps give the fine steps near zero that moments need (v spans decades
// within a block); a code is the integer nearest a square root, no table search (see
// encode_moments in optim_impl.h).
constexpr int64_t kBlock8 = 256;

struct Adam8bitTensor {  // param and grad contiguous 1-D (n); codes (n); scales (ceil(n/256))
  TensorView param, grad, m_codes, m_scales, v_codes, v_scales;
  float step_size = 0.f, bias_correction2_sqrt = 1.f;
};

void adam_step(CpuTier tier, const AdamHyper& h, const std::vector<AdamTensor>& tensors);
void adam8bit_step(CpuTier tier, const AdamHyper& h, const std::vector<Adam8bitTensor>& tensors);
void sgd_step(CpuTier tier, const SgdHyper& h, const std::vector<SgdTensor>& tensors);

#define LLMK_DECLARE_OPTIM_TIER(ns)                                                          \
  namespace ns {                                                                             \
  void adam_range(const AdamHyper& h, const AdamTensor& t, int64_t begin, int64_t end);      \
  void sgd_range(const SgdHyper& h, const SgdTensor& t, int64_t begin, int64_t end);         \
  void adam8bit_blocks(const AdamHyper& h, const Adam8bitTensor& t, int64_t b0, int64_t b1);  \
  }
LLMK_DECLARE_OPTIM_TIER(optim_generic)
LLMK_DECLARE_OPTIM_TIER(optim_avx2)
LLMK_DECLARE_OPTIM_TIER(optim_avx512)
LLMK_DECLARE_OPTIM_TIER(optim_avx512bf16)
#undef LLMK_DECLARE_OPTIM_TIER

}  // namespace llmk

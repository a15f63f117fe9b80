// The avx512bf16 tier of the fused optimizers (compile flags set in CMakeLists.txt).
#define LLMK_ISA_NS optim_avx512bf16
#include "optim_impl.h"

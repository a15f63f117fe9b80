// The avx512 tier of the fused optimizers (compile flags set in CMakeLists.txt).
#define LLMK_ISA_NS optim_avx512
#include "optim_impl.h"

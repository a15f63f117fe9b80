// The generic tier of the fused optimizers (compile flags set in CMakeLists.txt).
#define LLMK_ISA_NS optim_generic
#include "optim_impl.h"

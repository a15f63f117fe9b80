// The generic tier of the CPU quantized matmul (compile flags set in CMakeLists.txt).
#define LLMK_VEC_BYTES 16
#define LLMK_ISA_NS qmm_generic
#include "quant_matmul_impl.h"

// The avx2 tier of the CPU quantized matmul (compile flags set in CMakeLists.txt).
#define LLMK_VEC_BYTES 32
#define LLMK_ISA_NS qmm_avx2
#include "quant_matmul_impl.h"

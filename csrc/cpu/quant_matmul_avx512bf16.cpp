// The avx512bf16 tier of the CPU quantized matmul (compile flags set in CMakeLists.txt).
#define LLMK_VEC_BYTES 64
#define LLMK_ISA_NS qmm_avx512bf16
#include "quant_matmul_impl.h"

// The avx512 tier of the CPU attention kernel (compile flags set in CMakeLists.txt).
#define LLMK_VEC_BYTES 64
#define LLMK_ISA_NS attn_avx512
#include "attention_impl.h"

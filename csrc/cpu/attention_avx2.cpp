// The avx2 tier of the CPU attention kernel (compile flags set in CMakeLists.txt).
#define LLMK_VEC_BYTES 32
#define LLMK_ISA_NS attn_avx2
#include "attention_impl.h"

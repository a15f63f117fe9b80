// The generic tier of the CPU attention kernel (compile flags set in CMakeLists.txt).
#define LLMK_VEC_BYTES 16
#define LLMK_ISA_NS attn_generic
#include "attention_impl.h"

// The amx tier: the avx512_bf16 kernel with its bf16 matrix products on AMX tiles.
#define LLMK_VEC_BYTES 64
#define LLMK_ISA_NS attn_amx
#if defined(__x86_64__) && defined(__AVX512BF16__)
#define LLMK_AMX 1
#endif
#include "attention_impl.h"

// The avx512_bf16 tier: the avx512 kernel plus bf16 dot products for bfloat16 inputs.
#define LLMK_VEC_BYTES 64
#define LLMK_ISA_NS attn_avx512bf16
#include "attention_impl.h"

// What the CPU we run on can execute, detected once at run time (cpuid + xgetbv on x86).
#pragma once
#include <string>
#include <vector>

namespace llmk {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_fp16 = false, avx512_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool neon = false;
  std::string vendor, brand;
};

const CpuFeatures& cpu_features();

// Kernel tiers, from the most to the least capable. Every tier is built into the binary;
// the best one the CPU supports is used unless a lower one is forced (tests do).
// avx512_bf16 is avx512 plus bf16 dot products (vdpbf16ps) for bfloat16 inputs; amx is
// avx512_bf16 with bf16 matrix products on AMX tiles (attention; the other kernels run
// avx512_bf16's code). amx also runs on the tiles' software model where that is asked for
// (LLMKERNELS_AMX_EMULATE=1, tests): then it is supported but never the best tier.
enum class CpuTier : int { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };
constexpr CpuTier kAllTiers[] = {CpuTier::amx, CpuTier::avx512_bf16, CpuTier::avx512,
                                 CpuTier::avx2, CpuTier::generic};

const char* tier_name(CpuTier t);
bool tier_supported(CpuTier t);
CpuTier best_tier();
std::vector<std::string> supported_tiers();

}  // namespace llmk

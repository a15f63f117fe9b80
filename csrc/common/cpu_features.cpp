#include "cpu_features.h"

#include "../cpu/amx_tiles.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define LLMK_X86 1
#include <cpuid.h>
#endif

namespace llmk {

namespace {

#ifdef LLMK_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf == 0) return f;
  __cpuid(0, a, b, c, d);
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4); std::memcpy(vendor + 4, &d, 4); std::memcpy(vendor + 8, &c, 4);
  f.vendor = vendor;
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      __cpuid(0x80000002 + i, a, b, c, d);
      std::memcpy(brand + 16 * i, &a, 4); std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4); std::memcpy(brand + 16 * i + 12, &d, 4);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
  }
  __cpuid(1, a, b, c, d);
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;            // SSE + AVX state
  const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;      // XTILECFG + XTILEDATA
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = avx && os_ymm && (b & (1u << 5));
  f.fma = avx && os_ymm && fma;
  f.f16c = avx && os_ymm && f16c;
  f.avx512f = os_zmm && (b & (1u << 16));
  f.avx512dq = os_zmm && (b & (1u << 17));
  f.avx512bw = os_zmm && (b & (1u << 30));
  f.avx512vl = os_zmm && (b & (1u << 31));
  f.avx512_vnni = os_zmm && (c & (1u << 11));
  f.avx512_fp16 = os_zmm && (d & (1u << 23));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  f.amx_int8 = os_amx && (d & (1u << 25));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = os_zmm && (a & (1u << 5));
  return f;
}
#else
CpuFeatures detect() {
  CpuFeatures f;
#if defined(__aarch64__)
  f.neon = true;
#endif
  return f;
}
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* tier_name(CpuTier t) {
  switch (t) {
    case CpuTier::amx: return "amx";
    case CpuTier::avx512_bf16: return "avx512_bf16";
    case CpuTier::avx512: return "avx512";
    case CpuTier::avx2: return "avx2";
    default: return "generic";
  }
}

bool tier_supported(CpuTier t) {
  const CpuFeatures& f = cpu_features();
  switch (t) {
    case CpuTier::generic: return true;
#ifdef LLMK_X86
    case CpuTier::avx2: return f.avx2 && f.fma && f.f16c;
    case CpuTier::avx512:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c;
    case CpuTier::avx512_bf16:  // its files also use AVX512-VNNI (all BF16 CPUs have it)
      return tier_supported(CpuTier::avx512) && f.avx512_bf16 && f.avx512_vnni;
    case CpuTier::amx:
      return tier_supported(CpuTier::avx512_bf16) &&
             (amx::hardware_usable(nullptr) || amx::emulation_requested());
#endif
    default: return false;
  }
}

CpuTier best_tier() {
  for (CpuTier t : kAllTiers)
    if (tier_supported(t) && !(t == CpuTier::amx && amx::emulated())) return t;
  return CpuTier::generic;
}

std::vector<std::string> supported_tiers() {
  std::vector<std::string> out;
  for (CpuTier t : kAllTiers)
    if (tier_supported(t)) out.push_back(tier_name(t));
  return out;
}

}  // namespace llmk

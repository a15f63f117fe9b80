// AMX tile registers for the amx tier: the instructions themselves (Hardware) and a
// software model of the same instructions (Emulated), behind one interface so that the
// tier's kernels are written once and can run, slowly, on CPUs without AMX (tests).
//
// Both follow the Intel SDM: a 64-byte tile configuration (palette 1: eight tiles of up to
// 16 rows x 64 bytes), tileloadd / tilestored with a row stride in bytes, tilezero, and
// tdpbf16ps C += A B where A holds M rows of K bf16 pairs (32-bit words), B holds K rows of
// N pairs (the VNNI layout: B2[k][n] = (B[2k][n], B[2k+1][n])) and C holds M x N float32;
// tdpbsud is the same with quads of bytes (A signed, B unsigned) and int32 C.
// The emulator also checks what the hardware would fault on (unconfigured tiles, shapes that
// do not match), so a kernel bug shows up as an exception in tests, not as SIGILL later.
#pragma once
#include <cstdint>
#include <string>

namespace llmk {
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette = 0, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads exactly 64 bytes");

constexpr int kTileRows = 16;   // rows of a full tile
constexpr int kTileWords = 16;  // 32-bit words per row of a full tile (64 bytes)

// Every tile the kernels use (0-7) as a full 16 x 64-byte tile.
TileConfig full_tiles();

// ---------------------------------------------------------------- the software model
void emu_configure(const TileConfig& cfg);
void emu_store_config(TileConfig* cfg);  // all zeros while unconfigured, as sttilecfg
void emu_release();
void emu_zero(int t);
void emu_load(int t, const void* base, int64_t stride);
void emu_store(int t, void* base, int64_t stride);
void emu_dpbf16ps(int c, int a, int b);
void emu_dpbsud(int c, int a, int b);

struct Emulated {
  static void configure(const TileConfig& cfg) { emu_configure(cfg); }
  static void store_config(TileConfig* cfg) { emu_store_config(cfg); }
  static void release() { emu_release(); }
  template <int T> static void zero() { emu_zero(T); }
  template <int T> static void load(const void* base, int64_t stride) { emu_load(T, base, stride); }
  template <int T> static void store(void* base, int64_t stride) { emu_store(T, base, stride); }
  template <int C, int A, int B> static void dp() { emu_dpbf16ps(C, A, B); }
  template <int C, int A, int B> static void dp_s8u8() { emu_dpbsud(C, A, B); }
};

// ---------------------------------------------------------------- the instructions
// Written as inline assembly rather than with GCC's _tile_* macros: those declare no memory
// operands for tileloadd and only 8 bytes for ldtilecfg, so the compiler could drop or move
// the stores that fill a padded tile or a configuration. "memory" clobbers keep them.
#if defined(__x86_64__)
#define LLMK_HAS_AMX_ASM 1
struct Hardware {
  static void configure(const TileConfig& cfg) {
    asm volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  }
  static void store_config(TileConfig* cfg) {
    asm volatile("sttilecfg %0" : "=m"(*cfg)::"memory");
  }
  static void release() { asm volatile("tilerelease" ::: "memory"); }
  template <int T> static void zero() { asm volatile("tilezero %%tmm%c0" ::"i"(T)); }
  template <int T> static void load(const void* base, int64_t stride) {
    asm volatile("tileloadd (%1,%2,1), %%tmm%c0" ::"i"(T), "r"(base), "r"(stride) : "memory");
  }
  template <int T> static void store(void* base, int64_t stride) {
    asm volatile("tilestored %%tmm%c0, (%1,%2,1)" ::"i"(T), "r"(base), "r"(stride) : "memory");
  }
  template <int C, int A, int B> static void dp() {  // AT&T order: B, A, C
    asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
  template <int C, int A, int B> static void dp_s8u8() {
    asm volatile("tdpbsud %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};
#else
#define LLMK_HAS_AMX_ASM 0
#endif

// ---------------------------------------------------------------- a kernel's tiles
// scope_begin saves the thread's tile configuration and loads full_tiles(); scope_end puts
// the saved one back, or releases the tiles if none was loaded (see TileScope).
TileConfig scope_begin(bool emulated);
void scope_end(bool emulated, const TileConfig& saved);
// On the software model: a configuration of the caller's survives a scope, and a thread
// without one is left without one. Returns what went wrong, or "" (tests).
std::string scope_selftest();

// ---------------------------------------------------------------- availability
// True when LLMKERNELS_AMX_EMULATE=1 asks for the software model on a CPU without usable
// AMX tiles (the amx tier can then be forced, never chosen automatically).
bool emulation_requested();
// Whether the hardware path can run here: CPUID/XCR0 say AMX-BF16 and AMX-INT8, Linux
// granted the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM), and a small product on the
// tiles gave the emulator's bits. `why` says what failed.
bool hardware_usable(std::string* why);
// The amx tier runs on the software model (no usable hardware, emulation requested).
bool emulated();
// The self-check product on the tiles, run in a forked child (hardware_usable's last step,
// after the tile permission); tests call it on CPUs without AMX to see a faulting child
// reported, not crash the caller.
bool forked_self_check(std::string* why);

}  // namespace amx
}  // namespace llmk

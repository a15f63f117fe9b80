// The software model of the AMX tile instructions, and whether the hardware ones can run.
// Built with the baseline flags: plain scalar code, any x86-64 CPU runs it.
#include "amx_tiles.h"

#include <csignal>
#include <cstdlib>
#include <cstring>

#include "../common/checks.h"
#include "../common/cpu_features.h"

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace llmk {
namespace amx {

TileConfig full_tiles() {
  TileConfig c;
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kTileRows;
    c.colsb[t] = kTileWords * 4;
  }
  return c;
}

namespace {

struct EmuState {
  bool configured = false;
  TileConfig cfg;
  alignas(64) uint8_t data[8][kTileRows * 64];
};
thread_local EmuState emu;

void check_tile(int t, const char* op) {
  LLMK_CHECK(emu.configured, "AMX emulator: " << op << " before ldtilecfg (the hardware faults)");
  LLMK_CHECK(t >= 0 && t < 8 && emu.cfg.rows[t] > 0 && emu.cfg.colsb[t] > 0,
             "AMX emulator: " << op << " on unconfigured tile " << t);
}

float bf16_daz(uint16_t h) {  // tdpbf16ps treats denormal inputs as zero
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint32_t word_at(int t, int row, int col) {
  uint32_t w;
  std::memcpy(&w, emu.data[t] + row * 64 + col * 4, 4);
  return w;
}

}  // namespace

void emu_configure(const TileConfig& cfg) {
  LLMK_CHECK(cfg.palette == 1, "AMX emulator: palette must be 1");
  LLMK_CHECK(cfg.start_row == 0, "AMX emulator: start_row must be 0");
  for (uint8_t r : cfg.reserved) LLMK_CHECK(r == 0, "AMX emulator: reserved bytes must be 0");
  for (int t = 0; t < 16; ++t) {
    const bool used = cfg.rows[t] > 0 || cfg.colsb[t] > 0;
    if (t >= 8) {
      LLMK_CHECK(!used, "AMX emulator: palette 1 has 8 tiles, tile " << t << " configured");
      continue;
    }
    LLMK_CHECK(cfg.rows[t] <= kTileRows && cfg.colsb[t] <= 64,
               "AMX emulator: tile " << t << " larger than 16 rows x 64 bytes");
  }
  emu.cfg = cfg;
  emu.configured = true;
  std::memset(emu.data, 0, sizeof emu.data);
}

void emu_store_config(TileConfig* cfg) {
  *cfg = emu.configured ? emu.cfg : TileConfig{};
}

void emu_release() {
  emu.configured = false;
  std::memset(emu.data, 0, sizeof emu.data);
}

void emu_zero(int t) {
  check_tile(t, "tilezero");
  std::memset(emu.data[t], 0, sizeof emu.data[t]);
}

void emu_load(int t, const void* base, int64_t stride) {
  check_tile(t, "tileloadd");
  std::memset(emu.data[t], 0, sizeof emu.data[t]);  // bytes past the configured shape read 0
  const auto* src = static_cast<const uint8_t*>(base);
  for (int r = 0; r < emu.cfg.rows[t]; ++r)
    std::memcpy(emu.data[t] + r * 64, src + r * stride, emu.cfg.colsb[t]);
}

void emu_store(int t, void* base, int64_t stride) {
  check_tile(t, "tilestored");
  auto* dst = static_cast<uint8_t*>(base);
  for (int r = 0; r < emu.cfg.rows[t]; ++r)
    std::memcpy(dst + r * stride, emu.data[t] + r * 64, emu.cfg.colsb[t]);
}

namespace {

// C[m][n] = word_dot(C[m][n], A[m][k], B[k][n]) over k, with the shape checks the hardware
// faults on: C is M x N words, A M x K words, B K x N words.
template <class Acc, class WordDot>
void emu_dot(int c, int a, int b, const char* op, WordDot word_dot) {
  check_tile(c, op);
  check_tile(a, op);
  check_tile(b, op);
  LLMK_CHECK(c != a && c != b && a != b, "AMX emulator: " << op << " needs three distinct tiles");
  const TileConfig& g = emu.cfg;
  const int M = g.rows[c], N = g.colsb[c] / 4, K = g.colsb[a] / 4;
  LLMK_CHECK(g.colsb[c] % 4 == 0 && g.colsb[a] % 4 == 0 && g.rows[a] == M && g.rows[b] == K &&
                 g.colsb[b] == g.colsb[c],
             "AMX emulator: " << op << " shapes do not match (C " << M << "x" << g.colsb[c]
                 << "B, A " << int(g.rows[a]) << "x" << g.colsb[a] << "B, B " << int(g.rows[b])
                 << "x" << g.colsb[b] << "B)");
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      Acc acc;
      std::memcpy(&acc, emu.data[c] + m * 64 + n * 4, 4);
      for (int k = 0; k < K; ++k) acc = word_dot(acc, word_at(a, m, k), word_at(b, k, n));
      std::memcpy(emu.data[c] + m * 64 + n * 4, &acc, 4);
    }
}

}  // namespace

void emu_dpbf16ps(int c, int a, int b) {
  emu_dot<float>(c, a, b, "tdpbf16ps", [](float acc, uint32_t x, uint32_t y) {
    acc += bf16_daz(uint16_t(x)) * bf16_daz(uint16_t(y));
    return acc + bf16_daz(uint16_t(x >> 16)) * bf16_daz(uint16_t(y >> 16));
  });
}

void emu_dpbsud(int c, int a, int b) {
  emu_dot<int32_t>(c, a, b, "tdpbsud", [](int32_t acc, uint32_t x, uint32_t y) {
    uint32_t sum = uint32_t(acc);  // int32 sums wrap, as the instruction's do
    for (int i = 0; i < 4; ++i)
      sum += uint32_t(int32_t(int8_t(x >> (8 * i))) * int32_t(uint8_t(y >> (8 * i))));
    return int32_t(sum);
  });
}

TileConfig scope_begin(bool emulated) {
  static const TileConfig full = full_tiles();
  TileConfig saved;
#if LLMK_HAS_AMX_ASM
  if (!emulated) {
    Hardware::store_config(&saved);
    Hardware::configure(full);
    return saved;
  }
#endif
  Emulated::store_config(&saved);
  Emulated::configure(full);
  return saved;
}

void scope_end(bool emulated, const TileConfig& saved) {
  const bool had = saved.palette != 0;
#if LLMK_HAS_AMX_ASM
  if (!emulated) {
    if (had) Hardware::configure(saved); else Hardware::release();
    return;
  }
#endif
  if (had) Emulated::configure(saved); else Emulated::release();
}

std::string scope_selftest() {
  TileConfig theirs;
  theirs.palette = 1;
  theirs.rows[0] = 4;
  theirs.colsb[0] = 32;
  theirs.rows[3] = 16;
  theirs.colsb[3] = 16;
  emu_configure(theirs);
  TileConfig seen;
  const TileConfig saved = scope_begin(true);
  emu_store_config(&seen);
  const TileConfig full = full_tiles();
  if (std::memcmp(&seen, &full, sizeof seen) != 0) return "the scope did not load full_tiles()";
  scope_end(true, saved);
  emu_store_config(&seen);
  if (std::memcmp(&seen, &theirs, sizeof seen) != 0) return "the caller's configuration was lost";
  emu_release();
  scope_end(true, scope_begin(true));
  emu_store_config(&seen);
  if (seen.palette != 0) return "a thread without tiles was left configured";
  return "";
}

bool emulation_requested() {
  static const bool on = [] {
    const char* v = std::getenv("LLMKERNELS_AMX_EMULATE");
    return v && std::strcmp(v, "1") == 0;
  }();
  return on;
}

namespace {

// C = A B (+ a nonzero C) through ops O on small integers: every product and sum is exact,
// so the hardware and the model must agree bit for bit. Distinct A and B catch swapped
// operands; the nonzero C catches a lost accumulation; A's rows 128 bytes apart, a stride
// taken for the base or lost.
template <class O>
void self_check_product(float* out) {
  alignas(64) uint32_t A[kTileRows * 2 * kTileWords], B[kTileRows * kTileWords];
  alignas(64) float C[kTileRows * kTileWords];
  auto bf = [](int v) { float f = float(v); uint32_t u; std::memcpy(&u, &f, 4); return u >> 16; };
  for (int i = 0; i < kTileRows * 2 * kTileWords; ++i)
    A[i] = bf((i * 7) % 11 - 5) | (bf((i * 3) % 7 - 3) << 16);
  for (int i = 0; i < kTileRows * kTileWords; ++i) {
    B[i] = bf((i * 5) % 13 - 6) | (bf((i * 11) % 5 - 2) << 16);
    C[i] = float(i % 9 - 4);
  }
  const TileConfig cfg = full_tiles();
  O::configure(cfg);
  O::template load<1>(C, 64);
  O::template load<4>(A, 128);
  O::template load<6>(B, 64);
  O::template dp<1, 4, 6>();
  O::template store<1>(out, 64);
  // The same tiles as bytes: int32 sums of signed A bytes times unsigned B bytes.
  O::template zero<2>();
  O::template dp_s8u8<2, 4, 6>();
  O::template store<2>(out + kTileRows * kTileWords, 64);
  // The configuration reads back as loaded, and as zeros once released (TileScope relies on
  // both to put a caller's configuration back).
  TileConfig seen;
  O::store_config(&seen);
  std::memcpy(out + 2 * kTileRows * kTileWords, &seen, sizeof seen);
  O::release();
  O::store_config(&seen);
  std::memcpy(out + 2 * kTileRows * kTileWords + 16, &seen, sizeof seen);
}

constexpr int kSelfCheckFloats = 2 * kTileRows * kTileWords + 32;  // two products, two configs

#if LLMK_HAS_AMX_ASM && defined(__linux__)
// The tile data state for this process (process-wide, and inherited by forked children).
bool request_tile_permission(std::string* why) {
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXtiledata) != 0) {
    *why = "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; kernel < 5.16?)";
    return false;
  }
  unsigned long bits = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bits) != 0 || !(bits & (1ul << kXtiledata))) {
    *why = "Linux did not grant the AMX tile state (arch_prctl ARCH_GET_XCOMP_PERM)";
    return false;
  }
  return true;
}
#endif

}  // namespace

bool forked_self_check(std::string* why) {
#if LLMK_HAS_AMX_ASM && defined(__linux__)
  // The first tile instructions run in a forked child: if they fault (a kernel or hypervisor
  // that hides the state, or a mistake of ours), the child dies and the tier is disabled,
  // instead of `import llmkernels` crashing. The child only runs the product and compares
  // memory (no allocation after fork in a multithreaded process).
  alignas(64) float model[kSelfCheckFloats];
  self_check_product<Emulated>(model);
  const pid_t pid = fork();
  if (pid == 0) {
    // A fault is an expected answer here: the default action, not the parent's handlers
    // (Python's faulthandler, which pytest enables, printed "Fatal Python error: Illegal
    // instruction" and a traceback for the child on CPUs without AMX).
    std::signal(SIGILL, SIG_DFL);
    std::signal(SIGSEGV, SIG_DFL);
    std::signal(SIGBUS, SIG_DFL);
    alignas(64) float hw[kSelfCheckFloats];
    self_check_product<Hardware>(hw);
    _exit(std::memcmp(hw, model, sizeof hw) == 0 ? 0 : 1);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid) {
    *why = "could not fork to run the AMX self-check";
    return false;
  }
  if (WIFSIGNALED(status)) {
    *why = "the AMX self-check died of signal " + std::to_string(WTERMSIG(status)) + " (tier disabled)";
    return false;
  }
  if (WEXITSTATUS(status) != 0) {
    *why = "the AMX self-check product differs from the software model (tier disabled)";
    return false;
  }
  return true;
#else
  *why = "AMX tiles are only used on Linux x86-64";
  return false;
#endif
}

namespace {

bool check_hardware(std::string* why) {
  const CpuFeatures& f = cpu_features();
  if (!(f.amx_tile && f.amx_bf16 && f.amx_int8)) {
    *why = "the CPU (or the OS, XCR0) has no AMX-BF16 and AMX-INT8 tiles";
    return false;
  }
#if LLMK_HAS_AMX_ASM && defined(__linux__)
  if (!request_tile_permission(why)) return false;
#endif
  return forked_self_check(why);
}

}  // namespace

bool hardware_usable(std::string* why) {
  static std::string reason;
  static const bool ok = check_hardware(&reason);
  if (why) *why = reason;
  return ok;
}

bool emulated() { return !hardware_usable(nullptr) && emulation_requested(); }

}  // namespace amx
}  // namespace llmk

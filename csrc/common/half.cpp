// The branch-free float16 conversions checked against the branchy ones (half.h).
#include "common/half.h"

#include <sstream>

namespace llmk {

std::string half_conversions_selftest() {
  std::ostringstream err;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t a = f32_to_bits(f16_to_f32(uint16_t(h)));
    const uint32_t b = f32_to_bits(f16_to_f32_select(uint16_t(h)));
    if (a != b) {
      err << "f16_to_f32(0x" << std::hex << h << "): 0x" << a << " != 0x" << b;
      return err.str();
    }
  }
  // Every float whose low 12 bits are near a rounding boundary (ties, one off either side)
  // or random-looking, across all exponents and both signs.
  const uint32_t lows[] = {0x000, 0x001, 0xfff, 0x1000, 0x0fff, 0x1001, 0x0800, 0x07ff, 0x0801,
                           0x1800, 0x17ff, 0x1801, 0x0a5a, 0x1234};
  for (uint32_t sign = 0; sign < 2; ++sign)
    for (uint32_t exp = 0; exp < 256; ++exp)
      for (uint32_t high = 0; high < 2048; ++high)
        for (uint32_t low : lows) {
          const uint32_t u = (sign << 31) | (exp << 23) | ((high << 12) & 0x7ff000u) | low;
          const float f = bits_to_f32(u);
          if (f32_to_f16(f) != f32_to_f16_select(f)) {
            err << "f32_to_f16(0x" << std::hex << u << "): 0x" << f32_to_f16(f) << " != 0x"
                << f32_to_f16_select(f);
            return err.str();
          }
        }
  return "";
}

}  // namespace llmk

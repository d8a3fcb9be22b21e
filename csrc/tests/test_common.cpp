// 16-bit float widening against the compiler's own conversions, over every bit pattern.
#include <cmath>
#include <cstdio>

#include "check.h"
#include "fastcore/common.h"

using fastcore::bfloat16_bits_to_float;
using fastcore::bit_cast;
using fastcore::float16_bits_to_float;

int main() {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
#if defined(__FLT16_MAX__)
    const float expected = static_cast<float>(bit_cast<_Float16>(h));
    const float actual = float16_bits_to_float(h);
    if (std::isnan(expected)) {
      FC_EXPECT(std::isnan(actual), "fp16 0x%04x should widen to NaN", bits);
    } else {
      FC_EXPECT(bit_cast<uint32_t>(actual) == bit_cast<uint32_t>(expected), "fp16 0x%04x -> %g, expected %g", bits,
                actual, expected);
    }
#endif
    const float widened = bfloat16_bits_to_float(h);
    FC_EXPECT((bit_cast<uint32_t>(widened) >> 16) == bits && (bit_cast<uint32_t>(widened) & 0xffffu) == 0,
              "bf16 0x%04x", bits);
  }
  // Spot values that do not depend on _Float16 support.
  FC_EXPECT(float16_bits_to_float(0x3c00) == 1.0f, "fp16 one");
  FC_EXPECT(float16_bits_to_float(0xc000) == -2.0f, "fp16 minus two");
  FC_EXPECT(float16_bits_to_float(0x0001) == 5.9604644775390625e-8f, "fp16 smallest subnormal");
  FC_EXPECT(std::isinf(float16_bits_to_float(0x7c00)), "fp16 inf");
  std::printf("test_common: %d failure(s)\n", fc_failures());
  return fc_failures() == 0 ? 0 : 1;
}

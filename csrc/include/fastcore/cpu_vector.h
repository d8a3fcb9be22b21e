// CPU-only vector helpers shared by the CPU kernels (never included by .cu files): 8-lane float32
// vectors in GCC's vector extensions, lowered to AVX-512, AVX2 or SSE by the target clone of the
// calling function (FC_CPU_CLONES, defined in cpu_isa.h), so one binary is fast everywhere and portable.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/cpu_isa.h"

// 32-byte vectors only live inside inline functions; the psABI note does not apply. The helpers taking
// or returning them are always inlined: an out-of-line copy is compiled for the default target and
// passes vectors in memory, while its target_clones callers expect them in registers (a crash).
#pragma GCC diagnostic ignored "-Wpsabi"
#define FC_VECTOR_INLINE inline __attribute__((always_inline))

namespace fastcore {

typedef float Float8Lanes __attribute__((vector_size(32)));
typedef int32_t Int8Lanes __attribute__((vector_size(32)));

// mask ? a : b for a lane mask of all-ones/all-zeros, as bit operations (plain vector and/or on every ISA).
FC_VECTOR_INLINE Float8Lanes select_lanes(Int8Lanes mask, Float8Lanes a, Float8Lanes b) {
  return reinterpret_cast<Float8Lanes>((reinterpret_cast<Int8Lanes>(a) & mask) |
                                       (reinterpret_cast<Int8Lanes>(b) & ~mask));
}

// exp(x) for 8 float32 lanes at once: x = n ln2 + r with |r| ≤ ln2/2, exp(r) by its degree-7 Taylor
// polynomial (truncation < 5e-9 relative), 2^n through the exponent bits. Below −87.3 it returns 0
// (true value < 1.2e-38); above 88.7 +inf; NaN propagates.
FC_VECTOR_INLINE Float8Lanes exp_lanes(Float8Lanes x) {
  const Float8Lanes low_limit = Float8Lanes{} - 87.3f, high_limit = Float8Lanes{} + 88.7f;
  const Int8Lanes too_low = x<low_limit, too_high = x> high_limit, is_nan = x != x;
  const Float8Lanes clamped = select_lanes(too_low, low_limit, select_lanes(too_high, high_limit, x));
  // Round to nearest by adding and removing 1.5·2^23 (no libm call, so it vectorises).
  const Float8Lanes n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // Cody–Waite split of ln2 so r is exact to float precision.
  Float8Lanes r = clamped - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  Float8Lanes poly = Float8Lanes{} + 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const Int8Lanes exponent_bits = (__builtin_convertvector(n, Int8Lanes) + 127) << 23;
  Float8Lanes result = poly * reinterpret_cast<Float8Lanes>(exponent_bits);
  result = select_lanes(too_low, Float8Lanes{}, result);
  result = select_lanes(too_high, Float8Lanes{} + INFINITY, result);
  return select_lanes(is_nan, x, result);
}

}  // namespace fastcore

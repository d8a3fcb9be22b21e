// float -> bfloat16 / float16 bit conversions (round to nearest, ties to even), torch-free, shared by
// the mux CPU and CUDA kernels; the widening direction lives in fastcore/common.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace mux {

// bfloat16 is float32's top half: add half an ulp of the kept part (+1 when the kept lsb is odd, for
// ties to even) and truncate. NaN stays a quiet NaN.
FC_HOST_DEVICE uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// IEEE binary32 -> binary16. Normal results rebias the exponent (127 -> 15) and round the 23-bit
// mantissa to 10 bits (a carry correctly bumps the exponent); |x| < 2^-14 becomes a subnormal
// round(|x| · 2^24); |x| >= 65520 overflows to inf.
FC_HOST_DEVICE uint16_t float_to_float16_bits(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (magnitude < 0x38800000u) {
    const float scaled = bit_cast<float>(magnitude) * 16777216.0f;  // exact: a power-of-two scaling
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(rintf(scaled)));
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
}

// Writes `value` as element `offset` of a tensor of kind `kind`.
template <typename Acc>
FC_HOST_DEVICE void store_as(void* data, ScalarKind kind, int64_t offset, Acc value) {
  switch (kind) {
    case ScalarKind::kFloat32:
      static_cast<float*>(data)[offset] = static_cast<float>(value);
      break;
    case ScalarKind::kFloat16:
      static_cast<uint16_t*>(data)[offset] = float_to_float16_bits(static_cast<float>(value));
      break;
    case ScalarKind::kBFloat16:
      static_cast<uint16_t*>(data)[offset] = float_to_bfloat16_bits(static_cast<float>(value));
      break;
    case ScalarKind::kFloat64:
    default:
      static_cast<double*>(data)[offset] = static_cast<double>(value);
      break;
  }
}

}  // namespace mux
}  // namespace fastcore

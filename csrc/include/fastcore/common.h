// Torch-free basics shared by every kernel: host/device qualifiers, scalar kinds, bit casts, the
// 16-bit float conversions (both directions) and the load/store of a tensor element by ScalarKind.
// Kernels take raw pointers plus a ScalarKind, so this header (and everything under csrc/kernels/)
// compiles with a plain C++17 compiler or nvcc, never torch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#define FC_DEVICE __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#define FC_DEVICE inline
#endif

namespace fastcore {

// The element type of an input tensor, as the torch layer tells the kernel.
enum class ScalarKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

template <typename To, typename From>
FC_HOST_DEVICE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// ---- 16-bit floats: the one implementation of both directions (exhaustively checked in
// csrc/tests/test_half.cpp, float16 narrowing against the x86 F16C instruction on every float32).

// bfloat16 is the top half of a float32: widening is a shift, exact for every value incl. NaN/inf.
FC_HOST_DEVICE float bfloat16_bits_to_float(uint16_t bits) {
  return bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// IEEE binary16 -> binary32, exact for every one of the 65536 inputs: normal numbers rebias the
// exponent (15 -> 127), subnormals are mantissa * 2^-24 (exactly representable in float32), inf/NaN
// keep their payload.
FC_HOST_DEVICE float float16_bits_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0x1fu) return bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0u) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -magnitude : magnitude;
  }
  return bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float32 -> bfloat16, round to nearest, ties to even: add 0x7fff (+1 when the kept lsb is odd) and
// truncate the low 16 bits. A carry out of the mantissa bumps the exponent, so from the midpoint
// between the largest bfloat16 and 2^128 up, values become inf, as IEEE says. NaN: quiet bit set,
// sign and top payload bits kept.
FC_HOST_DEVICE uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// float32 -> IEEE binary16, round to nearest, ties to even, integer arithmetic only (no dependence
// on the floating-point rounding mode or on flush-to-zero):
//   |x| >= 65520 (65504 + half an ulp, a tie that rounds to the even inf) -> ±inf;
//   2^-14 <= |x| < 65520: rebias the exponent (127 -> 15) and round away the 13 low mantissa bits
//     (a carry out of the mantissa bumps the exponent, which is the correctly rounded result);
//   |x| < 2^-14: the subnormal round(|x| / 2^-24) = round(m · 2^(e - 126)) for the 24-bit significand
//     m and biased exponent e, i.e. m shifted right by 126 - e in [14, 24] with the shifted-out bits
//     rounded (1024 = the smallest normal when it carries); |x| < 2^-25 (e < 102) is ±0;
//   NaN: quiet bit set, sign and top 9 payload bits kept (what F16C's vcvtps2ph does).
FC_HOST_DEVICE uint16_t float_to_float16_bits(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (magnitude >= 0x38800000u) {
    const uint32_t rebased = magnitude - (112u << 23);
    return static_cast<uint16_t>(sign | ((rebased + 0xfffu + ((rebased >> 13) & 1u)) >> 13));
  }
  if (magnitude < 0x33000000u) return static_cast<uint16_t>(sign);
  const uint32_t shift = 126u - (magnitude >> 23);
  const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t kept = significand >> shift, rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return static_cast<uint16_t>(sign | (kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u)));
}

// Math functions in the argument's own precision on host and device (unqualified exp(float) may
// resolve to the double version on the host).
FC_HOST_DEVICE float fc_exp(float x) { return expf(x); }
FC_HOST_DEVICE double fc_exp(double x) { return exp(x); }
FC_HOST_DEVICE float fc_log(float x) { return logf(x); }
FC_HOST_DEVICE double fc_log(double x) { return log(x); }
FC_HOST_DEVICE float fc_erf(float x) { return erff(x); }
FC_HOST_DEVICE double fc_erf(double x) { return erf(x); }

// Reads element `offset` of a tensor of kind `kind` and widens it to Acc (float or double).
template <typename Acc>
FC_HOST_DEVICE Acc load_as(const void* data, ScalarKind kind, int64_t offset) {
  switch (kind) {
    case ScalarKind::kFloat32: return static_cast<Acc>(static_cast<const float*>(data)[offset]);
    case ScalarKind::kFloat16:
      return static_cast<Acc>(float16_bits_to_float(static_cast<const uint16_t*>(data)[offset]));
    case ScalarKind::kBFloat16:
      return static_cast<Acc>(bfloat16_bits_to_float(static_cast<const uint16_t*>(data)[offset]));
    case ScalarKind::kFloat64:
    default: return static_cast<Acc>(static_cast<const double*>(data)[offset]);
  }
}

// Writes `value` as element `offset` of a tensor of kind `kind`, the inverse of load_as. 16-bit
// kinds are rounded from float32 (a double is rounded to float32 first, as torch's own
// double -> Half / BFloat16 conversions do).
template <typename Acc>
FC_HOST_DEVICE void store_as(void* data, ScalarKind kind, int64_t offset, Acc value) {
  switch (kind) {
    case ScalarKind::kFloat32: static_cast<float*>(data)[offset] = static_cast<float>(value); break;
    case ScalarKind::kFloat16:
      static_cast<uint16_t*>(data)[offset] = float_to_float16_bits(static_cast<float>(value));
      break;
    case ScalarKind::kBFloat16:
      static_cast<uint16_t*>(data)[offset] = float_to_bfloat16_bits(static_cast<float>(value));
      break;
    case ScalarKind::kFloat64:
    default: static_cast<double*>(data)[offset] = static_cast<double>(value); break;
  }
}

}  // namespace fastcore

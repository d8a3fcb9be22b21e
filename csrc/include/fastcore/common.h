// Torch-free basics shared by every kernel: host/device qualifiers, scalar kinds, bit casts and
// the 16-bit float conversions. Kernels take raw pointers plus a ScalarKind, so this header (and
// everything under csrc/kernels/) compiles with a plain C++17 compiler or nvcc, never torch.
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

// bfloat16 is the top half of a float32: widening is a shift, exact for every value incl. NaN/inf.
FC_HOST_DEVICE float bfloat16_bits_to_float(uint16_t bits) {
  return bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// IEEE binary16 -> binary32, exact for every one of the 65536 inputs (checked exhaustively in
// csrc/tests/test_common.cpp): normal numbers rebias the exponent (15 -> 127), subnormals are
// mantissa * 2^-24 (exactly representable in float32), inf/NaN keep their payload.
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
    case ScalarKind::kFloat32:
      return static_cast<Acc>(static_cast<const float*>(data)[offset]);
    case ScalarKind::kFloat16:
      return static_cast<Acc>(float16_bits_to_float(static_cast<const uint16_t*>(data)[offset]));
    case ScalarKind::kBFloat16:
      return static_cast<Acc>(bfloat16_bits_to_float(static_cast<const uint16_t*>(data)[offset]));
    case ScalarKind::kFloat64:
    default:
      return static_cast<Acc>(static_cast<const double*>(data)[offset]);
  }
}

}  // namespace fastcore

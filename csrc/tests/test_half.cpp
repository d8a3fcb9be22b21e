// The 16-bit float conversions of fastcore/common.h, exhaustively:
//   * every float16 / bfloat16 bit pattern widens to the exact value (checked against an independent
//     decoding in double) and narrows back to the same bits (NaN: stays a quiet NaN, sign kept);
//   * float32 -> float16 on every one of the 2^32 float32 patterns against the x86 F16C instruction
//     (vcvtps2ph, round to nearest even) where the CPU has it;
//   * float32 -> bfloat16 on every low 16-bit half under every sign and exponent (kept lsb even and
//     odd, with and without a carry into the exponent) against an explicit round-half-even of the
//     low bits;
//   * both narrowings on a structured set (every 16-bit value, the exact midpoint to its neighbour and
//     ±1, ±2 float32 ulps around both, every float32 exponent with a strided mantissa sweep, and the
//     specials) against references computed in double with explicit round-half-even. Without F16C
//     this is the float16 check, and the output says so.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FC_TEST_HAS_F16C_PATH 1
#include <immintrin.h>
#endif

#include "check.h"
#include "fastcore/common.h"

using fastcore::bfloat16_bits_to_float;
using fastcore::bit_cast;
using fastcore::float16_bits_to_float;
using fastcore::float_to_bfloat16_bits;
using fastcore::float_to_float16_bits;

namespace {

constexpr int kMaxReports = 10;  // mismatches printed per check (all are counted)

bool is_nan_bits(uint32_t bits) { return (bits & 0x7fffffffu) > 0x7f800000u; }

// x rounded to a multiple of 2^q, ties to even, in double (exact: |x| / 2^q < 2^53 here).
double round_half_even(double x, int q) {
  const double t = std::ldexp(x, -q), floor_t = std::floor(t), frac = t - floor_t;
  const bool up = frac > 0.5 || (frac == 0.5 && std::fmod(floor_t, 2.0) != 0.0);
  return std::ldexp(up ? floor_t + 1.0 : floor_t, q);
}

// Reference float32 -> float16 in double: 11 significant bits, quantum 2^-24 below 2^-14, inf from
// 65536 (the rounded value) up; NaN -> quiet, sign and top payload kept (the rule common.h states).
uint16_t float16_reference(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (is_nan_bits(bits)) return static_cast<uint16_t>(sign | 0x7e00u | ((bits >> 13) & 0x3ffu));
  const double x = std::fabs(static_cast<double>(value));
  if (std::isinf(x)) return static_cast<uint16_t>(sign | 0x7c00u);
  if (x == 0.0) return sign;
  int e = 0;
  std::frexp(x, &e);  // x = m · 2^e, m in [0.5, 1)
  const double r = round_half_even(x, e - 11 > -24 ? e - 11 : -24);
  if (r >= 65536.0) return static_cast<uint16_t>(sign | 0x7c00u);
  if (r < 0x1p-14) return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::ldexp(r, 24)));
  const int exponent = std::ilogb(r);  // r = (1 + f) · 2^exponent, exponent in [-14, 15]
  const uint32_t fraction = static_cast<uint32_t>(std::ldexp(r, 10 - exponent)) - 1024u;
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(exponent + 15) << 10) | fraction);
}

// Reference float32 -> bfloat16 in double: 8 significant bits, quantum 2^-133 (bfloat16's smallest
// subnormal) at the bottom, inf from 2^128 up; NaN -> quiet, sign and top payload kept.
uint16_t bfloat16_reference(float value) {
  const uint32_t bits = bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  if (is_nan_bits(bits)) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const double x = std::fabs(static_cast<double>(value));
  if (std::isinf(x)) return static_cast<uint16_t>(sign | 0x7f80u);
  if (x == 0.0) return sign;
  int e = 0;
  std::frexp(x, &e);
  const double r = round_half_even(x, e - 8 > -133 ? e - 8 : -133);
  if (r >= 0x1p128) return static_cast<uint16_t>(sign | 0x7f80u);
  const uint32_t rounded = bit_cast<uint32_t>(static_cast<float>(r));  // exact: r has ≤ 8 significant bits
  FC_EXPECT((rounded & 0xffffu) == 0, "bf16 reference of 0x%08x is not a bfloat16", bits);
  return static_cast<uint16_t>(sign | (rounded >> 16));
}

// Exact value of a float16 pattern, decoded independently of common.h (NaN -> NaN).
double float16_value(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  const double sign = (h & 0x8000u) ? -1.0 : 1.0;
  if (exponent == 0x1f) return fraction ? NAN : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(fraction, -24);
  return sign * std::ldexp(1024 + fraction, exponent - 25);
}

double bfloat16_value(uint16_t h) {
  const int exponent = (h >> 7) & 0xff, fraction = h & 0x7f;
  const double sign = (h & 0x8000u) ? -1.0 : 1.0;
  if (exponent == 0xff) return fraction ? NAN : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(fraction, -133);
  return sign * std::ldexp(128 + fraction, exponent - 134);
}

// Every 16-bit pattern widens exactly and narrows back to itself; a NaN narrows to a quiet NaN of the
// same sign (bit-exactly itself when it was quiet).
template <typename Widen, typename Narrow, typename Value>
void check_round_trip(const char* name, Widen widen, Narrow narrow, Value exact, uint16_t exponent_mask,
                      uint16_t quiet_bit) {
  int reports = 0;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float wide = widen(h);
    const double expected = exact(h);
    const uint16_t back = narrow(wide);
    const bool nan = (h & exponent_mask) == exponent_mask && (h & ~(exponent_mask | 0x8000u)) != 0;
    bool ok;
    if (nan) {
      const bool back_nan = (back & exponent_mask) == exponent_mask && (back & ~(exponent_mask | 0x8000u)) != 0;
      ok = std::isnan(wide) && back_nan && (back & quiet_bit) && (back & 0x8000u) == (h & 0x8000u) &&
           ((h & quiet_bit) == 0 || back == h);
    } else {
      ok = static_cast<double>(wide) == expected && std::signbit(wide) == std::signbit(expected) && back == h;
    }
    if (!ok) {
      ++fc_failures();
      if (reports++ < kMaxReports)
        std::fprintf(stderr, "%s 0x%04x widens to %a (exact %a), narrows back to 0x%04x\n", name, h, wide, expected,
                     back);
    }
  }
}

// The structured float32 inputs: around every finite float16 (or bfloat16) value and around the exact
// midpoint to its neighbour further from zero, every float32 exponent with a strided mantissa, and
// the specials (zeros, float32 subnormals, FLT_MAX, infinities, quiet/signalling NaNs with payloads,
// the float16 overflow and underflow thresholds).
std::vector<uint32_t> structured_inputs(bool float16) {
  std::vector<uint32_t> in;
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float value = float16 ? float16_bits_to_float(h) : bfloat16_bits_to_float(h);
    if (std::isnan(value) || std::isinf(value)) continue;
    const uint32_t b = bit_cast<uint32_t>(value);
    for (int d = -2; d <= 2; ++d) in.push_back(b + static_cast<uint32_t>(d));  // the value ±1, ±2 ulp
    // The exact midpoint to the neighbour further from zero (a float32: 12 significant bits), ±1, ±2 ulp.
    const uint16_t next = static_cast<uint16_t>(h + 1);
    const float upper = float16 ? float16_bits_to_float(next) : bfloat16_bits_to_float(next);
    const double mid = (static_cast<double>(value) + static_cast<double>(upper)) / 2;     // upper may be inf:
    const float midpoint = std::isinf(upper) ? (float16 ? std::copysign(65520.0f, value)  // then the
                                                        : bit_cast<float>(b | 0x8000u))   // overflow tie
                                             : static_cast<float>(mid);
    FC_EXPECT(std::isinf(upper) || static_cast<double>(midpoint) == mid, "midpoint above 0x%04x", h);
    const uint32_t m = bit_cast<uint32_t>(midpoint);
    for (int d = -2; d <= 2; ++d) in.push_back(m + static_cast<uint32_t>(d));
  }
  for (uint32_t sign = 0; sign < 2; ++sign)
    for (uint32_t exponent = 0; exponent < 256; ++exponent)
      for (uint32_t mantissa = 0; mantissa < 0x800000u; mantissa += 4099)  // 4099: odd, hits every low-bit mix
        in.push_back((sign << 31) | (exponent << 23) | mantissa);
  const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x00800000u, 0x7f7fffffu,
                               0xff7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u, 0x7f800001u,
                               0xff800001u, 0x7fbfffffu, 0x7fffffffu, 0xffffffffu, 0x7fa02000u, 0x477fefffu,
                               0x477ff000u, 0x477ff001u, 0xc77ff000u, 0x38800000u, 0x387fffffu, 0x33000000u,
                               0x33000001u, 0x32ffffffu, 0x33800000u, 0x7f7f8000u, 0x7f7f7fffu, 0x7f7f8001u};
  for (uint32_t s : specials) in.push_back(s);
  return in;
}

template <typename Narrow, typename Reference>
void check_structured(const char* name, const std::vector<uint32_t>& inputs, Narrow narrow, Reference reference) {
  int reports = 0;
  for (uint32_t bits : inputs) {
    const float value = bit_cast<float>(bits);
    const uint16_t actual = narrow(value), expected = reference(value);
    if (actual != expected) {
      ++fc_failures();
      if (reports++ < kMaxReports)
        std::fprintf(stderr, "%s(0x%08x = %a) gave 0x%04x, reference 0x%04x\n", name, bits, value, actual, expected);
    }
  }
  std::printf("test_half: %s on %zu structured float32 inputs against the double reference\n", name, inputs.size());
}

#if defined(FC_TEST_HAS_F16C_PATH)
// Every float32 pattern, 8 at a time through vcvtps2ph (round to nearest even; MXCSR left at its
// default, so no DAZ/FTZ), compared 8 lanes at once; a mismatching group is reported lane by lane.
__attribute__((target("avx2,f16c"))) void check_float16_against_f16c() {
  int reports = 0;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (uint64_t base = 0; base < (uint64_t(1) << 32); base += 8) {
    const uint32_t b = static_cast<uint32_t>(base);
    const __m256i bits = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(b)), lanes);
    const __m128i hardware = _mm256_cvtps_ph(_mm256_castsi256_ps(bits), _MM_FROUND_TO_NEAREST_INT);
    const __m128i ours = _mm_setr_epi16(static_cast<short>(float_to_float16_bits(bit_cast<float>(b))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 1))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 2))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 3))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 4))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 5))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 6))),
                                        static_cast<short>(float_to_float16_bits(bit_cast<float>(b + 7))));
    if (_mm_movemask_epi8(_mm_cmpeq_epi16(ours, hardware)) == 0xffff) continue;
    alignas(16) uint16_t expected[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(expected), hardware);
    for (uint32_t k = 0; k < 8; ++k) {
      const uint16_t actual = float_to_float16_bits(bit_cast<float>(b + k));
      if (actual == expected[k]) continue;
      ++fc_failures();
      if (reports++ < kMaxReports)
        std::fprintf(stderr, "float16(0x%08x) gave 0x%04x, F16C 0x%04x\n", b + k, actual, expected[k]);
    }
  }
  std::printf("test_half: float16 narrowing on all 2^32 float32 patterns against F16C\n");
}
#endif

// bfloat16 rounding depends only on the low 16 bits, the kept lsb and whether the kept part is
// NaN/inf/FLT_MAX-adjacent: every low half under every sign and exponent with the top 7 mantissa bits
// 0x00, 0x01 (kept lsb even / odd, no carry) and 0x7e, 0x7f (a carry into the exponent, to inf at the
// top), against the explicit round-half-even of the low bits (NaN rule as above).
void check_bfloat16_low_halves() {
  int reports = 0;
  uint64_t count = 0;
  const uint32_t tops[] = {0x00u, 0x01u, 0x7eu, 0x7fu};
  for (uint32_t sign_exponent = 0; sign_exponent < 512; ++sign_exponent)
    for (uint32_t top : tops)
      for (uint32_t low = 0; low < 0x10000u; ++low, ++count) {
        const uint32_t bits = (sign_exponent << 23) | (top << 16) | low;
        uint32_t expected = bits >> 16;
        if (is_nan_bits(bits))
          expected |= 0x40u;
        else if (low > 0x8000u || (low == 0x8000u && (expected & 1u)))
          ++expected;  // a carry may reach inf: IEEE
        const uint16_t actual = float_to_bfloat16_bits(bit_cast<float>(bits));
        if (actual != expected) {
          ++fc_failures();
          if (reports++ < kMaxReports)
            std::fprintf(stderr, "bfloat16(0x%08x) gave 0x%04x, expected 0x%04x\n", bits, actual, expected);
        }
      }
  std::printf(
      "test_half: bfloat16 narrowing on %llu float32 patterns (every low half of 2048 high halves) "
      "against round-half-even of the low bits\n",
      static_cast<unsigned long long>(count));
}

}  // namespace

int main() {
  check_round_trip("float16", float16_bits_to_float, float_to_float16_bits, float16_value, 0x7c00u, 0x0200u);
  check_round_trip("bfloat16", bfloat16_bits_to_float, float_to_bfloat16_bits, bfloat16_value, 0x7f80u, 0x0040u);
  std::printf("test_half: all 2^16 float16 and bfloat16 patterns widen exactly and round-trip\n");

  // A few fixed points, readable on their own.
  FC_EXPECT(float_to_float16_bits(65504.0f) == 0x7bffu, "largest float16");
  FC_EXPECT(float_to_float16_bits(std::nextafter(65520.0f, 0.0f)) == 0x7bffu, "just below 65520");
  FC_EXPECT(float_to_float16_bits(65520.0f) == 0x7c00u, "65520 rounds to inf");
  FC_EXPECT(float_to_float16_bits(-65520.0f) == 0xfc00u, "-65520 rounds to -inf");
  FC_EXPECT(float_to_float16_bits(0x1p-25f) == 0x0000u, "2^-25 ties to +0");
  FC_EXPECT(float_to_float16_bits(-0x1p-25f) == 0x8000u, "-2^-25 ties to -0");
  FC_EXPECT(float_to_float16_bits(0x1.8p-24f) == 0x0002u, "1.5 · 2^-24 ties to even 2");
  FC_EXPECT(float_to_float16_bits(1.0f + 0x1p-11f) == 0x3c00u, "1 + half an ulp ties to 1");
  FC_EXPECT(float_to_float16_bits(std::nanf("")) == 0x7e00u, "quiet NaN");
  FC_EXPECT(float_to_bfloat16_bits(1.0f + 0x1p-8f) == 0x3f80u, "bf16 1 + half an ulp ties to 1");
  FC_EXPECT(float_to_bfloat16_bits(bit_cast<float>(0x7f7fffffu)) == 0x7f80u, "bf16 FLT_MAX rounds to inf");
  FC_EXPECT(float_to_bfloat16_bits(bit_cast<float>(0xff800001u)) == 0xffc0u, "bf16 signalling NaN -> quiet");

  check_structured("float16", structured_inputs(true), float_to_float16_bits, float16_reference);
  check_structured("bfloat16", structured_inputs(false), float_to_bfloat16_bits, bfloat16_reference);

#if defined(FC_TEST_HAS_F16C_PATH)
  if (__builtin_cpu_supports("f16c")) {
    check_float16_against_f16c();
  } else {
    std::printf("test_half: this CPU has no F16C: float16 narrowing checked against the double reference only\n");
  }
#else
  std::printf("test_half: not x86: float16 narrowing checked against the double reference only\n");
#endif
  check_bfloat16_low_halves();

  std::printf("test_half: %d failure(s)\n", fc_failures());
  return fc_failures() == 0 ? 0 : 1;
}

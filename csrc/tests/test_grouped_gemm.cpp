// The host-side pieces of the CUDA grouped GEMM (moe/grouped_gemm.h), which the kernel uses unchanged:
// the float32 -> float16 / bfloat16 round-to-nearest-even conversions (exhaustively: every 16-bit value
// round-trips, every midpoint between neighbours ties to even, and values just above / below a midpoint
// round to the nearer neighbour), the per-element epilogue against the formulas written out here, and
// the grid bound. Run under ASan/UBSan in CI (cmake -DFASTCORE_SANITIZE=ON).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "check.h"
#include "moe/grouped_gemm.h"

using namespace fastcore;
using namespace fastcore::moe;

namespace {

float bits_to_float(uint32_t bits) { return bit_cast<float>(bits); }

// Every finite 16-bit value round-trips, midpoints tie to even, and nudging a midpoint by one float32
// ulp picks the nearer neighbour. `widen` maps 16-bit patterns to float32, `narrow` is under test.
template <typename Widen, typename Narrow>
void check_conversion(const char* name, Widen widen, Narrow narrow, uint32_t inf_bits) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint32_t magnitude = h & 0x7fffu;
    const float value = widen(static_cast<uint16_t>(h));
    if (magnitude > inf_bits) {  // NaN stays NaN
      FC_EXPECT(std::isnan(widen(narrow(value))), "%s: NaN 0x%04x", name, h);
      continue;
    }
    FC_EXPECT(narrow(value) == h, "%s: round trip of 0x%04x gave 0x%04x", name, h, narrow(value));
    if (magnitude >= inf_bits) continue;
    const uint16_t next = static_cast<uint16_t>(h + 1);  // the neighbour further from zero
    if ((next & 0x7fffu) > inf_bits) continue;
    const float upper = widen(next);
    if (std::isinf(upper)) continue;
    const double mid = (static_cast<double>(value) + static_cast<double>(upper)) / 2;
    const float midpoint = static_cast<float>(mid);
    if (static_cast<double>(midpoint) != mid) continue;  // not representable in float32
    const uint16_t even = (h & 1u) == 0 ? static_cast<uint16_t>(h) : next;
    FC_EXPECT(narrow(midpoint) == even, "%s: midpoint above 0x%04x gave 0x%04x", name, h, narrow(midpoint));
    const float below = std::nextafter(midpoint, value), above = std::nextafter(midpoint, upper);
    FC_EXPECT(narrow(below) == h, "%s: just below the midpoint above 0x%04x", name, h);
    FC_EXPECT(narrow(above) == next, "%s: just above the midpoint above 0x%04x", name, h);
  }
}

void check_overflow_and_tiny() {
  FC_EXPECT(float_to_float16_bits(65504.0f) == 0x7bffu, "largest half");
  FC_EXPECT(float_to_float16_bits(65519.99f) == 0x7bffu, "below the overflow threshold");
  FC_EXPECT(float_to_float16_bits(65520.0f) == 0x7c00u, "65520 rounds to inf");
  FC_EXPECT(float_to_float16_bits(-1e30f) == 0xfc00u, "-inf");
  FC_EXPECT(float_to_float16_bits(bits_to_float(0x33000000u)) == 0x0000u, "2^-25 ties to +0");
  FC_EXPECT(float_to_float16_bits(bits_to_float(0x33000001u)) == 0x0001u, "just above 2^-25 rounds up");
  FC_EXPECT(float_to_float16_bits(1e-30f) == 0x0000u, "tiny rounds to 0");
  FC_EXPECT(float_to_bfloat16_bits(bits_to_float(0x7f7fffffu)) == 0x7f80u, "bf16 overflow to inf");
  FC_EXPECT(float_to_bfloat16_bits(bits_to_float(0x7fc00001u)) >> 7 == 0xffu, "bf16 NaN stays NaN");
}

void check_epilogue() {
  const int64_t S = 3, N = 4;
  std::vector<float> gate_up(S * 2 * N), h(S * N, NAN), c(S * 2 * N, NAN), scale = {0.5f, 2.0f, -1.0f};
  GroupedGemmParams p;
  p.kind = ScalarKind::kFloat32;
  p.n = N;
  p.rows = S;
  // kStore with a routing weight.
  p.epilogue = GemmEpilogue::kStore;
  p.c = c.data();
  p.c_row_stride = N;
  p.row_scale = scale.data();
  grouped_gemm_epilogue(p, 1, 2, 3.0f, 0.0f);
  FC_EXPECT(c[1 * N + 2] == 6.0f, "store scales by row_scale");
  // kActForward, gated SiLU: h = silu(gate) * up; gate_up saved.
  p.epilogue = GemmEpilogue::kActForward;
  p.gated = true;
  p.activation = Activation::kSilu;
  p.gate_up_out = gate_up.data();
  p.h = h.data();
  grouped_gemm_epilogue(p, 2, 1, 1.5f, -2.0f);
  const float silu = 1.5f / (1.0f + std::exp(-1.5f));
  FC_EXPECT(std::fabs(h[2 * N + 1] - silu * -2.0f) < 1e-6f, "gated forward h");
  FC_EXPECT(gate_up[2 * 2 * N + 1] == 1.5f && gate_up[2 * 2 * N + N + 1] == -2.0f, "gate_up saved");
  // kActBackward, gated GELU: grad_gate = grad_h * up * gelu'(gate), grad_up = grad_h * gelu(gate).
  p.epilogue = GemmEpilogue::kActBackward;
  p.activation = Activation::kGelu;
  p.gate_up_in = gate_up.data();
  p.c = c.data();
  p.c_row_stride = 2 * N;
  grouped_gemm_epilogue(p, 2, 1, 0.25f, 0.0f);
  const double g = 1.5, cdf = 0.5 * (1 + std::erf(g / std::sqrt(2.0)));
  const double slope = cdf + g * std::exp(-0.5 * g * g) / std::sqrt(2 * 3.14159265358979323846);
  FC_EXPECT(std::fabs(c[2 * 2 * N + 1] - 0.25 * -2.0 * slope) < 1e-6, "grad_gate");
  FC_EXPECT(std::fabs(c[2 * 2 * N + N + 1] - 0.25 * g * cdf) < 1e-6, "grad_up");
  FC_EXPECT(std::fabs(h[2 * N + 1] - g * cdf * -2.0) < 1e-5, "recomputed h");
  // bf16 output: one rounding of the float32 value.
  std::vector<uint16_t> c16(S * N, 0);
  p.epilogue = GemmEpilogue::kStore;
  p.kind = ScalarKind::kBFloat16;
  p.c = c16.data();
  p.c_row_stride = N;
  p.row_scale = nullptr;
  grouped_gemm_epilogue(p, 0, 3, 1.00390625f, 0.0f);  // 1 + 2^-8: a bf16 midpoint, ties to even (1.0)
  FC_EXPECT(c16[3] == 0x3f80u, "bf16 store ties to even, got 0x%04x", c16[3]);
}

void check_grid_bound() {
  // Σ_e ceil(rows_e / 64) <= bound for every split of S rows over E experts (checked on extreme splits).
  for (int64_t E = 1; E <= 9; ++E)
    for (int64_t S = 0; S <= 300; S += 7) {
      const int64_t bound = grouped_gemm_max_tiles(S, E);
      for (int64_t nonempty = 1; nonempty <= E; ++nonempty) {
        int64_t tiles = 0, left = S;
        for (int64_t e = 0; e < nonempty; ++e) {
          const int64_t rows = e + 1 == nonempty ? left : std::min<int64_t>(left, 1);
          tiles += (rows + kGemmBlockM - 1) / kGemmBlockM;
          left -= rows;
        }
        FC_EXPECT(tiles <= bound, "tiles %lld > bound %lld (S=%lld E=%lld)", (long long)tiles, (long long)bound,
                  (long long)S, (long long)E);
      }
    }
}

}  // namespace

int main() {
  check_conversion(
      "float16", [](uint16_t b) { return float16_bits_to_float(b); }, [](float v) { return float_to_float16_bits(v); },
      0x7c00u);
  check_conversion(
      "bfloat16", [](uint16_t b) { return bfloat16_bits_to_float(b); },
      [](float v) { return float_to_bfloat16_bits(v); }, 0x7f80u);
  check_overflow_and_tiny();
  check_epilogue();
  check_grid_bound();
  std::printf("test_grouped_gemm: %d failure(s)\n", fc_failures());
  return fc_failures() == 0 ? 0 : 1;
}

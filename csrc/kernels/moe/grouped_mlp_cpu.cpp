// CPU loops of the expert MLP's fused activation (math in grouped_mlp.h).
#include <cstring>

#include "fastcore/cpu_vector.h"
#include "moe/grouped_mlp.h"

namespace fastcore {
namespace moe {
namespace {

// The common case (float32, SiLU), 8 lanes at a time: silu(g) = g / (1 + exp(−g)) with the vector exp.
// Returns the first column it did not handle (the caller finishes the row with the scalar body).
FC_CPU_CLONES int64_t silu_forward_vector(const float* gate, const float* up, float* h, int64_t inner, bool gated) {
  int64_t i = 0;
  for (; i + 8 <= inner; i += 8) {
    Float8Lanes g, u = Float8Lanes{} + 1.0f;
    std::memcpy(&g, gate + i, sizeof(g));
    if (gated) std::memcpy(&u, up + i, sizeof(u));
    const Float8Lanes out = g / (1.0f + exp_lanes(-g)) * u;
    std::memcpy(h + i, &out, sizeof(out));
  }
  return i;
}

// The SiLU backward (float32), 8 lanes at a time: with s = σ(g) = 1 / (1 + exp(−g)),
// silu(g) = g s and silu'(g) = s (1 + g (1 − s)); gated: grad_gate = grad_h · up · silu'(gate),
// grad_up = grad_h · silu(gate); plain: grad_g = grad_h · silu'(g). Returns the first column not handled.
FC_CPU_CLONES int64_t silu_backward_vector(const float* gate, const float* up, const float* grad_h, float* grad_gate,
                                           float* grad_up, int64_t inner, bool gated) {
  int64_t i = 0;
  for (; i + 8 <= inner; i += 8) {
    Float8Lanes g, gh;
    std::memcpy(&g, gate + i, sizeof(g));
    std::memcpy(&gh, grad_h + i, sizeof(gh));
    const Float8Lanes s = 1.0f / (1.0f + exp_lanes(-g));
    const Float8Lanes derivative = s * (1.0f + g * (1.0f - s));
    if (gated) {
      Float8Lanes u;
      std::memcpy(&u, up + i, sizeof(u));
      const Float8Lanes grad_gate_lanes = gh * u * derivative, grad_up_lanes = gh * (g * s);
      std::memcpy(grad_gate + i, &grad_gate_lanes, sizeof(grad_gate_lanes));
      std::memcpy(grad_up + i, &grad_up_lanes, sizeof(grad_up_lanes));
    } else {
      const Float8Lanes grad_lanes = gh * derivative;
      std::memcpy(grad_gate + i, &grad_lanes, sizeof(grad_lanes));
    }
  }
  return i;
}

template <typename Acc>
void forward_rows(const GatedActivationParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t I = p.inner, width = p.gated ? 2 * I : I;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Acc* gu = static_cast<const Acc*>(p.gate_up) + r * width;
    Acc* h = static_cast<Acc*>(p.h) + r * I;
    int64_t first = 0;
    if constexpr (sizeof(Acc) == sizeof(float))
      if (p.activation == Activation::kSilu) first = silu_forward_vector(gu, p.gated ? gu + I : nullptr, h, I, p.gated);
    for (int64_t i = first; i < I; ++i) {
      const Acc a = activation_value(p.activation, gu[i]);
      h[i] = p.gated ? a * gu[I + i] : a;
    }
  }
}

template <typename Acc>
void backward_rows(const GatedActivationParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t I = p.inner, width = p.gated ? 2 * I : I;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const Acc* gu = static_cast<const Acc*>(p.gate_up) + r * width;
    const Acc* gh = static_cast<const Acc*>(p.grad_h) + r * I;
    Acc* ggu = static_cast<Acc*>(p.grad_gate_up) + r * width;
    int64_t first = 0;
    if constexpr (sizeof(Acc) == sizeof(float))
      if (p.activation == Activation::kSilu)
        first = silu_backward_vector(gu, p.gated ? gu + I : nullptr, gh, ggu, p.gated ? ggu + I : nullptr, I, p.gated);
    for (int64_t i = first; i < I; ++i) {
      const Acc d = activation_derivative(p.activation, gu[i]);
      if (p.gated) {
        ggu[i] = gh[i] * gu[I + i] * d;
        ggu[I + i] = gh[i] * activation_value(p.activation, gu[i]);
      } else {
        ggu[i] = gh[i] * d;
      }
    }
  }
}

}  // namespace

void gated_activation_forward_cpu(const GatedActivationParams& params, int64_t row_begin, int64_t row_end) {
  if (params.is_double)
    forward_rows<double>(params, row_begin, row_end);
  else
    forward_rows<float>(params, row_begin, row_end);
}

void gated_activation_backward_cpu(const GatedActivationParams& params, int64_t row_begin, int64_t row_end) {
  if (params.is_double)
    backward_rows<double>(params, row_begin, row_end);
  else
    backward_rows<float>(params, row_begin, row_end);
}

}  // namespace moe
}  // namespace fastcore

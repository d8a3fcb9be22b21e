// MoE expert MLP over rows grouped by expert, torch-free parts: the activation and its derivative,
// fused with the gating product, per row range.
//
// For a row x of expert e (weights in Hugging Face MixtralExperts' layout, w_gate_up [E, 2I, H],
// w_down [E, H, I]):  gu = W_gate_up[e] x;  gated: h = act(gu[:I]) ⊙ gu[I:];  plain: h = act(gu);
// y = W_down[e] h. The GEMMs run per expert segment (BLAS on the CPU); this header holds what sits
// between them, written once for every backend.
//   silu(g) = g σ(g),                silu'(g) = σ(g) (1 + g (1 − σ(g)))
//   gelu(g) = g Φ(g) (exact, erf),   gelu'(g) = Φ(g) + g φ(g)
//   relu(g) = max(g, 0),             relu'(g) = [g > 0]
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace moe {

enum class Activation : int32_t { kSilu = 0, kGelu = 1, kRelu = 2 };

template <typename Acc>
FC_HOST_DEVICE Acc activation_value(Activation act, Acc g) {
  switch (act) {
    case Activation::kSilu: return g / (Acc(1) + fc_exp(-g));
    case Activation::kGelu: return Acc(0.5) * g * (Acc(1) + fc_erf(g * Acc(0.70710678118654752440)));
    case Activation::kRelu:
    default: return g > Acc(0) ? g : Acc(0);
  }
}

template <typename Acc>
FC_HOST_DEVICE Acc activation_derivative(Activation act, Acc g) {
  switch (act) {
    case Activation::kSilu: {
      const Acc s = Acc(1) / (Acc(1) + fc_exp(-g));
      return s * (Acc(1) + g * (Acc(1) - s));
    }
    case Activation::kGelu: {
      const Acc cdf = Acc(0.5) * (Acc(1) + fc_erf(g * Acc(0.70710678118654752440)));
      const Acc pdf = Acc(0.39894228040143267794) * fc_exp(Acc(-0.5) * g * g);
      return cdf + g * pdf;
    }
    case Activation::kRelu:
    default: return g > Acc(0) ? Acc(1) : Acc(0);
  }
}

// gate_up [rows, (gated ? 2 : 1)·I] and h [rows, I], grad_h / grad_gate_up alike, contiguous, in Acc
// (float or double, `is_double`).
struct GatedActivationParams {
  const void* gate_up = nullptr;
  void* h = nullptr;             // forward output
  const void* grad_h = nullptr;  // backward input
  void* grad_gate_up = nullptr;  // backward output
  int64_t rows = 0;
  int64_t inner = 0;  // I
  bool gated = true;
  bool is_double = false;
  Activation activation = Activation::kSilu;
};

// Rows [row_begin, row_end): h = act(gate) ⊙ up (or act(gu)).
void gated_activation_forward_cpu(const GatedActivationParams& params, int64_t row_begin, int64_t row_end);
// Rows [row_begin, row_end): grad_gate = grad_h ⊙ up ⊙ act'(gate), grad_up = grad_h ⊙ act(gate)
// (plain: grad_gu = grad_h ⊙ act'(gu)).
void gated_activation_backward_cpu(const GatedActivationParams& params, int64_t row_begin, int64_t row_end);

}  // namespace moe
}  // namespace fastcore

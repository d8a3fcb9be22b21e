// DataMUX multiplexing (Hadamard) and index demultiplexing (GELU + LayerNorm epilogue), torch-free.
//
// Hadamard mux:   out[b, l, :] = (1/N) Σ_i x[b, i, l, :] ⊙ v[i, :]                  x [B, N, L, d], v [N, d]
//   backward:     dx[b, i, l, :] = (1/N) dout[b, l, :] ⊙ v[i, :]
//                 dv[i, :] = (1/N) Σ_{b, l} dout[b, l, :] ⊙ x[b, i, l, :]
// (The orthogonal mux is one GEMM with K = N·d and runs as such in the torch glue.)
//
// Index demux, separable form: W [p_i ; h_t] + bias = (W_L p_i + bias) + W_R h_t = A[b, i] + C[b, t], with
// A [B, N, e] and C [B, L, e] computed by two small GEMMs (so W_L p_i is computed once per index, not
// once per token). This kernel fuses the rest per output row (b, i, t):
//   z = A[b, i] + C[b, t];  g = GELU(z) = z Φ(z);  μ = mean(g);  σ² = mean((g − μ)²)
//   out[b·N + i, t] = (g − μ) / √(σ² + eps) · γ + β
// Backward per row (ĝ = (g − μ) r, r = 1/√(σ² + eps), dy = dout row):
//   dγ += dy ĝ,  dβ += dy,  dĝ = dy γ,  dg = r (dĝ − mean(dĝ) − ĝ mean(dĝ ĝ)),
//   dz = dg (Φ(z) + z φ(z)),  dA[b, i] += dz,  dC[b, t] += dz.
// A backward task owns one b (fixed i, t order): dA, dC rows are written by one task, dγ/dβ are
// per-b partial sums reduced by the caller in b order, so results are thread-count independent.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace mux {

struct HadamardMuxParams {
  const void* x = nullptr;  // [B, N, L, d] contiguous, x_kind
  ScalarKind x_kind = ScalarKind::kFloat32;
  const void* keys = nullptr;  // [N, d] contiguous, same kind as x
  int64_t batch = 0, instances = 0, length = 0, dim = 0;
  const void* grad_out = nullptr;     // [B, L, d] contiguous, x_kind (backward)
  void* out = nullptr;                // forward: [B, L, d] x_kind
  void* grad_x = nullptr;             // backward: [B, N, L, d] x_kind
  void* grad_keys_partial = nullptr;  // backward: [B, N, d] Acc partial sums over l (nullptr: not needed)
};

struct DemuxParams {
  const void* a = nullptr;  // [B or 1, N, e] Acc (a_batch_stride 0 when shared)
  int64_t a_batch_stride = 0;
  const void* c = nullptr;      // [B, L, e] Acc
  const void* gamma = nullptr;  // [e] Acc
  const void* beta = nullptr;   // [e] Acc
  bool is_double = false;       // Acc = double (float64 inputs) or float
  int64_t batch = 0, instances = 0, length = 0, dim = 0;
  double eps = 1e-5;
  ScalarKind out_kind = ScalarKind::kFloat32;
  void* out = nullptr;                 // [B·N, L, e] out_kind
  const void* grad_out = nullptr;      // [B·N, L, e] out_kind (backward)
  void* grad_a = nullptr;              // [B, N, e] Acc (backward)
  void* grad_c = nullptr;              // [B, L, e] Acc (backward)
  void* grad_gamma_partial = nullptr;  // [B, e] Acc
  void* grad_beta_partial = nullptr;   // [B, e] Acc
};

// GELU (exact, erf form) and its derivative Φ(z) + z φ(z).
template <typename T>
FC_HOST_DEVICE T gelu_exact(T z) {
  return T(0.5) * z * (T(1) + fc_erf(z * T(0.70710678118654752440)));
}

template <typename T>
FC_HOST_DEVICE T gelu_exact_grad(T z) {
  const T cdf = T(0.5) * (T(1) + fc_erf(z * T(0.70710678118654752440)));
  const T pdf = T(0.39894228040143267794) * fc_exp(T(-0.5) * z * z);
  return cdf + z * pdf;
}

// ---- CPU entry points (mux_demux_cpu.cpp), over [begin, end) ranges.
// Forward rows are (b, l); backward tasks are (b, i) for dx and the dv partial sums.
void hadamard_mux_forward_cpu(const HadamardMuxParams& p, int64_t row_begin, int64_t row_end);
void hadamard_mux_backward_cpu(const HadamardMuxParams& p, int64_t task_begin, int64_t task_end);
// Forward rows are (b, i, t) flattened; backward tasks are b.
void demux_forward_cpu(const DemuxParams& p, int64_t row_begin, int64_t row_end);
void demux_backward_cpu(const DemuxParams& p, int64_t batch_begin, int64_t batch_end);

}  // namespace mux
}  // namespace fastcore

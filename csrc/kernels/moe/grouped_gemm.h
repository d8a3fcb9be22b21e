// MoE grouped GEMM (CUDA), torch-free: one launch computes, for every expert e at once,
//
//   C[r, n] = Σ_κ A[row(r), κ] · B[e, κ, n]        for the rows r in [offsets[e], offsets[e + 1])
//
// where row(r) = a_rows[r] when a row index is given (the in-kernel gather of x rows by token: no
// x_sorted copy) and r otherwise, and B is addressed through three strides only, so W and Wᵀ (HF
// MixtralExperts' [E, 2I, H] / [E, H, I] weights) are the same kernel without copies. Epilogues
// (a per-element body, written once in this header and used by the kernel):
//   kStore        c[r, n] = s_r · C[r, n]         s_r = row_scale[r] (the routing weight) or 1
//   kActForward   gate = C[r, n], up = C[r, N + n] (gated: both halves accumulated in one pass):
//                 h[r, n] = act(gate) · up   (act(gate) not gated);  gate_up[r, :] saved in float32
//                 when requested (training)
//   kActBackward  grad_h = C[r, n], gate/up read from the saved float32 gate_up:
//                 grad_gu[r, n] = grad_h · up · act'(gate),  grad_gu[r, N + n] = grad_h · act(gate)
//                 (not gated: grad_h · act'(gate)), and the recomputed h[r, n] (for grad_W_down)
// Tiles: BLOCK_M rows of one expert × BLOCK_N columns per thread block; a tile never straddles two
// experts. A prep kernel turns the offsets into a sanitised copy (clamped into [0, S], first 0, last S,
// non-decreasing: malformed offsets can never index out of bounds) and the prefix sum of row tiles per
// expert; the main grid has the host-known upper bound ⌊(S + E (BLOCK_M − 1)) / BLOCK_M⌋ tiles (no host
// sync) and surplus blocks return at once.
// Math: bfloat16 / float16 operands on tensor cores (WMMA 16×16×16, float32 accumulation); float32
// operands on a SIMT path (exact float32 FMAs, no TF32, so float32 results match a float32 reference to
// ~1e-7 relative). Every result element is computed by one thread block with a fixed k order:
// deterministic. All row/element offsets are int64.
#pragma once

#include <cstdint>

#include "fastcore/common.h"
#include "moe/grouped_mlp.h"

namespace fastcore {
namespace moe {

enum class GemmEpilogue : int32_t { kStore = 0, kActForward = 1, kActBackward = 2 };

struct GroupedGemmParams {
  ScalarKind kind = ScalarKind::kFloat32;  // of A, B and every non-float32 output (float32, float16, bfloat16)
  // A [*, K]: element (row(r), κ) at row(r) * a_row_stride + κ * a_col_stride.
  const void* a = nullptr;
  int64_t a_row_stride = 0, a_col_stride = 1;
  const int64_t* a_rows = nullptr;  // [S] gather indices into A's rows, or nullptr (row(r) = r)
  int64_t a_num_rows = 0;           // rows of A (a gather index outside [0, a_num_rows) reads zeros)
  // B [E, K, N(+N)]: element (e, κ, n) at e * b_expert_stride + κ * b_k_stride + n * b_n_stride.
  const void* b = nullptr;
  int64_t b_expert_stride = 0, b_k_stride = 0, b_n_stride = 0;
  const int64_t* expert_offsets = nullptr;  // [E + 1] (sanitised by the prep kernel into `scratch`)
  int64_t num_experts = 0;                  // E
  int64_t rows = 0;                         // S
  int64_t n = 0;                            // N: output columns (I for the activation epilogues)
  int64_t k = 0;                            // K: reduction length
  int64_t* scratch = nullptr;               // [2 (E + 1)] int64 device scratch: sanitised offsets, tile prefix sum
  GemmEpilogue epilogue = GemmEpilogue::kStore;
  bool gated = true;
  Activation activation = Activation::kSilu;
  // kStore: c [S, N] (row stride c_row_stride, unit column stride) in `kind`; row_scale [S] float32 or nullptr.
  // kActBackward: c = grad_gu [S, N1] contiguous in `kind` (N1 = 2N gated, else N).
  void* c = nullptr;
  int64_t c_row_stride = 0;
  const float* row_scale = nullptr;
  float* gate_up_out = nullptr;       // kActForward: [S, N1] float32 or nullptr (inference)
  const float* gate_up_in = nullptr;  // kActBackward: [S, N1] float32
  void* h = nullptr;                  // kActForward / kActBackward: [S, N] contiguous in `kind`
};

// The epilogue of one output element (row r, column col < N) given the accumulated value(s): the
// per-element body of the kernel (see the header comment for the math).
FC_HOST_DEVICE void grouped_gemm_epilogue(const GroupedGemmParams& p, int64_t r, int64_t col, float acc, float acc_up) {
  const int64_t N = p.n, n1 = p.gated ? 2 * p.n : p.n;
  switch (p.epilogue) {
    case GemmEpilogue::kStore: {
      const float scale = p.row_scale != nullptr ? p.row_scale[r] : 1.0f;
      store_as<float>(p.c, p.kind, r * p.c_row_stride + col, acc * scale);
      break;
    }
    case GemmEpilogue::kActForward: {
      if (p.gate_up_out != nullptr) {
        p.gate_up_out[r * n1 + col] = acc;
        if (p.gated) p.gate_up_out[r * n1 + N + col] = acc_up;
      }
      const float value = activation_value(p.activation, acc);
      store_as<float>(p.h, p.kind, r * N + col, p.gated ? value * acc_up : value);
      break;
    }
    case GemmEpilogue::kActBackward:
    default: {
      const float gate = p.gate_up_in[r * n1 + col];
      const float value = activation_value(p.activation, gate), slope = activation_derivative(p.activation, gate);
      if (p.gated) {
        const float up = p.gate_up_in[r * n1 + N + col];
        store_as<float>(p.c, p.kind, r * n1 + col, acc * up * slope);
        store_as<float>(p.c, p.kind, r * n1 + N + col, acc * value);
        store_as<float>(p.h, p.kind, r * N + col, value * up);
      } else {
        store_as<float>(p.c, p.kind, r * n1 + col, acc * slope);
        store_as<float>(p.h, p.kind, r * N + col, value);
      }
      break;
    }
  }
}

// Tile geometry shared by the launcher and the torch glue (scratch sizing, grid bound).
constexpr int64_t kGemmBlockM = 64;
constexpr int64_t kGemmBlockN = 64;

// Upper bound on Σ_e ceil(rows_e / BLOCK_M) for any split of S rows over E experts (the grid size).
FC_HOST_DEVICE int64_t grouped_gemm_max_tiles(int64_t rows, int64_t num_experts) {
  return (rows + num_experts * (kGemmBlockM - 1)) / kGemmBlockM;
}

// ---- CUDA entry point (grouped_gemm.cu); returns a cudaError_t as int (0 = success). Launches the
// prep kernel and the grouped GEMM on `stream`; no host sync. Needs rows, n, k > 0.
int grouped_gemm_cuda(const GroupedGemmParams& p, void* stream);

}  // namespace moe
}  // namespace fastcore

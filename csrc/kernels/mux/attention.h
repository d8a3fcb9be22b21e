// Fused (flash-style) attention for any head size 1..256 and any Lq, Lk, torch-free.
//
//   s_ij  = scale · q_i·k_j + a_ij         a: additive mask value, or −inf where a bool mask is False,
//                                          where key_padding[b, j] is True, or (causal) where j > i
//   out_i = Σ_j p_ij v_j,  p_ij = exp(s_ij − lse_i),  lse_i = log Σ_j exp(s_ij)
//
// Forward (online softmax, FlashAttention): per query row keep m = running max, l = running Σ exp(s − m)
// and o = running Σ exp(s − m) v; a new key block with max m' rescales l and o by exp(m − m'). At the
// end out = o / l and lse = m + log l. The [Lq, Lk] score matrix is never formed: only a
// [q_tile, kv_block] tile. A fully masked row keeps l = 0: out = 0, lse = −inf (documented, no NaN).
//
// Backward (recompute from lse, FlashAttention-2): with δ_i = Σ_c dO_ic O_ic,
//   p_ij = exp(s_ij − lse_i),  dV_j = Σ_i p_ij dO_i,  dp_ij = dO_i·v_j,  ds_ij = p_ij (dp_ij − δ_i),
//   dQ_i = scale Σ_j ds_ij k_j,  dK_j = scale Σ_i ds_ij q_i.
// An additive mask a enters s_ij with coefficient 1, so its gradient is ds_ij (summed over the
// dimensions it was broadcast along); the CPU backward writes ds when asked (grad_scores), bool masks
// and the other mask arguments are constants. Each output element is produced by one task in a fixed
// order, so results do not depend on the thread count (DESIGN rule 8).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace mux {

constexpr int64_t kMaxHeadDim = 256;

enum class MaskKind : int32_t { kNone = 0, kBool = 1, kAdditive = 2 };

struct AttentionParams {
  // Inputs [B, H, L, D] of one dtype `kind`, any strides (elements, order b, h, l, d).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  ScalarKind kind = ScalarKind::kFloat32;
  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t batch = 0, heads = 0, len_q = 0, len_k = 0, head_dim = 0;
  // k / v heads H_kv (grouped-query attention; 0 = heads). heads % kv_heads == 0. k_stride / v_stride
  // index kv heads; grad_k / grad_v are [B, H_kv, Lk, D] on the CPU (the CUDA kernels write [B, H, Lk, D]
  // per query head and the glue sums each group).
  int64_t kv_heads = 0;
  // Optional attention mask broadcast to [B, H, Lq, Lk] by strides (0 on broadcast dims): bool (True =
  // attend) or additive (mask_kind_scalar gives its float dtype).
  const void* mask = nullptr;
  MaskKind mask_kind = MaskKind::kNone;
  ScalarKind mask_scalar = ScalarKind::kFloat32;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  // Optional key padding mask [B, Lk] (True = ignore the key).
  const bool* key_padding = nullptr;
  int64_t key_padding_stride[2] = {0, 0};
  bool causal = false;
  double scale = 1.0;
  int64_t q_tile = 64;     // (stacked) query rows per forward task
  int64_t kv_block = 512;  // keys per online-softmax step
  // Outputs: out [B, H, Lq, D] contiguous in `kind`; lse [B, H, Lq] contiguous in Acc (float32, or
  // float64 for float64 inputs).
  void* out = nullptr;
  void* lse = nullptr;
  // Backward only: grad_out [B, H, Lq, D] contiguous in `kind`; grads contiguous in `kind`.
  const void* grad_out = nullptr;
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  // Optional (CPU backward): ds = ∂loss/∂s [B, H, Lq, Lk] contiguous in Acc, the gradient of an additive
  // mask before it is summed over the mask's broadcast dimensions. The caller zero-fills it (tiles the
  // causal rule skips are not written).
  void* grad_scores = nullptr;
};

// H_kv, and the group size G = H / H_kv (query heads per kv head).
FC_HOST_DEVICE int64_t attention_kv_heads(const AttentionParams& p) { return p.kv_heads > 0 ? p.kv_heads : p.heads; }
FC_HOST_DEVICE int64_t attention_group(const AttentionParams& p) { return p.kv_heads > 0 ? p.heads / p.kv_heads : 1; }
// The kv head query head h reads.
FC_HOST_DEVICE int64_t attention_kv_head(const AttentionParams& p, int64_t h) { return h / attention_group(p); }

// Number of CPU forward tasks: (b, kv head, tile of q_tile stacked rows) triples, G·Lq rows per kv head.
FC_HOST_DEVICE int64_t attention_forward_tasks(const AttentionParams& p) {
  const int64_t rows = attention_group(p) * p.len_q;
  const int64_t tiles = (rows + p.q_tile - 1) / p.q_tile;
  return p.batch * attention_kv_heads(p) * tiles;
}

// ---- CPU entry points (attention_cpu.cpp), each over a [begin, end) range of tasks (DESIGN rule 3).
// Forward tasks are (b, kv head, stacked-row tile); backward tasks are (b, kv head) (dK/dV sum over every
// stacked query row).
// prefetch_task: the task the calling thread runs next (−1: none); the AVX-512 path prefetches its
// inputs while this range runs, so the next task does not start on cold memory.
void attention_forward_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task = -1);
void attention_backward_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task = -1);
// float32 / float16 / bfloat16 run an AVX-512 path when active_cpu_isa() (fastcore/cpu_isa.h) is AVX-512
// (16-lane FMA micro-kernels), the generic vector path otherwise (and float64 always). Tests cover the
// generic path on AVX-512 machines by capping the level: FASTCORE_AI_CPU_ISA=portable in the environment,
// or set_cpu_isa_cap (FASTCORE_AI_ATTENTION_CPU_GENERIC=1, the former switch, likewise means portable).

// ---- CUDA entry points (attention.cu); return a cudaError_t as int (0 = success).
int attention_forward_cuda(const AttentionParams& p, void* stream);
// Tensor-core (WMMA m16n16k16, float32 accumulation) forward for float16 / bfloat16 on sm_80+; same
// outputs and mask semantics as attention_forward_cuda.
int attention_forward_wmma_cuda(const AttentionParams& p, void* stream);
int attention_backward_cuda(const AttentionParams& p, void* workspace, void* stream);
// Tensor-core backward for float16 / bfloat16 on sm_80+: same gradients and mask semantics as
// attention_backward_cuda (δ from the same SIMT kernel, P recomputed per 16 × 16 tile from lse).
int attention_backward_wmma_cuda(const AttentionParams& p, void* workspace, void* stream);

}  // namespace mux
}  // namespace fastcore

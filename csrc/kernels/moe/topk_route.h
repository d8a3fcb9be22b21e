// Fused MoE router: softmax over experts, top-k, optional renormalisation and the router
// statistics (z-loss, tokens per expert, mean probability), in one pass per row.
//
// Math, for one row x = logits[t, :] of E experts (in Acc = float32, or float64 for float64 input):
//   lse       = log Σ_e exp(x_e)                              (max-shifted for stability)
//   p_e       = exp(x_e − lse)
//   s_0..s_k−1 = the k largest x (NaN counts as −inf; equal values: the lower index first)
//   weight_j  = p_{s_j}                 or, with renormalize,  p_{s_j} / Σ_i p_{s_i}
//   z_loss    = (1/T) Σ_t lse_t²   ,  mean_prob_e = (1/T) Σ_t p_te ,  tokens_per_expert_e = #{(t,j): s_j = e}
// Selection runs on the logits, not on the probabilities: exp() can round two different logits to
// one probability, and the logits are what every backend sees bit-identically, so ids agree exactly.
//
// Backward, for upstream gradients gw [k] (weights), gz (z_loss), gP [E] (mean_prob), per row:
//   a   = Σ_e p_e gP_e / T ,   c = 2 gz lse / T
//   renormalize=False:  g_e = gP_e / T + Σ_j [s_j = e] gw_j ;  dx_e = p_e (g_e − Σ_e' p_e' g_e') + c p_e
//   renormalize=True:   dx_e = p_e (gP_e / T − a) + c p_e + Σ_j [s_j = e] w_j (gw_j − Σ_i w_i gw_i)
// (with renormalisation the weights are a softmax over the selected logits alone, hence the last term).
//
// Determinism: rows are cut into fixed blocks of `rows_per_block` (a function of T and E only, never of
// the thread count). Each block writes its own partial sums; partials are then added in block order.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace moe {

constexpr int kMaxTopK = 16;
constexpr int64_t kMaxExperts = 1024;

struct TopkRouteParams {
  // Input: logits [T, E] of `logits_kind`, element (t, e) at logits[t * row_stride + e * col_stride].
  const void* logits = nullptr;
  ScalarKind logits_kind = ScalarKind::kFloat32;
  int64_t num_tokens = 0;   // T
  int64_t num_experts = 0;  // E
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  int32_t k = 1;
  bool renormalize = true;

  // Outputs, contiguous, in Acc (float, or double for float64 logits) unless stated.
  void* weights = nullptr;        // [T, k]
  int64_t* expert_ids = nullptr;  // [T, k]
  void* lse = nullptr;            // [T], kept for the backward

  // Per-block partial statistics, reduced in block order by reduce_route_partials().
  int64_t rows_per_block = 1;
  int64_t num_blocks = 0;
  void* partial_prob_sum = nullptr;    // [num_blocks, E] Acc: Σ_t p_te over the block
  void* partial_lse_sq_sum = nullptr;  // [num_blocks] Acc: Σ_t lse_t² over the block
  int32_t* partial_counts = nullptr;   // [num_blocks, E] (CPU only; CUDA adds integer counts atomically)
  int64_t* counts = nullptr;           // [E] tokens_per_expert
};

struct TopkRouteBackwardParams {
  const void* logits = nullptr;  // [T, E] as in the forward
  ScalarKind logits_kind = ScalarKind::kFloat32;
  int64_t num_tokens = 0, num_experts = 0, row_stride = 0, col_stride = 0;
  int32_t k = 1;
  bool renormalize = true;
  const int64_t* expert_ids = nullptr;   // [T, k]
  const void* weights = nullptr;         // [T, k] Acc
  const void* lse = nullptr;             // [T] Acc
  const void* grad_weights = nullptr;    // [T, k] Acc, contiguous
  const void* grad_mean_prob = nullptr;  // [E] Acc, contiguous
  const void* grad_z_loss = nullptr;     // [1] Acc: upstream gradient of z_loss (on the device)
  void* grad_logits = nullptr;           // [T, E] Acc, contiguous
};

// Rows per statistics block: at least `min_rows`, and enough that the partial buffers stay below ~4M
// entries even for T in the tens of millions. Depends on T and E only (determinism, see above).
// `min_rows` is the backend's preferred block (256 on the CPU, 64 on CUDA).
FC_HOST_DEVICE int64_t route_rows_per_block(int64_t num_tokens, int64_t num_experts, int64_t min_rows) {
  const int64_t max_partial_entries = int64_t(1) << 22;
  const int64_t max_blocks = max_partial_entries / (num_experts > 0 ? num_experts : 1);
  const int64_t rows = (num_tokens + max_blocks - 1) / (max_blocks > 0 ? max_blocks : 1);
  return rows < min_rows ? min_rows : rows;
}

// Selection key order: larger value first, equal values by lower index. NaN is mapped to −inf
// before comparing, so the order is total and every selected id lies in [0, E).
template <typename Acc>
FC_HOST_DEVICE Acc selection_key(Acc x) {
  return x != x ? -INFINITY : x;
}

template <typename Acc>
FC_HOST_DEVICE bool ranks_before(Acc key_a, int64_t index_a, Acc key_b, int64_t index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// Probability of one logit given the row's log-sum-exp.
template <typename Acc>
FC_HOST_DEVICE Acc route_probability(Acc x, Acc lse) {
  return fc_exp(x - lse);
}

// d(loss)/d(x_e) for one element, given the row scalars (see the header comment):
//   dense_grad_e = gP_e / T (+ gw_j if e = s_j and not renormalising), dot = Σ p g, c = 2 gz lse / T.
template <typename Acc>
FC_HOST_DEVICE Acc route_grad_element(Acc p, Acc dense_grad, Acc dot, Acc c) {
  return p * (dense_grad - dot) + c * p;
}

// Sort-free top-k insertion used by the CPU kernel and by the native tests: keeps
// (keys, ids)[0..k) ordered by ranks_before.
template <typename Acc>
FC_HOST_DEVICE void topk_insert(Acc* keys, int64_t* ids, int k, Acc key, int64_t id) {
  if (!ranks_before(key, id, keys[k - 1], ids[k - 1])) return;
  int pos = k - 1;
  while (pos > 0 && ranks_before(key, id, keys[pos - 1], ids[pos - 1])) {
    keys[pos] = keys[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  keys[pos] = key;
  ids[pos] = id;
}

// ---- CPU entry points (topk_route_cpu.cpp). Each takes a [begin, end) range so the torch layer
// ---- can drive them with at::parallel_for (DESIGN rule 3).

// Routes the rows of statistics blocks [block_begin, block_end).
void topk_route_cpu_blocks(const TopkRouteParams& params, int64_t block_begin, int64_t block_end);
// Adds the per-block partials in block order into z_loss, mean_prob [E] (Acc) and counts [E].
void topk_route_cpu_reduce(const TopkRouteParams& params, void* z_loss, void* mean_prob);
// Gradient of rows [row_begin, row_end).
void topk_route_backward_cpu_rows(const TopkRouteBackwardParams& params, int64_t row_begin, int64_t row_end);

// ---- CUDA entry points (topk_route.cu); `stream` is a cudaStream_t. Return a cudaError_t as int
// ---- (0 = success) so the torch layer can raise with the op's name.
int topk_route_cuda(const TopkRouteParams& params, void* z_loss, void* mean_prob, void* stream);
int topk_route_backward_cuda(const TopkRouteBackwardParams& params, void* stream);

}  // namespace moe
}  // namespace fastcore

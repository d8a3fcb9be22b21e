// MoE token dispatch (group the kept (token, slot) pairs by expert) and combine (weighted sum of the
// expert outputs back per token), torch-free.
//
// Slots are the pairs (t, j), t < T, j < k, numbered i = t·k + j (token-major). A slot is kept when
// kept[i] (no mask: all kept). The plan, a stable counting sort of the kept slots by expert id:
//   counts_e          = #{kept i : expert_ids[i] = e}
//   expert_offsets    = [0, c_0, c_0 + c_1, …, S]                 (exclusive scan, E + 1 entries, int64)
//   position(i)       = expert_offsets[e] + #{kept i' < i : expert_ids[i'] = e}   (stable: slot order)
//   slot_to_token[s]  = t           for s = position(i), i = t·k + j               ([S], int64)
//   token_slot[t, j]  = position(i) if kept, else −1                               ([T, k], int64)
// Dispatch:  x_sorted[s, :] = x[slot_to_token[s], :]   (a row copy in x's dtype, any strides for x).
// Combine:   out[t, h] = Σ_{j = 0..k−1, token_slot[t, j] ≥ 0} w[t, j] · y[token_slot[t, j], h]
//            summed in that fixed j order in Acc (float32, float64 for float64 y); dropped slots are
//            skipped, so they contribute exactly zero whatever y or w hold. With no weights (w = 1)
//            it is the backward of dispatch: grad_x[t] = Σ_j grad_x_sorted[token_slot[t, j]].
// Combine backward:
//   grad_y[s, h] = (Σ_{j : token_slot[t, j] = s} w[t, j]) · grad_out[t, h],  t = slot_to_token[s]
//   grad_w[t, j] = Σ_h grad_out[t, h] · y[token_slot[t, j], h]   (0 for a dropped slot)
// Each output element is written by exactly one worker and every sum has a fixed order, so results
// are bitwise reproducible across runs and thread counts (DESIGN rule 8). Only integer counts use
// atomics (CUDA histogram), which are exact in any order.
//
// Bounds: expert ids outside [0, E) are counted in `num_bad_ids` (the caller raises) and never index
// anything. A token_slot outside [−1, S) or a slot_to_token outside [0, T) (a plan that dispatch did
// not make) is never dereferenced: the CPU kernels count it in `num_bad` (the caller raises), the CUDA
// kernels write NaN to the affected output row instead (no host sync).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace moe {

constexpr int64_t kMaxDispatchExperts = 4096;

// Slots per counting chunk: at least `min_slots`, at most `max_chunks` chunks, and few enough chunks
// that the [chunks, E] count table stays below ~4M entries. A function of (N, E) and the backend's
// constants only (positions never depend on it anyway).
FC_HOST_DEVICE int64_t dispatch_slots_per_chunk(int64_t num_slots, int64_t num_experts, int64_t min_slots,
                                                int64_t max_chunks) {
  const int64_t max_entries = int64_t(1) << 22;
  int64_t chunks = max_entries / (num_experts > 0 ? num_experts : 1);
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  const int64_t slots = (num_slots + chunks - 1) / chunks;
  return slots < min_slots ? min_slots : slots;
}

struct DispatchParams {
  const int64_t* expert_ids = nullptr;  // [T, k] contiguous
  const bool* kept = nullptr;           // [T, k] contiguous, or nullptr (all kept)
  int64_t num_tokens = 0;               // T
  int64_t k = 1;
  int64_t num_experts = 0;  // E
  int64_t slots_per_chunk = 1;
  int64_t num_chunks = 0;  // ceil(T·k / slots_per_chunk)
  // Scratch [num_chunks, E] int64: kept slots per (chunk, expert), then (after the scan) the
  // position of the chunk's first such slot relative to expert_offsets[e].
  int64_t* chunk_counts = nullptr;
  int64_t* num_bad_ids = nullptr;     // [1] (CPU: [num_chunks]) ids outside [0, E)
  int64_t* expert_offsets = nullptr;  // [E + 1]
  int64_t* slot_to_token = nullptr;   // [S]
  int64_t* token_slot = nullptr;      // [T, k]
};

// Row gather: out[s, :] = in[src_row[s], :] (raw element copy, element_size bytes).
struct GatherRowsParams {
  const void* in = nullptr;
  int64_t in_row_stride = 0, in_col_stride = 0;  // elements
  int64_t in_rows = 0;                           // bound for src_row
  const int64_t* src_row = nullptr;              // [rows]
  void* out = nullptr;                           // [rows, H] contiguous
  int64_t rows = 0, cols = 0;
  int32_t element_size = 4;  // 2, 4 or 8 (16: vector copy, set inside dispatch.cu)
};

// Combine (forward, and dispatch backward with weights == nullptr) and its backward.
struct CombineParams {
  const void* y = nullptr;  // [S, H] contiguous, y_kind
  ScalarKind y_kind = ScalarKind::kFloat32;
  const void* weights = nullptr;  // [T, k] contiguous, weights_kind; nullptr = all ones
  ScalarKind weights_kind = ScalarKind::kFloat32;
  const int64_t* token_slot = nullptr;     // [T, k]
  const int64_t* slot_to_token = nullptr;  // [S] (backward only)
  int64_t num_tokens = 0, k = 1, num_rows = 0 /* S */, hidden = 0 /* H */;
  const void* grad_out = nullptr;  // [T, H] contiguous, grad_kind (backward)
  ScalarKind grad_kind = ScalarKind::kFloat32;
  void* out = nullptr;           // forward: [T, H] Acc
  void* grad_y = nullptr;        // backward: [S, H] Acc
  void* grad_weights = nullptr;  // backward: [T, k] Acc (nullptr: not needed)
};

// ---- per-element bodies, shared by the CPU loops and the CUDA kernels (DESIGN rule 2)

// out[t, h] of combine; `bad` is set when a slot lies outside [−1, S).
template <typename Acc>
FC_HOST_DEVICE Acc combine_element(const CombineParams& p, int64_t t, int64_t h, bool& bad) {
  Acc acc = Acc(0);
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t s = p.token_slot[t * p.k + j];
    if (s == -1) continue;
    if (s < 0 || s >= p.num_rows) {
      bad = true;
      continue;
    }
    const Acc y = load_as<Acc>(p.y, p.y_kind, s * p.hidden + h);
    const Acc w = p.weights ? load_as<Acc>(p.weights, p.weights_kind, t * p.k + j) : Acc(1);
    acc += w * y;
  }
  return acc;
}

// Σ_{j : token_slot[t, j] = s} w[t, j] for the token t = slot_to_token[s]; the scale of grad_y row s.
template <typename Acc>
FC_HOST_DEVICE Acc combine_slot_scale(const CombineParams& p, int64_t s, int64_t t) {
  Acc scale = Acc(0);
  for (int64_t j = 0; j < p.k; ++j)
    if (p.token_slot[t * p.k + j] == s)
      scale += p.weights ? load_as<Acc>(p.weights, p.weights_kind, t * p.k + j) : Acc(1);
  return scale;
}

// ---- CPU entry points (dispatch_cpu.cpp), each over a [begin, end) range (DESIGN rule 3).

// Counts kept slots per (chunk, expert) for chunks [begin, end); bad ids go to num_bad_ids[chunk].
void dispatch_count_cpu(const DispatchParams& p, int64_t chunk_begin, int64_t chunk_end);
// Serial: expert_offsets from the chunk counts, chunk_counts turned into chunk start positions.
// Returns S.
int64_t dispatch_scan_cpu(const DispatchParams& p);
// Writes token_slot and slot_to_token for the slots of chunks [begin, end) (after the scan).
void dispatch_scatter_cpu(const DispatchParams& p, int64_t chunk_begin, int64_t chunk_end);
// Copies rows [begin, end); returns how many src rows were out of range (those rows are not read).
int64_t gather_rows_cpu(const GatherRowsParams& p, int64_t row_begin, int64_t row_end);
// Combine rows t in [begin, end) into p.out; returns the number of out-of-range slots seen.
int64_t combine_cpu(const CombineParams& p, int64_t token_begin, int64_t token_end);
// grad_y rows s in [begin, end); returns the number of out-of-range tokens seen.
int64_t combine_backward_y_cpu(const CombineParams& p, int64_t row_begin, int64_t row_end);
// grad_weights rows t in [begin, end); returns the number of out-of-range slots seen.
int64_t combine_backward_weights_cpu(const CombineParams& p, int64_t token_begin, int64_t token_end);

// ---- CUDA entry points (dispatch.cu); return a cudaError_t as int (0 = success).
// Phase 1: counts, the scan, offsets (expert_offsets[E] = S on the device), bad id count.
// num_bad_ids must be zeroed by the caller (chunk_counts is fully written).
int dispatch_plan_count_cuda(const DispatchParams& p, void* stream);
// Phase 2 (after the caller read S and checked num_bad_ids): token_slot and slot_to_token.
int dispatch_plan_scatter_cuda(const DispatchParams& p, void* stream);
int gather_rows_cuda(const GatherRowsParams& p, void* stream);
int combine_cuda(const CombineParams& p, void* stream);
int combine_backward_cuda(const CombineParams& p, void* stream);

}  // namespace moe
}  // namespace fastcore

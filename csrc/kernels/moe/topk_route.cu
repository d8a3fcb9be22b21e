// CUDA kernels of the fused MoE router (math and determinism contract in topk_route.h).
//
// Forward, `topk_route_kernel<GROUP, VPL>`: one CUDA block per statistics block (grid = num_blocks),
// 8 warps. A row is handled by a group of GROUP lanes (GROUP = 32 for E > 16; 8 or 16 for small E,
// so a warp routes 32 / GROUP rows at once); lane g of the group owns the columns g + GROUP·v,
// v < VPL, and keeps them in registers (E ≤ GROUP·VPL; coalesced loads when col_stride == 1). Row
// max and Σ exp(x − max) are group shuffle reductions. Top-k is k rounds of a group arg-max under
// ranks_before over (selection key, index) pairs: every lane offers its best element that is not
// taken yet (or the sentinel (−inf, INT_MAX), which loses to every real element, −inf included),
// a __shfl_xor butterfly finds the winner, its owner marks it taken and re-scans its VPL values.
// Since 1 ≤ k ≤ E the k winners are k distinct real elements, so every id lies in [0, E), NaN rows
// included. Lane j < k keeps the j-th winner and writes weight j and id j.
//
// Statistics, deterministic by construction (no float atomics): each lane sums the probabilities
// of its columns over the rows its group routed, in row order; the groups of a warp are combined
// by a fixed xor butterfly, the 8 warps in warp order through shared memory, and the block writes
// partial_prob_sum[b, :] and partial_lse_sq_sum[b]. Token counts are integers: shared-memory
// counters per block, then one global 64-bit atomicAdd per expert (integer sums are exact, so the
// order does not matter). `reduce_route_partials_kernel` then adds the block partials in a fixed
// order in double: with more than kSinglePassRows blocks, first groups of G consecutive blocks
// (G = the power of two ≥ √num_blocks, a function of T and E only) into the first row of each
// group, in place, then the group sums; each sum is a strided per-thread sum plus a fixed-shape
// shared-memory tree.
//
// Backward, `topk_route_backward_kernel<GROUP, VPL>`: the same row layout, grid-stride over rows;
// probabilities are recomputed from the logits and the saved lse (route_probability), the two row
// dot products are group shuffle sums, route_grad_element gives the dense part and the k selected
// columns get their sparse terms from the lane that owns them (no shared memory, no atomics).
//
// Registers: x[VPL] (logits), ex[VPL] (exp(x − max)) and acc[VPL] (probability sums) per lane in the
// forward; the ptxas report (tests/test_cuda_build.py) must show no spills for sm_80 and sm_90. The
// kernels say __launch_bounds__(threads, 1) explicitly: with the minimum-blocks hint left out, ptxas
// 13 capped the backward at 80-128 registers and spilled a few values to reach a higher occupancy.
//
// Lanes g < k of a group hold the k selections: k ≤ min(E, 16) ≤ GROUP for every layout below
// (GROUP = 8 only for E ≤ 8, 16 only for E ≤ 16).
//
// tests/test_cuda_build.py also runs these kernels, source unchanged, on a small CPU emulation of the
// CUDA features used here (shuffles, __syncthreads, shared memory, integer atomics); it rewrites each
// `kernel<<<grid, block, smem, stream>>>(args)` launch, so keep launches in that form, and extend the
// emulator there when a kernel starts using another CUDA feature.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "fastcore/common.h"
#include "fastcore/cuda_launch.h"
#include "moe/topk_route.h"

namespace fastcore {
namespace moe {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kRouteWarps = 8;
constexpr int kRouteThreads = kRouteWarps * kWarpSize;
constexpr int kBackwardWarps = 8;
constexpr int kBackwardThreads = kBackwardWarps * kWarpSize;
constexpr int kNoExpert = INT_MAX;  // index of the sentinel a lane offers when it has nothing left

// Partial reduction: a block sums a tile of kReduceCols columns with kReduceSlices row slices.
constexpr int kReduceCols = 32;
constexpr int kReduceSlices = 16;
constexpr int kReduceThreads = kReduceCols * kReduceSlices;
constexpr int64_t kSinglePassRows = 256;  // up to this many blocks, one reduction pass

// ---- group (sub-warp) reductions; every lane of the warp must call them (full-mask shuffles).
// xor offsets below GROUP stay inside the aligned group of GROUP lanes.

template <int GROUP>
FC_DEVICE float group_max(float v) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <int GROUP>
FC_DEVICE float group_sum(float v) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// After it, every lane of the group holds the group's best (key, index) under ranks_before. The
// order is total on distinct pairs and all real indices differ, so all lanes agree.
template <int GROUP>
FC_DEVICE void group_argmax(float& key, int& index) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset >>= 1) {
    const float other_key = __shfl_xor_sync(kFullMask, key, offset);
    const int other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (ranks_before<float>(other_key, other_index, key, index)) {
      key = other_key;
      index = other_index;
    }
  }
}

// ---- row loads: lane g of a group reads columns g + GROUP·v of one row; padding (col ≥ E) and
// rows past the end read nothing and hold −inf. The element kind is resolved once per row, so the
// unrolled loop calls load_as with a constant kind (the switch inside it folds away).

template <ScalarKind KIND, int GROUP, int VPL>
FC_DEVICE void load_row_as(float (&x)[VPL], const void* data, int64_t row_offset, int64_t col_stride, int g,
                           int num_experts, bool valid) {
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int col = g + GROUP * v;
    x[v] = -INFINITY;
    if (valid && col < num_experts) x[v] = load_as<float>(data, KIND, row_offset + col * col_stride);
  }
}

template <int GROUP, int VPL>
FC_DEVICE void load_row(float (&x)[VPL], const void* data, ScalarKind kind, int64_t row_offset, int64_t col_stride,
                        int g, int num_experts, bool valid) {
  switch (kind) {
    case ScalarKind::kFloat16:
      load_row_as<ScalarKind::kFloat16, GROUP, VPL>(x, data, row_offset, col_stride, g, num_experts, valid);
      break;
    case ScalarKind::kBFloat16:
      load_row_as<ScalarKind::kBFloat16, GROUP, VPL>(x, data, row_offset, col_stride, g, num_experts, valid);
      break;
    default:  // kFloat32 (float64 never reaches the CUDA kernels, see check_shape)
      load_row_as<ScalarKind::kFloat32, GROUP, VPL>(x, data, row_offset, col_stride, g, num_experts, valid);
      break;
  }
}

// The lane's best element not marked in `taken` (bit v = column g + GROUP·v), or the sentinel
// (−inf, kNoExpert), which ranks after every real element including −inf ones.
template <int GROUP, int VPL>
FC_DEVICE void best_untaken(const float (&x)[VPL], uint32_t taken, int g, int num_experts, float& key, int& index) {
  key = -INFINITY;
  index = kNoExpert;
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int col = g + GROUP * v;
    const float candidate = selection_key(x[v]);
    if (col < num_experts && !((taken >> v) & 1u) && ranks_before<float>(candidate, col, key, index)) {
      key = candidate;
      index = col;
    }
  }
}

// ---- forward: route the rows of statistics block blockIdx.x and write its partial sums.
template <int GROUP, int VPL>
__global__ void __launch_bounds__(kRouteThreads, 1) topk_route_kernel(const TopkRouteParams p) {
  static_assert(GROUP == 8 || GROUP == 16 || GROUP == 32, "GROUP must be 8, 16 or 32 lanes");
  static_assert(VPL >= 1 && VPL <= 32, "the taken mask has 32 bits");
  constexpr int kCols = GROUP * VPL;
  constexpr int kRowsPerWarp = kWarpSize / GROUP;
  __shared__ float s_prob[kRouteWarps][kCols];
  __shared__ float s_lse_sq[kRouteWarps];
  __shared__ int s_counts[kCols];

  const int num_experts = static_cast<int>(p.num_experts);
  const int k = p.k;
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int g = lane % GROUP;    // lane within the row's group
  const int sub = lane / GROUP;  // which of the warp's rows
  const int64_t block = blockIdx.x;
  const int64_t row_begin = block * p.rows_per_block;
  const int64_t row_end = min(p.num_tokens, row_begin + p.rows_per_block);

  float* weights = static_cast<float*>(p.weights);
  int64_t* expert_ids = p.expert_ids;
  float* lse_out = static_cast<float*>(p.lse);

  for (int e = tid; e < kCols; e += kRouteThreads) s_counts[e] = 0;
  __syncthreads();

  float acc[VPL];
#pragma unroll
  for (int v = 0; v < VPL; ++v) acc[v] = 0.0f;
  float lse_sq = 0.0f;

  // The loop condition depends on the warp only, so whole warps iterate together (full-mask
  // shuffles are safe); a group whose row is past the block end computes on −inf and writes nothing.
  for (int64_t row0 = row_begin + warp * kRowsPerWarp; row0 < row_end; row0 += kRouteWarps * kRowsPerWarp) {
    const int64_t row = row0 + sub;
    const bool valid = row < row_end;
    float x[VPL];
    load_row<GROUP, VPL>(x, p.logits, p.logits_kind, row * p.row_stride, p.col_stride, g, num_experts, valid);

    // Softmax. fmaxf ignores NaN as the CPU max does; a NaN logit (or a row of only −inf, where
    // x − max is NaN, or a +inf logit) then makes the sum and so lse NaN, as on the CPU.
    float row_max = -INFINITY;
#pragma unroll
    for (int v = 0; v < VPL; ++v) row_max = fmaxf(row_max, x[v]);
    row_max = group_max<GROUP>(row_max);
    float ex[VPL];
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < VPL; ++v) {
      ex[v] = g + GROUP * v < num_experts ? expf(x[v] - row_max) : 0.0f;
      sum += ex[v];
    }
    sum = group_sum<GROUP>(sum);
    const float lse = row_max + logf(sum);
    const float inv_sum = 1.0f / sum;
    if (valid) {
#pragma unroll
      for (int v = 0; v < VPL; ++v) acc[v] += ex[v] * inv_sum;  // padding columns are never read
      lse_sq += lse * lse;
    }

    // Top-k on the selection keys: k rounds of a group arg-max.
    uint32_t taken = 0;
    float best_key;
    int best_index;
    best_untaken<GROUP, VPL>(x, taken, g, num_experts, best_key, best_index);
    float selected_key = -INFINITY;
    int selected_index = 0;
    for (int round = 0; round < k; ++round) {  // k is the same for every lane
      float key = best_key;
      int index = best_index;
      group_argmax<GROUP>(key, index);
      if (g == round) {
        selected_key = key;
        selected_index = index;
      }
      // k ≤ E, so the winner is always real; the bound check only keeps the shift defined.
      if (index < num_experts && index % GROUP == g) {
        taken |= 1u << (index / GROUP);
        best_untaken<GROUP, VPL>(x, taken, g, num_experts, best_key, best_index);
      }
    }

    // Lane j < k holds the j-th selection. The key equals the logit unless the logit is NaN, and
    // then the row's sum is NaN, so the probability is NaN either way (as on the CPU).
    const float prob = g < k ? expf(selected_key - row_max) * inv_sum : 0.0f;
    float weight = prob;
    if (p.renormalize) {  // uniform branch
      const float selected_sum = group_sum<GROUP>(prob);
      weight = prob * (1.0f / selected_sum);
    }
    if (valid && g < k) {
      weights[row * k + g] = weight;
      expert_ids[row * k + g] = selected_index;
      atomicAdd(&s_counts[selected_index], 1);
    }
    if (valid && g == 0) lse_out[row] = lse;
  }

  // Groups of the warp in a fixed butterfly (float addition is commutative, so every lane ends
  // with the same bits), then warps in warp order.
#pragma unroll
  for (int offset = GROUP; offset < kWarpSize; offset <<= 1) {
#pragma unroll
    for (int v = 0; v < VPL; ++v) acc[v] += __shfl_xor_sync(kFullMask, acc[v], offset);
    lse_sq += __shfl_xor_sync(kFullMask, lse_sq, offset);
  }
  if (sub == 0) {
#pragma unroll
    for (int v = 0; v < VPL; ++v) s_prob[warp][g + GROUP * v] = acc[v];
  }
  if (lane == 0) s_lse_sq[warp] = lse_sq;
  __syncthreads();

  float* partial_prob = static_cast<float*>(p.partial_prob_sum) + block * p.num_experts;
  for (int e = tid; e < num_experts; e += kRouteThreads) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kRouteWarps; ++w) total += s_prob[w][e];
    partial_prob[e] = total;
    const int count = s_counts[e];
    if (count != 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + e), static_cast<unsigned long long>(count));
  }
  if (tid == 0) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kRouteWarps; ++w) total += s_lse_sq[w];
    static_cast<float*>(p.partial_lse_sq_sum)[block] = total;
  }
}

// ---- partial reduction. Logical rows r < num_rows live at memory row r·row_step of the block
// partials ([num_blocks, E] probabilities, [num_blocks] lse²). Block (x, y) sums logical rows
// [y·group_rows, min(num_rows, (y+1)·group_rows)) of column tile x (x == number of tiles: the lse²
// column). Without `mean_prob` the sum is written in place to the group's first row (pass 1);
// with it, the sum times 1/T goes to mean_prob / z_loss (final pass, a single group).
__global__ void __launch_bounds__(kReduceThreads)
    reduce_route_partials_kernel(float* partial_prob, float* partial_lse_sq, int64_t num_experts, int64_t num_rows,
                                 int64_t row_step, int64_t group_rows, float* mean_prob, float* z_loss,
                                 double inv_tokens) {
  __shared__ double s_sum[kReduceSlices][kReduceCols];
  const int64_t prob_tiles = (num_experts + kReduceCols - 1) / kReduceCols;
  const bool is_lse = blockIdx.x == prob_tiles;
  float* data = is_lse ? partial_lse_sq : partial_prob;
  const int64_t row_length = is_lse ? 1 : num_experts;  // also the number of columns
  const int c = threadIdx.x % kReduceCols;
  const int slice = threadIdx.x / kReduceCols;
  const int64_t col = (is_lse ? 0 : static_cast<int64_t>(blockIdx.x) * kReduceCols) + c;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * group_rows;
  const int64_t end = min(num_rows, begin + group_rows);

  double total = 0.0;
  if (col < row_length) {
    for (int64_t r = begin + slice; r < end; r += kReduceSlices) total += data[r * row_step * row_length + col];
  }
  s_sum[slice][c] = total;
  __syncthreads();
#pragma unroll
  for (int half = kReduceSlices / 2; half > 0; half >>= 1) {
    if (slice < half) s_sum[slice][c] += s_sum[slice + half][c];
    __syncthreads();
  }
  if (slice == 0 && col < row_length) {
    const double sum = s_sum[0][c];
    if (mean_prob == nullptr)
      data[begin * row_step * row_length + col] = static_cast<float>(sum);  // read above, same block
    else if (is_lse)
      *z_loss = static_cast<float>(sum * inv_tokens);
    else
      mean_prob[col] = static_cast<float>(sum * inv_tokens);
  }
}

// ---- backward: dx for the rows of a grid-stride loop, a group of GROUP lanes per row.
template <int GROUP, int VPL>
__global__ void __launch_bounds__(kBackwardThreads, 1) topk_route_backward_kernel(const TopkRouteBackwardParams p) {
  constexpr int kRowsPerWarp = kWarpSize / GROUP;
  const int num_experts = static_cast<int>(p.num_experts);
  const int k = p.k;
  const int64_t num_tokens = p.num_tokens;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane % GROUP;
  const int sub = lane / GROUP;
  const int group_first_lane = lane - g;

  const float inv_tokens = __frcp_rn(static_cast<float>(num_tokens));  // = 1.0f / T, correctly rounded
  const float grad_z = *static_cast<const float*>(p.grad_z_loss);
  const float* grad_mean_prob = static_cast<const float*>(p.grad_mean_prob);
  const float* lse_in = static_cast<const float*>(p.lse);
  const float* weights = static_cast<const float*>(p.weights);
  const float* grad_weights = static_cast<const float*>(p.grad_weights);
  float* grad_logits = static_cast<float*>(p.grad_logits);

  float mean_grad[VPL];  // gP_e / T for the lane's columns
#pragma unroll
  for (int v = 0; v < VPL; ++v) {
    const int col = g + GROUP * v;
    mean_grad[v] = col < num_experts ? grad_mean_prob[col] * inv_tokens : 0.0f;
  }

  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kBackwardWarps * kRowsPerWarp;
  for (int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kBackwardWarps + warp) * kRowsPerWarp; row0 < num_tokens;
       row0 += row_step) {  // uniform per warp
    const int64_t row = row0 + sub;
    const bool valid = row < num_tokens;
    float prob[VPL];
    load_row<GROUP, VPL>(prob, p.logits, p.logits_kind, row * p.row_stride, p.col_stride, g, num_experts, valid);
    const float lse = valid ? lse_in[row] : 0.0f;
#pragma unroll
    for (int v = 0; v < VPL; ++v) prob[v] = g + GROUP * v < num_experts ? route_probability(prob[v], lse) : 0.0f;

    // Lane j < k holds selection j. Ids outside [0, E) (never produced by the forward) match no column.
    int my_id = -1;
    float my_weight = 0.0f, my_grad_weight = 0.0f;
    if (valid && g < k) {
      const int64_t id = p.expert_ids[row * k + g];
      my_id = id >= 0 && id < num_experts ? static_cast<int>(id) : -1;
      my_weight = weights[row * k + g];
      my_grad_weight = grad_weights[row * k + g];
    }
    const float selected_dot = group_sum<GROUP>(my_weight * my_grad_weight);  // Σ_i w_i gw_i
    const float c = 2.0f * grad_z * lse * inv_tokens;

    // prob[] becomes dx in place, so the live arrays are mean_grad, prob and (raw weights) dense.
    if (!p.renormalize) {  // uniform branch: g_e = gP_e / T + Σ_j [s_j = e] gw_j
      float dense[VPL];
#pragma unroll
      for (int v = 0; v < VPL; ++v) dense[v] = mean_grad[v];
      for (int j = 0; j < k; ++j) {
        const int id = __shfl_sync(kFullMask, my_id, group_first_lane + j);
        const float grad_weight = __shfl_sync(kFullMask, my_grad_weight, group_first_lane + j);
#pragma unroll
        for (int v = 0; v < VPL; ++v)
          if (id == g + GROUP * v) dense[v] += grad_weight;
      }
      float dot = 0.0f;
#pragma unroll
      for (int v = 0; v < VPL; ++v) dot += prob[v] * dense[v];
      dot = group_sum<GROUP>(dot);
#pragma unroll
      for (int v = 0; v < VPL; ++v) prob[v] = route_grad_element(prob[v], dense[v], dot, c);
    } else {  // dx_e = p_e (gP_e / T − Σ p gP / T) + c p_e, then dx_{s_j} += w_j (gw_j − Σ_i w_i gw_i)
      float dot = 0.0f;
#pragma unroll
      for (int v = 0; v < VPL; ++v) dot += prob[v] * mean_grad[v];
      dot = group_sum<GROUP>(dot);
#pragma unroll
      for (int v = 0; v < VPL; ++v) prob[v] = route_grad_element(prob[v], mean_grad[v], dot, c);
      const float my_term = my_weight * (my_grad_weight - selected_dot);
      for (int j = 0; j < k; ++j) {
        const int id = __shfl_sync(kFullMask, my_id, group_first_lane + j);
        const float term = __shfl_sync(kFullMask, my_term, group_first_lane + j);
#pragma unroll
        for (int v = 0; v < VPL; ++v)
          if (id == g + GROUP * v) prob[v] += term;
      }
    }
    if (valid) {
      float* out = grad_logits + row * p.num_experts;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        const int col = g + GROUP * v;
        if (col < num_experts) out[col] = prob[v];
      }
    }
  }
}

// ---- launches

// The layout for E experts: (lanes per row, values per lane), E ≤ lanes · values.
enum class RowLayout { k8x1, k16x1, k32x1, k32x2, k32x4, k32x8, k32x16, k32x32 };

RowLayout row_layout(int64_t num_experts) {
  if (num_experts <= 8) return RowLayout::k8x1;
  if (num_experts <= 16) return RowLayout::k16x1;
  if (num_experts <= 32) return RowLayout::k32x1;
  if (num_experts <= 64) return RowLayout::k32x2;
  if (num_experts <= 128) return RowLayout::k32x4;
  if (num_experts <= 256) return RowLayout::k32x8;
  if (num_experts <= 512) return RowLayout::k32x16;
  return RowLayout::k32x32;
}

int rows_per_warp(RowLayout layout) { return layout == RowLayout::k8x1 ? 4 : layout == RowLayout::k16x1 ? 2 : 1; }

// What the kernels rely on (the torch layer checks it too, with messages).
bool check_shape(ScalarKind kind, int64_t num_experts, int32_t k) {
  if (kind != ScalarKind::kFloat32 && kind != ScalarKind::kFloat16 && kind != ScalarKind::kBFloat16) return false;
  if (num_experts < 1 || num_experts > kMaxExperts) return false;
  return k >= 1 && k <= kMaxTopK && k <= num_experts;
}

template <int GROUP, int VPL>
int launch_route(const TopkRouteParams& p, cudaStream_t stream) {
  topk_route_kernel<GROUP, VPL><<<static_cast<unsigned>(p.num_blocks), kRouteThreads, 0, stream>>>(p);
  return launch_status();
}

template <int GROUP, int VPL>
int launch_backward(const TopkRouteBackwardParams& p, unsigned blocks, cudaStream_t stream) {
  topk_route_backward_kernel<GROUP, VPL><<<blocks, kBackwardThreads, 0, stream>>>(p);
  return launch_status();
}

int launch_reduce(const TopkRouteParams& p, float* z_loss, float* mean_prob, cudaStream_t stream) {
  float* partial_prob = static_cast<float*>(p.partial_prob_sum);
  float* partial_lse_sq = static_cast<float*>(p.partial_lse_sq_sum);
  const unsigned tiles = grid_blocks(p.num_experts, kReduceCols) + 1;  // + lse²
  const double inv_tokens = 1.0 / static_cast<double>(p.num_tokens);
  const int64_t blocks = p.num_blocks;
  if (blocks <= kSinglePassRows) {
    reduce_route_partials_kernel<<<dim3(tiles, 1), kReduceThreads, 0, stream>>>(
        partial_prob, partial_lse_sq, p.num_experts, blocks, 1, blocks, mean_prob, z_loss, inv_tokens);
    return launch_status();
  }
  // Two passes: groups of G consecutive blocks (G = smallest power of two with G² ≥ blocks, so at
  // most G groups; blocks ≤ 2^22 keeps the group count well inside gridDim.y), then the groups.
  int64_t group = 1;
  while (group * group < blocks) group <<= 1;
  const int64_t groups = ceil_div(blocks, group);
  if (groups > kMaxGridYZ) return static_cast<int>(cudaErrorInvalidConfiguration);
  reduce_route_partials_kernel<<<dim3(tiles, static_cast<unsigned>(groups)), kReduceThreads, 0, stream>>>(
      partial_prob, partial_lse_sq, p.num_experts, blocks, 1, group, nullptr, nullptr, inv_tokens);
  if (const int status = launch_status()) return status;
  reduce_route_partials_kernel<<<dim3(tiles, 1), kReduceThreads, 0, stream>>>(
      partial_prob, partial_lse_sq, p.num_experts, groups, group, groups, mean_prob, z_loss, inv_tokens);
  return launch_status();
}

}  // namespace

int topk_route_cuda(const TopkRouteParams& params, void* z_loss, void* mean_prob, void* stream) {
  if (params.num_tokens <= 0) return static_cast<int>(cudaSuccess);
  if (!check_shape(params.logits_kind, params.num_experts, params.k) || params.rows_per_block < 1 ||
      params.num_blocks != ceil_div(params.num_tokens, params.rows_per_block) || params.num_blocks > kMaxGridX ||
      z_loss == nullptr || mean_prob == nullptr || params.counts == nullptr || params.partial_prob_sum == nullptr ||
      params.partial_lse_sq_sum == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int status = 0;
  switch (row_layout(params.num_experts)) {
    case RowLayout::k8x1: status = launch_route<8, 1>(params, s); break;
    case RowLayout::k16x1: status = launch_route<16, 1>(params, s); break;
    case RowLayout::k32x1: status = launch_route<32, 1>(params, s); break;
    case RowLayout::k32x2: status = launch_route<32, 2>(params, s); break;
    case RowLayout::k32x4: status = launch_route<32, 4>(params, s); break;
    case RowLayout::k32x8: status = launch_route<32, 8>(params, s); break;
    case RowLayout::k32x16: status = launch_route<32, 16>(params, s); break;
    case RowLayout::k32x32: status = launch_route<32, 32>(params, s); break;
  }
  if (status != 0) return status;
  return launch_reduce(params, static_cast<float*>(z_loss), static_cast<float*>(mean_prob), s);
}

int topk_route_backward_cuda(const TopkRouteBackwardParams& params, void* stream) {
  if (params.num_tokens <= 0) return static_cast<int>(cudaSuccess);
  if (!check_shape(params.logits_kind, params.num_experts, params.k)) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const RowLayout layout = row_layout(params.num_experts);

  // Enough blocks to fill the GPU (8 resident blocks of 256 threads per SM at most), capped so each
  // warp loops over several rows and reuses its gP / T registers.
  int device = 0, sms = 0;
  cudaError_t query = cudaGetDevice(&device);
  if (query == cudaSuccess) query = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (query != cudaSuccess) return static_cast<int>(query);
  const int64_t rows_per_block = static_cast<int64_t>(kBackwardWarps) * rows_per_warp(layout);
  const int64_t needed = ceil_div(params.num_tokens, rows_per_block);
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * 8;
  const unsigned blocks = static_cast<unsigned>(needed < cap ? needed : cap);
  int status = 0;

  switch (layout) {
    case RowLayout::k8x1: status = launch_backward<8, 1>(params, blocks, s); break;
    case RowLayout::k16x1: status = launch_backward<16, 1>(params, blocks, s); break;
    case RowLayout::k32x1: status = launch_backward<32, 1>(params, blocks, s); break;
    case RowLayout::k32x2: status = launch_backward<32, 2>(params, blocks, s); break;
    case RowLayout::k32x4: status = launch_backward<32, 4>(params, blocks, s); break;
    case RowLayout::k32x8: status = launch_backward<32, 8>(params, blocks, s); break;
    case RowLayout::k32x16: status = launch_backward<32, 16>(params, blocks, s); break;
    case RowLayout::k32x32: status = launch_backward<32, 32>(params, blocks, s); break;
  }
  return status;
}

}  // namespace moe
}  // namespace fastcore

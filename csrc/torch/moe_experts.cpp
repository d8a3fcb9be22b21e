// Torch glue of the fused MoE expert computation (fastcore_ai.ops.moe_experts, inference path):
//
//   out[t] = Σ_{j kept} w[t, j] · W_down[e] (act(W_gate[e] x[t]) ⊙ W_up[e] x[t]),  e = expert_ids[t, j]
//
// Both devices first build moe_dispatch's plan without gathering x (expert_offsets, slot_to_token,
// token_slot; one host read of S, as moe_dispatch), then:
//   CUDA  two grouped-GEMM launches over all experts (grouped_gemm.cu): the gate_up GEMM gathers x rows by
//         slot_to_token inside its A-tile loads (no x_sorted) and fuses act(gate)·up into its epilogue; the
//         down GEMM applies the routing weight of each row in its epilogue (row_scale, built with torch ops
//         on the device: no sync); then the fixed-order combine kernel with unit weights sums each token's
//         k rows (deterministic, no atomics).
//   CPU   work items of up to R rows of one expert (R keeps the item's x rows, gate_up and h within a few
//         MB): gather the item's x rows into a buffer, one BLAS GEMM for gate_up, the fused activation, one
//         BLAS GEMM for the down projection written straight into y_sorted, with the routing weight folded
//         into the activation's output rows (w · W_down h = W_down (w · h), so y comes out of the GEMM
//         already weighted); then the fixed-order combine with unit weights. Items run in parallel with
//         single-threaded GEMMs when there are enough of them, else one after another with threaded GEMMs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "moe/grouped_mlp.h"
#include "moe_grouped_gemm.h"
#include "tensor_params.h"

#ifdef FASTCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastcore {
namespace moe {
namespace {

constexpr const char* kOp = "moe_experts";

// Rows per CPU chunk: the chunk's x rows, gate_up and h stay within a few MB (cache resident) while
// each GEMM keeps enough rows for BLAS to run at full speed.
int64_t chunk_rows(int64_t H, int64_t n1) {
  const int64_t bytes_per_row = (H + n1 + n1 / 2) * 4;
  return std::clamp<int64_t>((int64_t(4) << 20) / std::max<int64_t>(bytes_per_row, 1), 64, 1024);
}

// Scales row r of h (width I, float or double) by scale[r] (the routing weight of the slot that row holds).
at::Tensor routing_scale_of_rows(const at::Tensor& token_slot, const at::Tensor& weights, int64_t S,
                                 at::ScalarType dtype) {
  // scale[token_slot[t, j]] = w[t, j] for the kept slots; dropped slots (−1) land in a scratch entry 0
  // of a shifted buffer that is cut off. Each real row is written exactly once (the plan is a permutation).
  at::Tensor index = token_slot.reshape({-1}) + 1;
  at::Tensor buffer = at::zeros({S + 1}, weights.options().dtype(dtype));
  buffer.index_put_({index}, weights.reshape({-1}).to(dtype));
  return buffer.narrow(0, 1, S);
}

// Parallel over work items from this many on. A function of the shapes only (never of the thread count),
// so the same GEMM calls run whatever torch.get_num_threads() says: bitwise reproducible results.
constexpr int64_t kMinParallelItems = 8;

// One unit of CPU work: rows [begin, begin + rows) of expert e's segment.
struct WorkItem {
  int64_t expert, begin, rows;
};

at::Tensor experts_forward_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& slot_to_token,
                               const at::Tensor& token_slot, const at::Tensor& weights, const at::Tensor& w_gate_up,
                               const at::Tensor& w_down, int64_t activation, bool gated) {
  const int64_t S = slot_to_token.size(0), H = x.size(1), I = w_down.size(2), n1 = w_gate_up.size(1);
  const auto dtype = x.scalar_type();
  const auto acc = accumulate_type_of(x);
  at::Tensor y_sorted = at::empty({S, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (S > 0 && H > 0 && I == 0) y_sorted.zero_();
  if (S > 0 && H > 0 && I > 0) {
    const at::Tensor scale = routing_scale_of_rows(token_slot, weights, S, acc);
    const int64_t* bounds = offsets.data_ptr<int64_t>();
    const int64_t E = offsets.size(0) - 1;
    const int64_t R = chunk_rows(H, n1);
    std::vector<WorkItem> items;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t begin = bounds[e]; begin < bounds[e + 1]; begin += R)
        items.push_back({e, begin, std::min(R, bounds[e + 1] - begin)});
    const int64_t num_items = static_cast<int64_t>(items.size());
    // Each item writes only its own rows of y_sorted, with a fixed computation: the result is the same
    // whichever thread runs it. Enough items: one item per thread at a time with single-threaded BLAS
    // (small expert GEMMs scale better that way than split across threads); few items: one after
    // another, each GEMM using every thread (the BLAS's own partitioning).
    const bool across_items = num_items >= kMinParallelItems;
    auto run_items = [&](int64_t item_begin, int64_t item_end) {
      // at::parallel_for's worker threads do not inherit the caller's dispatch state: skip autograd
      // explicitly (the weights may be parameters that require grad; this is a kernel, not a graph).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const int64_t rows_max = std::min(R, S);
      at::Tensor xb = at::empty({rows_max, H}, x.options());
      at::Tensor gu = at::empty({rows_max, n1}, x.options());
      at::Tensor h_acc = at::empty({rows_max, I}, x.options().dtype(acc));
      at::Tensor h = dtype == acc ? h_acc : at::empty({rows_max, I}, x.options());
      GatedActivationParams ap;
      ap.inner = I;
      ap.gated = gated;
      ap.is_double = acc == at::kDouble;
      ap.activation = static_cast<Activation>(activation);
      for (int64_t i = item_begin; i < item_end; ++i) {
        const WorkItem& item = items[i];
        const int64_t rows = item.rows;
        at::Tensor x_chunk = xb.narrow(0, 0, rows), gu_chunk = gu.narrow(0, 0, rows);
        at::index_select_out(x_chunk, x, 0, slot_to_token.narrow(0, item.begin, rows));  // the one permutation
        at::mm_out(gu_chunk, x_chunk, w_gate_up[item.expert].t());
        const at::Tensor gu_in = dtype == acc ? gu_chunk : gu_chunk.to(acc);
        at::Tensor h_chunk = h_acc.narrow(0, 0, rows);
        ap.gate_up = gu_in.data_ptr();
        ap.h = h_chunk.data_ptr();
        ap.rows = rows;
        if (across_items) {
          gated_activation_forward_cpu(ap, 0, rows);
        } else {
          at::parallel_for(0, rows, 16, [&](int64_t b, int64_t end) { gated_activation_forward_cpu(ap, b, end); });
        }
        // Fold the routing weight into h's rows: w · (W_down h) = W_down (w · h).
        h_chunk.mul_(scale.narrow(0, item.begin, rows).unsqueeze(1));
        at::Tensor h_in = h_chunk;
        if (dtype != acc) {
          h_in = h.narrow(0, 0, rows);
          h_in.copy_(h_chunk);
        }
        at::Tensor y_chunk = y_sorted.narrow(0, item.begin, rows);
        at::mm_out(y_chunk, h_in, w_down[item.expert].t());
      }
    };
    if (across_items) {
      at::parallel_for(0, num_items, 1, run_items);
    } else {
      run_items(0, num_items);
    }
  }
  return combine(y_sorted, token_slot, std::nullopt);
}

#ifdef FASTCORE_WITH_CUDA
at::Tensor experts_forward_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& slot_to_token,
                                const at::Tensor& token_slot, const at::Tensor& weights, const at::Tensor& w_gate_up,
                                const at::Tensor& w_down, int64_t activation, bool gated) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t S = slot_to_token.size(0), H = x.size(1), I = w_down.size(2);
  at::Tensor y_sorted = at::empty({S, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (S > 0 && H > 0) {
    if (I == 0) {
      y_sorted.zero_();
    } else {
      const at::Tensor scale = routing_scale_of_rows(token_slot, weights, S, at::kFloat).contiguous();
      at::Tensor h = at::empty({S, I}, x.options());
      cuda_gate_up(x, slot_to_token.data_ptr<int64_t>(), offsets, w_gate_up, I, gated, activation, nullptr, h, kOp);
      cuda_down(h, offsets, w_down, scale.data_ptr<float>(), y_sorted, kOp);
    }
  }
  return combine(y_sorted, token_slot, std::nullopt);
}
#endif

}  // namespace

// out [T, H] in x's dtype. Validation with full messages is in fastcore_ai.ops.moe_experts; these checks
// guard the kernels when _C is called directly.
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                           const std::optional<at::Tensor>& kept, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           int64_t activation, bool gated) {
  FC_CHECK(x.dim() == 2 && w_down.dim() == 3 && w_gate_up.dim() == 3, kOp,
           "x must be [T, H], w_gate_up [E, 2I or I, H], w_down [E, H, I]");
  const int64_t T = x.size(0), H = x.size(1), E = w_down.size(0), I = w_down.size(2);
  FC_CHECK(w_down.size(1) == H && w_gate_up.size(0) == E && w_gate_up.size(2) == H &&
               w_gate_up.size(1) == (gated ? 2 * I : I),
           kOp, "weight shapes do not match x: w_gate_up must be [E, ", gated ? "2I" : "I", ", H], w_down [E, H, I]");
  FC_CHECK(x.scalar_type() == w_gate_up.scalar_type() && x.scalar_type() == w_down.scalar_type(), kOp,
           "x, w_gate_up and w_down must share one dtype");
  FC_CHECK(w_gate_up.device() == x.device() && w_down.device() == x.device() && weights.device() == x.device(), kOp,
           "the weights and routing weights must be on x's device");
  FC_CHECK(weights.dim() == 2 && weights.sizes() == expert_ids.sizes(), kOp, "weights must be shaped like expert_ids");
  FC_CHECK(activation >= 0 && activation <= 2, kOp, "activation code must be 0 (silu), 1 (gelu) or 2 (relu)");
  scalar_kind_of(weights, kOp, "weights");
  const auto plan = dispatch_impl(x, expert_ids, kept, E, /*gather=*/false);  // validates the ids (ValueError)
  const at::Tensor& offsets = plan[1];
  const at::Tensor& slot_to_token = plan[2];
  const at::Tensor& token_slot = plan[3];
  if (T == 0 || H == 0) return at::zeros({T, H}, x.options());
  if (x.is_cuda()) {
#ifdef FASTCORE_WITH_CUDA
    FC_CHECK(x.scalar_type() != at::kDouble, kOp, "the cuda backend takes float32, float16 or bfloat16, got float64");
    return experts_forward_cuda(x, offsets, slot_to_token, token_slot, weights, w_gate_up, w_down, activation, gated);
#else
    FC_CHECK(false, kOp, "this build of fastcore_ai has no CUDA kernels");
#endif
  }
  return experts_forward_cpu(x, offsets, slot_to_token, token_slot, weights, w_gate_up, w_down, activation, gated);
}

}  // namespace moe
}  // namespace fastcore

// Torch glue of the fused MoE expert computation (fastcore_ai.ops.moe_experts; inference on CPU and CUDA,
// and on the CPU also the fused training forward/backward, experts_forward_train / experts_backward below):
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
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "cuda_call.h"
#include "moe/grouped_mlp.h"
#include "moe_grouped_gemm.h"
#include "tensor_params.h"

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

// Rows per block of the training backward's activation math (float32 working set per block: a few
// hundred KB to ~1 MB at these widths, instead of whole-segment float32 copies).
constexpr int64_t kActivationRows = 128;

// Parallel over work items from this many on. A function of the shapes only (never of the thread count),
// so the same GEMM calls run whatever torch.get_num_threads() says: bitwise reproducible results.
constexpr int64_t kMinParallelItems = 8;

// One unit of CPU work: rows [begin, begin + rows) of expert e's segment.
struct WorkItem {
  int64_t expert, begin, rows;
};

// gate_up_saved: undefined for inference; for training an [S, n1] tensor in x's dtype that receives every
// row's gate_up GEMM output (the backward's only saved activation: h is recomputed from it).
at::Tensor experts_forward_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& slot_to_token,
                               const at::Tensor& token_slot, const at::Tensor& weights, const at::Tensor& w_gate_up,
                               const at::Tensor& w_down, int64_t activation, bool gated,
                               const at::Tensor& gate_up_saved = at::Tensor()) {
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
      at::Tensor gu = gate_up_saved.defined() ? at::Tensor() : at::empty({rows_max, n1}, x.options());
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
        at::Tensor x_chunk = xb.narrow(0, 0, rows);
        at::Tensor gu_chunk =
            gate_up_saved.defined() ? gate_up_saved.narrow(0, item.begin, rows) : gu.narrow(0, 0, rows);
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

at::Tensor experts_forward_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& slot_to_token,
                                const at::Tensor& token_slot, const at::Tensor& weights, const at::Tensor& w_gate_up,
                                const at::Tensor& w_down, int64_t activation, bool gated) {
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

}  // namespace

namespace {

// The checks the kernels rely on (validation with full messages is in fastcore_ai.ops.moe_experts; these
// guard the kernels when _C is called directly).
void check_experts_inputs(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                          const at::Tensor& w_gate_up, const at::Tensor& w_down, int64_t activation, bool gated) {
  FC_CHECK(x.dim() == 2 && w_down.dim() == 3 && w_gate_up.dim() == 3, kOp,
           "x must be [T, H], w_gate_up [E, 2I or I, H], w_down [E, H, I]");
  const int64_t H = x.size(1), E = w_down.size(0), I = w_down.size(2);
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
}

}  // namespace

// out [T, H] in x's dtype.
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                           const std::optional<at::Tensor>& kept, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           int64_t activation, bool gated) {
  check_experts_inputs(x, expert_ids, weights, w_gate_up, w_down, activation, gated);
  const int64_t T = x.size(0), H = x.size(1), E = w_down.size(0);
  const auto plan = dispatch_impl(x, expert_ids, kept, E, /*gather=*/false);  // validates the ids (ValueError)
  const at::Tensor& offsets = plan[1];
  const at::Tensor& slot_to_token = plan[2];
  const at::Tensor& token_slot = plan[3];
  if (T == 0 || H == 0) return at::zeros({T, H}, x.options());
  if (x.is_cuda()) {
    require_cuda(kOp);
    FC_CHECK(x.scalar_type() != at::kDouble, kOp, "the cuda backend takes float32, float16 or bfloat16, got float64");
    return experts_forward_cuda(x, offsets, slot_to_token, token_slot, weights, w_gate_up, w_down, activation, gated);
  }
  return experts_forward_cpu(x, offsets, slot_to_token, token_slot, weights, w_gate_up, w_down, activation, gated);
}

// Training forward (CPU): (out [T, H], gate_up [S, n1] in x's dtype, expert_offsets [E + 1], slot_to_token [S],
// token_slot [T, k]) — the same computation as experts_forward, bitwise, plus what experts_backward needs.
std::vector<at::Tensor> experts_forward_train(const at::Tensor& x, const at::Tensor& expert_ids,
                                              const at::Tensor& weights, const std::optional<at::Tensor>& kept,
                                              const at::Tensor& w_gate_up, const at::Tensor& w_down, int64_t activation,
                                              bool gated) {
  check_experts_inputs(x, expert_ids, weights, w_gate_up, w_down, activation, gated);
  FC_CHECK(x.device().is_cpu(), kOp,
           "the fused training path runs on the cpu backend (cuda/triton train through "
           "the moe_dispatch -> moe_grouped_mlp -> moe_combine composition)");
  const int64_t T = x.size(0), H = x.size(1), E = w_down.size(0), n1 = w_gate_up.size(1);
  const auto plan = dispatch_impl(x, expert_ids, kept, E, /*gather=*/false);
  const at::Tensor& offsets = plan[1];
  const at::Tensor& slot_to_token = plan[2];
  const at::Tensor& token_slot = plan[3];
  const int64_t S = slot_to_token.size(0);
  if (T == 0 || H == 0)
    return {at::zeros({T, H}, x.options()), at::zeros({S, n1}, x.options()), offsets, slot_to_token, token_slot};
  at::Tensor gate_up = at::empty({S, n1}, x.options());
  at::Tensor out = experts_forward_cpu(x, offsets, slot_to_token, token_slot, weights, w_gate_up, w_down, activation,
                                       gated, gate_up);
  return {out, gate_up, offsets, slot_to_token, token_slot};
}

// Fused CPU backward of experts_forward_train. With r a row of expert e (token t = slot_to_token[r],
// routing weight w_r), gu_r the saved gate_up row, h_r = act(gate) ⊙ up recomputed from it, and the
// forward's y_r = W_down[e] (w_r h_r) (the weight folded into h), g_r = grad_out[t]:
//   a_r = g_r W_down[e]                  (= dL/d(w_r h_r), one GEMM per segment)
//   dW_down[e] = Σ_r g_rᵀ (w_r h_r)       (GEMM; w_r h_r rounded exactly as in the forward)
//   dL/dw_r = <a_r, h_r>                  (= <g_r, W_down[e] h_r>)
//   dL/dh_r = w_r a_r -> dL/dgu_r by the activation backward
//   grad_x_sorted_r = dL/dgu_r W_gate_up[e];   dW_gate_up[e] = Σ_r dL/dgu_rᵀ x_t
//   grad_x[t] = Σ_j grad_x_sorted[token_slot[t, j]] in fixed j order (combine with unit weights).
// Per expert segment (segments in parallel with single-threaded BLAS when there are >= 8, as the forward);
// each writes only its own rows and its own weight-gradient slices: deterministic for any thread count.
// Working memory: per running segment its rows of grad_out, a, w·h, dL/dgu and x in x's dtype, the
// activation math in the accumulate type on blocks of kActivationRows rows, plus grad_x_sorted [S, H]. Gradients not asked for (need_*) are returned as
// empty [0] tensors and not computed. Returns (grad_x [T, H], grad_weights [T, k] in weights' dtype,
// grad_w_gate_up, grad_w_down).
std::vector<at::Tensor> experts_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& expert_offsets, const at::Tensor& slot_to_token,
                                         const at::Tensor& token_slot, const at::Tensor& weights,
                                         const at::Tensor& gate_up, const at::Tensor& w_gate_up,
                                         const at::Tensor& w_down, int64_t activation, bool gated, bool need_x,
                                         bool need_weights, bool need_params) {
  check_experts_inputs(x, token_slot, weights, w_gate_up, w_down, activation, gated);
  FC_CHECK(x.device().is_cpu(), kOp, "the fused training backward runs on the cpu backend");
  const int64_t T = x.size(0), H = x.size(1), I = w_down.size(2), n1 = w_gate_up.size(1);
  const int64_t S = slot_to_token.size(0);
  const auto dtype = x.scalar_type();
  const auto acc = accumulate_type_of(x);
  FC_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H && grad_out.device().is_cpu(), kOp,
           "grad_out must be [T, H] = [", T, ", ", H, "]");
  FC_CHECK(
      slot_to_token.dim() == 1 && slot_to_token.scalar_type() == at::kLong && token_slot.scalar_type() == at::kLong,
      kOp, "slot_to_token [S] and token_slot [T, k] must be int64 (the plan of the forward)");
  FC_CHECK(gate_up.dim() == 2 && gate_up.size(0) == S && gate_up.size(1) == n1 && gate_up.scalar_type() == dtype, kOp,
           "gate_up must be the forward's [S, ", n1, "] tensor in x's dtype");
  const auto bounds = segment_bounds(expert_offsets, S, kOp);
  FC_CHECK(static_cast<int64_t>(bounds.size()) == w_down.size(0) + 1, kOp, "expert_offsets must have E + 1 entries");
  if (S > 0) {
    const at::Tensor rows_token = slot_to_token;
    FC_CHECK(rows_token.min().item<int64_t>() >= 0 && rows_token.max().item<int64_t>() < T, kOp,
             "slot_to_token must lie in [0, T) (use the plan of the forward)");
  }
  const at::Tensor go = grad_out.to(dtype).contiguous();
  const at::Tensor gu_saved = gate_up.contiguous();
  // Weight gradients: the GEMMs overwrite the slices of experts that hold rows; only the others are zeroed
  // (no memset pass over the whole [E, ...] tensors). Everything is zero when H or I is 0.
  const bool any_work = S > 0 && H > 0 && I > 0;
  at::Tensor grad_w_down =
      need_params ? at::empty_like(w_down, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  at::Tensor grad_w_gate_up =
      need_params ? at::empty_like(w_gate_up, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  if (need_params) {
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(bounds.size()); ++e) {
      if (any_work && bounds[e + 1] > bounds[e]) continue;
      grad_w_down[e].zero_();
      grad_w_gate_up[e].zero_();
    }
  }
  at::Tensor grad_x_sorted =
      any_work ? at::empty({need_x ? S : 0, H}, x.options()) : at::zeros({need_x ? S : 0, H}, x.options());
  at::Tensor grad_row_weight = at::zeros({need_weights ? S : 0}, x.options().dtype(acc));
  if (any_work && (need_x || need_weights || need_params)) {
    const at::Tensor scale = routing_scale_of_rows(token_slot, weights, S, acc);
    for_each_segment_work(bounds, [&](int64_t e, int64_t begin, int64_t rows, bool threaded) {
      const at::Tensor row_tokens = slot_to_token.narrow(0, begin, rows);
      at::Tensor g = at::index_select(go, 0, row_tokens);  // [rows, H]
      at::Tensor a = at::mm(g, w_down[e]);                 // [rows, I]: dL/d(w·h)
      // The GEMM operands are whole-segment tensors in x's dtype; the activation math runs in the
      // accumulate type on blocks of kActivationRows rows, so at most one such block is ever held in
      // float32 for bf16/fp16 inputs (for float32 the blocks are views: no copies at all).
      const bool need_grad_gu = need_x || need_params;
      at::Tensor weighted_h = need_params ? at::empty({rows, I}, x.options()) : at::Tensor();
      at::Tensor grad_gu;
      GatedActivationParams ap;
      ap.inner = I;
      ap.gated = gated;
      ap.is_double = acc == at::kDouble;
      ap.activation = static_cast<Activation>(activation);
      // Pass 1 over blocks: h (recomputed), dL/dw, and w·h for dW_down; then that GEMM, so grad_out's
      // rows and w·h are released before pass 2 allocates dL/dgu.
      for (int64_t block = 0; block < rows && (need_weights || need_params); block += kActivationRows) {
        const int64_t n = std::min(kActivationRows, rows - block);
        const at::Tensor gu_acc = gu_saved.narrow(0, begin + block, n).to(acc);  // a view when dtype == acc
        at::Tensor h_acc =
            dtype == acc && need_params ? weighted_h.narrow(0, block, n) : at::empty({n, I}, x.options().dtype(acc));
        ap.gate_up = gu_acc.data_ptr();
        ap.h = h_acc.data_ptr();
        ap.rows = n;
        rows_loop(0, n, threaded, [&](int64_t b, int64_t end) { gated_activation_forward_cpu(ap, b, end); });
        if (need_weights) {
          const at::Tensor a_acc = a.narrow(0, block, n).to(acc);
          grad_row_weight.narrow(0, begin + block, n).copy_((a_acc * h_acc).sum(1));
        }
        if (need_params) {
          h_acc.mul_(scale.narrow(0, begin + block, n).unsqueeze(1));  // the forward's (w · h), the same operation
          if (dtype != acc) weighted_h.narrow(0, block, n).copy_(h_acc);
        }
      }
      if (need_params) {
        at::Tensor grad_w_down_e = grad_w_down[e];
        at::mm_out(grad_w_down_e, g.t(), weighted_h);
      }
      g.reset();
      weighted_h.reset();
      if (!need_grad_gu) return;
      // Pass 2: dL/dh = w · a and the activation backward into dL/dgu (x's dtype, for the two GEMMs).
      grad_gu = at::empty({rows, n1}, x.options());
      for (int64_t block = 0; block < rows; block += kActivationRows) {
        const int64_t n = std::min(kActivationRows, rows - block);
        const at::Tensor gu_acc = gu_saved.narrow(0, begin + block, n).to(acc);
        at::Tensor a_acc = a.narrow(0, block, n).to(acc);  // a view when dtype == acc (a is not needed after)
        a_acc.mul_(scale.narrow(0, begin + block, n).unsqueeze(1));
        at::Tensor grad_gu_acc =
            dtype == acc ? grad_gu.narrow(0, block, n) : at::empty({n, n1}, x.options().dtype(acc));
        ap.gate_up = gu_acc.data_ptr();
        ap.rows = n;
        ap.grad_h = a_acc.data_ptr();
        ap.grad_gate_up = grad_gu_acc.data_ptr();
        rows_loop(0, n, threaded, [&](int64_t b, int64_t end) { gated_activation_backward_cpu(ap, b, end); });
        if (dtype != acc) grad_gu.narrow(0, block, n).copy_(grad_gu_acc);
      }
      a.reset();
      if (need_x) {
        at::Tensor grad_x_rows = grad_x_sorted.narrow(0, begin, rows);
        at::mm_out(grad_x_rows, grad_gu, w_gate_up[e]);
      }
      if (need_params) {
        at::Tensor grad_w_gate_up_e = grad_w_gate_up[e];
        at::mm_out(grad_w_gate_up_e, grad_gu.t(), at::index_select(x, 0, row_tokens));
      }
    });
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_x && dtype == acc) {
    grad_x = combine(grad_x_sorted, token_slot, std::nullopt);
  } else if (need_x) {
    // combine sums in float32 into a float32 [T, H] result; run it over blocks of tokens so that only a
    // block's float32 result exists next to grad_x (same per-token operations: the same bits).
    grad_x = at::empty({T, H}, x.options());
    constexpr int64_t kCombineTokens = 512;
    for (int64_t t0 = 0; t0 < T; t0 += kCombineTokens) {
      const int64_t n = std::min(kCombineTokens, T - t0);
      grad_x.narrow(0, t0, n).copy_(combine(grad_x_sorted, token_slot.narrow(0, t0, n), std::nullopt));
    }
  }
  at::Tensor grad_weights = at::empty({0}, weights.options());
  if (need_weights) {
    // grad_weights[t, j] = dL/dw of the row holding slot (t, j); 0 for a dropped slot (token_slot = −1).
    const at::Tensor ts = token_slot.contiguous();
    const at::Tensor padded = at::cat({at::zeros({1}, grad_row_weight.options()), grad_row_weight});
    grad_weights = padded.index_select(0, (ts.reshape({-1}) + 1)).reshape(ts.sizes()).to(weights.scalar_type());
  }
  return {grad_x, grad_weights, grad_w_gate_up, grad_w_down};
}

}  // namespace moe

void bind_moe_experts(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("moe_experts", &moe::experts_forward,
        "fused expert computation: plan, gathered gate_up GEMM + activation, weighted down GEMM, combine", py::arg("x"),
        py::arg("expert_ids"), py::arg("weights"), py::arg("kept"), py::arg("w_gate_up"), py::arg("w_down"),
        py::arg("activation"), py::arg("gated"));
  m.def("moe_experts_train", &moe::experts_forward_train,
        "fused expert computation that also returns (gate_up, expert_offsets, slot_to_token, token_slot) (CPU)",
        py::arg("x"), py::arg("expert_ids"), py::arg("weights"), py::arg("kept"), py::arg("w_gate_up"),
        py::arg("w_down"), py::arg("activation"), py::arg("gated"));
  m.def("moe_experts_backward", &moe::experts_backward,
        "fused expert backward from the saved gate_up (CPU): (grad_x, grad_weights, grad_w_gate_up, grad_w_down)",
        py::arg("grad_out"), py::arg("x"), py::arg("expert_offsets"), py::arg("slot_to_token"), py::arg("token_slot"),
        py::arg("weights"), py::arg("gate_up"), py::arg("w_gate_up"), py::arg("w_down"), py::arg("activation"),
        py::arg("gated"), py::arg("need_x"), py::arg("need_weights"), py::arg("need_params"));
}

}  // namespace fastcore

// Torch glue of the MoE expert MLP on the CPU: one BLAS GEMM per expert segment on views (no copies
// of x or the weights), the fused activation kernel (csrc/kernels/moe/grouped_mlp.h) between them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "moe/grouped_mlp.h"
#include "tensor_params.h"

namespace fastcore {
namespace moe {
namespace {

constexpr const char* kOp = "moe_grouped_mlp";

std::vector<int64_t> segment_bounds(const at::Tensor& expert_offsets, int64_t rows) {
  FC_CHECK(expert_offsets.device().is_cpu() && expert_offsets.scalar_type() == at::kLong && expert_offsets.dim() == 1,
           kOp, "expert_offsets must be an int64 CPU tensor [E + 1]");
  at::Tensor offsets = expert_offsets.contiguous();
  std::vector<int64_t> bounds(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + offsets.numel());
  FC_CHECK(!bounds.empty() && bounds.front() == 0 && bounds.back() == rows, kOp,
           "expert_offsets must start at 0 and end at S = ", rows);
  for (size_t e = 1; e < bounds.size(); ++e)
    FC_CHECK(bounds[e] >= bounds[e - 1], kOp, "expert_offsets must be non-decreasing (entry ", e, ")");
  return bounds;
}

// Calls fn(e, begin, rows) for every expert segment that holds rows, in expert order.
template <typename Fn>
void for_each_segment(const std::vector<int64_t>& bounds, Fn&& fn) {
  for (size_t e = 0; e + 1 < bounds.size(); ++e)
    if (bounds[e + 1] > bounds[e]) fn(static_cast<int64_t>(e), bounds[e], bounds[e + 1] - bounds[e]);
}

at::Tensor run_activation(const at::Tensor& gate_up_acc, int64_t inner, bool gated, int64_t activation,
                          const at::Tensor* grad_h_acc) {
  GatedActivationParams p;
  p.gate_up = gate_up_acc.data_ptr();
  p.rows = gate_up_acc.size(0);
  p.inner = inner;
  p.gated = gated;
  p.is_double = gate_up_acc.scalar_type() == at::kDouble;
  p.activation = static_cast<Activation>(activation);
  at::Tensor out;
  if (grad_h_acc == nullptr) {
    out = at::empty({p.rows, inner}, gate_up_acc.options());
    p.h = out.data_ptr();
    at::parallel_for(0, p.rows, 64, [&](int64_t b, int64_t e) { gated_activation_forward_cpu(p, b, e); });
  } else {
    out = at::empty_like(gate_up_acc);
    p.grad_h = grad_h_acc->data_ptr();
    p.grad_gate_up = out.data_ptr();
    at::parallel_for(0, p.rows, 64, [&](int64_t b, int64_t e) { gated_activation_backward_cpu(p, b, e); });
  }
  return out;
}

}  // namespace

// Returns (y_sorted [S, H] in x's dtype, gate_up [S, 2I or I] in the accumulate type, saved for backward).
std::vector<at::Tensor> grouped_mlp_forward(const at::Tensor& x_sorted, const at::Tensor& expert_offsets,
                                            const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                            int64_t activation, bool gated) {
  FC_CHECK(x_sorted.device().is_cpu(), kOp, "the cpu backend takes CPU tensors");
  const int64_t S = x_sorted.size(0), H = x_sorted.size(1), I = w_down.size(2);
  const auto bounds = segment_bounds(expert_offsets, S);
  const auto acc = accumulate_type_of(x_sorted);
  at::Tensor gate_up = at::empty({S, w_gate_up.size(1)}, x_sorted.options());
  at::Tensor y = at::empty({S, H}, x_sorted.options());
  for_each_segment(bounds, [&](int64_t e, int64_t begin, int64_t rows) {
    at::Tensor out = gate_up.narrow(0, begin, rows);
    at::mm_out(out, x_sorted.narrow(0, begin, rows), w_gate_up[e].t());
  });
  at::Tensor gate_up_acc = gate_up.to(acc).contiguous();
  at::Tensor h = run_activation(gate_up_acc, I, gated, activation, nullptr).to(x_sorted.scalar_type());
  for_each_segment(bounds, [&](int64_t e, int64_t begin, int64_t rows) {
    at::Tensor out = y.narrow(0, begin, rows);
    at::mm_out(out, h.narrow(0, begin, rows), w_down[e].t());
  });
  return {y, gate_up_acc};
}

// Returns (grad_x_sorted [S, H], grad_w_gate_up, grad_w_down) in the input dtypes.
std::vector<at::Tensor> grouped_mlp_backward(const at::Tensor& grad_y, const at::Tensor& x_sorted,
                                             const at::Tensor& expert_offsets, const at::Tensor& w_gate_up,
                                             const at::Tensor& w_down, const at::Tensor& gate_up_acc,
                                             int64_t activation, bool gated) {
  const int64_t S = x_sorted.size(0), I = w_down.size(2);
  const auto bounds = segment_bounds(expert_offsets, S);
  const auto dtype = x_sorted.scalar_type();
  at::Tensor gy = grad_y.to(dtype).contiguous();
  at::Tensor h = run_activation(gate_up_acc, I, gated, activation, nullptr).to(dtype);
  at::Tensor grad_h = at::empty({S, I}, x_sorted.options());
  at::Tensor grad_w_down = at::zeros_like(w_down, at::MemoryFormat::Contiguous);
  at::Tensor grad_w_gate_up = at::zeros_like(w_gate_up, at::MemoryFormat::Contiguous);
  at::Tensor grad_x = at::empty_like(x_sorted, at::MemoryFormat::Contiguous);
  for_each_segment(bounds, [&](int64_t e, int64_t begin, int64_t rows) {
    at::Tensor gy_e = gy.narrow(0, begin, rows);
    at::Tensor grad_h_e = grad_h.narrow(0, begin, rows), grad_w_down_e = grad_w_down[e];
    at::mm_out(grad_h_e, gy_e, w_down[e]);
    at::mm_out(grad_w_down_e, gy_e.t(), h.narrow(0, begin, rows));
  });
  at::Tensor grad_h_acc = grad_h.to(gate_up_acc.scalar_type()).contiguous();
  at::Tensor grad_gate_up = run_activation(gate_up_acc, I, gated, activation, &grad_h_acc).to(dtype);
  for_each_segment(bounds, [&](int64_t e, int64_t begin, int64_t rows) {
    at::Tensor ggu_e = grad_gate_up.narrow(0, begin, rows);
    at::Tensor grad_x_e = grad_x.narrow(0, begin, rows), grad_w_gate_up_e = grad_w_gate_up[e];
    at::mm_out(grad_x_e, ggu_e, w_gate_up[e]);
    at::mm_out(grad_w_gate_up_e, ggu_e.t(), x_sorted.narrow(0, begin, rows));
  });
  return {grad_x, grad_w_gate_up, grad_w_down};
}

}  // namespace moe
}  // namespace fastcore

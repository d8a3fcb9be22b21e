// Torch glue of the MoE expert MLP.
// CPU: one BLAS GEMM per expert segment on views (no copies of x or the weights), the fused activation
// kernel (csrc/kernels/moe/grouped_mlp.h) between them.
// CUDA: the grouped GEMM of csrc/kernels/moe/grouped_gemm.cu, one launch per projection over all
// experts, with the activation (forward and backward) fused in its epilogues; the two weight-gradient
// GEMMs of the backward are at::mm on per-expert segment views (cuBLAS), which reads the offsets on the
// host once (one sync per backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "cuda_call.h"
#include "moe/grouped_gemm.h"
#include "moe/grouped_mlp.h"
#include "moe_grouped_gemm.h"
#include "tensor_params.h"

namespace fastcore {
namespace moe {
namespace {

constexpr const char* kOp = "moe_grouped_mlp";

GatedActivationParams activation_params(const at::Tensor& gate_up_acc, int64_t inner, bool gated, int64_t activation) {
  GatedActivationParams p;
  p.gate_up = gate_up_acc.data_ptr();
  p.rows = gate_up_acc.size(0);
  p.inner = inner;
  p.gated = gated;
  p.is_double = gate_up_acc.scalar_type() == at::kDouble;
  p.activation = static_cast<Activation>(activation);
  return p;
}

void launch_grouped_gemm(GroupedGemmParams& p, const at::Tensor& expert_offsets, const char* op) {
  at::Tensor scratch = at::empty({2 * (p.num_experts + 1)}, expert_offsets.options());
  p.scratch = scratch.data_ptr<int64_t>();
  p.expert_offsets = expert_offsets.data_ptr<int64_t>();
  FC_CUDA_CALL(op, "grouped GEMM launch", expert_offsets.device(), grouped_gemm_cuda(p, current_stream()));
}

GroupedGemmParams gemm_params(const at::Tensor& a, const at::Tensor& b, int64_t b_k_dim, int64_t b_n_dim, int64_t rows,
                              int64_t num_experts, int64_t n, int64_t k, const char* op) {
  GroupedGemmParams p;
  p.kind = scalar_kind_of(a, op, "x");
  FC_CHECK(p.kind != ScalarKind::kFloat64, op, "the cuda backend takes float32, float16 or bfloat16, got float64");
  p.a = a.data_ptr();
  p.a_row_stride = a.stride(0);
  p.a_col_stride = a.stride(1);
  p.a_num_rows = a.size(0);
  p.b = b.data_ptr();
  p.b_expert_stride = b.stride(0);
  p.b_k_stride = b.stride(b_k_dim);
  p.b_n_stride = b.stride(b_n_dim);
  p.num_experts = num_experts;
  p.rows = rows;
  p.n = n;
  p.k = k;
  return p;
}

}  // namespace

void cuda_gate_up(const at::Tensor& a, const int64_t* a_rows, const at::Tensor& expert_offsets,
                  const at::Tensor& w_gate_up, int64_t inner, bool gated, int64_t activation, float* gate_up_out,
                  at::Tensor& h, const char* op) {
  const int64_t S = h.size(0);
  if (S == 0 || inner == 0) return;
  if (a.size(1) == 0) {  // K = 0: gate = up = 0
    h.zero_();
    return;
  }
  // B[e] (κ = h, n = j) = W_gate_up[e, j, h].
  GroupedGemmParams p = gemm_params(a, w_gate_up, 2, 1, S, w_gate_up.size(0), inner, a.size(1), op);
  p.a_rows = a_rows;
  p.epilogue = GemmEpilogue::kActForward;
  p.gated = gated;
  p.activation = static_cast<Activation>(activation);
  p.gate_up_out = gate_up_out;
  p.h = h.data_ptr();
  launch_grouped_gemm(p, expert_offsets, op);
}

void cuda_down(const at::Tensor& h, const at::Tensor& expert_offsets, const at::Tensor& w_down, const float* row_scale,
               at::Tensor& y, const char* op) {
  const int64_t S = y.size(0), H = y.size(1);
  if (S == 0 || H == 0) return;
  if (h.size(1) == 0) {
    y.zero_();
    return;
  }
  // B[e] (κ = i, n = h) = W_down[e, h, i].
  GroupedGemmParams p = gemm_params(h, w_down, 2, 1, S, w_down.size(0), H, h.size(1), op);
  p.epilogue = GemmEpilogue::kStore;
  p.c = y.data_ptr();
  p.c_row_stride = y.stride(0);
  p.row_scale = row_scale;
  launch_grouped_gemm(p, expert_offsets, op);
}

namespace {

std::vector<at::Tensor> grouped_mlp_forward_cuda(const at::Tensor& x_sorted, const at::Tensor& expert_offsets,
                                                 const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                                 int64_t activation, bool gated) {
  const int64_t S = x_sorted.size(0), H = x_sorted.size(1), I = w_down.size(2);
  FC_CHECK(expert_offsets.is_cuda() && w_gate_up.is_cuda() && w_down.is_cuda(), kOp,
           "expert_offsets and the weights must be on x_sorted's device");
  at::Tensor offsets = expert_offsets.contiguous();
  at::Tensor gate_up = at::empty({S, w_gate_up.size(1)}, x_sorted.options().dtype(at::kFloat));
  at::Tensor h = at::empty({S, I}, x_sorted.options());
  at::Tensor y = at::empty({S, H}, x_sorted.options());  // every row is written (sanitised offsets cover [0, S))
  if (S == 0 || H == 0 || I == 0) return {y.zero_(), gate_up.zero_()};
  cuda_gate_up(x_sorted, nullptr, offsets, w_gate_up, I, gated, activation, gate_up.data_ptr<float>(), h, kOp);
  cuda_down(h, offsets, w_down, nullptr, y, kOp);
  return {y, gate_up};
}

std::vector<at::Tensor> grouped_mlp_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_sorted,
                                                  const at::Tensor& expert_offsets, const at::Tensor& w_gate_up,
                                                  const at::Tensor& w_down, const at::Tensor& gate_up_acc,
                                                  int64_t activation, bool gated) {
  const int64_t S = x_sorted.size(0), H = x_sorted.size(1), I = w_down.size(2), n1 = w_gate_up.size(1);
  const auto dtype = x_sorted.scalar_type();
  at::Tensor grad_w_down = at::zeros_like(w_down, at::MemoryFormat::Contiguous);
  at::Tensor grad_w_gate_up = at::zeros_like(w_gate_up, at::MemoryFormat::Contiguous);
  at::Tensor grad_x = at::empty({S, H}, x_sorted.options());
  if (S == 0 || H == 0 || I == 0) return {grad_x.zero_(), grad_w_gate_up, grad_w_down};
  at::Tensor offsets = expert_offsets.contiguous();
  at::Tensor gy = grad_y.to(dtype).contiguous();
  at::Tensor gate_up = gate_up_acc.to(at::kFloat).contiguous();
  at::Tensor grad_gu = at::empty({S, n1}, x_sorted.options());
  at::Tensor h = at::empty({S, I}, x_sorted.options());
  {
    // grad_h = grad_y W_down[e]: B[e] (κ = h, n = i) = W_down[e, h, i]; epilogue -> grad_gu and h.
    GroupedGemmParams p = gemm_params(gy, w_down, 1, 2, S, w_down.size(0), I, H, kOp);
    p.epilogue = GemmEpilogue::kActBackward;
    p.gated = gated;
    p.activation = static_cast<Activation>(activation);
    p.gate_up_in = gate_up.data_ptr<float>();
    p.c = grad_gu.data_ptr();
    p.c_row_stride = n1;
    p.h = h.data_ptr();
    launch_grouped_gemm(p, offsets, kOp);
  }
  {
    // grad_x = grad_gu W_gate_up[e]: B[e] (κ = j, n = h) = W_gate_up[e, j, h].
    GroupedGemmParams p = gemm_params(grad_gu, w_gate_up, 1, 2, S, w_gate_up.size(0), H, n1, kOp);
    p.epilogue = GemmEpilogue::kStore;
    p.c = grad_x.data_ptr();
    p.c_row_stride = H;
    launch_grouped_gemm(p, offsets, kOp);
  }
  // Weight gradients: cuBLAS on segment views (the one host read of the offsets).
  const auto bounds = segment_bounds(offsets.cpu(), S, kOp);
  for_each_segment(bounds, [&](int64_t e, int64_t begin, int64_t rows) {
    at::Tensor grad_w_down_e = grad_w_down[e], grad_w_gate_up_e = grad_w_gate_up[e];
    at::mm_out(grad_w_down_e, gy.narrow(0, begin, rows).t(), h.narrow(0, begin, rows));
    at::mm_out(grad_w_gate_up_e, grad_gu.narrow(0, begin, rows).t(), x_sorted.narrow(0, begin, rows));
  });
  return {grad_x, grad_w_gate_up, grad_w_down};
}

}  // namespace

// Returns (y_sorted [S, H] in x's dtype, gate_up [S, 2I or I] in the accumulate type, saved for backward).
std::vector<at::Tensor> grouped_mlp_forward(const at::Tensor& x_sorted, const at::Tensor& expert_offsets,
                                            const at::Tensor& w_gate_up, const at::Tensor& w_down, int64_t activation,
                                            bool gated) {
  if (x_sorted.is_cuda()) {
    require_cuda(kOp);
    return grouped_mlp_forward_cuda(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated);
  }
  FC_CHECK(x_sorted.device().is_cpu(), kOp, "the cpu backend takes CPU tensors");
  const int64_t S = x_sorted.size(0), H = x_sorted.size(1), I = w_down.size(2), n1 = w_gate_up.size(1);
  const auto bounds = segment_bounds(expert_offsets, S, kOp);
  const auto dtype = x_sorted.scalar_type();
  const auto acc = accumulate_type_of(x_sorted);
  at::Tensor gate_up_acc = at::empty({S, n1}, x_sorted.options().dtype(acc));
  at::Tensor gate_up = dtype == acc ? gate_up_acc : at::empty({S, n1}, x_sorted.options());
  at::Tensor h_acc = at::empty({S, I}, x_sorted.options().dtype(acc));
  at::Tensor h = dtype == acc ? h_acc : at::empty({S, I}, x_sorted.options());
  at::Tensor y = at::empty({S, H}, x_sorted.options());
  GatedActivationParams ap = activation_params(gate_up_acc, I, gated, activation);
  ap.h = h_acc.data_ptr();
  for_each_segment_work(bounds, [&](int64_t e, int64_t begin, int64_t rows, bool threaded) {
    at::Tensor gu_e = gate_up.narrow(0, begin, rows), y_e = y.narrow(0, begin, rows);
    at::mm_out(gu_e, x_sorted.narrow(0, begin, rows), w_gate_up[e].t());
    if (dtype != acc) gate_up_acc.narrow(0, begin, rows).copy_(gu_e);
    rows_loop(begin, rows, threaded, [&](int64_t b, int64_t end) { gated_activation_forward_cpu(ap, b, end); });
    if (dtype != acc) h.narrow(0, begin, rows).copy_(h_acc.narrow(0, begin, rows));
    at::mm_out(y_e, h.narrow(0, begin, rows), w_down[e].t());
  });
  return {y, gate_up_acc};
}

// Returns (grad_x_sorted [S, H], grad_w_gate_up, grad_w_down) in the input dtypes.
std::vector<at::Tensor> grouped_mlp_backward(const at::Tensor& grad_y, const at::Tensor& x_sorted,
                                             const at::Tensor& expert_offsets, const at::Tensor& w_gate_up,
                                             const at::Tensor& w_down, const at::Tensor& gate_up_acc,
                                             int64_t activation, bool gated) {
  if (x_sorted.is_cuda()) {
    require_cuda(kOp);
    return grouped_mlp_backward_cuda(grad_y, x_sorted, expert_offsets, w_gate_up, w_down, gate_up_acc, activation,
                                     gated);
  }
  const int64_t S = x_sorted.size(0), I = w_down.size(2), n1 = w_gate_up.size(1);
  const auto bounds = segment_bounds(expert_offsets, S, kOp);
  const auto dtype = x_sorted.scalar_type();
  const auto acc = gate_up_acc.scalar_type();
  FC_CHECK(gate_up_acc.dim() == 2 && gate_up_acc.size(0) == S && gate_up_acc.size(1) == n1 &&
               acc == accumulate_type_of(x_sorted),
           kOp, "gate_up must be the forward's [S, ", n1, "] tensor in the accumulate dtype");
  at::Tensor gu = gate_up_acc.contiguous();
  at::Tensor gy = grad_y.to(dtype).contiguous();
  at::Tensor h_acc = at::empty({S, I}, x_sorted.options().dtype(acc));
  at::Tensor h = dtype == acc ? h_acc : at::empty({S, I}, x_sorted.options());
  at::Tensor grad_h = at::empty({S, I}, x_sorted.options());
  at::Tensor grad_h_acc = dtype == acc ? grad_h : at::empty({S, I}, x_sorted.options().dtype(acc));
  at::Tensor grad_gu_acc = at::empty({S, n1}, x_sorted.options().dtype(acc));
  at::Tensor grad_gu = dtype == acc ? grad_gu_acc : at::empty({S, n1}, x_sorted.options());
  at::Tensor grad_w_down = at::zeros_like(w_down, at::MemoryFormat::Contiguous);
  at::Tensor grad_w_gate_up = at::zeros_like(w_gate_up, at::MemoryFormat::Contiguous);
  at::Tensor grad_x = at::empty_like(x_sorted, at::MemoryFormat::Contiguous);
  GatedActivationParams ap = activation_params(gu, I, gated, activation);
  ap.h = h_acc.data_ptr();
  ap.grad_h = grad_h_acc.data_ptr();
  ap.grad_gate_up = grad_gu_acc.data_ptr();
  // Per expert segment (each writes only its own rows and its own weight-gradient slice):
  //   h = act(gate) ⊙ up (recomputed from the saved gate_up), grad_h = grad_y W_down[e],
  //   grad_W_down[e] = grad_yᵀ h, grad_gu = activation backward, grad_x = grad_gu W_gate_up[e],
  //   grad_W_gate_up[e] = grad_guᵀ x.
  for_each_segment_work(bounds, [&](int64_t e, int64_t begin, int64_t rows, bool threaded) {
    at::Tensor gy_e = gy.narrow(0, begin, rows), h_e = h.narrow(0, begin, rows);
    at::Tensor grad_h_e = grad_h.narrow(0, begin, rows), grad_w_down_e = grad_w_down[e];
    rows_loop(begin, rows, threaded, [&](int64_t b, int64_t end) { gated_activation_forward_cpu(ap, b, end); });
    if (dtype != acc) h_e.copy_(h_acc.narrow(0, begin, rows));
    at::mm_out(grad_h_e, gy_e, w_down[e]);
    at::mm_out(grad_w_down_e, gy_e.t(), h_e);
    if (dtype != acc) grad_h_acc.narrow(0, begin, rows).copy_(grad_h_e);
    rows_loop(begin, rows, threaded, [&](int64_t b, int64_t end) { gated_activation_backward_cpu(ap, b, end); });
    at::Tensor ggu_e = grad_gu.narrow(0, begin, rows);
    if (dtype != acc) ggu_e.copy_(grad_gu_acc.narrow(0, begin, rows));
    at::Tensor grad_x_e = grad_x.narrow(0, begin, rows), grad_w_gate_up_e = grad_w_gate_up[e];
    at::mm_out(grad_x_e, ggu_e, w_gate_up[e]);
    at::mm_out(grad_w_gate_up_e, ggu_e.t(), x_sorted.narrow(0, begin, rows));
  });
  return {grad_x, grad_w_gate_up, grad_w_down};
}

}  // namespace moe

void bind_moe_grouped_mlp(pybind11::module_& m) {
  m.def("moe_grouped_mlp", &moe::grouped_mlp_forward, "expert MLP over expert segments (CPU, CUDA)");
  m.def("moe_grouped_mlp_backward", &moe::grouped_mlp_backward, "expert MLP backward (CPU, CUDA)");
}

}  // namespace fastcore

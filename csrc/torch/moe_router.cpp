// Torch glue of the fused MoE router: validation of what the kernels rely on, output allocation,
// TopkRouteParams filling, and the CPU (at::parallel_for) or CUDA launch. The user-facing
// validation with full messages lives in fastcore_ai.ops (one helper); these checks guard the
// kernels when _C is called directly.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <torch/csrc/utils/pybind.h>

#include "cuda_call.h"
#include "moe/topk_route.h"
#include "tensor_params.h"

namespace fastcore {
namespace moe {
namespace {

constexpr const char* kOp = "moe_topk_route";

void check_route_inputs(const at::Tensor& logits, int64_t k) {
  FC_CHECK(logits.dim() == 2, kOp, "logits must have shape [T, E], got ", logits.dim(), " dims");
  scalar_kind_of(logits, kOp, "logits");
  const int64_t E = logits.size(1);
  FC_CHECK(E >= 1 && E <= kMaxExperts, kOp, "logits must have 1 <= E <= ", kMaxExperts, " experts, got E=", E);
  FC_CHECK(k >= 1 && k <= std::min<int64_t>(E, kMaxTopK), kOp, "k must satisfy 1 <= k <= min(E, ", kMaxTopK,
           "), got k=", k, " with E=", E);
}

bool device_is_cuda(const at::Tensor& t) { return t.is_cuda(); }

void fill_logits(const at::Tensor& logits, const void*& data, ScalarKind& kind, int64_t& T, int64_t& E,
                 int64_t& row_stride, int64_t& col_stride) {
  data = logits.data_ptr();
  kind = scalar_kind_of(logits, kOp, "logits");
  T = logits.size(0);
  E = logits.size(1);
  row_stride = logits.stride(0);
  col_stride = logits.stride(1);
}

}  // namespace

// Rows of work below which one call runs on the calling thread: waking the pool costs more than a
// few microseconds of routing (a 512 × 16 call is a few µs of work). Counted in logits elements.
constexpr int64_t kMinParallelElements = int64_t(1) << 15;

// A CPU tensor without the dispatcher's round trip (the router allocates six per call, and at decode
// sizes the allocations cost more than the routing). Under torch's deterministic mode with
// fill_uninitialized_memory, at::empty poisons new memory (the tests' unwritten-output check): then
// it is used instead.
at::Tensor empty_on_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto& context = at::globalContext();
  if (C10_UNLIKELY(context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory()))
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

// Returns (weights [T,k], expert_ids [T,k] int64, z_loss [], tokens_per_expert [E] int64,
//          mean_prob [E], lse [T]); float tensors are float32 (float64 for float64 logits), and with
// `with_kept` a seventh output kept [T,k] bool, all True (the dropless mask, made here so that the
// Python layer's direct path needs no further torch call).
std::vector<at::Tensor> route(const at::Tensor& logits, int64_t k, bool renormalize, bool with_kept) {
  check_route_inputs(logits, k);
  const bool on_cuda = device_is_cuda(logits);
  const auto acc = accumulate_type_of(logits);
  TopkRouteParams p;
  fill_logits(logits, p.logits, p.logits_kind, p.num_tokens, p.num_experts, p.row_stride, p.col_stride);
  const int64_t T = p.num_tokens, E = p.num_experts;
  p.k = static_cast<int32_t>(k);
  p.renormalize = renormalize;
  p.rows_per_block = route_rows_per_block(T, E, on_cuda ? 64 : 256);
  p.num_blocks = (T + p.rows_per_block - 1) / p.rows_per_block;

  if (on_cuda) {
    const auto float_opts = logits.options().dtype(acc);
    const auto long_opts = logits.options().dtype(at::kLong);
    at::Tensor weights = at::empty({T, k}, float_opts);
    at::Tensor expert_ids = at::empty({T, k}, long_opts);
    at::Tensor lse = at::empty({T}, float_opts);
    at::Tensor z_loss = at::zeros({}, float_opts);
    at::Tensor mean_prob = at::zeros({E}, float_opts);
    at::Tensor counts = at::zeros({E}, long_opts);
    std::vector<at::Tensor> out{weights, expert_ids, z_loss, counts, mean_prob, lse};
    if (with_kept) out.push_back(at::ones({T, k}, logits.options().dtype(at::kBool)));
    if (T == 0) return out;
    require_cuda(kOp);
    FC_CHECK(logits.scalar_type() != at::kDouble, kOp,
             "the cuda backend takes float32, float16 or bfloat16 logits, got float64");
    p.weights = weights.data_ptr();
    p.expert_ids = expert_ids.data_ptr<int64_t>();
    p.lse = lse.data_ptr();
    p.counts = counts.data_ptr<int64_t>();
    at::Tensor partial_prob = at::empty({p.num_blocks, E}, float_opts);
    at::Tensor partial_lse_sq = at::empty({p.num_blocks}, float_opts);
    p.partial_prob_sum = partial_prob.data_ptr();
    p.partial_lse_sq_sum = partial_lse_sq.data_ptr();
    FC_CUDA_CALL(kOp, "kernel launch", logits.device(),
                 topk_route_cuda(p, z_loss.data_ptr(), mean_prob.data_ptr(), current_stream()));
    return out;
  }

  // CPU: every output is written by the kernel (z_loss, counts and mean_prob by the reduction), so
  // nothing is zero-filled except for T = 0; the block partials live in one host buffer.
  at::Tensor weights = empty_on_cpu({T, k}, acc);
  at::Tensor expert_ids = empty_on_cpu({T, k}, at::kLong);
  at::Tensor lse = empty_on_cpu({T}, acc);
  at::Tensor z_loss = empty_on_cpu({}, acc);
  at::Tensor mean_prob = empty_on_cpu({E}, acc);
  at::Tensor counts = empty_on_cpu({E}, at::kLong);
  std::vector<at::Tensor> out{weights, expert_ids, z_loss, counts, mean_prob, lse};
  if (with_kept) {
    at::Tensor kept = empty_on_cpu({T, k}, at::kBool);
    std::memset(kept.data_ptr(), 1, static_cast<size_t>(T * k));  // bool true is the byte 1
    out.push_back(kept);
  }
  if (T == 0) {
    z_loss.zero_();
    mean_prob.zero_();
    counts.zero_();
    return out;
  }
  p.weights = weights.data_ptr();
  p.expert_ids = expert_ids.data_ptr<int64_t>();
  p.lse = lse.data_ptr();
  p.counts = counts.data_ptr<int64_t>();
  const size_t acc_size = acc == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t prob_bytes = static_cast<size_t>(p.num_blocks * E) * acc_size;
  const size_t lse_bytes = static_cast<size_t>(p.num_blocks) * acc_size;
  std::unique_ptr<unsigned char[]> partials(
      new unsigned char[prob_bytes + lse_bytes + static_cast<size_t>(p.num_blocks * E) * sizeof(int32_t)]);
  p.partial_prob_sum = partials.get();
  p.partial_lse_sq_sum = partials.get() + prob_bytes;
  p.partial_counts = reinterpret_cast<int32_t*>(partials.get() + prob_bytes + lse_bytes);
  // The blocks are fixed by T and E (determinism); the grain only decides how many threads share them.
  const int64_t block_elements = p.rows_per_block * E;
  const int64_t grain = std::max<int64_t>(1, (kMinParallelElements + block_elements - 1) / block_elements);
  at::parallel_for(0, p.num_blocks, grain, [&](int64_t begin, int64_t end) { topk_route_cpu_blocks(p, begin, end); });
  topk_route_cpu_reduce(p, z_loss.data_ptr(), mean_prob.data_ptr());
  return out;
}

std::vector<at::Tensor> topk_route(const at::Tensor& logits, int64_t k, bool renormalize) {
  return route(logits, k, renormalize, false);
}

std::vector<at::Tensor> topk_route_with_kept(const at::Tensor& logits, int64_t k, bool renormalize) {
  return route(logits, k, renormalize, true);
}

// Gradient of (weights, z_loss, mean_prob) w.r.t. logits, in the accumulate type (the Python layer
// casts to the logits' dtype).
at::Tensor topk_route_backward(const at::Tensor& logits, const at::Tensor& expert_ids, const at::Tensor& weights,
                               const at::Tensor& lse, const at::Tensor& grad_weights, const at::Tensor& grad_z_loss,
                               const at::Tensor& grad_mean_prob, bool renormalize) {
  check_route_inputs(logits, expert_ids.size(-1));
  const auto acc = accumulate_type_of(logits);
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_ids.size(-1);
  FC_CHECK(expert_ids.sizes() == at::IntArrayRef({T, k}) && expert_ids.scalar_type() == at::kLong, kOp,
           "expert_ids must be int64 [T, k]");
  FC_CHECK(weights.sizes() == at::IntArrayRef({T, k}) && lse.sizes() == at::IntArrayRef({T}), kOp,
           "weights/lse must be the forward's outputs");
  at::Tensor grad_logits = at::empty({T, E}, logits.options().dtype(acc));
  if (T == 0) return grad_logits;
  const auto on = [&](const at::Tensor& t) { return t.to(logits.device(), acc).contiguous(); };
  at::Tensor ids_c = expert_ids.contiguous();
  at::Tensor w_c = on(weights), lse_c = on(lse), gw_c = on(grad_weights).expand({T, k}).contiguous();
  at::Tensor gz_c = on(grad_z_loss).reshape({1}), gp_c = on(grad_mean_prob).expand({E}).contiguous();

  TopkRouteBackwardParams p;
  fill_logits(logits, p.logits, p.logits_kind, p.num_tokens, p.num_experts, p.row_stride, p.col_stride);
  p.k = static_cast<int32_t>(k);
  p.renormalize = renormalize;
  p.expert_ids = ids_c.data_ptr<int64_t>();
  p.weights = w_c.data_ptr();
  p.lse = lse_c.data_ptr();
  p.grad_weights = gw_c.data_ptr();
  p.grad_z_loss = gz_c.data_ptr();
  p.grad_mean_prob = gp_c.data_ptr();
  p.grad_logits = grad_logits.data_ptr();
  if (logits.is_cuda()) {
    FC_CUDA_CALL(kOp, "backward kernel launch", logits.device(), topk_route_backward_cuda(p, current_stream()));
  } else {
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) { topk_route_backward_cpu_rows(p, begin, end); });
  }
  return grad_logits;
}

}  // namespace moe

void bind_moe_router(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("moe_topk_route", &moe::topk_route, "fused softmax + top-k router", py::arg("logits"), py::arg("k"),
        py::arg("renormalize"));
  m.def("moe_topk_route_with_kept", &moe::topk_route_with_kept,
        "moe_topk_route plus the dropless kept mask (all True), for the Python layer's direct path", py::arg("logits"),
        py::arg("k"), py::arg("renormalize"));
  m.def("moe_topk_route_backward", &moe::topk_route_backward, "router backward", py::arg("logits"),
        py::arg("expert_ids"), py::arg("weights"), py::arg("lse"), py::arg("grad_weights"), py::arg("grad_z_loss"),
        py::arg("grad_mean_prob"), py::arg("renormalize"));
}

}  // namespace fastcore

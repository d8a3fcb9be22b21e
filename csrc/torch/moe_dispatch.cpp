// Torch glue of MoE dispatch / combine: validation of what the kernels rely on, allocation,
// params filling, and the CPU (at::parallel_for) or CUDA launches. The user-facing validation with
// full messages lives in fastcore_ai.ops.moe_dispatch; these checks guard the kernels when _C is
// called directly. Out-of-range expert ids and malformed plans raise here (ValueError).
//
// Host syncs: dispatch's output size S = expert_offsets[E] is data-dependent, so dispatch reads it
// on the host once (on CUDA: one 16-byte device-to-host copy of (S, number of bad ids), after the
// counting kernels and before the scatter). Combine and its backward never sync; on CUDA a malformed
// plan gives NaN rows instead of an error (see dispatch.h).
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>
#include <optional>

#include "cuda_call.h"
#include "moe/dispatch.h"
#include "tensor_params.h"

namespace fastcore {
namespace moe {
namespace {

constexpr const char* kDispatch = "moe_dispatch";
constexpr const char* kCombine = "moe_combine";

// Raises ValueError naming one offending id (only called on the error path).
[[noreturn]] void raise_bad_ids(const at::Tensor& ids, int64_t E, int64_t bad) {
  const at::Tensor mask = (ids < 0).logical_or(ids >= E).reshape({-1});
  const int64_t flat = mask.nonzero().select(0, 0).item<int64_t>();
  const int64_t k = ids.size(1);
  const int64_t value = ids.reshape({-1}).select(0, flat).item<int64_t>();
  TORCH_CHECK_VALUE(false, "fastcore_ai.ops.", kDispatch, ": expert_ids must lie in [0, num_experts) = [0, ", E,
                    "), got ", bad, " id(s) outside, e.g. ", value, " at (", flat / k, ", ", flat % k, ")");
  throw;  // unreachable
}

int32_t element_size_of(const at::Tensor& t) { return static_cast<int32_t>(t.element_size()); }

}  // namespace

// Returns (x_sorted [S, H] in x's dtype, expert_offsets [E+1], slot_to_token [S], token_slot [T, k]);
// with gather = false, x_sorted is an empty [0, H] tensor and x is only read for its device and shape
// (the fused moe_experts paths gather x rows inside their GEMMs instead).
std::vector<at::Tensor> dispatch_impl(const at::Tensor& x, const at::Tensor& expert_ids,
                                      const std::optional<at::Tensor>& kept, int64_t num_experts, bool gather) {
  FC_CHECK(x.dim() == 2, kDispatch, "x must have shape [T, H], got ", x.dim(), " dims");
  scalar_kind_of(x, kDispatch, "x");
  FC_CHECK(expert_ids.dim() == 2 && expert_ids.scalar_type() == at::kLong && expert_ids.size(0) == x.size(0), kDispatch,
           "expert_ids must be int64 [T, k] with T = x.shape[0]");
  FC_CHECK(num_experts >= 1 && num_experts <= kMaxDispatchExperts, kDispatch,
           "num_experts must satisfy 1 <= E <= ", kMaxDispatchExperts, ", got ", num_experts);
  FC_CHECK(expert_ids.device() == x.device(), kDispatch, "expert_ids must be on x's device");
  const int64_t T = x.size(0), H = x.size(1), k = expert_ids.size(1), E = num_experts;
  FC_CHECK(k >= 1 && T * k < (int64_t(1) << 31), kDispatch, "expert_ids must have 1 <= k and T*k < 2^31");
  at::Tensor kept_c;
  if (kept.has_value()) {
    FC_CHECK(kept->scalar_type() == at::kBool && kept->sizes() == expert_ids.sizes() && kept->device() == x.device(),
             kDispatch, "kept must be a bool tensor shaped like expert_ids, on x's device");
    kept_c = kept->contiguous();
  }
  const bool on_cuda = x.is_cuda();
  const auto long_opts = expert_ids.options();
  at::Tensor ids_c = expert_ids.contiguous();
  at::Tensor offsets = at::empty({E + 1}, long_opts);
  at::Tensor token_slot = at::empty({T, k}, long_opts);

  DispatchParams p;
  p.expert_ids = ids_c.data_ptr<int64_t>();
  p.kept = kept_c.defined() ? kept_c.data_ptr<bool>() : nullptr;
  p.num_tokens = T;
  p.k = k;
  p.num_experts = E;
  p.slots_per_chunk = dispatch_slots_per_chunk(T * k, E, on_cuda ? 1024 : 4096, on_cuda ? 512 : (int64_t(1) << 22));
  p.num_chunks = (T * k + p.slots_per_chunk - 1) / p.slots_per_chunk;
  p.expert_offsets = offsets.data_ptr<int64_t>();
  p.token_slot = token_slot.data_ptr<int64_t>();
  at::Tensor chunk_counts = at::empty({std::max<int64_t>(p.num_chunks, 1), E}, long_opts);  // every row is written
  p.chunk_counts = chunk_counts.data_ptr<int64_t>();

  int64_t S = 0;
  if (T * k == 0) {
    offsets.zero_();  // empty input: no launch, no sync
  } else if (on_cuda) {
    require_cuda(kDispatch);
    FC_CHECK(x.scalar_type() != at::kDouble, kDispatch,
             "the cuda backend takes float32, float16 or bfloat16 x, got float64");
    at::Tensor bad = at::zeros({1}, long_opts);
    p.num_bad_ids = bad.data_ptr<int64_t>();
    FC_CUDA_CALL(kDispatch, "plan (count) launch", x.device(), dispatch_plan_count_cuda(p, current_stream()));
    const at::Tensor host = at::cat({offsets.narrow(0, E, 1), bad}).cpu();  // the one host sync
    S = host[0].item<int64_t>();
    const int64_t num_bad = host[1].item<int64_t>();
    if (num_bad > 0) raise_bad_ids(ids_c, E, num_bad);
  } else {
    at::Tensor bad = at::zeros({std::max<int64_t>(p.num_chunks, 1)}, long_opts);
    p.num_bad_ids = bad.data_ptr<int64_t>();
    at::parallel_for(0, p.num_chunks, 1, [&](int64_t b, int64_t e) { dispatch_count_cpu(p, b, e); });
    const int64_t num_bad = bad.sum().item<int64_t>();
    if (num_bad > 0) raise_bad_ids(ids_c, E, num_bad);
    S = dispatch_scan_cpu(p);
  }

  at::Tensor slot_to_token = at::empty({S}, long_opts);
  at::Tensor x_sorted = at::empty({gather ? S : 0, H}, x.options().memory_format(at::MemoryFormat::Contiguous));
  p.slot_to_token = slot_to_token.data_ptr<int64_t>();
  GatherRowsParams g;
  g.in = x.data_ptr();
  g.in_row_stride = x.stride(0);
  g.in_col_stride = x.stride(1);
  g.in_rows = T;
  g.src_row = p.slot_to_token;
  g.out = x_sorted.data_ptr();
  g.rows = S;
  g.cols = H;
  g.element_size = element_size_of(x);
  if (on_cuda) {
    require_cuda(kDispatch);
    // The scatter runs whenever there are slots: it writes token_slot = -1 for the dropped ones (S may be 0).
    if (T * k > 0)
      FC_CUDA_CALL(kDispatch, "plan (scatter) launch", x.device(), dispatch_plan_scatter_cuda(p, current_stream()));
    if (gather && S > 0 && H > 0)
      FC_CUDA_CALL(kDispatch, "row gather launch", x.device(), gather_rows_cuda(g, current_stream()));
  } else {
    at::parallel_for(0, p.num_chunks, 1, [&](int64_t b, int64_t e) { dispatch_scatter_cpu(p, b, e); });
    if (gather && H > 0) {
      std::atomic<int64_t> bad_rows{0};
      at::parallel_for(0, S, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)),
                       [&](int64_t b, int64_t e) { bad_rows += gather_rows_cpu(g, b, e); });
      FC_CHECK(bad_rows.load() == 0, kDispatch, "internal error: slot_to_token out of range");
    }
  }
  return {x_sorted, offsets, slot_to_token, token_slot};
}

std::vector<at::Tensor> dispatch(const at::Tensor& x, const at::Tensor& expert_ids,
                                 const std::optional<at::Tensor>& kept, int64_t num_experts) {
  return dispatch_impl(x, expert_ids, kept, num_experts, /*gather=*/true);
}

namespace {

void check_plan(const char* op, const at::Tensor& y, const at::Tensor& token_slot) {
  FC_CHECK(y.dim() == 2, op, "y_sorted must have shape [S, H], got ", y.dim(), " dims");
  scalar_kind_of(y, op, "y_sorted");
  FC_CHECK(token_slot.dim() == 2 && token_slot.scalar_type() == at::kLong && token_slot.device() == y.device(), op,
           "plan.token_slot must be int64 [T, k] on y_sorted's device");
}

void check_weights(const char* op, const std::optional<at::Tensor>& weights, const at::Tensor& token_slot,
                   const at::Tensor& y) {
  if (!weights.has_value()) return;
  scalar_kind_of(*weights, op, "weights");
  FC_CHECK(weights->sizes() == token_slot.sizes() && weights->device() == y.device(), op,
           "weights must have plan.token_slot's shape [T, k] and y_sorted's device");
}

at::ScalarType acc_of(const at::Tensor& y) { return accumulate_type_of(y); }

[[noreturn]] void raise_bad_plan(const char* op) {
  TORCH_CHECK_VALUE(false, "fastcore_ai.ops.", op,
                    ": plan is malformed: token_slot must lie in [-1, S) with S = "
                    "y_sorted.shape[0], and slot_to_token in [0, T) (use the plan moe_dispatch returned)");
  throw;  // unreachable
}

}  // namespace

// out [T, H] in y's dtype = Σ_j w[t, j] · y[token_slot[t, j]] (w = 1 when weights is None).
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& token_slot, const std::optional<at::Tensor>& weights) {
  check_plan(kCombine, y_sorted, token_slot);
  check_weights(kCombine, weights, token_slot, y_sorted);
  const int64_t T = token_slot.size(0), k = token_slot.size(1), S = y_sorted.size(0), H = y_sorted.size(1);
  at::Tensor y = y_sorted.contiguous(), ts = token_slot.contiguous();
  at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  at::Tensor out = at::empty({T, H}, y.options().dtype(acc_of(y)));
  if (T == 0 || H == 0) return out.to(y.scalar_type());
  CombineParams p;
  p.y = y.data_ptr();
  p.y_kind = scalar_kind_of(y, kCombine, "y_sorted");
  p.weights = w.defined() ? w.data_ptr() : nullptr;
  if (w.defined()) p.weights_kind = scalar_kind_of(w, kCombine, "weights");
  p.token_slot = ts.data_ptr<int64_t>();
  p.num_tokens = T;
  p.k = k;
  p.num_rows = S;
  p.hidden = H;
  p.out = out.data_ptr();
  if (y.is_cuda()) {
    require_cuda(kCombine);
    FC_CHECK(y.scalar_type() != at::kDouble, kCombine,
             "the cuda backend takes float32, float16 or bfloat16, got float64");
    FC_CUDA_CALL(kCombine, "kernel launch", y.device(), combine_cuda(p, current_stream()));
  } else {
    std::atomic<int64_t> bad{0};
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / H), [&](int64_t b, int64_t e) { bad += combine_cpu(p, b, e); });
    if (bad.load() > 0) raise_bad_plan(kCombine);
  }
  return out.scalar_type() == y.scalar_type() ? out : out.to(y.scalar_type());
}

// (grad_y [S, H] in y's dtype, grad_weights [T, k] in weights' dtype, or an undefined tensor when
// need_weights is false).
std::vector<at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                         const at::Tensor& slot_to_token, const at::Tensor& token_slot,
                                         const at::Tensor& weights, bool need_weights) {
  check_plan(kCombine, y_sorted, token_slot);
  check_weights(kCombine, weights, token_slot, y_sorted);
  const int64_t T = token_slot.size(0), k = token_slot.size(1), S = y_sorted.size(0), H = y_sorted.size(1);
  FC_CHECK(slot_to_token.dim() == 1 && slot_to_token.size(0) == S && slot_to_token.scalar_type() == at::kLong &&
               slot_to_token.device() == y_sorted.device(),
           kCombine, "plan.slot_to_token must be int64 [S] with S = y_sorted.shape[0]");
  FC_CHECK(
      grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H && grad_out.device() == y_sorted.device(),
      kCombine, "grad_out must be [T, H]");
  scalar_kind_of(grad_out, kCombine, "grad_out");
  const auto acc = acc_of(y_sorted);
  at::Tensor y = y_sorted.contiguous(), ts = token_slot.contiguous(), st = slot_to_token.contiguous();
  at::Tensor w = weights.contiguous(), go = grad_out.contiguous();
  at::Tensor grad_y = at::empty({S, H}, y.options().dtype(acc));
  at::Tensor grad_w = need_weights ? at::empty({T, k}, y.options().dtype(acc)) : at::Tensor();
  CombineParams p;
  p.y = y.data_ptr();
  p.y_kind = scalar_kind_of(y, kCombine, "y_sorted");
  p.weights = w.data_ptr();
  p.weights_kind = scalar_kind_of(w, kCombine, "weights");
  p.token_slot = ts.data_ptr<int64_t>();
  p.slot_to_token = st.data_ptr<int64_t>();
  p.num_tokens = T;
  p.k = k;
  p.num_rows = S;
  p.hidden = H;
  p.grad_out = go.data_ptr();
  p.grad_kind = scalar_kind_of(go, kCombine, "grad_out");
  p.grad_y = grad_y.data_ptr();
  p.grad_weights = need_weights ? grad_w.data_ptr() : nullptr;
  if (y.is_cuda()) {
    require_cuda(kCombine);
    FC_CHECK(y.scalar_type() != at::kDouble, kCombine,
             "the cuda backend takes float32, float16 or bfloat16, got float64");
    if ((S > 0 && H > 0) || (need_weights && T > 0))
      FC_CUDA_CALL(kCombine, "backward kernel launch", y.device(), combine_backward_cuda(p, current_stream()));
  } else {
    std::atomic<int64_t> bad{0};
    if (H > 0)
      at::parallel_for(0, S, std::max<int64_t>(1, 16384 / H),
                       [&](int64_t b, int64_t e) { bad += combine_backward_y_cpu(p, b, e); });
    if (need_weights)
      at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(H * k, 1)),
                       [&](int64_t b, int64_t e) { bad += combine_backward_weights_cpu(p, b, e); });
    if (bad.load() > 0) raise_bad_plan(kCombine);
  }
  if (grad_y.scalar_type() != y.scalar_type()) grad_y = grad_y.to(y.scalar_type());
  if (need_weights && grad_w.scalar_type() != w.scalar_type()) grad_w = grad_w.to(w.scalar_type());
  return {grad_y, grad_w};
}

}  // namespace moe

void bind_moe_dispatch(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("moe_dispatch", &moe::dispatch, "group (token, slot) pairs by expert and gather x rows", py::arg("x"),
        py::arg("expert_ids"), py::arg("kept"), py::arg("num_experts"));
  m.def("moe_combine", &moe::combine, "weighted sum of expert rows back per token (fixed order)", py::arg("y_sorted"),
        py::arg("token_slot"), py::arg("weights"));
  m.def("moe_combine_backward", &moe::combine_backward, "combine backward (grad_y, grad_weights)", py::arg("grad_out"),
        py::arg("y_sorted"), py::arg("slot_to_token"), py::arg("token_slot"), py::arg("weights"),
        py::arg("need_weights"));
}

}  // namespace fastcore

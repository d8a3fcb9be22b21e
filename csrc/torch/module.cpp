// The pybind11 module fastcore_ai._C: binds the torch glue of every op and reports how the
// extension was built. Only this file and csrc/torch/<family>_bindings.cpp include torch/extension.h
// (pybind11 + tensor casters).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>

#ifndef FASTCORE_TORCH_VERSION
#define FASTCORE_TORCH_VERSION "unknown"
#endif
#ifndef FASTCORE_CUDA_ARCHS
#define FASTCORE_CUDA_ARCHS ""
#endif
#ifndef FASTCORE_CUDA_VERSION
#define FASTCORE_CUDA_VERSION ""
#endif

namespace fastcore {
namespace moe {
std::vector<at::Tensor> topk_route(const at::Tensor& logits, int64_t k, bool renormalize);
at::Tensor topk_route_backward(const at::Tensor& logits, const at::Tensor& expert_ids,
                               const at::Tensor& weights, const at::Tensor& lse,
                               const at::Tensor& grad_weights, const at::Tensor& grad_z_loss,
                               const at::Tensor& grad_mean_prob, bool renormalize);
std::vector<at::Tensor> dispatch(const at::Tensor& x, const at::Tensor& expert_ids,
                                 const std::optional<at::Tensor>& kept, int64_t num_experts);
at::Tensor combine(const at::Tensor& y_sorted, const at::Tensor& token_slot,
                   const std::optional<at::Tensor>& weights);
std::vector<at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                         const at::Tensor& slot_to_token, const at::Tensor& token_slot,
                                         const at::Tensor& weights, bool need_weights);
std::vector<at::Tensor> grouped_mlp_forward(const at::Tensor& x_sorted, const at::Tensor& expert_offsets,
                                            const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                            int64_t activation, bool gated);
std::vector<at::Tensor> grouped_mlp_backward(const at::Tensor& grad_y, const at::Tensor& x_sorted,
                                             const at::Tensor& expert_offsets, const at::Tensor& w_gate_up,
                                             const at::Tensor& w_down, const at::Tensor& gate_up_acc,
                                             int64_t activation, bool gated);
at::Tensor experts_forward(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                           const std::optional<at::Tensor>& kept, const at::Tensor& w_gate_up, const at::Tensor& w_down,
                           int64_t activation, bool gated);
std::vector<at::Tensor> experts_forward_train(const at::Tensor& x, const at::Tensor& expert_ids,
                                              const at::Tensor& weights, const std::optional<at::Tensor>& kept,
                                              const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                              int64_t activation, bool gated);
std::vector<at::Tensor> experts_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& expert_offsets,
                                         const at::Tensor& slot_to_token, const at::Tensor& token_slot,
                                         const at::Tensor& weights, const at::Tensor& gate_up,
                                         const at::Tensor& w_gate_up, const at::Tensor& w_down, int64_t activation,
                                         bool gated, bool need_x, bool need_weights, bool need_params);
}  // namespace moe
}  // namespace fastcore

namespace fastcore {
// Each family binds its own ops from csrc/torch/<family>_bindings.cpp (one file per family, so
// families are added without touching this file's op list).
void bind_s4(pybind11::module_& m);
void bind_nerf(pybind11::module_& m);
void bind_pq(pybind11::module_& m);
void bind_mux(pybind11::module_& m);
}  // namespace fastcore

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcore_ai native kernels (CPU always, CUDA when built with nvcc)";
  m.def("build_config", []() {
    pybind11::dict d;
#ifdef FASTCORE_WITH_CUDA
    d["cuda_compiled"] = true;
#else
    d["cuda_compiled"] = false;
#endif
    d["torch_version"] = FASTCORE_TORCH_VERSION;
    d["cuda_archs"] = FASTCORE_CUDA_ARCHS;
    d["cuda_version"] = FASTCORE_CUDA_VERSION;
    return d;
  });
  // How many threads at::parallel_for actually used on a 64-chunk range: a build check that the
  // CPU kernels run in parallel (tests/test_backends.py), not a user API.
  m.def("parallel_for_threads_used", []() {
    std::atomic<uint64_t> seen{0};
    at::parallel_for(0, 64, 1, [&](int64_t begin, int64_t end) {
      seen.fetch_or(uint64_t(1) << (at::get_thread_num() % 64));
      volatile double sink = 0;  // a little work so one thread cannot take every chunk
      for (int64_t i = begin; i < end; ++i)
        for (int j = 0; j < 200000; ++j) sink = sink + j;
    });
    return __builtin_popcountll(seen.load());
  });
  m.def("moe_grouped_mlp", &fastcore::moe::grouped_mlp_forward, "expert MLP over expert segments (CPU, CUDA)");
  m.def("moe_grouped_mlp_backward", &fastcore::moe::grouped_mlp_backward, "expert MLP backward (CPU, CUDA)");
  m.def("moe_experts", &fastcore::moe::experts_forward,
        "fused expert computation: plan, gathered gate_up GEMM + activation, weighted down GEMM, combine",
        pybind11::arg("x"), pybind11::arg("expert_ids"), pybind11::arg("weights"), pybind11::arg("kept"),
        pybind11::arg("w_gate_up"), pybind11::arg("w_down"), pybind11::arg("activation"), pybind11::arg("gated"));
  m.def("moe_experts_train", &fastcore::moe::experts_forward_train,
        "fused expert computation that also returns (gate_up, expert_offsets, slot_to_token, token_slot) (CPU)",
        pybind11::arg("x"), pybind11::arg("expert_ids"), pybind11::arg("weights"), pybind11::arg("kept"),
        pybind11::arg("w_gate_up"), pybind11::arg("w_down"), pybind11::arg("activation"), pybind11::arg("gated"));
  m.def("moe_experts_backward", &fastcore::moe::experts_backward,
        "fused expert backward from the saved gate_up (CPU): (grad_x, grad_weights, grad_w_gate_up, grad_w_down)",
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("expert_offsets"), pybind11::arg("slot_to_token"),
        pybind11::arg("token_slot"), pybind11::arg("weights"), pybind11::arg("gate_up"), pybind11::arg("w_gate_up"),
        pybind11::arg("w_down"), pybind11::arg("activation"), pybind11::arg("gated"), pybind11::arg("need_x"),
        pybind11::arg("need_weights"), pybind11::arg("need_params"));
  m.def("moe_topk_route", &fastcore::moe::topk_route, "fused softmax + top-k router",
        pybind11::arg("logits"), pybind11::arg("k"), pybind11::arg("renormalize"));
  m.def("moe_topk_route_backward", &fastcore::moe::topk_route_backward, "router backward",
        pybind11::arg("logits"), pybind11::arg("expert_ids"), pybind11::arg("weights"),
        pybind11::arg("lse"), pybind11::arg("grad_weights"), pybind11::arg("grad_z_loss"),
        pybind11::arg("grad_mean_prob"), pybind11::arg("renormalize"));
  m.def("moe_dispatch", &fastcore::moe::dispatch, "group (token, slot) pairs by expert and gather x rows",
        pybind11::arg("x"), pybind11::arg("expert_ids"), pybind11::arg("kept"), pybind11::arg("num_experts"));
  m.def("moe_combine", &fastcore::moe::combine, "weighted sum of expert rows back per token (fixed order)",
        pybind11::arg("y_sorted"), pybind11::arg("token_slot"), pybind11::arg("weights"));
  m.def("moe_combine_backward", &fastcore::moe::combine_backward, "combine backward (grad_y, grad_weights)",
        pybind11::arg("grad_out"), pybind11::arg("y_sorted"), pybind11::arg("slot_to_token"),
        pybind11::arg("token_slot"), pybind11::arg("weights"), pybind11::arg("need_weights"));
  fastcore::bind_s4(m);
  fastcore::bind_nerf(m);
  fastcore::bind_pq(m);
  fastcore::bind_mux(m);
}

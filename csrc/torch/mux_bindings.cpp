// pybind11 bindings of the mux family (DataMUX multiplexing and attention): `fastcore_ai._C.mux_*`.
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace fastcore {
namespace mux {
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& attn_mask,
                                          const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale);
std::vector<at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                           const std::optional<at::Tensor>& attn_mask,
                                           const std::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
                                           bool need_mask_grad);
at::Tensor mux_forward(const at::Tensor& x, const at::Tensor& keys, int64_t mode);
std::vector<at::Tensor> mux_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& keys,
                                     int64_t mode, bool need_keys);
at::Tensor demux_forward(const at::Tensor& h, const at::Tensor& keys, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps);
std::vector<at::Tensor> demux_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& keys,
                                       const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& norm_weight,
                                       const at::Tensor& norm_bias, double eps);
}  // namespace mux

void bind_mux(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("mux_attention", &mux::attention_forward, "fused attention forward: (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("attn_mask"), py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"));
  m.def("mux_attention_backward", &mux::attention_backward, "fused attention backward: (dq, dk, dv, d attn_mask (empty unless need_mask_grad))");
  m.def("mux_mux", &mux::mux_forward, "DataMUX mux (mode 0 Hadamard, 1 orthogonal), CPU");
  m.def("mux_mux_backward", &mux::mux_backward, "DataMUX mux backward: (grad_x, grad_keys), CPU");
  m.def("mux_demux", &mux::demux_forward, "DataMUX index demux (separable GEMMs + fused GELU/LayerNorm), CPU");
  m.def("mux_demux_backward", &mux::demux_backward, "DataMUX index demux backward (6 gradients), CPU");
}
}  // namespace fastcore

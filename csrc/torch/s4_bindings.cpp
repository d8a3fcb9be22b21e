// pybind11 bindings of the s4 family (S4/S4D state-space kernels): `fastcore_ai._C.s4_*`.
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace fastcore {
namespace s4 {
at::Tensor cauchy(const at::Tensor& v, const at::Tensor& z, const at::Tensor& w, bool conj_symmetric);
std::vector<at::Tensor> cauchy_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& z,
                                        const at::Tensor& w, bool conj_symmetric);
at::Tensor vandermonde(const at::Tensor& v, const at::Tensor& x, int64_t L);
std::vector<at::Tensor> vandermonde_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& x);
at::Tensor fft_conv(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D, int64_t n,
                    int64_t chunk_rows);
std::vector<at::Tensor> fft_conv_backward(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& k,
                                          const std::optional<at::Tensor>& D, int64_t n, bool need_u, bool need_k,
                                          bool need_D, int64_t chunk_rows);
std::vector<at::Tensor> ssm_step(const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA, const at::Tensor& dB,
                                 const at::Tensor& C, const std::optional<at::Tensor>& D, bool inplace);
std::vector<at::Tensor> ssm_step_if_valid(const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA,
                                          const at::Tensor& dB, const at::Tensor& C,
                                          const std::optional<at::Tensor>& D, bool inplace, int64_t max_states);
std::vector<at::Tensor> ssm_step_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_new_state,
                                          const at::Tensor& state, const at::Tensor& u, const at::Tensor& dA,
                                          const at::Tensor& dB, const at::Tensor& C, const std::optional<at::Tensor>& D);
}  // namespace s4

void bind_s4(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("s4_cauchy", &s4::cauchy, "S4 Cauchy kernel out[b,l] = sum_n v/(z-w) (+ conj term)", py::arg("v"),
        py::arg("z"), py::arg("w"), py::arg("conj_symmetric"));
  m.def("s4_cauchy_backward", &s4::cauchy_backward, "Cauchy kernel backward (grad_v, grad_w)", py::arg("grad"),
        py::arg("v"), py::arg("z"), py::arg("w"), py::arg("conj_symmetric"));
  m.def("s4_vandermonde", &s4::vandermonde, "S4D kernel K[b,l] = 2 Re sum_n v exp(x l)", py::arg("v"), py::arg("x"),
        py::arg("L"));
  m.def("s4_vandermonde_backward", &s4::vandermonde_backward, "Vandermonde backward (grad_v, grad_x)",
        py::arg("grad"), py::arg("v"), py::arg("x"));
  m.def("s4_fft_conv", &s4::fft_conv, "causal FFT convolution + D skip", py::arg("u"), py::arg("k"), py::arg("D"),
        py::arg("n"), py::arg("chunk_rows") = 0);
  m.def("s4_fft_conv_backward", &s4::fft_conv_backward, "FFT convolution backward (grad_u, grad_k, grad_D)",
        py::arg("grad"), py::arg("u"), py::arg("k"), py::arg("D"), py::arg("n"), py::arg("need_u"),
        py::arg("need_k"), py::arg("need_D"), py::arg("chunk_rows") = 0);
  m.def("s4_ssm_step", &s4::ssm_step, "diagonal SSM recurrent step (y, new_state)", py::arg("state"), py::arg("u"),
        py::arg("dA"), py::arg("dB"), py::arg("C"), py::arg("D"), py::arg("inplace") = false);
  m.def("s4_ssm_step_if_valid", &s4::ssm_step_if_valid,
        "ssm_step when every argument check of ops.ssm_step passes, else [] (nothing computed)", py::arg("state"),
        py::arg("u"), py::arg("dA"), py::arg("dB"), py::arg("C"), py::arg("D"), py::arg("inplace"),
        py::arg("max_states"));
  m.def("s4_ssm_step_backward", &s4::ssm_step_backward, "SSM step backward", py::arg("grad_y"),
        py::arg("grad_new_state"), py::arg("state"), py::arg("u"), py::arg("dA"), py::arg("dB"), py::arg("C"),
        py::arg("D"));
}
}  // namespace fastcore

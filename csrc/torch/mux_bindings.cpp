// pybind11 bindings of the mux family (DataMUX multiplexing and attention): `fastcore_ai._C.mux_*`.
#include <torch/extension.h>

namespace fastcore {
void bind_mux(pybind11::module_& m) {
  (void)m;
}
}  // namespace fastcore

// pybind11 bindings of the s4 family (S4/S4D state-space kernels): `fastcore_ai._C.s4_*`.
#include <torch/extension.h>

namespace fastcore {
void bind_s4(pybind11::module_& m) {
  (void)m;
}
}  // namespace fastcore

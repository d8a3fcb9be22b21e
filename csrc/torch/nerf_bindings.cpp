// pybind11 bindings of the nerf family (NeRF ray marching and rendering): `fastcore_ai._C.nerf_*`.
#include <torch/extension.h>

namespace fastcore {
void bind_nerf(pybind11::module_& m) {
  (void)m;
}
}  // namespace fastcore

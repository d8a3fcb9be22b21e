// pybind11 bindings of the pq family (product-quantization search): `fastcore_ai._C.pq_*`.
#include <torch/extension.h>

namespace fastcore {
void bind_pq(pybind11::module_& m) {
  (void)m;
}
}  // namespace fastcore

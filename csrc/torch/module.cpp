// The pybind11 module fastcore_ai._C: reports how the extension was built and calls each glue file's
// bind_<file>(m), which sits at the bottom of the .cpp that defines those ops (so an op and its
// binding change together, and this file lists files, not ops).
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <atomic>

#include "cuda_call.h"
#include "fastcore/cpu_isa.h"

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
void bind_moe_router(pybind11::module_& m);
void bind_moe_dispatch(pybind11::module_& m);
void bind_moe_grouped_mlp(pybind11::module_& m);
void bind_moe_experts(pybind11::module_& m);
void bind_s4(pybind11::module_& m);
void bind_nerf(pybind11::module_& m);
void bind_pq(pybind11::module_& m);
void bind_mux_attention(pybind11::module_& m);
void bind_mux_demux(pybind11::module_& m);
}  // namespace fastcore

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcore_ai native kernels (CPU always, CUDA when built with nvcc)";
  m.def("build_config", []() {
    pybind11::dict d;
    d["cuda_compiled"] = fastcore::kCudaCompiled;
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
  // The CPU instruction-set level of every family's hand-written intrinsic paths (fastcore/cpu_isa.h):
  // cap > 0 caps it process-wide (1 portable, 2 avx2, 3 avx512), 0 lifts the cap, < 0 only reads.
  m.def(
      "cpu_isa",
      [](int64_t cap) {
        if (cap >= 0) fastcore::set_cpu_isa_cap(static_cast<int>(cap));
        return std::string(fastcore::cpu_isa_name(fastcore::active_cpu_isa()));
      },
      pybind11::arg("cap") = -1);
  fastcore::bind_moe_router(m);
  fastcore::bind_moe_dispatch(m);
  fastcore::bind_moe_grouped_mlp(m);
  fastcore::bind_moe_experts(m);
  fastcore::bind_s4(m);
  fastcore::bind_nerf(m);
  fastcore::bind_pq(m);
  fastcore::bind_mux_attention(m);
  fastcore::bind_mux_demux(m);
}

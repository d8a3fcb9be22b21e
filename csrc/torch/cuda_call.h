// The one place the torch glue meets CUDA: the device guard, the current stream, the launch-status
// check and the error of a build without CUDA kernels, each naming the op.
//
// Invariant: a glue file launches a kernel only through FC_CUDA_CALL and uses current_stream() only
// inside its `call`, so no glue file needs #ifdef FASTCORE_WITH_CUDA. Without CUDA the macro raises the
// no-CUDA error and keeps `call` in an unevaluated operand: it still type-checks, but no CUDA symbol
// is referenced (the *_cuda launchers are declared by the kernel headers and only defined in .cu files).
// A glue helper that calls launchers itself must be inline or a template, so that it is never emitted there.
#pragma once

#include <ATen/ATen.h>

#include "tensor_params.h"

#ifdef FASTCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace fastcore {

// Raises naming the op when a launcher returned a nonzero cudaError_t.
inline void check_cuda_status(int status, const char* op, const char* what) {
  TORCH_CHECK(status == 0, "fastcore_ai.ops.", op, ": CUDA ", what, " failed with cudaError ", status);
}

// A CUDA tensor reached a build without CUDA kernels.
[[noreturn]] inline void raise_no_cuda(const char* op) {
  FC_CHECK(false, op,
           "this build of fastcore_ai has no CUDA kernels; reinstall on a machine with nvcc and a CUDA "
           "build of torch (FASTCORE_AI_CUDA=1 pip install --no-build-isolation .)");
  throw;  // unreachable
}

#ifdef FASTCORE_WITH_CUDA

inline constexpr bool kCudaCompiled = true;

// At the top of a CUDA path that does work before its launches: there the no-CUDA error comes first.
inline void require_cuda(const char*) {}

// The current stream of the current device (FC_CUDA_CALL's guard has set it to the tensor's device).
inline void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The compute capability's major number of a CUDA device.
inline int cuda_capability_major(const at::Device& device, const char* op) {
  int major = 0;
  check_cuda_status(static_cast<int>(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index())),
                    op, "device query");
  return major;
}

// Runs `call` (a launcher returning its cudaError_t as int) on `device` and raises
// "fastcore_ai.ops.<op>: CUDA <what> failed with cudaError <status>" when it fails.
#define FC_CUDA_CALL(op, what, device, call)             \
  do {                                                   \
    const ::c10::cuda::CUDAGuard fc_cuda_guard_(device); \
    ::fastcore::check_cuda_status((call), (op), (what)); \
  } while (0)

#else  // no CUDA kernels in this build

inline constexpr bool kCudaCompiled = false;

[[noreturn]] inline void require_cuda(const char* op) { raise_no_cuda(op); }

void* current_stream();  // declared only: every use sits in FC_CUDA_CALL's unevaluated operand

[[noreturn]] inline int cuda_capability_major(const at::Device&, const char* op) { raise_no_cuda(op); }

#define FC_CUDA_CALL(op, what, device, call)                               \
  do {                                                                     \
    static_cast<void>(sizeof((call)) + sizeof((device)) + sizeof((what))); \
    ::fastcore::raise_no_cuda(op);                                         \
  } while (0)

#endif

}  // namespace fastcore

// CUDA kernels of the nerf family: one thread per ray (march, render, composite), per (ray, box) pair
// (ray/AABB), per sample / cell / byte (grid update). Every body is the FC_HOST_DEVICE function of nerf.h
// that the CPU loops run, so CPU/CUDA parity holds by construction (DESIGN rule 2). The only atomic is the
// float max of the grid scatter, which is order-free (max is associative and commutative), so results are
// deterministic. Every launch returns its cudaError_t; empty sizes launch nothing.
#include <cuda_runtime.h>

#include <cstdint>

#include "fastcore/common.h"
#include "fastcore/cuda_launch.h"
#include "nerf/nerf.h"

namespace fastcore {
namespace nerf {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535;

// The grid over n items: every kernel here is a grid-stride loop (FC_GRID_LOOP).
unsigned stride_blocks(int64_t n) { return grid_stride_blocks(n, kThreads, kMaxBlocks); }

// Grid-stride index helpers (int64: sizes may pass 2^31).
#define FC_GRID_LOOP(i, n)                                                               \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__global__ void __launch_bounds__(kThreads) ray_aabb_kernel(const AabbParams<T> p) {
  FC_GRID_LOOP(i, p.num_rays * p.num_boxes) aabb_element<T>(p, i / p.num_boxes, i % p.num_boxes);
}

// Float max by compare-and-swap on the bits (order-free result).
FC_DEVICE void atomic_max_value(float* address, float value) {
  int* bits = reinterpret_cast<int*>(address);
  int old = *bits;
  while (__int_as_float(old) < value) {
    const int seen = atomicCAS(bits, old, __float_as_int(value));
    if (seen == old) break;
    old = seen;
  }
}
FC_DEVICE void atomic_max_value(double* address, double value) {
  unsigned long long* bits = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = *bits;
  while (__longlong_as_double(static_cast<long long>(old)) < value) {
    const unsigned long long seen = atomicCAS(bits, old, static_cast<unsigned long long>(__double_as_longlong(value)));
    if (seen == old) break;
    old = seen;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grid_scatter_kernel(const GridUpdateParams<T> p) {
  FC_GRID_LOOP(i, p.num_samples) {
    const int64_t c = p.cell_indices[i];
    if (c >= 0 && c < p.num_cells) atomic_max_value(p.sampled_max + c, p.values[i]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grid_cells_kernel(const GridUpdateParams<T> p) {
  FC_GRID_LOOP(c, p.num_cells) grid_update_cell<T>(p, c);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grid_pack_kernel(const GridUpdateParams<T> p) {
  FC_GRID_LOOP(b, (p.num_cells + 7) / 8) grid_pack_byte<T>(p, b);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) march_count_kernel(const MarchParams<T> p) {
  FC_GRID_LOOP(r, p.num_rays) p.counts[r] = march_ray<T>(p, r, 0, false);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) march_fill_kernel(const MarchParams<T> p) {
  FC_GRID_LOOP(r, p.num_rays) {
    const int64_t count = march_ray<T>(p, r, p.offsets[r], true);
    if (p.counts) p.counts[r] = count;  // the single-pass (padded) mode's counts; pass 2 rewrites pass 1's
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) render_forward_kernel(const RenderParams<T> p) {
  FC_GRID_LOOP(r, p.num_rays) render_forward_ray<T>(p, r);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) render_backward_kernel(const RenderParams<T> p) {
  FC_GRID_LOOP(r, p.num_rays) render_backward_ray<T>(p, r);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) composite_kernel(const CompositeParams<T> p) {
  FC_GRID_LOOP(r, p.num_rays) composite_ray<T>(p, r);
}

}  // namespace

template <typename T>
int ray_aabb_cuda(const AabbParams<T>& p, void* stream) {
  const int64_t n = p.num_rays * p.num_boxes;
  if (n == 0) return 0;
  ray_aabb_kernel<T><<<stride_blocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

template <typename T>
int grid_update_cuda(const GridUpdateParams<T>& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.num_samples > 0) {
    grid_scatter_kernel<T><<<stride_blocks(p.num_samples), kThreads, 0, s>>>(p);
    if (const int status = launch_status()) return status;
  }
  if (p.num_cells == 0) return 0;
  grid_cells_kernel<T><<<stride_blocks(p.num_cells), kThreads, 0, s>>>(p);
  return launch_status();
}

template <typename T>
int grid_pack_cuda(const GridUpdateParams<T>& p, void* stream) {
  const int64_t bytes = (p.num_cells + 7) / 8;
  if (bytes == 0) return 0;
  grid_pack_kernel<T><<<stride_blocks(bytes), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

template <typename T>
int march_count_cuda(const MarchParams<T>& p, void* stream) {
  if (p.num_rays == 0) return 0;
  march_count_kernel<T><<<stride_blocks(p.num_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

template <typename T>
int march_fill_cuda(const MarchParams<T>& p, void* stream) {
  if (p.num_rays == 0) return 0;
  march_fill_kernel<T><<<stride_blocks(p.num_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

template <typename T>
int render_forward_cuda(const RenderParams<T>& p, void* stream) {
  if (p.num_rays == 0) return 0;
  render_forward_kernel<T><<<stride_blocks(p.num_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

template <typename T>
int render_backward_cuda(const RenderParams<T>& p, void* stream) {
  if (p.num_rays == 0) return 0;
  render_backward_kernel<T><<<stride_blocks(p.num_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

template <typename T>
int composite_cuda(const CompositeParams<T>& p, void* stream) {
  if (p.num_rays == 0) return 0;
  composite_kernel<T><<<stride_blocks(p.num_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

#define FC_NERF_INSTANTIATE_CUDA(T)                                    \
  template int ray_aabb_cuda<T>(const AabbParams<T>&, void*);          \
  template int grid_update_cuda<T>(const GridUpdateParams<T>&, void*); \
  template int grid_pack_cuda<T>(const GridUpdateParams<T>&, void*);   \
  template int march_count_cuda<T>(const MarchParams<T>&, void*);      \
  template int march_fill_cuda<T>(const MarchParams<T>&, void*);       \
  template int render_forward_cuda<T>(const RenderParams<T>&, void*);  \
  template int render_backward_cuda<T>(const RenderParams<T>&, void*); \
  template int composite_cuda<T>(const CompositeParams<T>&, void*);

FC_NERF_INSTANTIATE_CUDA(float)
FC_NERF_INSTANTIATE_CUDA(double)
#undef FC_NERF_INSTANTIATE_CUDA

}  // namespace nerf
}  // namespace fastcore

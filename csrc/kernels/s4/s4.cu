// CUDA kernels of the s4 family (math and gradients in s4.h). float32 (complex64) only; every launch
// returns its cudaError_t. No torch headers (DESIGN rule 1).
//
// Cauchy forward: a block per (row b, tile of 256 nodes); the row's v and w are staged through shared
// memory in chunks of kStateChunk states, each thread owns one node and sums the states in order
// (complex arithmetic written out in cauchy_forward_term, shared with the CPU loop).
// Cauchy backward: a block per (row b, group of kBwdStates states); threads stride over the nodes,
// then a fixed-order block reduction (warp shuffles, then warps in order): deterministic.
// Vandermonde: block tables in shared memory — the in-block powers p_n[j] = exp(x_n j) (TB = 64) and
// the block starts exp(x_n l0), both by the shared exp_times (double phase, see s4.h).
#include <cuda_runtime.h>

#include "fastcore/cuda_launch.h"
#include "s4/s4.h"

namespace fastcore {
namespace s4 {
namespace {

constexpr int kThreads = 256;
constexpr int kStateChunk = 256;             // states staged per shared-memory round (4 KB of v + 4 KB of w)
constexpr int kBwdStates = 4;                // states per backward block
constexpr int kVandFwdBlocks = 16;           // TB-blocks (of 64 nodes) per forward CTA: 1024 nodes, 4 per thread
constexpr int kVandStates = 16;              // states per shared-memory round of the Vandermonde forward
constexpr int64_t kMaxStrideBlocks = 65536;  // grid of the grid-stride FFT-convolution kernels

// The grid of a grid-stride FFT-convolution kernel over `total` elements.
unsigned stride_blocks(int64_t total) { return grid_stride_blocks(total, kThreads, kMaxStrideBlocks); }

// Fixed-order sum of `value` over the block (all threads call it); result valid in thread 0.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

__global__ void __launch_bounds__(kThreads) cauchy_forward_kernel(const CauchyParams<float> p) {
  __shared__ float sv[2 * kStateChunk], sw[2 * kStateChunk];
  const int64_t b = blockIdx.x;
  const int64_t l = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = l < p.nodes;
  const float zr = active ? p.z[2 * l] : 0.f, zi = active ? p.z[2 * l + 1] : 0.f;
  float acc_re = 0.f, acc_im = 0.f;
  for (int64_t n0 = 0; n0 < p.states; n0 += kStateChunk) {
    const int count = static_cast<int>(p.states - n0 < kStateChunk ? p.states - n0 : kStateChunk);
    __syncthreads();
    for (int i = threadIdx.x; i < 2 * count; i += kThreads) {
      sv[i] = p.v[2 * (b * p.states + n0) + i];
      sw[i] = p.w[2 * (b * p.states + n0) + i];
    }
    __syncthreads();
    if (active)
      for (int n = 0; n < count; ++n)
        cauchy_forward_term<float, float>(zr, zi, sv[2 * n], sv[2 * n + 1], sw[2 * n], sw[2 * n + 1], p.conj_symmetric,
                                          acc_re, acc_im);
  }
  if (active) {
    p.out[2 * (b * p.nodes + l)] = acc_re;
    p.out[2 * (b * p.nodes + l) + 1] = acc_im;
  }
}

__global__ void __launch_bounds__(kThreads) cauchy_backward_kernel(const CauchyParams<float> p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t b = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBwdStates;
  float wr[kBwdStates], wi[kBwdStates], acc[kBwdStates][4];
#pragma unroll
  for (int s = 0; s < kBwdStates; ++s) {
    const int64_t n = n0 + s < p.states ? n0 + s : p.states - 1;  // clamp: duplicate work, never stored
    wr[s] = p.w[2 * (b * p.states + n)];
    wi[s] = p.w[2 * (b * p.states + n) + 1];
    acc[s][0] = acc[s][1] = acc[s][2] = acc[s][3] = 0.f;
  }
  for (int64_t l = threadIdx.x; l < p.nodes; l += kThreads) {
    const float zr = p.z[2 * l], zi = p.z[2 * l + 1];
    const float gr = p.grad_out[2 * (b * p.nodes + l)], gi = p.grad_out[2 * (b * p.nodes + l) + 1];
#pragma unroll
    for (int s = 0; s < kBwdStates; ++s)
      cauchy_backward_term<float, float>(zr, zi, gr, gi, wr[s], wi[s], p.conj_symmetric, acc[s][0], acc[s][1],
                                         acc[s][2], acc[s][3]);
  }
#pragma unroll
  for (int s = 0; s < kBwdStates; ++s) {
    float total[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) total[q] = block_sum(acc[s][q], scratch);
    const int64_t n = n0 + s;
    if (threadIdx.x == 0 && n < p.states) {
      const int64_t i = b * p.states + n;
      cauchy_backward_finish<float>(p.v[2 * i], p.v[2 * i + 1], total[0], total[1], total[2], total[3],
                                    p.grad_v + 2 * i, p.grad_w + 2 * i);
    }
  }
}

__global__ void __launch_bounds__(kThreads) vandermonde_forward_kernel(const VandermondeParams<float> p) {
  constexpr int TB = static_cast<int>(kVandBlock);
  __shared__ float table_re[kVandStates][TB], table_im[kVandStates][TB];
  __shared__ float c_re[kVandStates][kVandFwdBlocks], c_im[kVandStates][kVandFwdBlocks];
  const int64_t b = blockIdx.x;
  const int64_t l_base = static_cast<int64_t>(blockIdx.y) * kVandFwdBlocks * TB;
  constexpr int kPerThread = kVandFwdBlocks * TB / kThreads;
  float acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.f;
  for (int64_t n0 = 0; n0 < p.states; n0 += kVandStates) {
    const int count = static_cast<int>(p.states - n0 < kVandStates ? p.states - n0 : kVandStates);
    __syncthreads();
    for (int i = threadIdx.x; i < count * TB; i += kThreads) {
      const int n = i / TB, j = i % TB;
      const int64_t idx = b * p.states + n0 + n;
      exp_times<float>(p.x[2 * idx], p.x[2 * idx + 1], j, table_re[n][j], table_im[n][j]);
    }
    for (int i = threadIdx.x; i < count * kVandFwdBlocks; i += kThreads) {
      const int n = i / kVandFwdBlocks, kb = i % kVandFwdBlocks;
      const int64_t idx = b * p.states + n0 + n;
      float sr, si;
      exp_times<float>(p.x[2 * idx], p.x[2 * idx + 1], l_base + static_cast<int64_t>(kb) * TB, sr, si);
      const float vr = p.v[2 * idx], vi = p.v[2 * idx + 1];
      c_re[n][kb] = vr * sr - vi * si;
      c_im[n][kb] = vr * si + vi * sr;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int local = threadIdx.x + i * kThreads, kb = local / TB, j = local % TB;
      float a = acc[i];
      for (int n = 0; n < count; ++n) a += c_re[n][kb] * table_re[n][j] - c_im[n][kb] * table_im[n][j];
      acc[i] = a;
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t l = l_base + threadIdx.x + i * kThreads;
    if (l < p.length) p.out[b * p.length + l] = 2.f * acc[i];
  }
}

// A block per (row b, state n): threads own nodes l = tid + 256·i (blocks of 64 nodes: 4 per round).
__global__ void __launch_bounds__(kThreads) vandermonde_backward_kernel(const VandermondeParams<float> p) {
  constexpr int TB = static_cast<int>(kVandBlock);
  constexpr int kRound = kThreads / TB;  // TB-blocks per round
  __shared__ float table_re[TB], table_im[TB], start_re[kRound], start_im[kRound];
  __shared__ float scratch[kThreads / 32];
  const int64_t b = blockIdx.x, n = blockIdx.y, idx = b * p.states + n;
  const float xr = p.x[2 * idx], xi = p.x[2 * idx + 1];
  if (threadIdx.x < TB) exp_times<float>(xr, xi, threadIdx.x, table_re[threadIdx.x], table_im[threadIdx.x]);
  const int j = threadIdx.x % TB, kb = threadIdx.x / TB;
  float s0r = 0.f, s0i = 0.f, s1r = 0.f, s1i = 0.f;
  for (int64_t l0 = 0; l0 < p.length; l0 += kThreads) {
    __syncthreads();
    if (threadIdx.x < kRound) {
      float sr, si;
      exp_times<float>(xr, xi, l0 + static_cast<int64_t>(threadIdx.x) * TB, sr, si);
      start_re[threadIdx.x] = sr;
      start_im[threadIdx.x] = si;
    }
    __syncthreads();
    const int64_t l = l0 + threadIdx.x;
    if (l < p.length) {
      const float g = p.grad_out[b * p.length + l];
      const float pr = table_re[j], pi = table_im[j], sr = start_re[kb], si = start_im[kb];
      const float er = sr * pr - si * pi, ei = sr * pi + si * pr;  // exp(x l)
      const float tr = g * er, ti = -g * ei;                       // g conj(e)
      s0r += tr;
      s0i += ti;
      const float lf = static_cast<float>(l);
      s1r += lf * tr;
      s1i += lf * ti;
    }
  }
  const float t0r = block_sum(s0r, scratch), t0i = block_sum(s0i, scratch);
  const float t1r = block_sum(s1r, scratch), t1i = block_sum(s1i, scratch);
  if (threadIdx.x == 0) {
    const float vr = p.v[2 * idx], vi = p.v[2 * idx + 1];
    p.grad_v[2 * idx] = 2.f * t0r;
    p.grad_v[2 * idx + 1] = 2.f * t0i;
    p.grad_x[2 * idx] = 2.f * (vr * t1r + vi * t1i);
    p.grad_x[2 * idx + 1] = 2.f * (vr * t1i - vi * t1r);
  }
}

__global__ void __launch_bounds__(kThreads) pad_cast_kernel(const FFTConvParams<float> p) {
  const int64_t total = p.rows * p.fft_size;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / p.fft_size, l = i % p.fft_size;
    p.real_buf[i] = l < p.length ? load_as<float>(p.in, p.in_kind, (p.row_begin + r) * p.length + l) : 0.f;
  }
}

__global__ void __launch_bounds__(kThreads) cmul_kernel(const FFTConvParams<float> p) {
  const int64_t total = p.rows * p.freqs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    cmul_element<float>(p, i / p.freqs, i % p.freqs);
}

__global__ void __launch_bounds__(kThreads) crop_skip_kernel(const FFTConvParams<float> p) {
  const int64_t total = p.rows * p.length;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = i / p.length, l = i % p.length;
    store_as<float>(p.out, p.out_kind, (p.row_begin + r) * p.length + l, crop_skip_value<float>(p, r, l));
  }
}

__global__ void __launch_bounds__(kThreads) grad_spectra_kernel(const FFTConvParams<float> p) {
  const int64_t total = p.heads * p.freqs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    grad_spectra_element<float>(p, i / p.freqs, i % p.freqs);
}

__global__ void __launch_bounds__(kThreads) row_dot_kernel(const FFTConvParams<float> p) {
  __shared__ float scratch[kThreads / 32];
  const int64_t r = blockIdx.x;
  float acc = 0.f;
  for (int64_t l = threadIdx.x; l < p.length; l += kThreads)
    acc += load_as<float>(p.in, p.in_kind, r * p.length + l) * load_as<float>(p.in2, p.in2_kind, r * p.length + l);
  const float total = block_sum(acc, scratch);
  if (threadIdx.x == 0) p.dot[r] = total;
}

__global__ void __launch_bounds__(kThreads) ssm_step_kernel(const StepParams<float> p) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (row < p.batch * p.heads) ssm_step_row<float>(p, row);
}

__global__ void __launch_bounds__(kThreads) ssm_step_backward_kernel(const StepParams<float> p) {
  const int64_t h = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (h < p.heads) ssm_step_backward_head<float>(p, h);
}

}  // namespace

int cauchy_forward_cuda(const CauchyParams<float>& p, void* stream) {
  const dim3 grid(static_cast<unsigned>(p.batch), grid_blocks(p.nodes, kThreads));
  cauchy_forward_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int cauchy_backward_cuda(const CauchyParams<float>& p, void* stream) {
  const dim3 grid(static_cast<unsigned>(p.batch), grid_blocks(p.states, kBwdStates));
  cauchy_backward_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int vandermonde_forward_cuda(const VandermondeParams<float>& p, void* stream) {
  const int64_t per_block = kVandFwdBlocks * kVandBlock;
  const dim3 grid(static_cast<unsigned>(p.batch), grid_blocks(p.length, per_block));
  vandermonde_forward_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int vandermonde_backward_cuda(const VandermondeParams<float>& p, void* stream) {
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(p.states));
  vandermonde_backward_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int fftconv_pad_cast_cuda(const FFTConvParams<float>& p, void* stream) {
  pad_cast_kernel<<<stride_blocks(p.rows * p.fft_size), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int fftconv_cmul_cuda(const FFTConvParams<float>& p, void* stream) {
  cmul_kernel<<<stride_blocks(p.rows * p.freqs), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int fftconv_crop_skip_cuda(const FFTConvParams<float>& p, void* stream) {
  crop_skip_kernel<<<stride_blocks(p.rows * p.length), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int fftconv_grad_spectra_cuda(const FFTConvParams<float>& p, void* stream) {
  grad_spectra_kernel<<<stride_blocks(p.heads * p.freqs), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int fftconv_row_dot_cuda(const FFTConvParams<float>& p, void* stream) {
  row_dot_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int ssm_step_cuda(const StepParams<float>& p, void* stream) {
  ssm_step_kernel<<<grid_blocks(p.batch * p.heads, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int ssm_step_backward_cuda(const StepParams<float>& p, void* stream) {
  ssm_step_backward_kernel<<<grid_blocks(p.heads, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

}  // namespace s4
}  // namespace fastcore

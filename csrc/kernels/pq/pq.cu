// CUDA kernels of the pq family (math in pq.h): the distance tables and the 8-bit ADC scan with a
// block-wide top-k.
//
// pq_lut_kernel       one thread per (query, sub-space, centroid j): Σ_t (x_t − CT[m, t, j])² (or the
//                     product for ip), summed in t order exactly like the CPU tables loop; CT is the
//                     transposed codebook [M, dsub, ksub], so neighbouring threads read neighbouring j.
// adc_topk_kernel     one block per (query, chunk of `chunk` rows, a power of two ≥ k). The query's
//                     whole table [M, ksub] float32 is copied into dynamic shared memory (M = 64 with
//                     256 centroids is 64 KiB, above the 48 KiB default: the launcher opts into large
//                     dynamic shared memory with cudaFuncSetAttribute, which FAISS GPU does not, hence
//                     its fp16-table requirement). Each thread sums rows in m order (as the CPU), maps
//                     the key (dist, −dist for ip) to an order-preserving uint32 and packs it with the
//                     row number into a uint64 (key high, row low); a shared-memory bitonic sort of the
//                     chunk orders the block by (key, row) and its first k entries are written to
//                     partial[q, chunk, 0..k). The torch layer merges the chunks (one sort over
//                     nchunks·k candidates per query) and unpacks keys and rows, so ties go to the lower
//                     id exactly as on the CPU. Chunks up to 8192 rows: k ≤ 4096 (FAISS GPU: 2048).
#include <cuda_runtime.h>

#include <cstdint>

#include "fastcore/common.h"
#include "fastcore/cuda_launch.h"
#include "pq/pq.h"

namespace fastcore {
namespace pq {
namespace {

// Dynamic shared memory. The CPU emulator of tests/test_cuda_build.py (host compiler, no __CUDACC__)
// has no `extern __shared__`; it provides emu_dynamic_smem(), one buffer per (sequentially run) block.
#if defined(__CUDACC__)
#define PQ_DYNAMIC_SMEM(name) extern __shared__ unsigned long long name[]
#else
#define PQ_DYNAMIC_SMEM(name) unsigned long long* name = emu_dynamic_smem()
#endif

constexpr int kLutThreads = 256;
constexpr int kScanThreads = 1024;

__global__ void __launch_bounds__(kLutThreads) pq_lut_kernel(const TableParams<float> p) {
  const int64_t total = p.n * p.M * p.ksub;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t j = i % p.ksub, m = (i / p.ksub) % p.M, row = i / (p.ksub * p.M);
  const float* x = p.x + row * p.x_stride + m * p.dsub;
  const float* ct = p.codebooks_t + m * p.dsub * p.ksub + j;
  float acc = 0.0f;
  if (p.metric == Metric::kL2) {
    for (int64_t t = 0; t < p.dsub; ++t) {
      const float diff = x[t] - ct[t * p.ksub];
      acc += diff * diff;
    }
  } else {
    for (int64_t t = 0; t < p.dsub; ++t) acc += x[t] * ct[t * p.ksub];
  }
  p.lut[i] = acc;
}

// Monotone map of a float key to uint32 (negative floats reversed), so integer order = float order.
FC_DEVICE uint32_t ordered_bits(float key) {
  const uint32_t bits = __float_as_uint(key);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__global__ void __launch_bounds__(kScanThreads) adc_topk_kernel(const AdcCudaParams p) {
  PQ_DYNAMIC_SMEM(smem);
  unsigned long long* keys = smem;                        // [chunk]
  float* lut = reinterpret_cast<float*>(smem + p.chunk);  // [M, ksub]
  const int64_t q = blockIdx.y, chunk_index = blockIdx.x;
  const int64_t table = p.M * p.ksub;
  const float* lut_q = p.lut + q * table;
  for (int64_t i = threadIdx.x; i < table; i += blockDim.x) lut[i] = lut_q[i];
  __syncthreads();
  const int64_t row0 = chunk_index * p.chunk;
  for (int64_t i = threadIdx.x; i < p.chunk; i += blockDim.x) {
    const int64_t r = row0 + i;
    unsigned long long packed = ~0ull;  // padding: sorts last
    if (r < p.n) {
      const uint8_t* code = p.codes + r * p.M;
      float s = 0.0f;
      for (int64_t m = 0; m < p.M; ++m) s += lut[m * p.ksub + code[m]];
      const float key = (p.metric == Metric::kIP ? -s : s) + 0.0f;  // + 0: −0 becomes +0 (equal keys tie)
      packed = (static_cast<unsigned long long>(ordered_bits(key)) << 32) | static_cast<unsigned long long>(r);
    }
    keys[i] = packed;
  }
  __syncthreads();
  // Bitonic sort of keys[0, chunk) ascending (chunk is a power of two).
  for (int64_t size = 2; size <= p.chunk; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = threadIdx.x; i < p.chunk; i += blockDim.x) {
        const int64_t partner = i ^ stride;
        if (partner > i) {
          const bool ascending = (i & size) == 0;
          const unsigned long long a = keys[i], b = keys[partner];
          if ((a > b) == ascending) {
            keys[i] = b;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  unsigned long long* out = p.partial + (q * p.nchunks + chunk_index) * p.k;
  for (int64_t i = threadIdx.x; i < p.k; i += blockDim.x) out[i] = keys[i];
}

}  // namespace

int pq_lut_cuda(const TableParams<float>& p, void* stream) {
  const int64_t total = p.n * p.M * p.ksub;
  if (total == 0) return 0;
  const int64_t blocks = ceil_div(total, kLutThreads);
  if (blocks > kMaxGridX) return static_cast<int>(cudaErrorInvalidConfiguration);
  pq_lut_kernel<<<static_cast<unsigned>(blocks), kLutThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int64_t adc_cuda_smem_bytes(const AdcCudaParams& p) {
  return p.chunk * static_cast<int64_t>(sizeof(unsigned long long)) +
         p.M * p.ksub * static_cast<int64_t>(sizeof(float));
}

int adc_topk_cuda(const AdcCudaParams& p, void* stream) {
  if (p.nq == 0 || p.nchunks == 0) return 0;
  if (p.nq > kMaxGridYZ) return static_cast<int>(cudaErrorInvalidConfiguration);
  const int64_t smem = adc_cuda_smem_bytes(p);
  if (smem > 48 * 1024) {
    // Opt into more than the default 48 KiB of dynamic shared memory (the whole float32 table), up to
    // the device's limit (227 KiB on sm_90, 163 KiB on sm_80).
    int device = 0, limit = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return static_cast<int>(status);
    status = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status != cudaSuccess) return static_cast<int>(status);
    if (smem > limit) return static_cast<int>(cudaErrorInvalidValue);
    status = cudaFuncSetAttribute(adc_topk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  const dim3 grid(static_cast<unsigned>(p.nchunks), static_cast<unsigned>(p.nq));
  adc_topk_kernel<<<grid, kScanThreads, static_cast<size_t>(smem), static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

}  // namespace pq
}  // namespace fastcore

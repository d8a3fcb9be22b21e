// CUDA kernels of MoE dispatch / combine (math, plan and determinism contract in dispatch.h).
//
// Plan, a stable counting sort in three kernels (no float atomics, no order-dependent atomics):
//   dispatch_count_kernel   one block per chunk of slots: shared-memory histogram of the kept slots'
//                           expert ids (integer atomics: the counts are exact in any order), written
//                           to chunk_counts[chunk, :]; ids outside [0, E) are only counted (64-bit
//                           atomic add into num_bad_ids) and never used as an index.
//   dispatch_scan_kernel    one block of 1024 threads: per expert, an exclusive scan over the chunks
//                           (chunk_counts becomes each chunk's first position within the expert),
//                           then a block scan of the expert totals gives expert_offsets [E + 1].
//   (host: one copy of (S, number of bad ids) to the host, done by the torch layer)
//   dispatch_scatter_kernel one warp per chunk, walking its slots in order 32 at a time: slots with
//                           the same expert in a group of 32 find each other with __match_any_sync,
//                           rank = number of such lanes below; the lowest of them advances the
//                           chunk's shared cursor of that expert after everyone read it. Position =
//                           offsets[e] + chunk start + cursor + rank: the slot order, deterministic.
// Rows: gather_rows_kernel copies x rows (any strides; 16-byte vectors when the rows are contiguous
// and 16-byte aligned) into x_sorted; combine_kernel computes one
// output row per block with the shared combine_element body (fixed j order); the backward computes
// grad_y rows with combine_slot_scale and grad_weights as one block per token with a fixed-shape
// shared-memory tree per dot product. All row/element offsets are int64.
//
// tests/test_moe_dispatch.py runs these kernels, source unchanged, on the CPU CUDA emulator of
// tests/test_cuda_build.py (plus __match_any_sync, __syncwarp and __popc), so keep launches in the
// form `kernel<<<grid, block, smem, stream>>>(args)`.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"
#include "fastcore/cuda_launch.h"
#include "moe/dispatch.h"

namespace fastcore {
namespace moe {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCountThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kScatterThreads = 32;  // one warp
constexpr int kRowThreads = 128;
constexpr int64_t kMaxRowBlocks = 65535;  // the row kernels are grid-stride loops over rows

__global__ void __launch_bounds__(kCountThreads) dispatch_count_kernel(const DispatchParams p) {
  __shared__ int histogram[kMaxDispatchExperts];
  const int64_t E = p.num_experts, N = p.num_tokens * p.k;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) histogram[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.slots_per_chunk;
  const int64_t end = begin + p.slots_per_chunk < N ? begin + p.slots_per_chunk : N;
  unsigned long long bad = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t e = p.expert_ids[i];
    if (e < 0 || e >= E) {
      ++bad;
      continue;
    }
    if (p.kept == nullptr || p.kept[i]) atomicAdd(&histogram[e], 1);
  }
  if (bad != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.num_bad_ids), bad);
  __syncthreads();
  int64_t* counts = p.chunk_counts + static_cast<int64_t>(blockIdx.x) * E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) counts[e] = histogram[e];
}

__global__ void __launch_bounds__(kScanThreads) dispatch_scan_kernel(const DispatchParams p) {
  __shared__ long long sums[kScanThreads];
  const int64_t E = p.num_experts;
  const int tid = threadIdx.x;
  // Thread tid owns the consecutive experts [first, last), so a serial scan inside it keeps expert order.
  const int64_t per_thread = (E + kScanThreads - 1) / kScanThreads;
  const int64_t first = tid * per_thread < E ? tid * per_thread : E;
  const int64_t last = first + per_thread < E ? first + per_thread : E;
  long long thread_total = 0;
  for (int64_t e = first; e < last; ++e) {
    int64_t within = 0;
    for (int64_t c = 0; c < p.num_chunks; ++c) {
      const int64_t count = p.chunk_counts[c * E + e];
      p.chunk_counts[c * E + e] = within;
      within += count;
    }
    p.expert_offsets[e] = within;  // the expert's total, until the block scan below
    thread_total += within;
  }
  sums[tid] = thread_total;
  __syncthreads();
  for (int offset = 1; offset < kScanThreads; offset <<= 1) {  // Hillis–Steele inclusive scan
    const long long add = tid >= offset ? sums[tid - offset] : 0;
    __syncthreads();
    sums[tid] += add;
    __syncthreads();
  }
  long long position = sums[tid] - thread_total;
  for (int64_t e = first; e < last; ++e) {
    const int64_t total = p.expert_offsets[e];
    p.expert_offsets[e] = position;
    position += total;
  }
  if (tid == kScanThreads - 1) p.expert_offsets[E] = sums[tid];
}

__global__ void __launch_bounds__(kScatterThreads) dispatch_scatter_kernel(const DispatchParams p) {
  __shared__ int cursor[kMaxDispatchExperts];  // kept slots of the chunk placed so far, per expert
  const int64_t E = p.num_experts, N = p.num_tokens * p.k;
  const int lane = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  for (int64_t e = lane; e < E; e += kScatterThreads) cursor[e] = 0;
  __syncwarp();
  const int64_t begin = chunk * p.slots_per_chunk;
  const int64_t end = begin + p.slots_per_chunk < N ? begin + p.slots_per_chunk : N;
  const int64_t* chunk_start = p.chunk_counts + chunk * E;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kScatterThreads) {  // uniform trip count in the warp
    const int64_t i = base + lane;
    const bool inside = i < end;
    const int64_t e = inside ? p.expert_ids[i] : -1;
    const bool keep = inside && e >= 0 && e < E && (p.kept == nullptr || p.kept[i]);
    const int key = keep ? static_cast<int>(e) : -1;
    const unsigned peers = __match_any_sync(kFullMask, key);
    const int rank = __popc(peers & lanes_below);
    const int before = keep ? cursor[e] : 0;
    __syncwarp();
    if (keep && rank == 0) cursor[e] = before + __popc(peers);
    __syncwarp();
    if (inside) {
      const int64_t position = keep ? p.expert_offsets[e] + chunk_start[e] + before + rank : -1;
      p.token_slot[i] = position;
      if (keep) p.slot_to_token[position] = i / p.k;
    }
  }
}

template <typename Element>
__global__ void __launch_bounds__(kRowThreads) gather_rows_kernel(const GatherRowsParams p) {
  const Element* in = static_cast<const Element*>(p.in);
  Element* out = static_cast<Element*>(p.out);
  for (int64_t s = blockIdx.x; s < p.rows; s += gridDim.x) {
    const int64_t src = p.src_row[s];
    if (src < 0 || src >= p.in_rows) continue;  // never from a plan dispatch made; never read out of bounds
    const Element* row = in + src * p.in_row_stride;
    for (int64_t h = threadIdx.x; h < p.cols; h += blockDim.x) out[s * p.cols + h] = row[h * p.in_col_stride];
  }
}

__global__ void __launch_bounds__(kRowThreads) combine_kernel(const CombineParams p) {
  float* out = static_cast<float*>(p.out);
  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    for (int64_t h = threadIdx.x; h < p.hidden; h += blockDim.x) {
      bool bad = false;
      const float value = combine_element<float>(p, t, h, bad);
      out[t * p.hidden + h] = bad ? NAN : value;
    }
  }
}

__global__ void __launch_bounds__(kRowThreads) combine_backward_y_kernel(const CombineParams p) {
  float* grad_y = static_cast<float*>(p.grad_y);
  for (int64_t s = blockIdx.x; s < p.num_rows; s += gridDim.x) {
    const int64_t t = p.slot_to_token[s];
    const bool bad = t < 0 || t >= p.num_tokens;
    const float scale = bad ? NAN : combine_slot_scale<float>(p, s, t);
    for (int64_t h = threadIdx.x; h < p.hidden; h += blockDim.x)
      grad_y[s * p.hidden + h] = bad ? NAN : scale * load_as<float>(p.grad_out, p.grad_kind, t * p.hidden + h);
  }
}

__global__ void __launch_bounds__(kRowThreads) combine_backward_weights_kernel(const CombineParams p) {
  __shared__ float partial[kRowThreads];
  float* grad_w = static_cast<float*>(p.grad_weights);
  const int tid = threadIdx.x;
  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {  // uniform in the block
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t s = p.token_slot[t * p.k + j];
      const bool valid = s >= 0 && s < p.num_rows;
      float dot = 0.0f;
      if (valid)
        for (int64_t h = tid; h < p.hidden; h += kRowThreads)
          dot += load_as<float>(p.grad_out, p.grad_kind, t * p.hidden + h) *
                 load_as<float>(p.y, p.y_kind, s * p.hidden + h);
      partial[tid] = dot;
      __syncthreads();
      for (int offset = kRowThreads / 2; offset > 0; offset >>= 1) {  // fixed-shape tree
        if (tid < offset) partial[tid] += partial[tid + offset];
        __syncthreads();
      }
      if (tid == 0) grad_w[t * p.k + j] = valid ? partial[0] : (s == -1 ? 0.0f : NAN);
      __syncthreads();
    }
  }
}

// 16 bytes copied as one vector load/store (uint4-like; a plain struct so the CPU emulator compiles it).
struct alignas(16) Bytes16 {
  uint32_t words[4];
};

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// One block per row, at most kMaxRowBlocks (each block then strides over rows).
unsigned row_blocks(int64_t rows) { return grid_stride_blocks(rows, 1, kMaxRowBlocks); }

}  // namespace

int dispatch_plan_count_cuda(const DispatchParams& p, void* stream) {
  const int64_t N = p.num_tokens * p.k;
  if (p.num_experts < 1 || p.num_experts > kMaxDispatchExperts || p.k < 1 || N >= (int64_t(1) << 31) ||
      p.slots_per_chunk < 1 || p.num_chunks != ceil_div(N, p.slots_per_chunk) || p.num_chunks > 65535 ||
      p.chunk_counts == nullptr || p.num_bad_ids == nullptr || p.expert_offsets == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.num_chunks > 0) {
    dispatch_count_kernel<<<static_cast<unsigned>(p.num_chunks), kCountThreads, 0, s>>>(p);
    if (const int status = launch_status()) return status;
  }
  dispatch_scan_kernel<<<1, kScanThreads, 0, s>>>(p);  // also writes offsets (all 0) when N = 0
  return launch_status();
}

int dispatch_plan_scatter_cuda(const DispatchParams& p, void* stream) {
  if (p.num_chunks <= 0) return static_cast<int>(cudaSuccess);
  // slot_to_token may be null when S = 0 (every slot dropped): it is only written for kept slots.
  if (p.num_chunks > 65535 || p.token_slot == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  dispatch_scatter_kernel<<<static_cast<unsigned>(p.num_chunks), kScatterThreads, 0,
                            static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int gather_rows_cuda(const GatherRowsParams& p, void* stream) {
  if (p.rows <= 0 || p.cols <= 0) return static_cast<int>(cudaSuccess);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = row_blocks(p.rows);
  const int64_t row_bytes = p.cols * p.element_size, stride_bytes = p.in_row_stride * p.element_size;
  if (p.in_col_stride == 1 && row_bytes % 16 == 0 && stride_bytes % 16 == 0 && aligned16(p.in) && aligned16(p.out)) {
    // Contiguous, 16-byte aligned rows (the usual case): copy them as 16-byte vectors.
    GatherRowsParams v = p;
    v.cols = row_bytes / 16;
    v.in_row_stride = stride_bytes / 16;
    v.element_size = 16;
    gather_rows_kernel<Bytes16><<<blocks, kRowThreads, 0, s>>>(v);
    return launch_status();
  }
  switch (p.element_size) {
    case 2: gather_rows_kernel<uint16_t><<<blocks, kRowThreads, 0, s>>>(p); break;
    case 4: gather_rows_kernel<uint32_t><<<blocks, kRowThreads, 0, s>>>(p); break;
    case 8: gather_rows_kernel<uint64_t><<<blocks, kRowThreads, 0, s>>>(p); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return launch_status();
}

int combine_cuda(const CombineParams& p, void* stream) {
  if (p.num_tokens <= 0 || p.hidden <= 0) return static_cast<int>(cudaSuccess);
  if (p.y_kind == ScalarKind::kFloat64 || p.weights_kind == ScalarKind::kFloat64)
    return static_cast<int>(cudaErrorInvalidValue);
  combine_kernel<<<row_blocks(p.num_tokens), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

int combine_backward_cuda(const CombineParams& p, void* stream) {
  if (p.y_kind == ScalarKind::kFloat64 || p.weights_kind == ScalarKind::kFloat64 || p.grad_kind == ScalarKind::kFloat64)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.num_rows > 0 && p.hidden > 0) {
    combine_backward_y_kernel<<<row_blocks(p.num_rows), kRowThreads, 0, s>>>(p);
    if (const int status = launch_status()) return status;
  }
  if (p.grad_weights != nullptr && p.num_tokens > 0) {
    combine_backward_weights_kernel<<<row_blocks(p.num_tokens), kRowThreads, 0, s>>>(p);
    return launch_status();
  }
  return static_cast<int>(cudaSuccess);
}

}  // namespace moe
}  // namespace fastcore

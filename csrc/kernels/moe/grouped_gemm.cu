// CUDA grouped GEMM of the MoE expert MLP (math, epilogues and contracts in grouped_gemm.h).
//
// Kernels:
//   grouped_gemm_prep_kernel  one thread: sanitised offsets (clamped into [0, S], non-decreasing, first 0,
//                             last S) and the prefix sum of row tiles per expert, into p.scratch. E <= 4096
//                             serial steps (a few µs); it keeps the main kernel free of any host-side count.
//   grouped_gemm_kernel<Kind> one thread block per (row tile of one expert, BLOCK_N columns). The block finds
//                             its expert by binary search over the tile prefix sum, stages the A tile (rows
//                             gathered through a_rows when given: the x-row gather happens here, in the
//                             load, with no x_sorted copy) and the B tile(s) in shared memory, and
//                             accumulates in float32:
//                               Kind = float16 / bfloat16: WMMA 16×16×16 on tensor cores, 4 warps, each a
//                                 32×32 sub-tile (2×2 fragments; ×2 for the gated gate/up pair);
//                               Kind = float32: SIMT, 256 threads, each a 4×4 sub-tile (strided by 16 so
//                                 shared-memory reads are conflict-free), exact float32 FMAs (no TF32).
//                             The accumulators go through shared memory (the WMMA fragment layout is
//                             opaque), then every thread applies the shared per-element epilogue
//                             (grouped_gemm_epilogue: routing weight, fused activation) on its elements.
//
// tests/test_moe_experts.py runs these kernels, source unchanged, on the CPU CUDA emulator of
// tests/test_cuda_build.py with a functional WMMA stand-in (each emulated thread holds whole 16×16
// fragments), so keep launches in the form `kernel<<<grid, block, smem, stream>>>(args)`, keep the tensor-
// core code to load/fill/mma/store of fragments, and include <mma.h> only under nvcc.
#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "fastcore/common.h"
#include "fastcore/cuda_launch.h"
#include "moe/grouped_gemm.h"

namespace fastcore {
namespace moe {
namespace {

constexpr int kBlockM = static_cast<int>(kGemmBlockM);
constexpr int kBlockN = static_cast<int>(kGemmBlockN);
constexpr int kTcThreads = 128;    // 4 warps, 2 × 2 warp sub-tiles of 32 × 32
constexpr int kSimtThreads = 256;  // 16 × 16 threads, 4 × 4 elements each
constexpr int kCPad = 4;           // float padding of a row of the staged accumulator tile

// Storage of one operand element and the WMMA element type of a kind.
template <int Kind>
struct KindTraits;
template <>
struct KindTraits<0> {  // float32, SIMT
  using Storage = float;
  static constexpr int kBlockK = 16;
  static constexpr int kThreads = kSimtThreads;
  static FC_DEVICE float widen(float v) { return v; }
};
template <>
struct KindTraits<1> {  // float16, tensor cores
  using Storage = uint16_t;
  using Wmma = __half;
  static constexpr int kBlockK = 32;
  static constexpr int kThreads = kTcThreads;
};
template <>
struct KindTraits<2> {  // bfloat16, tensor cores
  using Storage = uint16_t;
  using Wmma = __nv_bfloat16;
  static constexpr int kBlockK = 32;
  static constexpr int kThreads = kTcThreads;
};

__global__ void grouped_gemm_prep_kernel(const GroupedGemmParams p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int64_t E = p.num_experts, S = p.rows;
  int64_t* offsets = p.scratch;
  int64_t* tiles = p.scratch + E + 1;
  offsets[0] = 0;
  tiles[0] = 0;
  for (int64_t e = 1; e <= E; ++e) {
    int64_t o = e == E ? S : p.expert_offsets[e];
    o = o < offsets[e - 1] ? offsets[e - 1] : (o > S ? S : o);
    offsets[e] = o;
    tiles[e] = tiles[e - 1] + (o - offsets[e - 1] + kBlockM - 1) / kBlockM;
  }
}

// Shared memory of one block: the operand tiles during the K loop, then (reused) the accumulator tile(s).
template <int Kind>
struct SharedTiles {
  using Storage = typename KindTraits<Kind>::Storage;
  static constexpr int kBlockK = KindTraits<Kind>::kBlockK;
  static constexpr int kOperandBytes = (kBlockM * kBlockK + 2 * kBlockK * kBlockN) * int(sizeof(Storage));
  static constexpr int kAccBytes = 2 * kBlockM * (kBlockN + kCPad) * int(sizeof(float));
  static constexpr int kBytes = kOperandBytes > kAccBytes ? kOperandBytes : kAccBytes;
};

template <int Kind>
FC_DEVICE typename KindTraits<Kind>::Storage load_element(const void* base, int64_t offset) {
  return static_cast<const typename KindTraits<Kind>::Storage*>(base)[offset];
}

// Float32 SIMT inner product of one K step: acc[i][j] += Σ_kk A[ty + 16 i, kk] B[kk, tx + 16 j].
template <int BlockK>
FC_DEVICE void simt_multiply(const float* a_tile, const float* b_tile, const float* b_up_tile, bool two_halves, int ty,
                             int tx, float (&acc)[4][4], float (&acc_up)[4][4]) {
#pragma unroll 4
  for (int kk = 0; kk < BlockK; ++kk) {
    float a[4], b[4];
    for (int i = 0; i < 4; ++i) a[i] = a_tile[(ty + 16 * i) * BlockK + kk];
    for (int j = 0; j < 4; ++j) b[j] = b_tile[kk * kBlockN + tx + 16 * j];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    if (two_halves) {
      for (int j = 0; j < 4; ++j) b[j] = b_up_tile[kk * kBlockN + tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc_up[i][j] = fmaf(a[i], b[j], acc_up[i][j]);
    }
  }
}

// Tensor-core accumulators of one warp: a 32 × 32 sub-tile as 2 × 2 WMMA fragments (and the "up"
// half's 2 × 2 in the gated forward). The float32 kind has none.
template <int Kind>
struct TcAccumulators {
  using Wmma = typename KindTraits<Kind>::Wmma;
  static constexpr int kBlockK = KindTraits<Kind>::kBlockK;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2], up[2][2];

  FC_DEVICE void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
        nvcuda::wmma::fill_fragment(up[i][j], 0.0f);
      }
  }

  FC_DEVICE void multiply(const uint16_t* a_tile, const uint16_t* b_tile, const uint16_t* b_up_tile, bool two_halves,
                          int wm, int wn) {
    const Wmma* a = reinterpret_cast<const Wmma*>(a_tile);
    const Wmma* b = reinterpret_cast<const Wmma*>(b_tile);
    const Wmma* b_up = reinterpret_cast<const Wmma*>(b_up_tile);
    for (int kk = 0; kk < kBlockK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, Wmma, nvcuda::wmma::row_major> fa[2];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, Wmma, nvcuda::wmma::row_major> fb;
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], a + (wm * 32 + 16 * i) * kBlockK + kk, kBlockK);
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::load_matrix_sync(fb, b + kk * kBlockN + wn * 32 + 16 * j, kBlockN);
        for (int i = 0; i < 2; ++i) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
        if (two_halves) {
          nvcuda::wmma::load_matrix_sync(fb, b_up + kk * kBlockN + wn * 32 + 16 * j, kBlockN);
          for (int i = 0; i < 2; ++i) nvcuda::wmma::mma_sync(up[i][j], fa[i], fb, up[i][j]);
        }
      }
    }
  }

  FC_DEVICE void store(float* c_tile, float* c_up_tile, bool two_halves, int wm, int wn, int ldc) {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        const int offset = (wm * 32 + 16 * i) * ldc + wn * 32 + 16 * j;
        nvcuda::wmma::store_matrix_sync(c_tile + offset, acc[i][j], ldc, nvcuda::wmma::mem_row_major);
        if (two_halves) nvcuda::wmma::store_matrix_sync(c_up_tile + offset, up[i][j], ldc, nvcuda::wmma::mem_row_major);
      }
  }
};
template <>
struct TcAccumulators<0> {};

template <int Kind>
__global__ void __launch_bounds__(KindTraits<Kind>::kThreads, 1) grouped_gemm_kernel(const GroupedGemmParams p) {
  using Traits = KindTraits<Kind>;
  using Storage = typename Traits::Storage;
  constexpr int kBlockK = Traits::kBlockK;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kLdc = kBlockN + kCPad;
  __shared__ __align__(128) unsigned char smem[SharedTiles<Kind>::kBytes];
  Storage* a_tile = reinterpret_cast<Storage*>(smem);  // [BLOCK_M][BLOCK_K]
  Storage* b_tile = a_tile + kBlockM * kBlockK;        // [BLOCK_K][BLOCK_N]
  Storage* b_up_tile = b_tile + kBlockK * kBlockN;     // [BLOCK_K][BLOCK_N] (gated forward)
  float* c_tile = reinterpret_cast<float*>(smem);      // [BLOCK_M][kLdc], after the K loop
  float* c_up_tile = c_tile + kBlockM * kLdc;

  const int64_t E = p.num_experts;
  const int64_t* offsets = p.scratch;
  const int64_t* tile_prefix = p.scratch + E + 1;
  const int64_t tile = blockIdx.x;
  if (tile >= tile_prefix[E]) return;  // surplus block (uniform per block)
  int64_t lo = 0, hi = E - 1;          // last e with tile_prefix[e] <= tile
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_prefix[mid] <= tile)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t expert = lo;
  const int64_t row0 = offsets[expert] + (tile - tile_prefix[expert]) * kBlockM;
  const int64_t row_end = offsets[expert + 1];
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  const int64_t N = p.n, K = p.k;
  const bool two_halves = p.epilogue == GemmEpilogue::kActForward && p.gated;
  const int tid = threadIdx.x;
  const char* b_expert = static_cast<const char*>(p.b);  // byte base of B; element offsets below

  // Source row of each tile row (gathered), -1 past the expert's rows or outside A.
  __shared__ int64_t source_row[kBlockM];
  for (int r = tid; r < kBlockM; r += kThreads) {
    const int64_t row = row0 + r;
    int64_t src = -1;
    if (row < row_end) {
      src = p.a_rows != nullptr ? p.a_rows[row] : row;
      if (src < 0 || src >= p.a_num_rows) src = -1;
    }
    source_row[r] = src;
  }
  __syncthreads();

  constexpr bool kTensorCores = Kind != 0;
  // SIMT accumulators (float32 path): rows ty + 16 i, columns tx + 16 j.
  float acc[4][4], acc_up[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_up[i][j] = 0.0f;
  const int ty = tid / 16, tx = tid % 16;
  // Tensor-core accumulators: warp (wm, wn) owns rows 32 wm .. +32, columns 32 wn .. +32.
  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  TcAccumulators<Kind> tc;
  if constexpr (kTensorCores) tc.zero();

  const bool b_k_fastest = p.b_k_stride == 1;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    // A tile: consecutive threads take consecutive κ of a row (coalesced when a_col_stride = 1).
    for (int idx = tid; idx < kBlockM * kBlockK; idx += kThreads) {
      const int r = idx / kBlockK, kk = idx % kBlockK;
      const int64_t src = source_row[r], kappa = k0 + kk;
      Storage v = Storage(0);
      if (src >= 0 && kappa < K) v = load_element<Kind>(p.a, src * p.a_row_stride + kappa * p.a_col_stride);
      a_tile[r * kBlockK + kk] = v;
    }
    // B tile(s): walk κ fastest when B is contiguous along κ (Wᵀ views), else n fastest.
    for (int idx = tid; idx < kBlockK * kBlockN; idx += kThreads) {
      const int kk = b_k_fastest ? idx % kBlockK : idx / kBlockN;
      const int nn = b_k_fastest ? idx / kBlockK : idx % kBlockN;
      const int64_t kappa = k0 + kk, col = col0 + nn;
      Storage v = Storage(0), u = Storage(0);
      if (kappa < K && col < N) {
        const int64_t offset = expert * p.b_expert_stride + kappa * p.b_k_stride + col * p.b_n_stride;
        v = load_element<Kind>(b_expert, offset);
        if (two_halves) u = load_element<Kind>(b_expert, offset + N * p.b_n_stride);
      }
      b_tile[kk * kBlockN + nn] = v;
      if (two_halves) b_up_tile[kk * kBlockN + nn] = u;
    }
    __syncthreads();
    if constexpr (kTensorCores) {
      tc.multiply(a_tile, b_tile, b_up_tile, two_halves, wm, wn);
    } else {
      simt_multiply<kBlockK>(a_tile, b_tile, b_up_tile, two_halves, ty, tx, acc, acc_up);
    }
    __syncthreads();
  }

  // Stage the accumulators (operand tiles are dead now), then the per-element epilogue.
  if constexpr (kTensorCores) {
    tc.store(c_tile, c_up_tile, two_halves, wm, wn, kLdc);
  } else {
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        c_tile[(ty + 16 * i) * kLdc + tx + 16 * j] = acc[i][j];
        if (two_halves) c_up_tile[(ty + 16 * i) * kLdc + tx + 16 * j] = acc_up[i][j];
      }
  }
  __syncthreads();
  for (int idx = tid; idx < kBlockM * kBlockN; idx += kThreads) {
    const int r = idx / kBlockN, nn = idx % kBlockN;
    const int64_t row = row0 + r, col = col0 + nn;
    if (row >= row_end || col >= N) continue;
    grouped_gemm_epilogue(p, row, col, c_tile[r * kLdc + nn], two_halves ? c_up_tile[r * kLdc + nn] : 0.0f);
  }
}

template <int Kind>
int launch_grouped_gemm(const GroupedGemmParams& p, cudaStream_t stream) {
  const int64_t tiles = grouped_gemm_max_tiles(p.rows, p.num_experts);
  const int64_t col_blocks = ceil_div(p.n, kBlockN);
  if (tiles <= 0 || tiles > kMaxGridX || col_blocks > kMaxGridYZ) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_blocks));
  grouped_gemm_kernel<Kind><<<grid, KindTraits<Kind>::kThreads, 0, stream>>>(p);
  return launch_status();
}

}  // namespace

int grouped_gemm_cuda(const GroupedGemmParams& p, void* stream) {
  if (p.rows <= 0 || p.n <= 0 || p.k <= 0 || p.num_experts <= 0 || p.scratch == nullptr) return cudaErrorInvalidValue;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  grouped_gemm_prep_kernel<<<1, 1, 0, s>>>(p);
  if (const int status = launch_status()) return status;
  switch (p.kind) {
    case ScalarKind::kFloat32: return launch_grouped_gemm<0>(p, s);
    case ScalarKind::kFloat16: return launch_grouped_gemm<1>(p, s);
    case ScalarKind::kBFloat16: return launch_grouped_gemm<2>(p, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe
}  // namespace fastcore

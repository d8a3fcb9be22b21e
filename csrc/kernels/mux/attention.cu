// CUDA fused attention (see attention.h for the math), torch-free.
//
// Forward: a block of kWarps warps owns kWarps·kRowsPerWarp query rows of one (b, h); key/value tiles of
// kTileN rows are staged once in shared memory (converted to float32) and shared by every row of the block.
// Each warp walks its rows' online softmax: lane l holds features l, l + 32, … of q and of the output
// accumulator (D ≤ 256 -> ≤ 8 registers each), a score is a warp-shuffle reduction, so any head size
// 1..256 and any Lq, Lk work (tails are masked loads). Softmax and accumulation are float32 for every
// input dtype (SIMT path; bf16/fp16 inputs are widened on load).
// Backward (recompute from lse, FlashAttention-2 algebra, no atomics, deterministic):
//   dkdv kernel: one warp per key row j loops over every query row i: dV_j = Σ p_ij dO_i, dK_j = scale Σ ds_ij q_i;
//   dq kernel:   one warp per query row i loops over every key row j: dQ_i = scale Σ ds_ij k_j,
//   with p_ij = exp(s_ij − lse_i), ds_ij = p_ij (dO_i·v_j − δ_i), δ_i = dO_i·O_i.
// The mask terms come from the same FC_HOST_DEVICE rule as the CPU path (attention_bias_of below).
//
// Tensor-core forward (attention_forward_wmma_cuda, float16/bfloat16 on sm_80+): a block of kTcWarps warps
// owns one strip of 16 query rows. Q (16 × Dp, Dp = D rounded up to 16, zero padded), a transposed key
// tile K^T (Dp × 16) and a value tile V (16 × Dp) are staged in shared memory as the input's 16-bit bits;
// S = Q K^T is WMMA m16n16k16 with float32 accumulation (warp w takes the k-steps w, w + 4, …, partial
// sums in shared memory), the online softmax of the 16 rows runs in float32 (one thread per row, mask
// rule shared with the SIMT path), P is rounded to the input dtype and O (16 × Dp float32, shared
// memory) is rescaled then O += P V by WMMA (warp w takes the 16-column tiles w, w + 4, …). Each
// fragment result is stored after a __syncwarp so the read-modify-write of O is also correct on the CPU
// emulator's WMMA stand-in (tests/test_mux_attention_cuda_emulated.py). Keep launches in the form
// `kernel<<<grid, block, smem, stream>>>(args)` and include <mma.h> only under nvcc.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "mux/attention.h"
#include "mux/convert.h"

namespace fastcore {
namespace mux {
namespace {

constexpr int kWarps = 4;
constexpr int kTileN = 16;  // 2 tiles × 16 × 257 floats = 33 KB of static shared memory
constexpr int kMaxPerLane = kMaxHeadDim / 32;  // 8

// The additive mask term of score (b, h, i, j): 0, the additive mask value, or −inf (masked).
__device__ __forceinline__ float attention_bias_of(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                                                   int64_t j) {
  float bias = 0.0f;
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t offset = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] + j * p.mask_stride[3];
    if (p.mask_kind == MaskKind::kBool) {
      if (!static_cast<const bool*>(p.mask)[offset]) return -INFINITY;
    } else {
      bias = load_as<float>(p.mask, p.mask_scalar, offset);
    }
  }
  if (p.key_padding != nullptr && p.key_padding[b * p.key_padding_stride[0] + j * p.key_padding_stride[1]])
    return -INFINITY;
  if (p.causal && j > i) return -INFINITY;
  return bias;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Loads one D-row starting at element `offset` (feature stride `d_stride`) into the lane's registers
// (features lane + 32 c), scaled.
__device__ __forceinline__ void load_lane_row(const void* base, ScalarKind kind, int64_t offset, int64_t d_stride,
                                              int D, int lane, float scale, float* dst) {
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    dst[c] = d < D ? load_as<float>(base, kind, offset + d * d_stride) * scale : 0.0f;
  }
}

__device__ __forceinline__ int64_t row_offset(const int64_t* stride, int64_t b, int64_t h, int64_t row) {
  return b * stride[0] + h * stride[1] + row * stride[2];
}

__global__ void __launch_bounds__(kWarps * 32) attention_forward_kernel(AttentionParams p) {
  __shared__ float k_tile[kTileN][kMaxHeadDim + 1];
  __shared__ float v_tile[kTileN][kMaxHeadDim + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int D = static_cast<int>(p.head_dim);
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = row < p.len_q;
  float q[kMaxPerLane], o[kMaxPerLane];
  load_lane_row(p.q, p.kind, row_offset(p.q_stride, b, h, active ? row : 0), p.q_stride[3], D, lane, static_cast<float>(p.scale), q);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) o[c] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  const int64_t last_row = min(p.len_q, (static_cast<int64_t>(blockIdx.x) + 1) * kWarps) - 1;
  const int64_t end = p.causal ? min(p.len_k, last_row + 1) : p.len_k;
  for (int64_t j0 = 0; j0 < end; j0 += kTileN) {
    const int n = static_cast<int>(p.len_k - j0 < kTileN ? p.len_k - j0 : kTileN);
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D;
      const int64_t key = j0 + j;
      k_tile[j][d] = load_as<float>(p.k, p.kind, b * p.k_stride[0] + h * p.k_stride[1] + key * p.k_stride[2] +
                                                   d * p.k_stride[3]);
      v_tile[j][d] = load_as<float>(p.v, p.kind, b * p.v_stride[0] + h * p.v_stride[1] + key * p.v_stride[2] +
                                                   d * p.v_stride[3]);
    }
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; ++j) {
      float partial = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxPerLane; ++c) {
        const int d = lane + 32 * c;
        if (d < D) partial += q[c] * k_tile[j][d];
      }
      const float s = warp_sum(partial) + attention_bias_of(p, b, h, row, j0 + j);
      if (s == -INFINITY) continue;  // masked: contributes exp(−inf) = 0
      const float m_new = fmaxf(m, s);
      const float alpha = expf(m - m_new);  // 0 when m = −inf
      const float weight = expf(s - m_new);
      l = l * alpha + weight;
#pragma unroll
      for (int c = 0; c < kMaxPerLane; ++c) {
        const int d = lane + 32 * c;
        o[c] = o[c] * alpha + (d < D ? weight * v_tile[j][d] : 0.0f);
      }
      m = m_new;
    }
  }
  if (!active) return;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // fully masked row: out = 0, lse = −inf
  const int64_t out_row = bh * p.len_q + row;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) store_as<float>(p.out, p.kind, out_row * D + d, o[c] * inv);
  }
  if (lane == 0) static_cast<float*>(p.lse)[out_row] = l > 0.0f ? m + logf(l) : -INFINITY;
}

struct BackwardRow {
  float x[kMaxPerLane];
};

__device__ __forceinline__ float lane_dot(const float* a, const float* b, int D, int lane) {
  float partial = 0.0f;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c)
    if (lane + 32 * c < D) partial += a[c] * b[c];
  return warp_sum(partial);
}

// δ_i = dO_i · O_i, one warp per query row.
__global__ void __launch_bounds__(kWarps * 32) attention_delta_kernel(AttentionParams p, float* delta) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t rows = p.batch * p.heads * p.len_q;
  if (row >= rows) return;
  const int D = static_cast<int>(p.head_dim);
  float partial = 0.0f;
  for (int d = lane; d < D; d += 32)
    partial += load_as<float>(p.grad_out, p.kind, row * D + d) * load_as<float>(p.out, p.kind, row * D + d);
  partial = warp_sum(partial);
  if (lane == 0) delta[row] = partial;
}

__global__ void __launch_bounds__(kWarps * 32, 1) attention_dkdv_kernel(AttentionParams p, const float* delta) {
  const int lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim);
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (j >= p.len_k) return;
  float k[kMaxPerLane], v[kMaxPerLane], dk[kMaxPerLane], dv[kMaxPerLane];
  load_lane_row(p.k, p.kind, row_offset(p.k_stride, b, h, j), p.k_stride[3], D, lane, 1.0f, k);
  load_lane_row(p.v, p.kind, row_offset(p.v_stride, b, h, j), p.v_stride[3], D, lane, 1.0f, v);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) dk[c] = dv[c] = 0.0f;
  const float scale = static_cast<float>(p.scale);
  const float* lse = static_cast<const float*>(p.lse) + bh * p.len_q;
  for (int64_t i = p.causal ? j : 0; i < p.len_q; ++i) {
    const float bias = attention_bias_of(p, b, h, i, j);
    if (bias == -INFINITY || lse[i] == -INFINITY) continue;
    float q[kMaxPerLane], dout[kMaxPerLane];
    load_lane_row(p.q, p.kind, row_offset(p.q_stride, b, h, i), p.q_stride[3], D, lane, 1.0f, q);
    load_lane_row(p.grad_out, p.kind, (bh * p.len_q + i) * p.head_dim, 1, D, lane, 1.0f, dout);
    const float prob = expf(lane_dot(q, k, D, lane) * scale + bias - lse[i]);
    const float ds = prob * (lane_dot(dout, v, D, lane) - delta[bh * p.len_q + i]);
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      dv[c] += prob * dout[c];
      dk[c] += ds * q[c];
    }
  }
  const int64_t out_row = bh * p.len_k + j;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) {
      store_as<float>(p.grad_k, p.kind, out_row * D + d, dk[c] * scale);
      store_as<float>(p.grad_v, p.kind, out_row * D + d, dv[c]);
    }
  }
}

__global__ void __launch_bounds__(kWarps * 32) attention_dq_kernel(AttentionParams p, const float* delta) {
  const int lane = threadIdx.x % 32;
  const int D = static_cast<int>(p.head_dim);
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= p.len_q) return;
  const float scale = static_cast<float>(p.scale);
  const float lse = static_cast<const float*>(p.lse)[bh * p.len_q + i];
  const float di = delta[bh * p.len_q + i];
  float q[kMaxPerLane], dout[kMaxPerLane], dq[kMaxPerLane];
  load_lane_row(p.q, p.kind, row_offset(p.q_stride, b, h, i), p.q_stride[3], D, lane, 1.0f, q);
  load_lane_row(p.grad_out, p.kind, (bh * p.len_q + i) * p.head_dim, 1, D, lane, 1.0f, dout);
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) dq[c] = 0.0f;
  const int64_t end = p.causal ? min(p.len_k, i + 1) : p.len_k;
  for (int64_t j = 0; lse != -INFINITY && j < end; ++j) {
    const float bias = attention_bias_of(p, b, h, i, j);
    if (bias == -INFINITY) continue;
    float k[kMaxPerLane], v[kMaxPerLane];
    load_lane_row(p.k, p.kind, row_offset(p.k_stride, b, h, j), p.k_stride[3], D, lane, 1.0f, k);
    load_lane_row(p.v, p.kind, row_offset(p.v_stride, b, h, j), p.v_stride[3], D, lane, 1.0f, v);
    const float prob = expf(lane_dot(q, k, D, lane) * scale + bias - lse);
    const float ds = prob * (lane_dot(dout, v, D, lane) - di);
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) dq[c] += ds * k[c];
  }
  const int64_t out_row = bh * p.len_q + i;
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) store_as<float>(p.grad_q, p.kind, out_row * D + d, dq[c] * scale);
  }
}

// ---- tensor-core forward (float16 / bfloat16)

constexpr int kTcWarps = 4;
constexpr int kTcRows = 16;                    // query rows per block
constexpr int kTcKeys = 16;                    // keys per tile
constexpr int kQLd = kMaxHeadDim + 8;          // 16-bit elements per staged Q / V row
constexpr int kOLd = kMaxHeadDim + 4;          // floats per O row
constexpr int kKtLd = kTcKeys;                 // 16-bit elements per K^T row

template <typename Wmma>
__global__ void __launch_bounds__(kTcWarps * 32) attention_forward_wmma_kernel(AttentionParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(32) uint16_t q_s[kTcRows * kQLd];
  __shared__ __align__(32) uint16_t kt_s[kMaxHeadDim * kKtLd];
  __shared__ __align__(32) uint16_t v_s[kTcKeys * kQLd];
  __shared__ __align__(32) uint16_t p_s[kTcRows * kTcKeys];
  __shared__ __align__(32) float o_s[kTcRows * kOLd];
  __shared__ __align__(32) float s_part[kTcWarps][kTcRows * kTcKeys];
  __shared__ float m_s[kTcRows], l_s[kTcRows], alpha_s[kTcRows];
  namespace wmma = nvcuda::wmma;
  const int tid = threadIdx.x, warp = tid / 32;
  const int D = static_cast<int>(p.head_dim);
  const int Dp = (D + 15) / 16 * 16;
  const int steps = Dp / 16;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const bool bf16 = p.kind == ScalarKind::kBFloat16;
  const uint16_t* qg = static_cast<const uint16_t*>(p.q);
  const uint16_t* kg = static_cast<const uint16_t*>(p.k);
  const uint16_t* vg = static_cast<const uint16_t*>(p.v);
  for (int idx = tid; idx < kTcRows * Dp; idx += blockDim.x) {
    const int r = idx / Dp, d = idx % Dp;
    const int64_t row = row0 + r;
    q_s[r * kQLd + d] = row < p.len_q && d < D ? qg[row_offset(p.q_stride, b, h, row) + d * p.q_stride[3]] : 0;
    o_s[r * kOLd + d] = 0.0f;
  }
  if (tid < kTcRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
  }
  const float scale = static_cast<float>(p.scale);
  const int64_t last_row = min(p.len_q, row0 + kTcRows) - 1;
  const int64_t end = p.causal ? min(p.len_k, last_row + 1) : p.len_k;
  for (int64_t j0 = 0; j0 < end; j0 += kTcKeys) {
    const int n = static_cast<int>(p.len_k - j0 < kTcKeys ? p.len_k - j0 : kTcKeys);
    __syncthreads();  // the previous tile's P V is done with kt_s, v_s, p_s
    for (int idx = tid; idx < kTcKeys * Dp; idx += blockDim.x) {
      const int j = idx / Dp, d = idx % Dp;
      const int64_t key = j0 + j;
      const bool in = j < n && d < D;
      kt_s[d * kKtLd + j] = in ? kg[row_offset(p.k_stride, b, h, key) + d * p.k_stride[3]] : 0;
      v_s[j * kQLd + d] = in ? vg[row_offset(p.v_stride, b, h, key) + d * p.v_stride[3]] : 0;
    }
    __syncthreads();
    {  // S partials: warp w sums the k-steps w, w + kTcWarps, …
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int step = warp; step < steps; step += kTcWarps) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, Wmma, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Wmma, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, reinterpret_cast<const Wmma*>(q_s) + step * 16, kQLd);
        wmma::load_matrix_sync(fb, reinterpret_cast<const Wmma*>(kt_s) + step * 16 * kKtLd, kKtLd);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(s_part[warp], acc, kTcKeys, wmma::mem_row_major);
    }
    __syncthreads();
    if (tid < kTcRows) {  // online softmax of row tid, float32
      const int64_t row = row0 + tid;
      float s[kTcKeys];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kTcKeys; ++j) {
        float value = -INFINITY;
        if (row < p.len_q && j < n) {
          float dot = 0.0f;
#pragma unroll
          for (int w = 0; w < kTcWarps; ++w) dot += s_part[w][tid * kTcKeys + j];
          const float bias = attention_bias_of(p, b, h, row, j0 + j);
          if (bias != -INFINITY) value = dot * scale + bias;
        }
        s[j] = value;
        tile_max = fmaxf(tile_max, value);
      }
      const float m = m_s[tid];
      const float m_new = fmaxf(m, tile_max);
      float alpha = 1.0f, sum = 0.0f;
      if (m_new != -INFINITY) alpha = expf(m - m_new);  // 0 when m = −inf
#pragma unroll
      for (int j = 0; j < kTcKeys; ++j) {
        const float weight = s[j] == -INFINITY ? 0.0f : expf(s[j] - m_new);
        sum += weight;
        p_s[tid * kTcKeys + j] = bf16 ? float_to_bfloat16_bits(weight) : float_to_float16_bits(weight);
      }
      m_s[tid] = m_new;
      l_s[tid] = l_s[tid] * alpha + sum;
      alpha_s[tid] = alpha;
    }
    __syncthreads();
    for (int idx = tid; idx < kTcRows * Dp; idx += blockDim.x) {
      const int r = idx / Dp, d = idx % Dp;
      o_s[r * kOLd + d] *= alpha_s[r];
    }
    __syncthreads();
    {  // O += P V: warp w takes the column tiles w, w + kTcWarps, …
      wmma::fragment<wmma::matrix_a, 16, 16, 16, Wmma, wmma::row_major> fp;
      wmma::load_matrix_sync(fp, reinterpret_cast<const Wmma*>(p_s), kTcKeys);
      for (int tile = warp; tile < steps; tile += kTcWarps) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Wmma, wmma::row_major> fv;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, o_s + tile * 16, kOLd, wmma::mem_row_major);
        wmma::load_matrix_sync(fv, reinterpret_cast<const Wmma*>(v_s) + tile * 16, kQLd);
        wmma::mma_sync(acc, fp, fv, acc);
        __syncwarp();  // every lane has read the tile before it is overwritten
        wmma::store_matrix_sync(o_s + tile * 16, acc, kOLd, wmma::mem_row_major);
      }
    }
  }
  __syncthreads();
  for (int idx = tid; idx < kTcRows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const int64_t row = row0 + r;
    if (row >= p.len_q) continue;
    const float l = l_s[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // fully masked row: out = 0, lse = −inf
    store_as<float>(p.out, p.kind, (bh * p.len_q + row) * D + d, o_s[r * kOLd + d] * inv);
  }
  if (tid < kTcRows && row0 + tid < p.len_q) {
    const float l = l_s[tid];
    static_cast<float*>(p.lse)[bh * p.len_q + row0 + tid] = l > 0.0f ? m_s[tid] + logf(l) : -INFINITY;
  }
#endif
}

}  // namespace

int attention_forward_cuda(const AttentionParams& p, void* stream) {
  if (p.batch * p.heads * p.len_q == 0) return 0;
  const dim3 grid(static_cast<unsigned>((p.len_q + kWarps - 1) / kWarps), static_cast<unsigned>(p.batch * p.heads));
  attention_forward_kernel<<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// float16 / bfloat16 only; the caller checks the device is sm_80+.
int attention_forward_wmma_cuda(const AttentionParams& p, void* stream) {
  if (p.batch * p.heads * p.len_q == 0) return 0;
  if (p.kind != ScalarKind::kFloat16 && p.kind != ScalarKind::kBFloat16) return 1;  // cudaErrorInvalidValue
  const dim3 grid(static_cast<unsigned>((p.len_q + kTcRows - 1) / kTcRows), static_cast<unsigned>(p.batch * p.heads));
  if (p.kind == ScalarKind::kFloat16)
    attention_forward_wmma_kernel<__half><<<grid, kTcWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  else
    attention_forward_wmma_kernel<__nv_bfloat16><<<grid, kTcWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// workspace: float32 [B·H·Lq] for δ (the caller allocates at least that much).
int attention_backward_cuda(const AttentionParams& p, void* workspace, void* stream) {
  const int64_t rows = p.batch * p.heads * p.len_q;
  if (rows == 0 || p.len_k == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* delta = static_cast<float*>(workspace);
  attention_delta_kernel<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, s>>>(p, delta);
  int status = static_cast<int>(cudaGetLastError());
  if (status != 0) return status;
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  attention_dkdv_kernel<<<dim3(static_cast<unsigned>((p.len_k + kWarps - 1) / kWarps), bh), kWarps * 32, 0, s>>>(
      p, delta);
  status = static_cast<int>(cudaGetLastError());
  if (status != 0) return status;
  attention_dq_kernel<<<dim3(static_cast<unsigned>((p.len_q + kWarps - 1) / kWarps), bh), kWarps * 32, 0, s>>>(
      p, delta);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace mux
}  // namespace fastcore

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
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

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

}  // namespace

int attention_forward_cuda(const AttentionParams& p, void* stream) {
  if (p.batch * p.heads * p.len_q == 0) return 0;
  const dim3 grid(static_cast<unsigned>((p.len_q + kWarps - 1) / kWarps), static_cast<unsigned>(p.batch * p.heads));
  attention_forward_kernel<<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
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

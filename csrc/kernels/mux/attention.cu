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

#include "fastcore/common.h"
#include "fastcore/cuda_launch.h"
#include "mux/attention.h"

namespace fastcore {
namespace mux {
namespace {

constexpr int kWarps = 4;
constexpr int kTileN = 16;                     // 2 tiles × 16 × 257 floats = 33 KB of static shared memory
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

// The backward's recomputed probability p_ij = exp(scale · q_i·k_j + a_ij − lse_i) from the raw dot
// product: 0 for a masked score (a_ij = −inf) or a fully masked row (lse_i = −inf), never NaN.
__device__ __forceinline__ float recomputed_probability(float dot, float scale, float bias, float lse) {
  return bias == -INFINITY || lse == -INFINITY ? 0.0f : expf(dot * scale + bias - lse);
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
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = attention_kv_head(p, h);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool active = row < p.len_q;
  float q[kMaxPerLane], o[kMaxPerLane];
  load_lane_row(p.q, p.kind, row_offset(p.q_stride, b, h, active ? row : 0), p.q_stride[3], D, lane,
                static_cast<float>(p.scale), q);
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
      k_tile[j][d] =
          load_as<float>(p.k, p.kind, b * p.k_stride[0] + hk * p.k_stride[1] + key * p.k_stride[2] + d * p.k_stride[3]);
      v_tile[j][d] =
          load_as<float>(p.v, p.kind, b * p.v_stride[0] + hk * p.v_stride[1] + key * p.v_stride[2] + d * p.v_stride[3]);
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
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = attention_kv_head(p, h);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (j >= p.len_k) return;
  float k[kMaxPerLane], v[kMaxPerLane], dk[kMaxPerLane], dv[kMaxPerLane];
  load_lane_row(p.k, p.kind, row_offset(p.k_stride, b, hk, j), p.k_stride[3], D, lane, 1.0f, k);
  load_lane_row(p.v, p.kind, row_offset(p.v_stride, b, hk, j), p.v_stride[3], D, lane, 1.0f, v);
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
    const float prob = recomputed_probability(lane_dot(q, k, D, lane), scale, bias, lse[i]);
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
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = attention_kv_head(p, h);
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
    load_lane_row(p.k, p.kind, row_offset(p.k_stride, b, hk, j), p.k_stride[3], D, lane, 1.0f, k);
    load_lane_row(p.v, p.kind, row_offset(p.v_stride, b, hk, j), p.v_stride[3], D, lane, 1.0f, v);
    const float prob = recomputed_probability(lane_dot(q, k, D, lane), scale, bias, lse);
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
constexpr int kTcRows = 16;                                   // query rows per block
constexpr int kTcKeys = 16;                                   // keys per tile
constexpr int kQLd = kMaxHeadDim + 8;                         // 16-bit elements per staged Q / V row
constexpr int kOLd = kMaxHeadDim + 4;                         // floats per O row
constexpr int kKtLd = kTcKeys;                                // 16-bit elements per K^T row
constexpr int kTcTilesPerWarp = kMaxHeadDim / 16 / kTcWarps;  // 16-column output tiles a warp owns (≤ 4)

// Staging of 16 rows (row0 … row0 + 15) of a [B, H, L, D] 16-bit tensor into shared memory, the whole
// block cooperating; rows ≥ len and features ≥ D (up to Dp, the multiple of 16) are zero, so padded
// operands add nothing to a product. Row-major: dst[r · ld + d]. Transposed: dst[d · 16 + r].
__device__ __forceinline__ void stage_rows(uint16_t* dst, int ld, const void* src, const int64_t* stride, int64_t b,
                                           int64_t h, int64_t row0, int64_t len, int D, int Dp) {
  const uint16_t* g = static_cast<const uint16_t*>(src);
  for (int idx = threadIdx.x; idx < 16 * Dp; idx += blockDim.x) {
    const int r = idx / Dp, d = idx % Dp;
    const int64_t row = row0 + r;
    dst[r * ld + d] = row < len && d < D ? g[row_offset(stride, b, h, row) + d * stride[3]] : 0;
  }
}

__device__ __forceinline__ void stage_rows_transposed(uint16_t* dst, const void* src, const int64_t* stride, int64_t b,
                                                      int64_t h, int64_t row0, int64_t len, int D, int Dp) {
  const uint16_t* g = static_cast<const uint16_t*>(src);
  for (int idx = threadIdx.x; idx < 16 * Dp; idx += blockDim.x) {
    const int r = idx / Dp, d = idx % Dp;
    const int64_t row = row0 + r;
    dst[d * 16 + r] = row < len && d < D ? g[row_offset(stride, b, h, row) + d * stride[3]] : 0;
  }
}

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
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = attention_kv_head(p, h);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const bool bf16 = p.kind == ScalarKind::kBFloat16;
  stage_rows(q_s, kQLd, p.q, p.q_stride, b, h, row0, p.len_q, D, Dp);
  for (int idx = tid; idx < kTcRows * Dp; idx += blockDim.x) o_s[(idx / Dp) * kOLd + idx % Dp] = 0.0f;
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
    stage_rows_transposed(kt_s, p.k, p.k_stride, b, hk, j0, p.len_k, D, Dp);
    stage_rows(v_s, kQLd, p.v, p.v_stride, b, hk, j0, p.len_k, D, Dp);
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

// ---- tensor-core backward (float16 / bfloat16), FlashAttention-2 algebra with P recomputed per tile
//
// Two deterministic kernels (no atomics), as the SIMT backward, each tile 16 query rows × 16 keys:
//   dkdv: a block owns 16 key rows; for every query tile it recomputes S = Q Kᵀ and dP = dO Vᵀ (WMMA,
//         the Dp/16 k-steps split over the warps, partial sums in shared memory), then per element
//         P = exp(scale S + a − lse) and dS = P ∘ (dP − δ) in float32 (recomputed_probability), rounds
//         Pᵀ and dSᵀ to the input dtype and accumulates dV += Pᵀ dO, dK += dSᵀ Q in float32 fragments
//         held in registers (warp w owns the 16-column tiles w, w + 4, …); dK is scaled at the store.
//   dq:   a block owns 16 query rows; for every key tile it recomputes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (so K is
//         staged once, row-major, and serves both Sᵀ and dQ += dS K), dS as above, dQ += dS K.
// δ_i = dO_i · O_i comes from the SIMT attention_delta_kernel (float32 workspace); lse is the forward's
// float32 log-sum-exp. Row and key tails are zero operands with P = dS = 0; fully masked rows give zero
// gradients. Shared memory stays under the 48 KB static limit (≈ 42 KB for D = 256).

// The per-element step of both backward kernels for the 16 × 16 tile (query rows i0 + r, keys j0 + c):
// sums the warps' partial S and dP (element [r][c] at partial index r · row_stride + c · col_stride), and
// writes P and dS rounded to the input dtype at p_out / ds_out[r · out_row_stride + c · out_col_stride].
__device__ __forceinline__ void backward_tile_elements(const AttentionParams& p, int64_t b, int64_t h, int64_t i0,
                                                       int64_t j0, const float (*s_part)[256],
                                                       const float (*dp_part)[256], int row_stride, int col_stride,
                                                       const float* lse_s, const float* delta_s, uint16_t* p_out,
                                                       uint16_t* ds_out, int out_row_stride, int out_col_stride,
                                                       bool bf16) {
  const float scale = static_cast<float>(p.scale);
  for (int idx = threadIdx.x; idx < 256; idx += blockDim.x) {
    const int r = idx / 16, c = idx % 16;
    const int64_t i = i0 + r, j = j0 + c;
    float prob = 0.0f, ds = 0.0f;
    if (i < p.len_q && j < p.len_k) {
      const int at = r * row_stride + c * col_stride;
      float dot = 0.0f, dp = 0.0f;
#pragma unroll
      for (int w = 0; w < kTcWarps; ++w) {
        dot += s_part[w][at];
        dp += dp_part[w][at];
      }
      prob = recomputed_probability(dot, scale, attention_bias_of(p, b, h, i, j), lse_s[r]);
      ds = prob * (dp - delta_s[r]);
    }
    const int out = r * out_row_stride + c * out_col_stride;
    if (p_out != nullptr) p_out[out] = bf16 ? float_to_bfloat16_bits(prob) : float_to_float16_bits(prob);
    ds_out[out] = bf16 ? float_to_bfloat16_bits(ds) : float_to_float16_bits(ds);
  }
}

// Warp-split partial products of a 16 × 16 tile: part[w] = Σ_{steps s ≡ w mod kTcWarps} A_s B_s with
// A_s = a + 16 s (row-major, leading dimension lda) and B_s = bt + 16 s · 16 (row-major 16 columns).
template <typename Wmma>
__device__ __forceinline__ void partial_tile_product(const uint16_t* a, int lda, const uint16_t* bt, int steps,
                                                     float* part) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int step = warp; step < steps; step += kTcWarps) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, Wmma, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, Wmma, wmma::row_major> fb;
    wmma::load_matrix_sync(fa, reinterpret_cast<const Wmma*>(a) + step * 16, lda);
    wmma::load_matrix_sync(fb, reinterpret_cast<const Wmma*>(bt) + step * 16 * 16, 16);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(part, acc, 16, wmma::mem_row_major);
}

// acc[t] += A (16 × 16, row-major, ld 16) · B[:, 16 tile .. 16 tile + 15] for the warp's tiles
// tile = warp + kTcWarps t < tiles (B row-major, leading dimension ldb).
template <typename Wmma, typename Fragment>
__device__ __forceinline__ void accumulate_tiles(Fragment* acc, const uint16_t* a, const uint16_t* b, int ldb,
                                                 int tiles) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Wmma, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, reinterpret_cast<const Wmma*>(a), 16);
#pragma unroll
  for (int t = 0; t < kTcTilesPerWarp; ++t) {
    const int tile = warp + kTcWarps * t;
    if (tile < tiles) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, Wmma, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, reinterpret_cast<const Wmma*>(b) + tile * 16, ldb);
      wmma::mma_sync(acc[t], fa, fb, acc[t]);
    }
  }
}

// Stores the warp's accumulator tiles, times `factor`, as rows row0 … row0 + 15 (< len) of the
// contiguous [B·H, len, D] output `dst` (of the input's kind), through the 16 × 16 float scratch.
template <typename Fragment>
__device__ __forceinline__ void store_tiles(const AttentionParams& p, Fragment* acc, float* scratch, void* dst,
                                            int64_t bh, int64_t row0, int64_t len, int D, int tiles, float factor) {
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < kTcTilesPerWarp; ++t) {
    const int tile = warp + kTcWarps * t;
    if (tile < tiles) {
      wmma::store_matrix_sync(scratch, acc[t], 16, wmma::mem_row_major);
      __syncwarp();
      for (int idx = lane; idx < 256; idx += 32) {
        const int r = idx / 16, d = tile * 16 + idx % 16;
        const int64_t row = row0 + r;
        if (row < len && d < D) store_as<float>(dst, p.kind, (bh * len + row) * D + d, scratch[idx] * factor);
      }
      __syncwarp();  // every lane has read the scratch before the next tile overwrites it
    }
  }
}

template <typename Wmma>
__global__ void __launch_bounds__(kTcWarps * 32) attention_dkdv_wmma_kernel(AttentionParams p, const float* delta) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(32) uint16_t kt_s[kMaxHeadDim * 16];    // Kᵀ of the block's 16 keys
  __shared__ __align__(32) uint16_t vt_s[kMaxHeadDim * 16];    // Vᵀ
  __shared__ __align__(32) uint16_t q_s[kTcRows * kQLd];       // the query tile's Q
  __shared__ __align__(32) uint16_t do_s[kTcRows * kQLd];      // and dO
  __shared__ __align__(32) uint16_t pt_s[kTcKeys * kTcRows];   // Pᵀ (keys × queries), input dtype
  __shared__ __align__(32) uint16_t dst_s[kTcKeys * kTcRows];  // dSᵀ
  __shared__ __align__(32) float s_part[kTcWarps][256];        // per-warp partial S, then the store scratch
  __shared__ __align__(32) float dp_part[kTcWarps][256];       // per-warp partial dP
  __shared__ float lse_s[kTcRows], delta_s[kTcRows];
  namespace wmma = nvcuda::wmma;
  const int tid = threadIdx.x, warp = tid / 32;
  const int D = static_cast<int>(p.head_dim);
  const int Dp = (D + 15) / 16 * 16;
  const int steps = Dp / 16;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = attention_kv_head(p, h);
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTcKeys;
  const bool bf16 = p.kind == ScalarKind::kBFloat16;
  const int64_t grad_out_stride[4] = {p.heads * p.len_q * p.head_dim, p.len_q * p.head_dim, p.head_dim, 1};
  stage_rows_transposed(kt_s, p.k, p.k_stride, b, hk, j0, p.len_k, D, Dp);
  stage_rows_transposed(vt_s, p.v, p.v_stride, b, hk, j0, p.len_k, D, Dp);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[kTcTilesPerWarp], dv[kTcTilesPerWarp];
#pragma unroll
  for (int t = 0; t < kTcTilesPerWarp; ++t) {
    wmma::fill_fragment(dk[t], 0.0f);
    wmma::fill_fragment(dv[t], 0.0f);
  }
  const float* lse = static_cast<const float*>(p.lse) + bh * p.len_q;
  // causal: query rows i < j0 see none of these keys (query tiles start at multiples of 16, as j0)
  for (int64_t i0 = p.causal ? j0 : 0; i0 < p.len_q; i0 += kTcRows) {
    __syncthreads();  // the previous tile's products are done with q_s, do_s, pt_s, dst_s
    stage_rows(q_s, kQLd, p.q, p.q_stride, b, h, i0, p.len_q, D, Dp);
    stage_rows(do_s, kQLd, p.grad_out, grad_out_stride, b, h, i0, p.len_q, D, Dp);
    if (tid < kTcRows) {
      const bool in = i0 + tid < p.len_q;
      lse_s[tid] = in ? lse[i0 + tid] : -INFINITY;
      delta_s[tid] = in ? delta[bh * p.len_q + i0 + tid] : 0.0f;
    }
    __syncthreads();
    partial_tile_product<Wmma>(q_s, kQLd, kt_s, steps, s_part[warp]);    // S  = Q Kᵀ
    partial_tile_product<Wmma>(do_s, kQLd, vt_s, steps, dp_part[warp]);  // dP = dO Vᵀ
    __syncthreads();
    backward_tile_elements(p, b, h, i0, j0, s_part, dp_part, 16, 1, lse_s, delta_s, pt_s, dst_s, 1, 16, bf16);
    __syncthreads();
    accumulate_tiles<Wmma>(dv, pt_s, do_s, kQLd, steps);  // dV += Pᵀ dO
    accumulate_tiles<Wmma>(dk, dst_s, q_s, kQLd, steps);  // dK += dSᵀ Q
  }
  __syncthreads();
  store_tiles(p, dk, s_part[warp], p.grad_k, bh, j0, p.len_k, D, steps, static_cast<float>(p.scale));
  store_tiles(p, dv, s_part[warp], p.grad_v, bh, j0, p.len_k, D, steps, 1.0f);
#endif
}

template <typename Wmma>
__global__ void __launch_bounds__(kTcWarps * 32) attention_dq_wmma_kernel(AttentionParams p, const float* delta) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(32) uint16_t qt_s[kMaxHeadDim * 16];   // Qᵀ of the block's 16 query rows
  __shared__ __align__(32) uint16_t dot_s[kMaxHeadDim * 16];  // dOᵀ
  __shared__ __align__(32) uint16_t k_s[kTcKeys * kQLd];      // the key tile's K
  __shared__ __align__(32) uint16_t v_s[kTcKeys * kQLd];      // and V
  __shared__ __align__(32) uint16_t ds_s[kTcRows * kTcKeys];  // dS (queries × keys), input dtype
  __shared__ __align__(32) float s_part[kTcWarps][256];       // per-warp partial Sᵀ, then the store scratch
  __shared__ __align__(32) float dp_part[kTcWarps][256];      // per-warp partial dPᵀ
  __shared__ float lse_s[kTcRows], delta_s[kTcRows];
  namespace wmma = nvcuda::wmma;
  const int tid = threadIdx.x, warp = tid / 32;
  const int D = static_cast<int>(p.head_dim);
  const int Dp = (D + 15) / 16 * 16;
  const int steps = Dp / 16;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = attention_kv_head(p, h);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const bool bf16 = p.kind == ScalarKind::kBFloat16;
  const int64_t grad_out_stride[4] = {p.heads * p.len_q * p.head_dim, p.len_q * p.head_dim, p.head_dim, 1};
  stage_rows_transposed(qt_s, p.q, p.q_stride, b, h, i0, p.len_q, D, Dp);
  stage_rows_transposed(dot_s, p.grad_out, grad_out_stride, b, h, i0, p.len_q, D, Dp);
  if (tid < kTcRows) {
    const bool in = i0 + tid < p.len_q;
    lse_s[tid] = in ? static_cast<const float*>(p.lse)[bh * p.len_q + i0 + tid] : -INFINITY;
    delta_s[tid] = in ? delta[bh * p.len_q + i0 + tid] : 0.0f;
  }
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[kTcTilesPerWarp];
#pragma unroll
  for (int t = 0; t < kTcTilesPerWarp; ++t) wmma::fill_fragment(dq[t], 0.0f);
  const int64_t last_row = min(p.len_q, i0 + kTcRows) - 1;
  const int64_t end = p.causal ? min(p.len_k, last_row + 1) : p.len_k;
  for (int64_t j0 = 0; j0 < end; j0 += kTcKeys) {
    __syncthreads();  // the previous tile's dS K is done with k_s, ds_s
    stage_rows(k_s, kQLd, p.k, p.k_stride, b, hk, j0, p.len_k, D, Dp);
    stage_rows(v_s, kQLd, p.v, p.v_stride, b, hk, j0, p.len_k, D, Dp);
    __syncthreads();
    partial_tile_product<Wmma>(k_s, kQLd, qt_s, steps, s_part[warp]);    // Sᵀ  = K Qᵀ
    partial_tile_product<Wmma>(v_s, kQLd, dot_s, steps, dp_part[warp]);  // dPᵀ = V dOᵀ
    __syncthreads();
    // partials are keys × queries: element (query r, key c) sits at c · 16 + r
    backward_tile_elements(p, b, h, i0, j0, s_part, dp_part, 1, 16, lse_s, delta_s, nullptr, ds_s, 16, 1, bf16);
    __syncthreads();
    accumulate_tiles<Wmma>(dq, ds_s, k_s, kQLd, steps);  // dQ += dS K
  }
  __syncthreads();
  store_tiles(p, dq, s_part[warp], p.grad_q, bh, i0, p.len_q, D, steps, static_cast<float>(p.scale));
#endif
}

}  // namespace

int attention_forward_cuda(const AttentionParams& p, void* stream) {
  if (p.batch * p.heads * p.len_q == 0) return 0;
  const dim3 grid(grid_blocks(p.len_q, kWarps), static_cast<unsigned>(p.batch * p.heads));
  attention_forward_kernel<<<grid, kWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

// float16 / bfloat16 only; the caller checks the device is sm_80+.
int attention_forward_wmma_cuda(const AttentionParams& p, void* stream) {
  if (p.batch * p.heads * p.len_q == 0) return 0;
  if (p.kind != ScalarKind::kFloat16 && p.kind != ScalarKind::kBFloat16) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(grid_blocks(p.len_q, kTcRows), static_cast<unsigned>(p.batch * p.heads));
  if (p.kind == ScalarKind::kFloat16)
    attention_forward_wmma_kernel<__half><<<grid, kTcWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  else
    attention_forward_wmma_kernel<__nv_bfloat16><<<grid, kTcWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status();
}

// workspace: float32 [B·H·Lq] for δ (the caller allocates at least that much).
int attention_backward_wmma_cuda(const AttentionParams& p, void* workspace, void* stream) {
  const int64_t rows = p.batch * p.heads * p.len_q;
  if (rows == 0 || p.len_k == 0) return 0;
  if (p.kind != ScalarKind::kFloat16 && p.kind != ScalarKind::kBFloat16) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* delta = static_cast<float*>(workspace);
  attention_delta_kernel<<<grid_blocks(rows, kWarps), kWarps * 32, 0, s>>>(p, delta);
  if (const int status = launch_status()) return status;
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  const dim3 key_grid(grid_blocks(p.len_k, kTcKeys), bh);
  const dim3 query_grid(grid_blocks(p.len_q, kTcRows), bh);
  if (p.kind == ScalarKind::kFloat16)
    attention_dkdv_wmma_kernel<__half><<<key_grid, kTcWarps * 32, 0, s>>>(p, delta);
  else
    attention_dkdv_wmma_kernel<__nv_bfloat16><<<key_grid, kTcWarps * 32, 0, s>>>(p, delta);
  if (const int status = launch_status()) return status;
  if (p.kind == ScalarKind::kFloat16)
    attention_dq_wmma_kernel<__half><<<query_grid, kTcWarps * 32, 0, s>>>(p, delta);
  else
    attention_dq_wmma_kernel<__nv_bfloat16><<<query_grid, kTcWarps * 32, 0, s>>>(p, delta);
  return launch_status();
}

// workspace: float32 [B·H·Lq] for δ (the caller allocates at least that much).
int attention_backward_cuda(const AttentionParams& p, void* workspace, void* stream) {
  const int64_t rows = p.batch * p.heads * p.len_q;
  if (rows == 0 || p.len_k == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* delta = static_cast<float*>(workspace);
  attention_delta_kernel<<<grid_blocks(rows, kWarps), kWarps * 32, 0, s>>>(p, delta);
  if (const int status = launch_status()) return status;
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  attention_dkdv_kernel<<<dim3(grid_blocks(p.len_k, kWarps), bh), kWarps * 32, 0, s>>>(p, delta);
  if (const int status = launch_status()) return status;
  attention_dq_kernel<<<dim3(grid_blocks(p.len_q, kWarps), bh), kWarps * 32, 0, s>>>(p, delta);
  return launch_status();
}

}  // namespace mux
}  // namespace fastcore

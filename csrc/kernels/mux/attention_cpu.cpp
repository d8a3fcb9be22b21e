// CPU fused attention (see attention.h for the math). Specialised for the short sequences DataMUX runs
// (L' = 128..169, D = 64): a forward task owns one (batch, kv head, tile of stacked query rows: the G
// query heads of a grouped-query kv head share its K/V) and packs the whole key block of its kv head once (K transposed, V row-major, both padded to the vector width with zeros), so every
// inner product is a register-blocked micro-GEMM over cache-resident panels, the scores tile is
// [q_tile, kv_block] (no [Lq, Lk] for long sequences), and exp runs 8 lanes at a time.
// A backward task owns one (batch, kv head): it recomputes p from the saved lse and accumulates dK, dV
// over all tiles of stacked query rows (every query head of the group) in a fixed order (no atomics), so results are thread-count independent.
// This file: the generic path (8-lane GCC vectors, FC_CPU_CLONES) and the dispatch; the AVX-512 float32
// path is in attention_avx512_cpu.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "fastcore/cpu_vector.h"
#include "mux/attention_cpu_internal.h"

namespace fastcore {
namespace mux {
using namespace detail;  // the shared pieces of attention_cpu_internal.h
namespace {

template <typename T>
struct Lanes {
  static constexpr int64_t kCount = 32 / sizeof(T);
  typedef T Vec __attribute__((vector_size(32)));
};

template <typename V, typename T>
FC_ALWAYS_INLINE V load_vec(const T* src) {
  V v;
  std::memcpy(&v, src, sizeof(V));
  return v;
}

template <typename V, typename T>
FC_ALWAYS_INLINE void store_vec(T* dst, V v) {
  std::memcpy(dst, &v, sizeof(V));
}

// C[MR rows, NV vectors] (+)= Σ_k A[r, k] · B[k, :]: MR·NV accumulators stay in registers for the whole
// k loop (6 × 2 ymm = 12 of the 16 AVX2 registers, plus 2 for B and 1 for the broadcast).
template <typename T, int MR, int NV>
FC_ALWAYS_INLINE void gemm_block(int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
                                 int64_t ldc, bool accumulate) {
  typedef typename Lanes<T>::Vec V;
  constexpr int64_t L = Lanes<T>::kCount;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load_vec<V>(B + k * ldb + v * L);
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * L;
      store_vec(c, accumulate ? load_vec<V>(c) + acc[r][v] : acc[r][v]);
    }
}

template <typename T, int NV>
FC_ALWAYS_INLINE void gemm_rows(int64_t M, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                                T* C, int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    gemm_block<T, MR, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, accumulate);
  const T* a = A + i * a_row;
  T* c = C + i * ldc;
  switch (M - i) {
    case 5: gemm_block<T, 5, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_block<T, 4, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_block<T, 3, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_block<T, 2, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_block<T, 1, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

// C [M, N] (+)= A [M, K] · B [K, N] with A addressed by (row, column) strides (so Aᵀ is free), B and C
// row-major with N a multiple of the vector width (the padded panels guarantee it).
template <typename T>
FC_ALWAYS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                           int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t L = Lanes<T>::kCount;
  int64_t n = 0;
  for (; n + 2 * L <= N; n += 2 * L) gemm_rows<T, 2>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate);
  if (n < N) gemm_rows<T, 1>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate);
}

// max over s[0, n) (n a multiple of the vector width), −inf for an empty/all −inf row.
FC_ALWAYS_INLINE float row_max(const float* s, int64_t n) {
  Float8Lanes m = Float8Lanes{} - INFINITY;
  for (int64_t j = 0; j < n; j += 8) {
    const Float8Lanes x = load_vec<Float8Lanes>(s + j);
    m = select_lanes(x > m, x, m);
  }
  float result = -INFINITY;
  for (int lane = 0; lane < 8; ++lane) result = std::max(result, m[lane]);
  return result;
}

FC_ALWAYS_INLINE double row_max(const double* s, int64_t n) {
  double result = -INFINITY;
  for (int64_t j = 0; j < n; ++j) result = std::max(result, s[j]);
  return result;
}

// s[j] = exp(s[j] − shift) in place (−inf -> 0); returns Σ_j s[j].
FC_ALWAYS_INLINE float exp_shift_sum(float* s, int64_t n, float shift) {
  Float8Lanes sum = Float8Lanes{};
  for (int64_t j = 0; j < n; j += 8) {
    const Float8Lanes e = exp_lanes(load_vec<Float8Lanes>(s + j) - shift);
    store_vec(s + j, e);
    sum += e;
  }
  float total = 0.0f;
  for (int lane = 0; lane < 8; ++lane) total += sum[lane];
  return total;
}

FC_ALWAYS_INLINE double exp_shift_sum(double* s, int64_t n, double shift) {
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

template <typename T>
FC_ALWAYS_INLINE void transpose_panel(const T* rows, int64_t n, int64_t D, int64_t d_pad, int64_t n_pad, T* cols) {
  for (int64_t c = 0; c < D; ++c) {
    T* dst = cols + c * n_pad;
    for (int64_t j = 0; j < n; ++j) dst[j] = rows[j * d_pad + c];
    for (int64_t j = n; j < n_pad; ++j) dst[j] = T(0);
  }
}

template <typename T>
struct Shapes {
  int64_t D, d_pad, block, block_pad, tile;
  explicit Shapes(const AttentionParams& p, int64_t tile_rows, int64_t stacked_rows) {
    constexpr int64_t L = Lanes<T>::kCount;
    D = p.head_dim;
    d_pad = round_up(std::max<int64_t>(D, 1), L);
    block = std::max<int64_t>(1, std::min(p.kv_block, p.len_k));
    block_pad = round_up(block, L);
    tile = std::max<int64_t>(1, std::min(tile_rows, stacked_rows));
  }
};

template <typename T>
FC_ALWAYS_INLINE void forward_range(const AttentionParams& p, int64_t task_begin, int64_t task_end) {
  const int64_t G = attention_group(p), Hk = attention_kv_heads(p), Lq = p.len_q, R = G * Lq;
  const Shapes<T> s(p, p.q_tile, R);
  const int64_t D = s.D, Dp = s.d_pad, Bk = s.block, Bkp = s.block_pad, Tq = s.tile;
  ForwardScratch<T>& scratch = ForwardScratch<T>::of_this_thread();
  T* const q_panel = at_least(scratch.q_panel, Tq * Dp);
  T* const k_rows = at_least(scratch.k_rows, Bk * Dp);
  T* const k_cols = at_least(scratch.k_cols, D * Bkp);
  T* const v_rows = at_least(scratch.v_rows, Bk * Dp);
  T* const scores = at_least(scratch.scores, Tq * Bkp);
  T* const o_acc = at_least(scratch.o_acc, Tq * Dp);
  T* const row_max_ = at_least(scratch.row_max, Tq);
  T* const row_sum = at_least(scratch.row_sum, Tq);
  const int64_t tiles = (R + Tq - 1) / Tq;
  const bool bias = has_bias(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bk = task / tiles, tile = task % tiles, b = bk / Hk, hk = bk % Hk;
    const int64_t r0 = tile * Tq, rows = std::min(Tq, R - r0), reach = last_query(p, r0, rows);
    for_each_head_run(p, hk, r0, rows, [&](int64_t h, int64_t i0, int64_t count, int64_t at) {
      pack_rows<T>(p.q, p.kind, p.q_stride, b, h, i0, count, D, Dp, static_cast<T>(p.scale), q_panel + at * Dp);
    });
    std::fill(o_acc, o_acc + rows * Dp, T(0));
    std::fill(row_max_, row_max_ + Tq, neg_inf);
    std::fill(row_sum, row_sum + Tq, T(0));
    for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
      if (p.causal && j0 > reach) break;  // every later key is above the diagonal
      const int64_t n = std::min(Bk, p.len_k - j0), n_pad = round_up(n, Lanes<T>::kCount);
      pack_rows<T>(p.k, p.kind, p.k_stride, b, hk, j0, n, D, Dp, T(1), k_rows);
      transpose_panel<T>(k_rows, n, D, Dp, n_pad, k_cols);
      pack_rows<T>(p.v, p.kind, p.v_stride, b, hk, j0, n, D, Dp, T(1), v_rows);
      // scores = (scale q) kᵀ  [rows, n_pad]
      gemm<T>(rows, n_pad, D, q_panel, Dp, 1, k_cols, n_pad, scores, Bkp, false);
      for (int64_t i = 0; i < rows; ++i) {
        T* si = scores + i * Bkp;
        for (int64_t j = n; j < n_pad; ++j) si[j] = neg_inf;
        if (bias) add_bias<T>(p, b, hk * G + (r0 + i) / Lq, (r0 + i) % Lq, j0, n, si);
        const T m_old = row_max_[i], m_new = std::max(m_old, row_max(si, n_pad));
        if (m_new == neg_inf) {  // nothing attended yet: p = 0 for this block
          std::fill(si, si + n_pad, T(0));
          continue;
        }
        const T block_sum = exp_shift_sum(si, n_pad, m_new);
        if (m_old != neg_inf && m_old != m_new) {  // rescale the running sums to the new max
          const T alpha = std::exp(m_old - m_new);
          row_sum[i] *= alpha;
          T* oi = o_acc + i * Dp;
          for (int64_t c = 0; c < Dp; ++c) oi[c] *= alpha;
        }
        row_sum[i] += block_sum;
        row_max_[i] = m_new;
      }
      // o += p v  [rows, Dp]
      gemm<T>(rows, Dp, n, scores, Bkp, 1, v_rows, Dp, o_acc, Dp, true);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = (b * p.heads + hk * G + (r0 + i) / Lq) * Lq + (r0 + i) % Lq;  // [B, H, Lq] index
      const T l = row_sum[i];
      const T inv = l > T(0) ? T(1) / l : T(0);  // fully masked row: out = 0
      static_cast<T*>(p.lse)[row] = l > T(0) ? row_max_[i] + std::log(l) : neg_inf;
      store_row<T>(p.out, p.kind, row * D, D, inv, o_acc + i * Dp);
    }
  }
}

template <typename T>
FC_ALWAYS_INLINE void backward_range(const AttentionParams& p, int64_t task_begin, int64_t task_end) {
  constexpr int64_t kTile = 64;
  const int64_t G = attention_group(p), Hk = attention_kv_heads(p), Lq = p.len_q, R = G * Lq;
  const Shapes<T> s(p, kTile, R);
  const int64_t D = s.D, Dp = s.d_pad, Bk = s.block, Bkp = s.block_pad, Tq = s.tile;
  // stacked rows (attention.h): the G query heads of the task's kv head, G·Lq rows
  std::vector<T> q_rows(R * Dp), do_rows(R * Dp), o_row(Dp), delta(R), lse(R), dq(R * Dp), k_rows(Bk * Dp),
      k_cols(D * Bkp), v_cols(D * Bkp), v_rows(Bk * Dp), dk(Bk * Dp), dv(Bk * Dp), probs(Tq * Bkp), dprobs(Tq * Bkp);
  std::vector<int64_t> row_of(R);  // stacked row -> its [B, H, Lq] index
  const int64_t contiguous[4] = {p.heads * Lq * D, Lq * D, D, 1};
  const bool bias = has_bias(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t bk = task_begin; bk < task_end; ++bk) {
    const int64_t b = bk / Hk, hk = bk % Hk;
    for_each_head_run(p, hk, 0, R, [&](int64_t h, int64_t i0, int64_t count, int64_t at) {
      pack_rows<T>(p.q, p.kind, p.q_stride, b, h, i0, count, D, Dp, static_cast<T>(p.scale), q_rows.data() + at * Dp);
      pack_rows<T>(p.grad_out, p.kind, contiguous, b, h, i0, count, D, Dp, T(1), do_rows.data() + at * Dp);
      for (int64_t i = 0; i < count; ++i) row_of[at + i] = (b * p.heads + h) * Lq + i0 + i;
    });
    for (int64_t r = 0; r < R; ++r) {  // δ_r = dO_r · O_r
      load_row<T>(p.out, p.kind, row_of[r] * D, 1, D, T(1), o_row.data());
      T sum = T(0);
      for (int64_t c = 0; c < D; ++c) sum += o_row[c] * do_rows[r * Dp + c];
      delta[r] = sum;
      lse[r] = static_cast<const T*>(p.lse)[row_of[r]];
    }
    std::fill(dq.begin(), dq.end(), T(0));
    for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
      const int64_t n = std::min(Bk, p.len_k - j0), n_pad = round_up(n, Lanes<T>::kCount);
      pack_rows<T>(p.k, p.kind, p.k_stride, b, hk, j0, n, D, Dp, T(1), k_rows.data());
      transpose_panel<T>(k_rows.data(), n, D, Dp, n_pad, k_cols.data());
      pack_rows<T>(p.v, p.kind, p.v_stride, b, hk, j0, n, D, Dp, T(1), v_rows.data());
      transpose_panel<T>(v_rows.data(), n, D, Dp, n_pad, v_cols.data());
      std::fill(dk.begin(), dk.begin() + n * Dp, T(0));
      std::fill(dv.begin(), dv.begin() + n * Dp, T(0));
      for (int64_t i0 = 0; i0 < R; i0 += Tq) {
        const int64_t rows = std::min(Tq, R - i0);
        if (p.causal && last_query(p, i0, rows) < j0) continue;  // a tile wholly above the diagonal adds nothing
        const T* qi = q_rows.data() + i0 * Dp;
        const T* doi = do_rows.data() + i0 * Dp;
        gemm<T>(rows, n_pad, D, qi, Dp, 1, k_cols.data(), n_pad, probs.data(), Bkp, false);
        for (int64_t i = 0; i < rows; ++i) {  // p = exp(s − lse), 0 where masked or the row is fully masked
          T* pi = probs.data() + i * Bkp;
          for (int64_t j = n; j < n_pad; ++j) pi[j] = neg_inf;
          if (bias) add_bias<T>(p, b, hk * G + (i0 + i) / Lq, (i0 + i) % Lq, j0, n, pi);
          const T l = lse[i0 + i];
          if (l == neg_inf) {
            std::fill(pi, pi + n_pad, T(0));
          } else {
            exp_shift_sum(pi, n_pad, l);
          }
        }
        // dV += pᵀ dO
        gemm<T>(n, Dp, rows, probs.data(), 1, Bkp, doi, Dp, dv.data(), Dp, true);
        // dp = dO vᵀ, then ds = p (dp − δ) in place
        gemm<T>(rows, n_pad, D, doi, Dp, 1, v_cols.data(), n_pad, dprobs.data(), Bkp, false);
        for (int64_t i = 0; i < rows; ++i) {
          const T* pi = probs.data() + i * Bkp;
          T* dsi = dprobs.data() + i * Bkp;
          const T di = delta[i0 + i];
          for (int64_t j = 0; j < n_pad; ++j) dsi[j] = pi[j] * (dsi[j] - di);
          if (p.grad_scores != nullptr)  // the additive mask's gradient, before its broadcast reduction
            std::copy(dsi, dsi + n, static_cast<T*>(p.grad_scores) + row_of[i0 + i] * p.len_k + j0);
        }
        // dQ += ds k (scaled at the end), dK += dsᵀ (scale q)
        gemm<T>(rows, Dp, n, dprobs.data(), Bkp, 1, k_rows.data(), Dp, dq.data() + i0 * Dp, Dp, true);
        gemm<T>(n, Dp, rows, dprobs.data(), 1, Bkp, qi, Dp, dk.data(), Dp, true);
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t offset = (bk * p.len_k + j0 + j) * D;  // grad_k, grad_v: [B, H_kv, Lk, D]
        store_row<T>(p.grad_k, p.kind, offset, D, T(1), dk.data() + j * Dp);
        store_row<T>(p.grad_v, p.kind, offset, D, T(1), dv.data() + j * Dp);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      store_row<T>(p.grad_q, p.kind, row_of[r] * D, D, static_cast<T>(p.scale), dq.data() + r * Dp);
  }
}

FC_CPU_CLONES void forward_float(const AttentionParams& p, int64_t begin, int64_t end) {
  forward_range<float>(p, begin, end);
}
FC_CPU_CLONES void forward_double(const AttentionParams& p, int64_t begin, int64_t end) {
  forward_range<double>(p, begin, end);
}
FC_CPU_CLONES void backward_float(const AttentionParams& p, int64_t begin, int64_t end) {
  backward_range<float>(p, begin, end);
}
FC_CPU_CLONES void backward_double(const AttentionParams& p, int64_t begin, int64_t end) {
  backward_range<double>(p, begin, end);
}

}  // namespace

void attention_forward_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task) {
  if (task_begin >= task_end) return;
  if (p.kind == ScalarKind::kFloat64) {
    forward_double(p, task_begin, task_end);
    return;
  }
  if constexpr (kAttentionAvx512) {
    if (active_cpu_isa() >= CpuIsa::kAvx512) {
      forward_float_avx512(p, task_begin, task_end, prefetch_task);
      return;
    }
  }
  forward_float(p, task_begin, task_end);
}

void attention_backward_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task) {
  if (task_begin >= task_end) return;
  if (p.kind == ScalarKind::kFloat64) {
    backward_double(p, task_begin, task_end);
    return;
  }
  if constexpr (kAttentionAvx512) {
    if (active_cpu_isa() >= CpuIsa::kAvx512) {
      backward_float_avx512(p, task_begin, task_end, prefetch_task);
      return;
    }
  }
  backward_float(p, task_begin, task_end);
}

}  // namespace mux
}  // namespace fastcore

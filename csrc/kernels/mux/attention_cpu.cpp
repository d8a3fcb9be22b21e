// CPU fused attention (see attention.h for the math). Specialised for the short sequences DataMUX runs
// (L' = 128..169, D = 64): a forward task owns one (batch, head, q-tile) and packs the whole key block
// of its head once (K transposed, V row-major, both padded to the vector width with zeros), so every
// inner product is a register-blocked micro-GEMM over cache-resident panels, the scores tile is
// [q_tile, kv_block] (no [Lq, Lk] for long sequences), and exp runs 8 lanes at a time.
// A backward task owns one (batch, head): it recomputes p from the saved lse and accumulates dK, dV
// over all query tiles in a fixed order (no atomics), so results are thread-count independent.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "fastcore/cpu_vector.h"
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif
#include "mux/attention.h"
#include "mux/convert.h"

#define FC_ALWAYS_INLINE inline __attribute__((always_inline))

// The generic path's clones: FC_CPU_CLONES's "avx512f" and "avx2" targets do not enable FMA, so their
// 8-lane products compiled to separate multiplies and adds; the x86-64-v4 / v3 levels include it.
#ifdef __x86_64__
#if defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define FC_ATTENTION_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef FC_ATTENTION_CLONES
#define FC_ATTENTION_CLONES
#endif

namespace fastcore {
namespace mux {
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

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

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
FC_ALWAYS_INLINE void gemm_rows(int64_t M, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B,
                                int64_t ldb, T* C, int64_t ldc, bool accumulate) {
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

// Row loads in the input dtype, widened to T (one dtype switch per row, not per element).
template <typename T>
FC_ALWAYS_INLINE void load_row(const void* base, ScalarKind kind, int64_t offset, int64_t stride, int64_t n, T scale,
                               T* dst) {
  switch (kind) {
    case ScalarKind::kFloat32: {
      const float* src = static_cast<const float*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c * stride]) * scale;
      break;
    }
    case ScalarKind::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(float16_bits_to_float(src[c * stride])) * scale;
      break;
    }
    case ScalarKind::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(bfloat16_bits_to_float(src[c * stride])) * scale;
      break;
    }
    case ScalarKind::kFloat64:
    default: {
      const double* src = static_cast<const double*>(base) + offset;
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c * stride]) * scale;
      break;
    }
  }
}

template <typename T>
FC_ALWAYS_INLINE void store_row(void* base, ScalarKind kind, int64_t offset, int64_t n, T scale, const T* src) {
  if (kind == ScalarKind::kFloat32) {
    float* dst = static_cast<float*>(base) + offset;
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c] * scale);
  } else if (kind == ScalarKind::kFloat64) {
    double* dst = static_cast<double*>(base) + offset;
    for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<double>(src[c] * scale);
  } else {
    for (int64_t c = 0; c < n; ++c) store_as<T>(base, kind, offset + c, src[c] * scale);
  }
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

inline bool has_bias(const AttentionParams& p) {
  return p.mask_kind != MaskKind::kNone || p.key_padding != nullptr || p.causal;
}

// Adds the mask terms of query row `qi` to scores s[0, n) of keys j0 .. j0 + n − 1 (−inf where masked).
template <typename T>
FC_ALWAYS_INLINE void add_bias(const AttentionParams& p, int64_t b, int64_t h, int64_t qi, int64_t j0, int64_t n, T* s) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t base = b * p.mask_stride[0] + h * p.mask_stride[1] + qi * p.mask_stride[2];
    const int64_t stride = p.mask_stride[3];
    if (p.mask_kind == MaskKind::kBool) {
      const bool* mask = static_cast<const bool*>(p.mask) + base;
      for (int64_t j = 0; j < n; ++j)
        if (!mask[(j0 + j) * stride]) s[j] = neg_inf;
    } else {
      for (int64_t j = 0; j < n; ++j) s[j] += load_as<T>(p.mask, p.mask_scalar, base + (j0 + j) * stride);
    }
  }
  if (p.key_padding != nullptr) {
    const bool* pad = p.key_padding + b * p.key_padding_stride[0];
    for (int64_t j = 0; j < n; ++j)
      if (pad[(j0 + j) * p.key_padding_stride[1]]) s[j] = neg_inf;
  }
  if (p.causal)
    for (int64_t j = std::max<int64_t>(0, qi + 1 - j0); j < n; ++j) s[j] = neg_inf;
}

// Packs keys j0 .. j0 + n − 1 of head (b, h): Kt [D, n_pad] (transposed, zero-padded columns) when kt
// is given, Krow [n, D_pad] (zero-padded) when krow is given; likewise any [L, D] input.
template <typename T>
FC_ALWAYS_INLINE void pack_rows(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h,
                                int64_t j0, int64_t n, int64_t D, int64_t d_pad, T scale, T* rows) {
  const int64_t offset = b * stride[0] + h * stride[1];
  for (int64_t j = 0; j < n; ++j) {
    load_row<T>(base, kind, offset + (j0 + j) * stride[2], stride[3], D, scale, rows + j * d_pad);
    for (int64_t c = D; c < d_pad; ++c) rows[j * d_pad + c] = T(0);
  }
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
  explicit Shapes(const AttentionParams& p, int64_t tile_rows) {
    constexpr int64_t L = Lanes<T>::kCount;
    D = p.head_dim;
    d_pad = round_up(std::max<int64_t>(D, 1), L);
    block = std::max<int64_t>(1, std::min(p.kv_block, p.len_k));
    block_pad = round_up(block, L);
    tile = std::max<int64_t>(1, std::min(tile_rows, p.len_q));
  }
};

// The forward's scratch panels, cached per thread between calls and grown on demand (bounded by the tile
// sizes: q_tile ≤ 192, kv_block ≤ 512, D ≤ 256 give at most ≈ 2.3 MB per thread in float): a call then
// allocates only its outputs, and the panels are not zero-filled again on every call. Nothing relies on
// their initial contents: packing writes every element a product reads, padding included.
template <typename T>
struct ForwardScratch {
  std::vector<T> q_panel, k_rows, k_cols, v_rows, scores, o_acc, row_max, row_sum;
  static ForwardScratch& of_this_thread() {
    static thread_local ForwardScratch scratch;
    return scratch;
  }
};

template <typename T>
T* at_least(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(static_cast<size_t>(size));
  return buffer.data();
}

template <typename T>
FC_ALWAYS_INLINE void forward_range(const AttentionParams& p, int64_t task_begin, int64_t task_end) {
  const Shapes<T> s(p, p.q_tile);
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
  const int64_t tiles = (p.len_q + Tq - 1) / Tq;
  const bool bias = has_bias(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bh = task / tiles, tile = task % tiles, b = bh / p.heads, h = bh % p.heads;
    const int64_t q0 = tile * Tq, rows = std::min(Tq, p.len_q - q0);
    pack_rows<T>(p.q, p.kind, p.q_stride, b, h, q0, rows, D, Dp, static_cast<T>(p.scale), q_panel);
    std::fill(o_acc, o_acc + rows * Dp, T(0));
    std::fill(row_max_, row_max_ + Tq, neg_inf);
    std::fill(row_sum, row_sum + Tq, T(0));
    for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
      if (p.causal && j0 > q0 + rows - 1) break;  // every later key is above the diagonal
      const int64_t n = std::min(Bk, p.len_k - j0), n_pad = round_up(n, Lanes<T>::kCount);
      pack_rows<T>(p.k, p.kind, p.k_stride, b, h, j0, n, D, Dp, T(1), k_rows);
      transpose_panel<T>(k_rows, n, D, Dp, n_pad, k_cols);
      pack_rows<T>(p.v, p.kind, p.v_stride, b, h, j0, n, D, Dp, T(1), v_rows);
      // scores = (scale q) kᵀ  [rows, n_pad]
      gemm<T>(rows, n_pad, D, q_panel, Dp, 1, k_cols, n_pad, scores, Bkp, false);
      for (int64_t i = 0; i < rows; ++i) {
        T* si = scores + i * Bkp;
        for (int64_t j = n; j < n_pad; ++j) si[j] = neg_inf;
        if (bias) add_bias<T>(p, b, h, q0 + i, j0, n, si);
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
    T* lse = static_cast<T*>(p.lse) + bh * p.len_q + q0;
    const int64_t out_offset = (bh * p.len_q + q0) * D;
    for (int64_t i = 0; i < rows; ++i) {
      const T l = row_sum[i];
      const T inv = l > T(0) ? T(1) / l : T(0);  // fully masked row: out = 0
      lse[i] = l > T(0) ? row_max_[i] + std::log(l) : neg_inf;
      store_row<T>(p.out, p.kind, out_offset + i * D, D, inv, o_acc + i * Dp);
    }
  }
}

template <typename T>
FC_ALWAYS_INLINE void backward_range(const AttentionParams& p, int64_t task_begin, int64_t task_end) {
  constexpr int64_t kTile = 64;
  const Shapes<T> s(p, kTile);
  const int64_t D = s.D, Dp = s.d_pad, Bk = s.block, Bkp = s.block_pad, Tq = s.tile, Lq = p.len_q;
  std::vector<T> q_rows(Lq * Dp), do_rows(Lq * Dp), o_row(Dp), delta(Lq), dq(Lq * Dp), k_rows(Bk * Dp),
      k_cols(D * Bkp), v_cols(D * Bkp), v_rows(Bk * Dp), dk(Bk * Dp), dv(Bk * Dp), probs(Tq * Bkp), dprobs(Tq * Bkp);
  const int64_t contiguous[4] = {p.heads * Lq * D, Lq * D, D, 1};
  const bool bias = has_bias(p);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t bh = task_begin; bh < task_end; ++bh) {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const T* lse = static_cast<const T*>(p.lse) + bh * Lq;
    pack_rows<T>(p.q, p.kind, p.q_stride, b, h, 0, Lq, D, Dp, static_cast<T>(p.scale), q_rows.data());
    pack_rows<T>(p.grad_out, p.kind, contiguous, b, h, 0, Lq, D, Dp, T(1), do_rows.data());
    for (int64_t i = 0; i < Lq; ++i) {  // δ_i = dO_i · O_i
      load_row<T>(p.out, p.kind, (bh * Lq + i) * D, 1, D, T(1), o_row.data());
      T sum = T(0);
      for (int64_t c = 0; c < D; ++c) sum += o_row[c] * do_rows[i * Dp + c];
      delta[i] = sum;
    }
    std::fill(dq.begin(), dq.end(), T(0));
    for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
      const int64_t n = std::min(Bk, p.len_k - j0), n_pad = round_up(n, Lanes<T>::kCount);
      pack_rows<T>(p.k, p.kind, p.k_stride, b, h, j0, n, D, Dp, T(1), k_rows.data());
      transpose_panel<T>(k_rows.data(), n, D, Dp, n_pad, k_cols.data());
      pack_rows<T>(p.v, p.kind, p.v_stride, b, h, j0, n, D, Dp, T(1), v_rows.data());
      transpose_panel<T>(v_rows.data(), n, D, Dp, n_pad, v_cols.data());
      std::fill(dk.begin(), dk.begin() + n * Dp, T(0));
      std::fill(dv.begin(), dv.begin() + n * Dp, T(0));
      const int64_t q_start = p.causal ? (j0 / Tq) * Tq : 0;  // tiles wholly above the diagonal add nothing
      for (int64_t i0 = q_start; i0 < Lq; i0 += Tq) {
        const int64_t rows = std::min(Tq, Lq - i0);
        const T* qi = q_rows.data() + i0 * Dp;
        const T* doi = do_rows.data() + i0 * Dp;
        gemm<T>(rows, n_pad, D, qi, Dp, 1, k_cols.data(), n_pad, probs.data(), Bkp, false);
        for (int64_t i = 0; i < rows; ++i) {  // p = exp(s − lse), 0 where masked or the row is fully masked
          T* pi = probs.data() + i * Bkp;
          for (int64_t j = n; j < n_pad; ++j) pi[j] = neg_inf;
          if (bias) add_bias<T>(p, b, h, i0 + i, j0, n, pi);
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
            std::copy(dsi, dsi + n, static_cast<T*>(p.grad_scores) + (bh * Lq + i0 + i) * p.len_k + j0);
        }
        // dQ += ds k (scaled at the end), dK += dsᵀ (scale q)
        gemm<T>(rows, Dp, n, dprobs.data(), Bkp, 1, k_rows.data(), Dp, dq.data() + i0 * Dp, Dp, true);
        gemm<T>(n, Dp, rows, dprobs.data(), 1, Bkp, qi, Dp, dk.data(), Dp, true);
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t offset = (bh * p.len_k + j0 + j) * D;
        store_row<T>(p.grad_k, p.kind, offset, D, T(1), dk.data() + j * Dp);
        store_row<T>(p.grad_v, p.kind, offset, D, T(1), dv.data() + j * Dp);
      }
    }
    for (int64_t i = 0; i < Lq; ++i)
      store_row<T>(p.grad_q, p.kind, (bh * Lq + i) * D, D, static_cast<T>(p.scale), dq.data() + i * Dp);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FC_HAVE_AVX512_PATH 1
// ---- float32 backward for AVX-512 CPUs (16-lane zmm, 32 registers, FMA). Same task split and math as
// backward_range, restructured for the short sequences DataMUX runs: K and V are packed transposed
// straight from the inputs (no row copy of V), Q / dO / K rows are packed with masked vector loads
// (δ_i = dO_i · O_i is summed while dO is packed), the micro-kernels keep 24 accumulators in registers
// (6 × 64, 8 × 48 or 12 × 32 / 12 × 16 outputs per k step), p = exp(s − lse) uses a 16-lane exp
// (range reduction, degree-7 polynomial, vscalefps), and every panel lives in per-thread scratch that
// is reused between calls (no per-call zero fill). dV, dK accumulate over the query tiles of a key
// block in a fixed order, dQ over the key blocks: results stay independent of the thread count.
// GCC 12's avx512fintrin.h self-initialises its "undefined" vectors, which -Wmaybe-uninitialized
// reports once inlined (as in pq_cpu.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FC_AVX512_FN __attribute__((target("avx512f")))
#define FC_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

// exp(x) for 16 lanes: x = n ln2 + r, |r| ≤ ln2/2, exp(r) by its degree-7 Taylor polynomial (truncation
// < 5e-9 relative), 2^n by vscalefps. As exp_lanes: 0 below −87.3 (and for −inf), +inf above 88.7, NaN kept.
FC_AVX512_INLINE __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);  // (NaN in the second operand propagates)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 poly = _mm512_set1_ps(1.0f / 5040.0f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 720.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 120.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 24.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f / 6.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.5f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(poly, n));
}

FC_AVX512_INLINE __mmask16 lanes_below(int64_t count) {  // the first min(count, 16) lanes
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// Prefetches the rows of a later task's inputs a few cache lines at a time (step), spread over the row
// loops of the current task, so they arrive while its micro-kernels run. Inputs whose last dimension is
// not contiguous are skipped.
struct RowPrefetch {
  struct Rows {
    const char* first;
    int64_t stride_bytes, rows, lines;
  };
  Rows list[5];
  int count = 0;
  int current = 0;
  int64_t row = 0, total = 0;

  void add(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h, int64_t j0, int64_t rows,
           int64_t D) {
    if (rows <= 0 || count == 5 || (stride[3] != 1 && D > 1)) return;
    const int64_t bytes = kind == ScalarKind::kFloat64 ? 8 : (kind == ScalarKind::kFloat32 ? 4 : 2);
    list[count++] = {static_cast<const char*>(base) + (b * stride[0] + h * stride[1] + j0 * stride[2]) * bytes,
                     stride[2] * bytes, rows, (D * bytes + 63) / 64};
    total += rows;
  }
  // Prefetches the next `rows` input rows (every cache line of each).
  void step(int64_t rows) {
    for (; rows > 0 && current < count; --rows) {
      const Rows& r = list[current];
      const char* line = r.first + row * r.stride_bytes;
      for (int64_t l = 0; l <= r.lines; ++l) _mm_prefetch(line + 64 * l, _MM_HINT_T0);  // (+1: unaligned rows)
      if (++row == r.rows) {
        row = 0;
        ++current;
      }
    }
  }
};

// C[MR rows, NV·16] (+)= Σ_k A(r, k) · B[k, :] with A(r, k) = A[r·a_row + k·a_col]: MR·NV ≤ 24 zmm
// accumulators for the whole k loop.
template <int MR, int NV>
FC_AVX512_INLINE void tile16(int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B, int64_t ldb,
                             float* C, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    const float* a = A + k * a_col;
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * a_row]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
}

template <int NV>
FC_AVX512_INLINE void rows16(int64_t M, int64_t K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int MR = NV >= 4 ? 6 : (NV == 3 ? 8 : 12);
  int64_t i = 0;
  for (; i + MR <= M; i += MR) tile16<MR, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, accumulate);
  const float* a = A + i * a_row;
  float* c = C + i * ldc;
#define FC_TAIL(m) \
  case m: if (m < MR) tile16<(m < MR ? m : 1), NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
  switch (M - i) {
    FC_TAIL(1) FC_TAIL(2) FC_TAIL(3) FC_TAIL(4) FC_TAIL(5) FC_TAIL(6) FC_TAIL(7) FC_TAIL(8) FC_TAIL(9) FC_TAIL(10)
    FC_TAIL(11)
    default: break;
  }
#undef FC_TAIL
}

// C [M, N] (+)= A [M, K] · B [K, N]: A by (row, column) strides (Aᵀ is free), B and C row-major, N a
// multiple of 16 (the padded panels guarantee it).
FC_AVX512_INLINE void gemm16(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row, int64_t a_col,
                             const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) rows16<4>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate);
  switch ((N - n) / 16) {
    case 3: rows16<3>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate); break;
    case 2: rows16<2>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate); break;
    case 1: rows16<1>(M, K, A, a_row, a_col, B + n, ldb, C + n, ldc, accumulate); break;
    default: break;
  }
}

// Rows j0 .. j0 + n − 1 of head (b, h) of a [B, H, L, D] input -> rows [n, Dp] (zero-padded, times scale).
FC_AVX512_INLINE void pack_rows16(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h,
                                  int64_t j0, int64_t n, int64_t D, int64_t Dp, float scale, float* rows) {
  const int64_t offset = b * stride[0] + h * stride[1] + j0 * stride[2];
  if (kind == ScalarKind::kFloat32 && stride[3] == 1) {
    const float* src = static_cast<const float*>(base) + offset;
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < Dp; c += 16)
        _mm512_storeu_ps(rows + j * Dp + c,
                         _mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes_below(D - c), src + j * stride[2] + c)));
    return;
  }
  pack_rows<float>(base, kind, stride, b, h, j0, n, D, Dp, scale, rows);
}

// In-register transpose of a 16 × 16 block: r[i] = row i on entry, r[c] = column c on return (unpack
// within 128-bit lanes, then two rounds of 128-bit lane shuffles).
FC_AVX512_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c]: in 128-bit lane L, column 4L + c of rows g .. g + 3
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
  }
  for (int c = 0; c < 4; ++c) {  // 4 × 4 transpose of the 128-bit lanes of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
  }
}

// Keys j0 .. j0 + n − 1 of head (b, h) -> cols [D, n_pad] (transposed, zero-padded columns), 16 keys ×
// 16 features at a time through transpose16 (float32 rows straight from the input; other dtypes or
// strides through `scratch` [16, D]).
FC_AVX512_INLINE void pack_cols16(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h,
                                  int64_t j0, int64_t n, int64_t D, int64_t n_pad, float* cols, float* scratch) {
  const bool direct = kind == ScalarKind::kFloat32 && stride[3] == 1;
  const int64_t offset = b * stride[0] + h * stride[1];
  for (int64_t jb = 0; jb < n_pad; jb += 16) {
    const int64_t count = std::min<int64_t>(16, n - jb);
    const float* rows = scratch;
    int64_t ld = D;
    if (direct) {
      rows = static_cast<const float*>(base) + offset + (j0 + jb) * stride[2];
      ld = stride[2];
    } else {
      for (int64_t j = 0; j < count; ++j)
        load_row<float>(base, kind, offset + (j0 + jb + j) * stride[2], stride[3], D, 1.0f, scratch + j * D);
    }
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
      const __mmask16 lanes = lanes_below(D - c0);
      __m512 r[16];
      for (int64_t j = 0; j < 16; ++j)
        r[j] = j < count ? _mm512_maskz_loadu_ps(lanes, rows + j * ld + c0) : _mm512_setzero_ps();
      transpose16(r);
      const int64_t columns = std::min<int64_t>(16, D - c0);
      for (int64_t c = 0; c < columns; ++c) _mm512_storeu_ps(cols + (c0 + c) * n_pad + jb, r[c]);
    }
  }
}

// The forward (forward_range's math and task split) on the same panels and micro-kernels.
FC_AVX512_FN void forward_float_avx512(const AttentionParams& p, int64_t task_begin, int64_t task_end,
                                       int64_t prefetch_task) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16);
  const int64_t Bk = std::max<int64_t>(1, std::min(p.kv_block, p.len_k)), Bkp = round_up(Bk, 16);
  const int64_t Tq = std::max<int64_t>(1, std::min(p.q_tile, p.len_q));
  ForwardScratch<float>& scratch = ForwardScratch<float>::of_this_thread();
  float* const q_panel = at_least(scratch.q_panel, Tq * Dp);
  float* const k_cols = at_least(scratch.k_cols, D * Bkp);
  float* const v_rows = at_least(scratch.v_rows, Bk * Dp);
  float* const scores = at_least(scratch.scores, Tq * Bkp);
  float* const o_acc = at_least(scratch.o_acc, Tq * Dp);
  float* const row_max_ = at_least(scratch.row_max, Tq);
  float* const row_sum = at_least(scratch.row_sum, Tq);
  float* const block = at_least(scratch.k_rows, 16 * D);
  const int64_t tiles = (p.len_q + Tq - 1) / Tq;
  const bool bias = has_bias(p);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 neg_inf16 = _mm512_set1_ps(neg_inf);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bh = task / tiles, tile = task % tiles, b = bh / p.heads, h = bh % p.heads;
    const int64_t q0 = tile * Tq, rows = std::min(Tq, p.len_q - q0);
    RowPrefetch next;  // the next task's query tile, keys and values (this range's next task, or the hint)
    const int64_t next_task = task + 1 < task_end ? task + 1 : prefetch_task;
    if (next_task >= 0) {
      const int64_t nbh = next_task / tiles, nq0 = (next_task % tiles) * Tq, nb = nbh / p.heads, nh = nbh % p.heads;
      next.add(p.q, p.kind, p.q_stride, nb, nh, nq0, std::min(Tq, p.len_q - nq0), D);
      if (nbh != bh) {
        next.add(p.k, p.kind, p.k_stride, nb, nh, 0, p.len_k, D);
        next.add(p.v, p.kind, p.v_stride, nb, nh, 0, p.len_k, D);
      }
    }
    const int64_t prefetch_rows = (next.total + rows - 1) / rows;  // per softmax row of the first key block
    pack_rows16(p.q, p.kind, p.q_stride, b, h, q0, rows, D, Dp, static_cast<float>(p.scale), q_panel);
    std::fill(row_max_, row_max_ + rows, neg_inf);
    std::fill(row_sum, row_sum + rows, 0.0f);
    for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
      if (p.causal && j0 > q0 + rows - 1) break;  // every later key is above the diagonal
      const int64_t n = std::min(Bk, p.len_k - j0), n_pad = round_up(n, 16);
      pack_cols16(p.k, p.kind, p.k_stride, b, h, j0, n, D, n_pad, k_cols, block);
      pack_rows16(p.v, p.kind, p.v_stride, b, h, j0, n, D, Dp, 1.0f, v_rows);
      // scores = (scale q) kᵀ  [rows, n_pad]
      gemm16(rows, n_pad, D, q_panel, Dp, 1, k_cols, n_pad, scores, Bkp, false);
      for (int64_t i = 0; i < rows; ++i) {
        next.step(prefetch_rows);
        float* si = scores + i * Bkp;
        if (bias) add_bias<float>(p, b, h, q0 + i, j0, n, si);
        __m512 m = neg_inf16;
        for (int64_t j = 0; j < n_pad; j += 16)
          m = _mm512_mask_max_ps(m, lanes_below(n - j), m, _mm512_loadu_ps(si + j));
        const float m_old = row_max_[i], m_new = std::max(m_old, _mm512_reduce_max_ps(m));
        if (m_new == neg_inf) {  // nothing attended yet: p = 0 for this block
          std::fill(si, si + n_pad, 0.0f);
          continue;
        }
        const __m512 shift = _mm512_set1_ps(m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n_pad; j += 16) {
          const __m512 e = _mm512_maskz_mov_ps(lanes_below(n - j), exp16(_mm512_sub_ps(_mm512_loadu_ps(si + j), shift)));
          _mm512_storeu_ps(si + j, e);
          sum = _mm512_add_ps(sum, e);
        }
        if (m_old != neg_inf && m_old != m_new) {  // rescale the running sums to the new max
          const float alpha = std::exp(m_old - m_new);
          row_sum[i] *= alpha;
          float* oi = o_acc + i * Dp;
          for (int64_t c = 0; c < Dp; c += 16) _mm512_storeu_ps(oi + c, _mm512_mul_ps(_mm512_set1_ps(alpha), _mm512_loadu_ps(oi + c)));
        }
        row_sum[i] += _mm512_reduce_add_ps(sum);
        row_max_[i] = m_new;
      }
      // o += p v  [rows, Dp] (the first key block writes)
      gemm16(rows, Dp, n, scores, Bkp, 1, v_rows, Dp, o_acc, Dp, j0 > 0);
    }
    if (p.len_k == 0) std::fill(o_acc, o_acc + rows * Dp, 0.0f);  // no key block ran: out = 0, lse = −inf
    float* lse = static_cast<float*>(p.lse) + bh * p.len_q + q0;
    const int64_t out_offset = (bh * p.len_q + q0) * D;
    for (int64_t i = 0; i < rows; ++i) {
      const float l = row_sum[i];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // fully masked row: out = 0
      lse[i] = l > 0.0f ? row_max_[i] + std::log(l) : neg_inf;
      if (p.kind == ScalarKind::kFloat32) {
        float* dst = static_cast<float*>(p.out) + out_offset + i * D;
        for (int64_t c = 0; c < Dp; c += 16)
          _mm512_mask_storeu_ps(dst + c, lanes_below(D - c), _mm512_mul_ps(_mm512_set1_ps(inv), _mm512_loadu_ps(o_acc + i * Dp + c)));
      } else {
        store_row<float>(p.out, p.kind, out_offset + i * D, D, inv, o_acc + i * Dp);
      }
    }
  }
}

struct BackwardScratch16 {
  std::vector<float> q_rows, do_rows, delta, dq, k_rows, k_cols, v_cols, dk, dv, probs, dprobs, block;
  static BackwardScratch16& of_this_thread() {
    static thread_local BackwardScratch16 scratch;
    return scratch;
  }
};

FC_AVX512_FN void backward_float_avx512(const AttentionParams& p, int64_t task_begin, int64_t task_end,
                                        int64_t prefetch_task) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16), Lq = p.len_q, Lk = p.len_k;
  const int64_t Bk = std::max<int64_t>(1, std::min(p.kv_block, Lk)), Bkp = round_up(Bk, 16);
  const int64_t Tq = std::max<int64_t>(1, std::min<int64_t>(Lq <= 192 ? Lq : 64, Lq));
  BackwardScratch16& scratch = BackwardScratch16::of_this_thread();
  float* const q_rows = at_least(scratch.q_rows, Lq * Dp);
  float* const do_rows = at_least(scratch.do_rows, Lq * Dp);
  float* const delta = at_least(scratch.delta, Lq);
  float* const dq = at_least(scratch.dq, Lq * Dp);
  float* const k_rows = at_least(scratch.k_rows, Bk * Dp);
  float* const k_cols = at_least(scratch.k_cols, D * Bkp);
  float* const v_cols = at_least(scratch.v_cols, D * Bkp);
  float* const dk = at_least(scratch.dk, Bk * Dp);
  float* const dv = at_least(scratch.dv, Bk * Dp);
  float* const probs = at_least(scratch.probs, Tq * Bkp);
  float* const dprobs = at_least(scratch.dprobs, Tq * Bkp);
  float* const block = at_least(scratch.block, 16 * D);
  const int64_t contiguous[4] = {p.heads * Lq * D, Lq * D, D, 1};
  const bool bias = has_bias(p);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t bh = task_begin; bh < task_end; ++bh) {
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const float* lse = static_cast<const float*>(p.lse) + bh * Lq;
    RowPrefetch next;  // the next task's q, k, v, dO and O rows (this range's next task, or the hint)
    const int64_t next_bh = bh + 1 < task_end ? bh + 1 : prefetch_task;
    if (next_bh >= 0) {
      const int64_t nb = next_bh / p.heads, nh = next_bh % p.heads;
      next.add(p.q, p.kind, p.q_stride, nb, nh, 0, Lq, D);
      next.add(p.k, p.kind, p.k_stride, nb, nh, 0, Lk, D);
      next.add(p.v, p.kind, p.v_stride, nb, nh, 0, Lk, D);
      next.add(p.grad_out, p.kind, contiguous, nb, nh, 0, Lq, D);
      next.add(p.out, p.kind, contiguous, nb, nh, 0, Lq, D);
    }
    const int64_t prefetch_rows = (next.total + Lq - 1) / Lq;  // per p row of the first key block
    pack_rows16(p.q, p.kind, p.q_stride, b, h, 0, Lq, D, Dp, static_cast<float>(p.scale), q_rows);
    pack_rows16(p.grad_out, p.kind, contiguous, b, h, 0, Lq, D, Dp, 1.0f, do_rows);
    if (p.kind == ScalarKind::kFloat32) {  // δ_i = dO_i · O_i
      const float* o = static_cast<const float*>(p.out) + bh * Lq * D;
      for (int64_t i = 0; i < Lq; ++i) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < Dp; c += 16)
          sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes_below(D - c), o + i * D + c),
                                _mm512_loadu_ps(do_rows + i * Dp + c), sum);
        delta[i] = _mm512_reduce_add_ps(sum);
      }
    } else {
      for (int64_t i = 0; i < Lq; ++i) {
        load_row<float>(p.out, p.kind, (bh * Lq + i) * D, 1, D, 1.0f, block);
        float sum = 0.0f;
        for (int64_t c = 0; c < D; ++c) sum += block[c] * do_rows[i * Dp + c];
        delta[i] = sum;
      }
    }
    for (int64_t j0 = 0; j0 < Lk; j0 += Bk) {
      const int64_t n = std::min(Bk, Lk - j0), n_pad = round_up(n, 16);
      pack_rows16(p.k, p.kind, p.k_stride, b, h, j0, n, D, Dp, 1.0f, k_rows);
      pack_cols16(p.k, p.kind, p.k_stride, b, h, j0, n, D, n_pad, k_cols, block);
      pack_cols16(p.v, p.kind, p.v_stride, b, h, j0, n, D, n_pad, v_cols, block);
      const int64_t q_start = p.causal ? (j0 / Tq) * Tq : 0;  // tiles wholly above the diagonal add nothing
      bool first = true;
      for (int64_t i0 = q_start; i0 < Lq; i0 += Tq) {
        const int64_t rows = std::min(Tq, Lq - i0);
        const float* qi = q_rows + i0 * Dp;
        const float* doi = do_rows + i0 * Dp;
        // p = exp(s − lse): 0 where masked, in the padded columns, or for a fully masked row
        gemm16(rows, n_pad, D, qi, Dp, 1, k_cols, n_pad, probs, Bkp, false);
        for (int64_t i = 0; i < rows; ++i) {
          next.step(prefetch_rows);
          float* pi = probs + i * Bkp;
          if (bias) add_bias<float>(p, b, h, i0 + i, j0, n, pi);
          const float l = lse[i0 + i];
          if (l == neg_inf) {
            std::fill(pi, pi + n_pad, 0.0f);
            continue;
          }
          const __m512 shift = _mm512_set1_ps(l);
          for (int64_t j = 0; j < n_pad; j += 16)
            _mm512_storeu_ps(pi + j, _mm512_maskz_mov_ps(lanes_below(n - j),
                                                         exp16(_mm512_sub_ps(_mm512_loadu_ps(pi + j), shift))));
        }
        // dV += pᵀ dO
        gemm16(n, Dp, rows, probs, 1, Bkp, doi, Dp, dv, Dp, !first);
        // dp = dO vᵀ, then ds = p (dp − δ) in place
        gemm16(rows, n_pad, D, doi, Dp, 1, v_cols, n_pad, dprobs, Bkp, false);
        for (int64_t i = 0; i < rows; ++i) {
          const float* pi = probs + i * Bkp;
          float* dsi = dprobs + i * Bkp;
          const __m512 di = _mm512_set1_ps(delta[i0 + i]);
          for (int64_t j = 0; j < n_pad; j += 16)
            _mm512_storeu_ps(dsi + j, _mm512_mul_ps(_mm512_loadu_ps(pi + j), _mm512_sub_ps(_mm512_loadu_ps(dsi + j), di)));
          if (p.grad_scores != nullptr)  // the additive mask's gradient, before its broadcast reduction
            std::copy(dsi, dsi + n, static_cast<float*>(p.grad_scores) + (bh * Lq + i0 + i) * Lk + j0);
        }
        // dQ += ds k (scaled at the end; the first key block writes), dK += dsᵀ (scale q)
        gemm16(rows, Dp, n, dprobs, Bkp, 1, k_rows, Dp, dq + i0 * Dp, Dp, j0 > 0);
        gemm16(n, Dp, rows, dprobs, 1, Bkp, qi, Dp, dk, Dp, !first);
        first = false;
      }
      if (first) {  // no query reaches this key block (causal, Lk > Lq)
        std::fill(dk, dk + n * Dp, 0.0f);
        std::fill(dv, dv + n * Dp, 0.0f);
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t offset = (bh * Lk + j0 + j) * D;
        store_row<float>(p.grad_k, p.kind, offset, D, 1.0f, dk + j * Dp);
        store_row<float>(p.grad_v, p.kind, offset, D, 1.0f, dv + j * Dp);
      }
    }
    for (int64_t i = 0; i < Lq; ++i)
      store_row<float>(p.grad_q, p.kind, (bh * Lq + i) * D, D, static_cast<float>(p.scale), dq + i * Dp);
  }
}
#pragma GCC diagnostic pop
#endif

FC_ATTENTION_CLONES void forward_float(const AttentionParams& p, int64_t begin, int64_t end) {
  forward_range<float>(p, begin, end);
}
FC_ATTENTION_CLONES void forward_double(const AttentionParams& p, int64_t begin, int64_t end) {
  forward_range<double>(p, begin, end);
}
FC_ATTENTION_CLONES void backward_float(const AttentionParams& p, int64_t begin, int64_t end) {
  backward_range<float>(p, begin, end);
}
FC_ATTENTION_CLONES void backward_double(const AttentionParams& p, int64_t begin, int64_t end) {
  backward_range<double>(p, begin, end);
}

#ifdef FC_HAVE_AVX512_PATH
std::atomic<int> force_generic{-1};  // −1: not decided yet (read the environment at first use)

bool use_avx512() {
  int force = force_generic.load(std::memory_order_relaxed);
  if (force < 0) {
    const char* env = std::getenv("FASTCORE_AI_ATTENTION_CPU_GENERIC");
    force = (env != nullptr && env[0] != '\0' && env[0] != '0') ? 1 : 0;
    force_generic.store(force, std::memory_order_relaxed);
  }
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  return has_avx512 && force == 0;
}
#endif

}  // namespace

void attention_cpu_force_generic(bool force) {
#ifdef FC_HAVE_AVX512_PATH
  force_generic.store(force ? 1 : 0, std::memory_order_relaxed);
#else
  (void)force;
#endif
}

void attention_forward_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task) {
  if (task_begin >= task_end) return;
  if (p.kind == ScalarKind::kFloat64) {
    forward_double(p, task_begin, task_end);
    return;
  }
#ifdef FC_HAVE_AVX512_PATH
  if (use_avx512()) {
    forward_float_avx512(p, task_begin, task_end, prefetch_task);
    return;
  }
#endif
  forward_float(p, task_begin, task_end);
}

void attention_backward_cpu(const AttentionParams& p, int64_t task_begin, int64_t task_end, int64_t prefetch_task) {
  if (task_begin >= task_end) return;
  if (p.kind == ScalarKind::kFloat64) {
    backward_double(p, task_begin, task_end);
    return;
  }
#ifdef FC_HAVE_AVX512_PATH
  if (use_avx512()) {
    backward_float_avx512(p, task_begin, task_end, prefetch_task);
    return;
  }
#endif
  backward_float(p, task_begin, task_end);
}

}  // namespace mux
}  // namespace fastcore

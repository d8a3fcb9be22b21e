// CPU fused attention, the AVX-512 float32 path (attention_cpu.cpp dispatches here; see attention.h for
// the math).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mux/attention_cpu_internal.h"

#if FC_ATTENTION_AVX512
#include <immintrin.h>

namespace fastcore {
namespace mux {
using namespace detail;  // the shared pieces of attention_cpu_internal.h

// ---- float32 backward for AVX-512 CPUs (16-lane zmm, 32 registers, FMA). Same task split and math as
// backward_range, restructured for the short sequences DataMUX runs: K and V are packed transposed
// straight from the inputs (no row copy of V), Q / dO / K rows are packed with masked vector loads
// (δ_i = dO_i · O_i is summed while dO is packed), the micro-kernels keep 24 accumulators in registers
// (6 × 64, 8 × 48 or 12 × 32 / 12 × 16 outputs per k step), p = exp(s − lse) uses a 16-lane exp
// (range reduction, degree-7 polynomial, vscalefps), and every panel lives in per-thread scratch that
// is reused between calls (no per-call zero fill). dV, dK accumulate over the query tiles of a key
// block in a fixed order, dQ over the key blocks: results stay independent of the thread count.
// GCC 12's avx512fintrin.h self-initialises its "undefined" vectors, which -Wmaybe-uninitialized
// reports once inlined (as in the pq ISA files).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FC_AVX512_FN __attribute__((target("avx512f")))
#define FC_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

namespace {

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
#define FC_TAIL(m)                                                                            \
  case m:                                                                                     \
    if (m < MR) tile16<(m < MR ? m : 1), NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); \
    break;
  // A macro per case reads as one table, which the formatter cannot lay out.
  // clang-format off
  switch (M - i) {
    FC_TAIL(1) FC_TAIL(2) FC_TAIL(3) FC_TAIL(4) FC_TAIL(5) FC_TAIL(6) FC_TAIL(7) FC_TAIL(8) FC_TAIL(9) FC_TAIL(10)
    FC_TAIL(11)
    default: break;
  }
  // clang-format on
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
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88),
                 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
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

struct BackwardScratch16 {
  std::vector<float> q_rows, do_rows, delta, dq, k_rows, k_cols, v_cols, dk, dv, probs, dprobs, block;
  static BackwardScratch16& of_this_thread() {
    static thread_local BackwardScratch16 scratch;
    return scratch;
  }
};

}  // namespace

namespace detail {

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
          const __m512 e =
              _mm512_maskz_mov_ps(lanes_below(n - j), exp16(_mm512_sub_ps(_mm512_loadu_ps(si + j), shift)));
          _mm512_storeu_ps(si + j, e);
          sum = _mm512_add_ps(sum, e);
        }
        if (m_old != neg_inf && m_old != m_new) {  // rescale the running sums to the new max
          const float alpha = std::exp(m_old - m_new);
          row_sum[i] *= alpha;
          float* oi = o_acc + i * Dp;
          for (int64_t c = 0; c < Dp; c += 16)
            _mm512_storeu_ps(oi + c, _mm512_mul_ps(_mm512_set1_ps(alpha), _mm512_loadu_ps(oi + c)));
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
          _mm512_mask_storeu_ps(dst + c, lanes_below(D - c),
                                _mm512_mul_ps(_mm512_set1_ps(inv), _mm512_loadu_ps(o_acc + i * Dp + c)));
      } else {
        store_row<float>(p.out, p.kind, out_offset + i * D, D, inv, o_acc + i * Dp);
      }
    }
  }
}

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
            _mm512_storeu_ps(
                pi + j, _mm512_maskz_mov_ps(lanes_below(n - j), exp16(_mm512_sub_ps(_mm512_loadu_ps(pi + j), shift))));
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
            _mm512_storeu_ps(dsi + j,
                             _mm512_mul_ps(_mm512_loadu_ps(pi + j), _mm512_sub_ps(_mm512_loadu_ps(dsi + j), di)));
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

}  // namespace detail
#pragma GCC diagnostic pop

}  // namespace mux
}  // namespace fastcore
#endif  // FC_ATTENTION_AVX512

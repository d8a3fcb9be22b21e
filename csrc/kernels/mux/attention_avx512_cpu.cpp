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

// 16 contiguous bfloat16 / float16 values at element `offset` widened to float (exact).
FC_AVX512_INLINE __m512 load16_half(const void* base, ScalarKind kind, int64_t offset) {
  const __m256i bits =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + offset));
  if (kind == ScalarKind::kFloat16) return _mm512_cvtph_ps(bits);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));  // bf16 = the high half
}

// One input row of D values (element stride `step`) -> dst[0, Dp) as float times scale, zero-padded to Dp
// (a multiple of 16): float32 and 16-bit rows with unit stride as vectors, anything else element-wise.
FC_AVX512_INLINE void load_row16(const void* base, ScalarKind kind, int64_t offset, int64_t step, int64_t D, int64_t Dp,
                                 float scale, float* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  if (kind == ScalarKind::kFloat32 && (step == 1 || D == 1)) {
    const float* src = static_cast<const float*>(base) + offset;
    for (int64_t c = 0; c < Dp; c += 16)
      _mm512_storeu_ps(dst + c, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes_below(D - c), src + c)));
    return;
  }
  int64_t c = 0;
  if ((kind == ScalarKind::kBFloat16 || kind == ScalarKind::kFloat16) && step == 1)
    for (; c + 16 <= D; c += 16) _mm512_storeu_ps(dst + c, _mm512_mul_ps(s, load16_half(base, kind, offset + c)));
  if (c < D) load_row<float>(base, kind, offset + c * step, step, D - c, scale, dst + c);
  for (c = D; c < Dp; ++c) dst[c] = 0.0f;
}

// Rows j0 .. j0 + n − 1 of head (b, h) of a [B, H, L, D] input -> rows [n, Dp] (zero-padded, times scale).
FC_AVX512_INLINE void pack_rows16(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h,
                                  int64_t j0, int64_t n, int64_t D, int64_t Dp, float scale, float* rows) {
  const int64_t offset = b * stride[0] + h * stride[1] + j0 * stride[2];
  for (int64_t j = 0; j < n; ++j)
    load_row16(base, kind, offset + j * stride[2], stride[3], D, Dp, scale, rows + j * Dp);
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
// strides through `scratch` [16, round_up(D, 16)]).
FC_AVX512_INLINE void pack_cols16(const void* base, ScalarKind kind, const int64_t* stride, int64_t b, int64_t h,
                                  int64_t j0, int64_t n, int64_t D, int64_t n_pad, float* cols, float* scratch) {
  const bool direct = kind == ScalarKind::kFloat32 && stride[3] == 1;
  const int64_t offset = b * stride[0] + h * stride[1];
  for (int64_t jb = 0; jb < n_pad; jb += 16) {
    const int64_t count = std::min<int64_t>(16, n - jb);
    const float* rows = scratch;
    int64_t ld = round_up(D, 16);
    if (direct) {
      rows = static_cast<const float*>(base) + offset + (j0 + jb) * stride[2];
      ld = stride[2];
    } else {
      for (int64_t j = 0; j < count; ++j)
        load_row16(base, kind, offset + (j0 + jb + j) * stride[2], stride[3], D, ld, 1.0f, scratch + j * ld);
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
  std::vector<float> q_rows, do_rows, delta, lse, dq, k_rows, k_cols, v_cols, dk, dv, probs, dprobs, block;
  std::vector<int64_t> row_of;
  static BackwardScratch16& of_this_thread() {
    static thread_local BackwardScratch16 scratch;
    return scratch;
  }
};

// Lane j of the result = the sum of the 16 lanes of t[j] (16 dot products finished at once): pairs are
// added after unpacking (32-bit, then 64-bit interleaves leave every vector's per-128-bit-lane sums side
// by side), then the four 128-bit lanes are transposed and added.
FC_AVX512_INLINE __m512 reduce16(const __m512 t[16]) {
  __m512 u[8], w[4];
  for (int k = 0; k < 8; ++k)  // u[k], 128-bit lane L: [a0+a2, b0+b2, a1+a3, b1+b3] of a = t[2k], b = t[2k+1]
    u[k] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * k], t[2 * k + 1]), _mm512_unpackhi_ps(t[2 * k], t[2 * k + 1]));
  for (int m = 0; m < 4; ++m) {  // w[m], 128-bit lane L: the lane-L sums of t[4m .. 4m + 3]
    const __m512d a = _mm512_castps_pd(u[2 * m]), b = _mm512_castps_pd(u[2 * m + 1]);
    w[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
}

// scores [rows, n_pad] = q [rows, Dp] · kᵀ for keys stored as rows (k + j·k_ld, D values each; read with
// masked loads, so rows straight from the input need no padding): one query row against 16 keys at a
// time, 16 partial-sum vectors finished by reduce16. For the few query rows of a decode step this costs
// less than transposing K into columns for a micro-GEMM (pack_cols16), which only pays off over many rows.
// Lanes past n are 0.
FC_AVX512_INLINE void scores_by_rows(int64_t rows, int64_t n, int64_t D, const float* q, int64_t Dp, const float* k,
                                     int64_t k_ld, float* scores, int64_t ld) {
  for (int64_t jb = 0; jb < n; jb += 16) {
    const int64_t count = std::min<int64_t>(16, n - jb);
    const float* kb = k + jb * k_ld;
    for (int64_t r = 0; r < rows; ++r) {
      __m512 t[16];
      for (int j = 0; j < 16; ++j) t[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < Dp; c += 16) {
        const __mmask16 lanes = lanes_below(D - c);
        const __m512 qc = _mm512_loadu_ps(q + r * Dp + c);
        if (count == 16) {
          for (int j = 0; j < 16; ++j)
            t[j] = _mm512_fmadd_ps(qc, _mm512_maskz_loadu_ps(lanes, kb + j * k_ld + c), t[j]);
        } else {
          for (int j = 0; j < 16; ++j)
            if (j < count) t[j] = _mm512_fmadd_ps(qc, _mm512_maskz_loadu_ps(lanes, kb + j * k_ld + c), t[j]);
        }
      }
      _mm512_storeu_ps(scores + r * ld + jb, reduce16(t));
    }
  }
}

// Query rows in lanes, for a tile of ≤ 16 stacked rows without mask terms and Lk ≥ 1: St [n, 16] = K [n, D] · Qᵀ [D, 16] reads K
// rows as broadcast scalars (no transpose: any float32 strides in place), so one zmm holds one key's
// scores for all the rows and the online softmax runs down the keys with lane-wise max / exp / sums (no
// horizontal reductions); o += P V then takes Pᵀ by strides.
FC_AVX512_INLINE void forward_lanes(const AttentionParams& p, int64_t bk, int64_t r0, int64_t rows, float* q_panel,
                                    float* q_cols, float* k_rows, float* v_rows, float* scores, float* o_acc) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16), G = attention_group(p), Hk = attention_kv_heads(p);
  const int64_t Lq = p.len_q, b = bk / Hk, hk = bk % Hk;
  const int64_t Bk = std::max<int64_t>(1, std::min(p.kv_block, p.len_k));
  const bool k_in_place = p.kind == ScalarKind::kFloat32;
  const bool v_in_place = p.kind == ScalarKind::kFloat32 && p.v_stride[3] == 1 && D % 16 == 0;
  for (int64_t r = r0; r < r0 + rows;) {  // the tile's runs of one query head (as for_each_head_run)
    const int64_t i0 = r % Lq, count = std::min(r0 + rows - r, Lq - i0), h = hk * G + r / Lq;
    pack_rows16(p.q, p.kind, p.q_stride, b, h, i0, count, D, Dp, static_cast<float>(p.scale), q_panel + (r - r0) * Dp);
    r += count;
  }
  for (int64_t c = 0; c < D; ++c)  // Qᵀ [D, 16], zero lanes past the rows
    for (int64_t r = 0; r < 16; ++r) q_cols[c * 16 + r] = r < rows ? q_panel[r * Dp + c] : 0.0f;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m512 m = _mm512_set1_ps(neg_inf), l = _mm512_setzero_ps();
  alignas(64) float alpha[16];
  for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
    const int64_t n = std::min(Bk, p.len_k - j0);
    const float* k_src = k_rows;
    int64_t k_row = Dp, k_col = 1;
    if (k_in_place) {
      k_src = static_cast<const float*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j0 * p.k_stride[2];
      k_row = p.k_stride[2];
      k_col = p.k_stride[3];
    } else {
      pack_rows16(p.k, p.kind, p.k_stride, b, hk, j0, n, D, Dp, 1.0f, k_rows);
    }
    gemm16(n, 16, D, k_src, k_row, k_col, q_cols, 16, scores, 16, false);  // St [n, 16]
    __m512 m_new = m;
    for (int64_t j = 0; j < n; ++j) m_new = _mm512_max_ps(m_new, _mm512_loadu_ps(scores + j * 16));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j * 16), m_new));
      _mm512_storeu_ps(scores + j * 16, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j0 > 0) {  // rescale the running sums to the new max (m finite after the first block)
      const __m512 a = exp16(_mm512_sub_ps(m, m_new));
      l = _mm512_mul_ps(l, a);
      _mm512_store_ps(alpha, a);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < Dp; c += 16)
          _mm512_storeu_ps(o_acc + r * Dp + c,
                           _mm512_mul_ps(_mm512_set1_ps(alpha[r]), _mm512_loadu_ps(o_acc + r * Dp + c)));
    }
    l = _mm512_add_ps(l, sum);
    m = m_new;
    const float* v_src = v_rows;
    int64_t v_ld = Dp;
    if (v_in_place) {
      v_src = static_cast<const float*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j0 * p.v_stride[2];
      v_ld = p.v_stride[2];
    } else {
      pack_rows16(p.v, p.kind, p.v_stride, b, hk, j0, n, D, Dp, 1.0f, v_rows);
    }
    gemm16(rows, Dp, n, scores, 1, 16, v_src, v_ld, o_acc, Dp, j0 > 0);  // o += P V, P [r, j] = St [j, r]
  }
  alignas(64) float row_max[16], row_sum[16];
  _mm512_store_ps(row_max, m);
  _mm512_store_ps(row_sum, l);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = (b * p.heads + hk * G + (r0 + r) / Lq) * Lq + (r0 + r) % Lq;  // [B, H, Lq] index
    const float inv = 1.0f / row_sum[r];  // no mask: every row attends to at least one key (Lk ≥ 1)
    static_cast<float*>(p.lse)[row] = row_max[r] + std::log(row_sum[r]);
    if (p.kind == ScalarKind::kFloat32) {
      float* dst = static_cast<float*>(p.out) + row * D;
      for (int64_t c = 0; c < Dp; c += 16)
        _mm512_mask_storeu_ps(dst + c, lanes_below(D - c),
                              _mm512_mul_ps(_mm512_set1_ps(inv), _mm512_loadu_ps(o_acc + r * Dp + c)));
    } else {
      store_row<float>(p.out, p.kind, row * D, D, inv, o_acc + r * Dp);
    }
  }
}

}  // namespace

namespace detail {

// The forward (forward_range's math and task split) on the same panels and micro-kernels. A task is a
// tile of stacked query rows of one kv head (attention.h). Per key block: scores = q kᵀ, then the online
// softmax, then o += p v. With at most kFewRows stacked rows per kv head (decode, short or grouped-query
// steps) the scores come from K rows (scores_by_rows: per row and key D/16 FMAs + ≈ 3 reduction ops);
// otherwise K is transposed once per block (≈ 20 ops per key) and shared by the tile's rows (pack_cols16
// + gemm16: D/16 FMAs per row and key), which wins from about 9 rows on (docs/mux.md). Float32 V with D
// a multiple of 16 is read in place. The choice depends on the shape only (not on the thread count), so
// results do not either.
constexpr int64_t kFewRows = 8;

FC_AVX512_FN void forward_float_avx512(const AttentionParams& p, int64_t task_begin, int64_t task_end,
                                       int64_t prefetch_task) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16);
  const int64_t G = attention_group(p), Hk = attention_kv_heads(p), Lq = p.len_q, R = G * Lq;
  const int64_t Bk = std::max<int64_t>(1, std::min(p.kv_block, p.len_k)), Bkp = round_up(Bk, 16);
  const int64_t Tq = std::max<int64_t>(1, std::min(p.q_tile, R));
  const bool few = R <= kFewRows;
  // 8 < R ≤ 16 rows per kv head, unmasked: rows in lanes (forward_lanes), no K transpose. Decided on R and
  // the masks only (R ≤ 16 is never split by the glue's tile choice, so the thread count cannot change it).
  const bool lanes = !few && R <= 16 && Tq <= 16 && !has_bias(p) && p.len_k > 0;
  const bool k_in_place = p.kind == ScalarKind::kFloat32 && (p.k_stride[3] == 1 || D == 1);
  const bool v_in_place = p.kind == ScalarKind::kFloat32 && p.v_stride[3] == 1 && D % 16 == 0;
  ForwardScratch<float>& scratch = ForwardScratch<float>::of_this_thread();
  float* const q_panel = at_least(scratch.q_panel, Tq * Dp);
  float* const k_cols = at_least(scratch.k_cols, std::max(D * Bkp, Bk * Dp));  // K columns, or K rows (few)
  float* const v_rows = at_least(scratch.v_rows, Bk * Dp);
  float* const scores = at_least(scratch.scores, std::max<int64_t>(Tq, 16) * Bkp);
  float* const q_cols = at_least(scratch.q_cols, 16 * Dp);
  float* const o_acc = at_least(scratch.o_acc, Tq * Dp);
  float* const row_max_ = at_least(scratch.row_max, Tq);
  float* const row_sum = at_least(scratch.row_sum, Tq);
  float* const block = at_least(scratch.k_rows, 16 * Dp);
  const int64_t tiles = (R + Tq - 1) / Tq;
  const bool bias = has_bias(p);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m512 neg_inf16 = _mm512_set1_ps(neg_inf);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t bk = task / tiles, tile = task % tiles, b = bk / Hk, hk = bk % Hk;
    const int64_t r0 = tile * Tq, rows = std::min(Tq, R - r0), reach = last_query(p, r0, rows);
    RowPrefetch next;  // the next task's first query rows, keys and values (this range's next task, or the hint)
    const int64_t next_task = task + 1 < task_end ? task + 1 : prefetch_task;
    if (next_task >= 0) {
      const int64_t nbk = next_task / tiles, nr0 = (next_task % tiles) * Tq, nb = nbk / Hk, nhk = nbk % Hk;
      next.add(p.q, p.kind, p.q_stride, nb, nhk * G + nr0 / Lq, nr0 % Lq, std::min(Tq, Lq - nr0 % Lq), D);
      if (nbk != bk) {
        next.add(p.k, p.kind, p.k_stride, nb, nhk, 0, p.len_k, D);
        next.add(p.v, p.kind, p.v_stride, nb, nhk, 0, p.len_k, D);
      }
    }
    if (lanes) {
      forward_lanes(p, bk, r0, rows, q_panel, q_cols, k_cols, v_rows, scores, o_acc);
      continue;
    }
    const int64_t prefetch_rows = (next.total + rows - 1) / rows;  // per softmax row of the first key block
    for (int64_t r = r0; r < r0 + rows;) {  // runs of one query head (for_each_head_run; no lambda here, whose
      const int64_t i0 = r % Lq, count = std::min(r0 + rows - r, Lq - i0), h = hk * G + r / Lq;  // ISA is the base)
      pack_rows16(p.q, p.kind, p.q_stride, b, h, i0, count, D, Dp, static_cast<float>(p.scale),
                  q_panel + (r - r0) * Dp);
      r += count;
    }
    std::fill(row_max_, row_max_ + rows, neg_inf);
    std::fill(row_sum, row_sum + rows, 0.0f);
    for (int64_t j0 = 0; j0 < p.len_k; j0 += Bk) {
      if (p.causal && j0 > reach) break;  // every later key is above the diagonal
      const int64_t n = std::min(Bk, p.len_k - j0), n_pad = round_up(n, 16);
      // scores = (scale q) kᵀ  [rows, n_pad]
      if (few) {
        const float* k_src = k_cols;
        int64_t k_ld = Dp;
        if (k_in_place) {
          k_src = static_cast<const float*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + j0 * p.k_stride[2];
          k_ld = p.k_stride[2];
        } else {
          pack_rows16(p.k, p.kind, p.k_stride, b, hk, j0, n, D, Dp, 1.0f, k_cols);
        }
        scores_by_rows(rows, n, D, q_panel, Dp, k_src, k_ld, scores, Bkp);
      } else {
        pack_cols16(p.k, p.kind, p.k_stride, b, hk, j0, n, D, n_pad, k_cols, block);
        gemm16(rows, n_pad, D, q_panel, Dp, 1, k_cols, n_pad, scores, Bkp, false);
      }
      const float* v_src = v_rows;
      int64_t v_ld = Dp;
      if (v_in_place) {
        v_src = static_cast<const float*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + j0 * p.v_stride[2];
        v_ld = p.v_stride[2];
      } else {
        pack_rows16(p.v, p.kind, p.v_stride, b, hk, j0, n, D, Dp, 1.0f, v_rows);
      }
      for (int64_t i = 0; i < rows; ++i) {
        next.step(prefetch_rows);
        float* si = scores + i * Bkp;
        if (bias) add_bias<float>(p, b, hk * G + (r0 + i) / Lq, (r0 + i) % Lq, j0, n, si);
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
      gemm16(rows, Dp, n, scores, Bkp, 1, v_src, v_ld, o_acc, Dp, j0 > 0);
    }
    if (p.len_k == 0) std::fill(o_acc, o_acc + rows * Dp, 0.0f);  // no key block ran: out = 0, lse = −inf
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = (b * p.heads + hk * G + (r0 + i) / Lq) * Lq + (r0 + i) % Lq;  // [B, H, Lq] index
      const float l = row_sum[i];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // fully masked row: out = 0
      static_cast<float*>(p.lse)[row] = l > 0.0f ? row_max_[i] + std::log(l) : neg_inf;
      if (p.kind == ScalarKind::kFloat32) {
        float* dst = static_cast<float*>(p.out) + row * D;
        for (int64_t c = 0; c < Dp; c += 16)
          _mm512_mask_storeu_ps(dst + c, lanes_below(D - c),
                                _mm512_mul_ps(_mm512_set1_ps(inv), _mm512_loadu_ps(o_acc + i * Dp + c)));
      } else {
        store_row<float>(p.out, p.kind, row * D, D, inv, o_acc + i * Dp);
      }
    }
  }
}

// The backward: a task is one (batch, kv head) and all G·Lq stacked query rows of its query heads.
FC_AVX512_FN void backward_float_avx512(const AttentionParams& p, int64_t task_begin, int64_t task_end,
                                        int64_t prefetch_task) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16), Lq = p.len_q, Lk = p.len_k;
  const int64_t G = attention_group(p), Hk = attention_kv_heads(p), R = G * Lq;
  const int64_t Bk = std::max<int64_t>(1, std::min(p.kv_block, Lk)), Bkp = round_up(Bk, 16);
  const int64_t Tq = std::max<int64_t>(1, std::min<int64_t>(R <= 192 ? R : 64, R));
  BackwardScratch16& scratch = BackwardScratch16::of_this_thread();
  float* const q_rows = at_least(scratch.q_rows, R * Dp);
  float* const do_rows = at_least(scratch.do_rows, R * Dp);
  float* const delta = at_least(scratch.delta, R);
  float* const lse = at_least(scratch.lse, R);
  int64_t* const row_of = at_least(scratch.row_of, R);  // stacked row -> its [B, H, Lq] index
  float* const dq = at_least(scratch.dq, R * Dp);
  float* const k_rows = at_least(scratch.k_rows, Bk * Dp);
  float* const k_cols = at_least(scratch.k_cols, D * Bkp);
  float* const v_cols = at_least(scratch.v_cols, D * Bkp);
  float* const dk = at_least(scratch.dk, Bk * Dp);
  float* const dv = at_least(scratch.dv, Bk * Dp);
  float* const probs = at_least(scratch.probs, Tq * Bkp);
  float* const dprobs = at_least(scratch.dprobs, Tq * Bkp);
  float* const block = at_least(scratch.block, 16 * Dp);
  const int64_t contiguous[4] = {p.heads * Lq * D, Lq * D, D, 1};
  const bool bias = has_bias(p);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t bk = task_begin; bk < task_end; ++bk) {
    const int64_t b = bk / Hk, hk = bk % Hk;
    RowPrefetch next;  // the next task's k, v and its first query head's q, dO and O rows
    const int64_t next_bk = bk + 1 < task_end ? bk + 1 : prefetch_task;
    if (next_bk >= 0) {
      const int64_t nb = next_bk / Hk, nhk = next_bk % Hk, nh = nhk * G;
      next.add(p.q, p.kind, p.q_stride, nb, nh, 0, Lq, D);
      next.add(p.k, p.kind, p.k_stride, nb, nhk, 0, Lk, D);
      next.add(p.v, p.kind, p.v_stride, nb, nhk, 0, Lk, D);
      next.add(p.grad_out, p.kind, contiguous, nb, nh, 0, Lq, D);
      next.add(p.out, p.kind, contiguous, nb, nh, 0, Lq, D);
    }
    const int64_t prefetch_rows = (next.total + R - 1) / R;  // per p row of the first key block
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {        // stacked rows: query head h = rows (h − hk·G)·Lq ..
      const int64_t at = (h - hk * G) * Lq;
      pack_rows16(p.q, p.kind, p.q_stride, b, h, 0, Lq, D, Dp, static_cast<float>(p.scale), q_rows + at * Dp);
      pack_rows16(p.grad_out, p.kind, contiguous, b, h, 0, Lq, D, Dp, 1.0f, do_rows + at * Dp);
      for (int64_t i = 0; i < Lq; ++i) row_of[at + i] = (b * p.heads + h) * Lq + i;
    }
    for (int64_t r = 0; r < R; ++r) {  // δ_r = dO_r · O_r
      load_row16(p.out, p.kind, row_of[r] * D, 1, D, Dp, 1.0f, block);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < Dp; c += 16)
        sum = _mm512_fmadd_ps(_mm512_loadu_ps(block + c), _mm512_loadu_ps(do_rows + r * Dp + c), sum);
      delta[r] = _mm512_reduce_add_ps(sum);
      lse[r] = static_cast<const float*>(p.lse)[row_of[r]];
    }
    for (int64_t j0 = 0; j0 < Lk; j0 += Bk) {
      const int64_t n = std::min(Bk, Lk - j0), n_pad = round_up(n, 16);
      pack_rows16(p.k, p.kind, p.k_stride, b, hk, j0, n, D, Dp, 1.0f, k_rows);
      pack_cols16(p.k, p.kind, p.k_stride, b, hk, j0, n, D, n_pad, k_cols, block);
      pack_cols16(p.v, p.kind, p.v_stride, b, hk, j0, n, D, n_pad, v_cols, block);
      bool first = true;
      for (int64_t i0 = 0; i0 < R; i0 += Tq) {
        const int64_t rows = std::min(Tq, R - i0);
        // a tile wholly above the diagonal adds nothing (every tile reaches j0 = 0, which writes dQ)
        if (p.causal && last_query(p, i0, rows) < j0) continue;
        const float* qi = q_rows + i0 * Dp;
        const float* doi = do_rows + i0 * Dp;
        // p = exp(s − lse): 0 where masked, in the padded columns, or for a fully masked row
        gemm16(rows, n_pad, D, qi, Dp, 1, k_cols, n_pad, probs, Bkp, false);
        for (int64_t i = 0; i < rows; ++i) {
          next.step(prefetch_rows);
          float* pi = probs + i * Bkp;
          if (bias) add_bias<float>(p, b, hk * G + (i0 + i) / Lq, (i0 + i) % Lq, j0, n, pi);
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
            std::copy(dsi, dsi + n, static_cast<float*>(p.grad_scores) + row_of[i0 + i] * Lk + j0);
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
        const int64_t offset = (bk * Lk + j0 + j) * D;  // grad_k, grad_v: [B, H_kv, Lk, D]
        store_row<float>(p.grad_k, p.kind, offset, D, 1.0f, dk + j * Dp);
        store_row<float>(p.grad_v, p.kind, offset, D, 1.0f, dv + j * Dp);
      }
    }
    for (int64_t r = 0; r < R; ++r)
      store_row<float>(p.grad_q, p.kind, row_of[r] * D, D, static_cast<float>(p.scale), dq + r * Dp);
  }
}

}  // namespace detail
#pragma GCC diagnostic pop

}  // namespace mux
}  // namespace fastcore
#endif  // FC_ATTENTION_AVX512

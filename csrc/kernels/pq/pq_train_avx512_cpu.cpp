// AVX-512 bodies of the k-means assignment: the running-argmin scan of a GEMM's rows and the fused
// tile kernel (pq_train_cpu.cpp dispatches here).
#include <algorithm>
#include <cstdint>
#include <limits>

#include "pq/pq_cpu_internal.h"

#if FC_CPU_X86
#include <immintrin.h>

namespace fastcore {
namespace pq {
using namespace detail;  // the shared pieces of pq_cpu_internal.h

// GCC 12's AVX-512 headers start some results from a deliberately undefined register
// (_mm512_undefined_*), which -Wuninitialized / -Wmaybe-uninitialized report once inlined here; the
// values are never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int kFusedRows = 12;           // rows per register tile (24 accumulators + 2 centroid vectors + 1 x)
constexpr int64_t kFusedPanelRows = 48;  // rows sharing each loaded panel (4 tiles; the panel stays in L1)

// One 12 × 32 tile over all d, then the running-minimum update of its 12 rows (best / best_j: 16 lanes
// per row). rows[r] points at row r's x (tail tiles repeat the last row; its results are not used).
__attribute__((target("avx512f"))) inline void fused_tile(const float* const* rows, const float* panel,
                                                          const float* base, int64_t d, __m512 scale, __m512i j0,
                                                          float* best, int32_t* best_j) {
  __m512 acc[kFusedRows][2];
#pragma GCC unroll 12
  for (int r = 0; r < kFusedRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < d; ++t) {
    __m512 c0 = _mm512_loadu_ps(panel + t * 32), c1 = _mm512_loadu_ps(panel + t * 32 + 16);
    __asm__("" : "+v"(c0), "+v"(c1));  // loaded once, not folded into each of the 12 FMAs
#pragma GCC unroll 12
    for (int r = 0; r < kFusedRows; ++r) {
      const __m512 xv = _mm512_set1_ps(rows[r][t]);
      acc[r][0] = _mm512_fmadd_ps(xv, c0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, c1, acc[r][1]);
    }
  }
  const __m512 b0 = _mm512_loadu_ps(base), b1 = _mm512_loadu_ps(base + 16);
  const __m512i j1 = _mm512_add_epi32(j0, _mm512_set1_epi32(16));
#pragma GCC unroll 12
  for (int r = 0; r < kFusedRows; ++r) {
    __m512 bv = _mm512_loadu_ps(best + 16 * r);
    __m512i bj = _mm512_loadu_si512(best_j + 16 * r);
    const __m512 k0 = _mm512_fmadd_ps(scale, acc[r][0], b0), k1 = _mm512_fmadd_ps(scale, acc[r][1], b1);
    __mmask16 lt = _mm512_cmp_ps_mask(k0, bv, _CMP_LT_OQ);
    bv = _mm512_mask_mov_ps(bv, lt, k0);
    bj = _mm512_mask_mov_epi32(bj, lt, j0);
    lt = _mm512_cmp_ps_mask(k1, bv, _CMP_LT_OQ);
    bv = _mm512_mask_mov_ps(bv, lt, k1);
    bj = _mm512_mask_mov_epi32(bj, lt, j1);
    _mm512_storeu_ps(best + 16 * r, bv);
    _mm512_storeu_si512(best_j + 16 * r, bj);
  }
}

}  // namespace

namespace detail {

// Lane l keeps the smallest key (and its column) among columns j ≡ l (mod 16), updated in increasing j
// with a strict <, so each lane holds its lowest such column; the answer is the lowest column among
// the lanes holding the overall minimum. A row whose keys are all NaN or +inf gets column 0, as the
// scalar loop (which also starts from column 0).
__attribute__((target("avx512f"))) void assign_rows_avx512(const AssignParams& p, int64_t begin, int64_t end) {
  const int64_t k = p.k;
  const bool l2 = p.metric == Metric::kL2;
  const __m512 scale = _mm512_set1_ps(l2 ? -2.0f : -1.0f);
  const __m512i step = _mm512_set1_epi32(16);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t full = k / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - full)) - 1u);
  for (int64_t i = begin; i < end; ++i) {
    const float* g = p.gram + i * k;
    __m512 best = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    __m512i best_j = _mm512_setzero_si512();
    __m512i j = lanes;
    int64_t c = 0;
    for (; c < full; c += 16) {
      const __m512 base = l2 ? _mm512_loadu_ps(p.c_norms + c) : _mm512_setzero_ps();
      const __m512 v = _mm512_fmadd_ps(scale, _mm512_loadu_ps(g + c), base);
      const __mmask16 lt = _mm512_cmp_ps_mask(v, best, _CMP_LT_OQ);
      best = _mm512_mask_mov_ps(best, lt, v);
      best_j = _mm512_mask_mov_epi32(best_j, lt, j);
      j = _mm512_add_epi32(j, step);
    }
    if (tail) {
      const __m512 base = l2 ? _mm512_maskz_loadu_ps(tail, p.c_norms + c) : _mm512_setzero_ps();
      const __m512 v = _mm512_fmadd_ps(scale, _mm512_maskz_loadu_ps(tail, g + c), base);
      const __mmask16 lt = _mm512_mask_cmp_ps_mask(tail, v, best, _CMP_LT_OQ);
      best = _mm512_mask_mov_ps(best, lt, v);
      best_j = _mm512_mask_mov_epi32(best_j, lt, j);
    }
    const float low = _mm512_reduce_min_ps(best);
    const __mmask16 at_low = _mm512_cmp_ps_mask(best, _mm512_set1_ps(low), _CMP_EQ_OQ);
    const int64_t col =
        at_low ? _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), at_low, best_j)) : 0;
    assign_store(p, i, col, at_low ? low : assign_key(p, g, 0));
  }
}

__attribute__((target("avx512f"))) void assign_fused_avx512(const FusedAssignParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d, panels = (p.k + 31) / 32;
  const bool l2 = p.metric == Metric::kL2;
  const __m512 scale = _mm512_set1_ps(l2 ? -2.0f : -1.0f);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) float best[kFusedPanelRows * 16];
  alignas(64) int32_t best_j[kFusedPanelRows * 16];
  const float* rows[kFusedPanelRows];
  for (int64_t i0 = begin; i0 < end; i0 += kFusedPanelRows) {
    const int64_t count = std::min(kFusedPanelRows, end - i0);
    const int64_t tiles = (count + kFusedRows - 1) / kFusedRows;
    for (int64_t r = 0; r < tiles * kFusedRows; ++r) rows[r] = p.x + (i0 + std::min(r, count - 1)) * p.x_stride;
    for (int64_t e = 0; e < tiles * kFusedRows * 16; ++e) {
      best[e] = std::numeric_limits<float>::infinity();
      best_j[e] = 0;
    }
    for (int64_t pn = 0; pn < panels; ++pn) {
      const __m512i j0 = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(32 * pn)));
      for (int64_t tile = 0; tile < tiles; ++tile)
        fused_tile(rows + tile * kFusedRows, p.c_packed + pn * d * 32, p.base + 32 * pn, d, scale, j0,
                   best + tile * kFusedRows * 16, best_j + tile * kFusedRows * 16);
    }
    for (int64_t r = 0; r < count; ++r) {
      const __m512 bv = _mm512_load_ps(best + 16 * r);
      const float low = _mm512_reduce_min_ps(bv);
      const __mmask16 at_low = _mm512_cmp_ps_mask(bv, _mm512_set1_ps(low), _CMP_EQ_OQ);
      const __m512i bj = _mm512_load_si512(best_j + 16 * r);
      const int64_t col =
          at_low ? _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(_mm512_set1_epi32(INT32_MAX), at_low, bj)) : 0;
      const int64_t i = i0 + r;
      p.assign[i] = col;
      if (p.min_dist) {
        // a row whose keys are all +inf / NaN keeps column 0 and reports its key
        float key = low;
        if (!at_low) key = std::numeric_limits<float>::quiet_NaN();
        if (l2) {
          const float* x = p.x + i * p.x_stride;
          float norm = 0.0f;
          for (int64_t t = 0; t < d; ++t) norm += x[t] * x[t];
          p.min_dist[i] = std::max(0.0f, norm + key);
        } else {
          p.min_dist[i] = -key;
        }
      }
    }
  }
}

}  // namespace detail

#pragma GCC diagnostic pop
}  // namespace pq
}  // namespace fastcore
#endif  // FC_CPU_X86

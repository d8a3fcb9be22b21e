// CPU kernels of the pq family (math and contracts in pq.h).
//
// Tables/encode: per row and sub-space, the ksub partial sums live in a stack buffer and the loop over
// the dsub dimensions updates all ksub of them at once (contiguous, so it vectorises; FC_CPU_CLONES
// builds AVX-512/AVX2/SSE variants). ADC: several queries share each block of code rows (the codes are
// loaded once per block, the tables of the block's queries stay in L1/L2), and a bounded max-heap per
// query only sees rows that beat its current k-th best. Fast-scan: 16-entry uint8 tables looked up in
// registers with vpshufb (AVX2 / AVX-512BW, picked at run time), uint16 sums, SIMD threshold masks.
#include "pq/pq.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "fastcore/cpu_vector.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FC_PQ_X86 1
#include <immintrin.h>
#endif

namespace fastcore {
namespace pq {

// ---- distance tables / encode ---------------------------------------------------------------------

namespace {

template <typename T>
FC_CPU_CLONES void tables_rows(const TableParams<T>& p, int64_t begin, int64_t end) {
  const int64_t M = p.M, dsub = p.dsub, ksub = p.ksub;
  T buffer[256];
  for (int64_t i = begin; i < end; ++i) {
    const T* x = p.x + i * p.x_stride;
    for (int64_t m = 0; m < M; ++m) {
      T* acc = p.lut ? p.lut + (i * M + m) * ksub : buffer;
      for (int64_t j = 0; j < ksub; ++j) acc[j] = T(0);
      const T* ct = p.codebooks_t + m * dsub * ksub;
      if (p.metric == Metric::kL2) {
        for (int64_t t = 0; t < dsub; ++t) {
          const T xv = x[m * dsub + t];
          const T* row = ct + t * ksub;
          for (int64_t j = 0; j < ksub; ++j) {
            const T diff = xv - row[j];
            acc[j] += diff * diff;
          }
        }
      } else {
        for (int64_t t = 0; t < dsub; ++t) {
          const T xv = x[m * dsub + t];
          const T* row = ct + t * ksub;
          for (int64_t j = 0; j < ksub; ++j) acc[j] += xv * row[j];
        }
      }
      if (p.codes) {
        int64_t best = 0;
        T best_value = acc[0];
        for (int64_t j = 1; j < ksub; ++j)
          if (acc[j] < best_value) {  // strict: the lower j wins ties
            best_value = acc[j];
            best = j;
          }
        p.codes[i * M + m] = static_cast<uint8_t>(best);
      }
    }
  }
}

}  // namespace

void pq_tables_cpu(const TableParams<float>& p, int64_t begin, int64_t end) { tables_rows<float>(p, begin, end); }
void pq_tables_cpu(const TableParams<double>& p, int64_t begin, int64_t end) { tables_rows<double>(p, begin, end); }

// ---- float32 encode (GEMM form, SIMD argmin) ------------------------------------------------------

namespace {

// Rows are taken in blocks so that the block's slice of x stays in L2 while the sub-spaces are
// visited one by one (each sub-space's codebook, dsub·ksub floats, then stays in L1).
constexpr int64_t kEncodeRowBlock = 128;

// Any ksub ≤ 256: the ksub values ‖c‖² − 2⟨x, c⟩ in a stack buffer (vectorised by the target
// clones), then a scalar argmin (strict <: the lower j wins ties).
FC_CPU_CLONES void encode_rows_portable(const TableParams<float>& p, const float* c_norms, int64_t begin,
                                        int64_t end) {
  const int64_t M = p.M, dsub = p.dsub, ksub = p.ksub;
  float dist[256];
  for (int64_t i0 = begin; i0 < end; i0 += kEncodeRowBlock) {
    const int64_t i1 = std::min(end, i0 + kEncodeRowBlock);
    for (int64_t m = 0; m < M; ++m) {
      const float* ct = p.codebooks_t + m * dsub * ksub;
      const float* cn = c_norms + m * ksub;
      for (int64_t i = i0; i < i1; ++i) {
        const float* x = p.x + i * p.x_stride + m * dsub;
        for (int64_t j = 0; j < ksub; ++j) dist[j] = cn[j];
        for (int64_t t = 0; t < dsub; ++t) {
          const float xv = x[t];
          const float* row = ct + t * ksub;  // −2·C
          for (int64_t j = 0; j < ksub; ++j) dist[j] += xv * row[j];
        }
        int64_t best = 0;
        for (int64_t j = 1; j < ksub; ++j)
          if (dist[j] < dist[best]) best = j;
        p.codes[i * M + m] = static_cast<uint8_t>(best);
      }
    }
  }
}

#ifdef FC_PQ_X86
// GCC 12's AVX-512 headers start some results from a deliberately undefined register, which
// -Wmaybe-uninitialized reports once inlined (as in the fast-scan section below).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// ksub = 16·NV: the NV registers of 16 distances stay in registers through the dsub FMAs; the argmin
// is a tree of vminps, one horizontal min, and the first lane equal to it (lower j on ties).
template <int NV>
__attribute__((target("avx512f"))) void encode_rows_avx512(const TableParams<float>& p, const float* c_norms,
                                                            int64_t begin, int64_t end) {
  const int64_t M = p.M, dsub = p.dsub, ksub = 16 * NV;
  for (int64_t i0 = begin; i0 < end; i0 += kEncodeRowBlock) {
    const int64_t i1 = std::min(end, i0 + kEncodeRowBlock);
    for (int64_t m = 0; m < M; ++m) {
      const float* ct = p.codebooks_t + m * dsub * ksub;
      const float* cn = c_norms + m * ksub;
      for (int64_t i = i0; i < i1; ++i) {
        const float* x = p.x + i * p.x_stride + m * dsub;
        __m512 acc[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) acc[v] = _mm512_loadu_ps(cn + 16 * v);
        for (int64_t t = 0; t < dsub; ++t) {
          const __m512 xv = _mm512_set1_ps(x[t]);  // the rows hold −2·C
          const float* row = ct + t * ksub;
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(row + 16 * v), acc[v]);
        }
        __m512 low[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) low[v] = acc[v];
#pragma GCC unroll 4
        for (int step = 1; step < NV; step *= 2)
#pragma GCC unroll 16
          for (int v = 0; v + step < NV; v += 2 * step) low[v] = _mm512_min_ps(low[v], low[v + step]);
        const __m512 best = _mm512_set1_ps(_mm512_reduce_min_ps(low[0]));
        int code = 0;  // stays 0 when every distance is NaN
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          const uint32_t hit = _mm512_cmpeq_ps_mask(acc[v], best);
          if (hit) {
            code = 16 * v + __builtin_ctz(hit);
            break;
          }
        }
        p.codes[i * M + m] = static_cast<uint8_t>(code);
      }
    }
  }
}

// ksub = 256 (8-bit codes): the 16 registers of one row's distances leave no room to reuse a loaded
// codebook vector, so the loop above does one load per FMA. Here R rows share each load: the 256
// centroids are taken in two halves of 8 registers, R·8 accumulators (R = 3: 24 of the 32 registers)
// get one FMA per loaded vector per row. Each distance is accumulated in the same order as above
// (‖c‖², then t = 0..dsub−1), so the codes are the same; per row the half-minimum is taken at its
// first lane, and the second half wins only when strictly smaller (lower j on ties).
template <int R>
__attribute__((target("avx512f"))) inline void encode_group_256(const float* x, int64_t x_stride, const float* ct,
                                                                const float* cn, int64_t dsub, int* codes) {
  float best[R];
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    __m512 acc[R][8];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[r][v] = _mm512_loadu_ps(cn + 128 * h + 16 * v);
    for (int64_t t = 0; t < dsub; ++t) {
      const float* row = ct + t * 256 + 128 * h;
      __m512 xv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) xv[r] = _mm512_set1_ps(x[r * x_stride + t]);  // a broadcast load
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) {
        __m512 c = _mm512_loadu_ps(row + 16 * v);
        // Keep the vector in a register: GCC would otherwise fold the load into each of the R FMAs
        // (R loads per vector again, the load ports the limit).
        __asm__("" : "+v"(c));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][v] = _mm512_fmadd_ps(xv[r], c, acc[r][v]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 low = _mm512_min_ps(_mm512_min_ps(_mm512_min_ps(acc[r][0], acc[r][1]), _mm512_min_ps(acc[r][2], acc[r][3])),
                                       _mm512_min_ps(_mm512_min_ps(acc[r][4], acc[r][5]), _mm512_min_ps(acc[r][6], acc[r][7])));
      const float value = _mm512_reduce_min_ps(low);
      const __m512 target = _mm512_set1_ps(value);
      // The first lane equal to the minimum, without a data-dependent branch per register: the eight
      // 16-bit equality masks as two 64-bit words (0 when every distance is NaN).
      uint64_t lo = 0, hi = 0;
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        lo |= uint64_t(_mm512_cmpeq_ps_mask(acc[r][v], target)) << (16 * v);
        hi |= uint64_t(_mm512_cmpeq_ps_mask(acc[r][v + 4], target)) << (16 * v);
      }
      const int code = lo ? 128 * h + __builtin_ctzll(lo) : hi ? 128 * h + 64 + __builtin_ctzll(hi) : 0;
      if (h == 0 || value < best[r]) {
        best[r] = value;
        codes[r] = code;
      }
    }
  }
}

__attribute__((target("avx512f"))) void encode_rows_avx512_256(const TableParams<float>& p, const float* c_norms,
                                                               int64_t begin, int64_t end) {
  constexpr int R = 3;
  const int64_t M = p.M, dsub = p.dsub;
  int codes[R];
  for (int64_t i0 = begin; i0 < end; i0 += kEncodeRowBlock) {
    const int64_t i1 = std::min(end, i0 + kEncodeRowBlock);
    for (int64_t m = 0; m < M; ++m) {
      const float* ct = p.codebooks_t + m * dsub * 256;
      const float* cn = c_norms + m * 256;
      int64_t i = i0;
      for (; i + R <= i1; i += R) {
        encode_group_256<R>(p.x + i * p.x_stride + m * dsub, p.x_stride, ct, cn, dsub, codes);
        for (int r = 0; r < R; ++r) p.codes[(i + r) * M + m] = static_cast<uint8_t>(codes[r]);
      }
      for (; i < i1; ++i) {
        encode_group_256<1>(p.x + i * p.x_stride + m * dsub, p.x_stride, ct, cn, dsub, codes);
        p.codes[i * M + m] = static_cast<uint8_t>(codes[0]);
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// The SIMD kernel family of every CPU path here (encode, 8-bit scan, fast-scan): 3 = AVX-512 (F + BW),
// 2 = AVX2, 1 = portable; pq4_force_kernel picks a lower one for tests.
std::atomic<int> g_force{0};

int detected_kernel() {
#ifdef FC_PQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 3;
  if (__builtin_cpu_supports("avx2")) return 2;
#endif
  return 1;
}

int active_kernel() {
  static const int detected = detected_kernel();
  const int force = g_force.load();
  return (force >= 1 && force <= detected) ? force : detected;
}

}  // namespace

void pq_encode_cpu(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end) {
#ifdef FC_PQ_X86
  if (active_kernel() == 3) {
    if (p.ksub == 256) return encode_rows_avx512_256(p, c_norms, begin, end);
    if (p.ksub == 16) return encode_rows_avx512<1>(p, c_norms, begin, end);
  }
#endif
  encode_rows_portable(p, c_norms, begin, end);
}

// ---- k-means assignment ---------------------------------------------------------------------------

namespace {

// Key of column j (smaller is better): l2 ‖c_j‖² − 2G (one rounding; the FMA form is the same, 2G is
// exact), ip −G.
inline float assign_key(const AssignParams& p, const float* g, int64_t j) {
  return p.metric == Metric::kL2 ? p.c_norms[j] - 2.0f * g[j] : -g[j];
}

inline void assign_store(const AssignParams& p, int64_t i, int64_t best, float best_key) {
  p.assign[i] = best;
  if (p.min_dist)
    p.min_dist[i] = p.metric == Metric::kL2 ? std::max(0.0f, p.x_norms[i] + best_key) : -best_key;
}

void assign_rows_portable(const AssignParams& p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float* g = p.gram + i * p.k;
    int64_t best = 0;
    float best_key = assign_key(p, g, 0);
    for (int64_t j = 1; j < p.k; ++j) {
      const float v = assign_key(p, g, j);
      if (v < best_key) {  // strict: the lower j wins ties
        best_key = v;
        best = j;
      }
    }
    assign_store(p, i, best, best_key);
  }
}

#ifdef FC_PQ_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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
#pragma GCC diagnostic pop
#endif

}  // namespace

void pq_assign_cpu(const AssignParams& p, int64_t begin, int64_t end) {
#ifdef FC_PQ_X86
  if (active_kernel() == 3 && p.k <= INT32_MAX) return assign_rows_avx512(p, begin, end);
#endif
  assign_rows_portable(p, begin, end);
}

// ---- fused k-means / IVF assignment ----------------------------------------------------------------

namespace {

constexpr int kFusedRows = 12;   // rows per register tile (24 accumulators + 2 centroid vectors + 1 x)
constexpr int64_t kFusedPanelRows = 48;  // rows sharing each loaded panel (4 tiles; the panel stays in L1)

#ifdef FC_PQ_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// One 12 × 32 tile over all d, then the running-minimum update of its 12 rows (best / best_j: 16 lanes
// per row). rows[r] points at row r's x (tail tiles repeat the last row; its results are not used).
__attribute__((target("avx512f"))) inline void fused_tile(const float* const* rows, const float* panel,
                                                          const float* base, int64_t d, __m512 scale,
                                                          __m512i j0, float* best, int32_t* best_j) {
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
#pragma GCC diagnostic pop
#endif

}  // namespace

bool pq_assign_fused_available() {
#ifdef FC_PQ_X86
  return active_kernel() == 3;
#else
  return false;
#endif
}

void pq_assign_fused_cpu(const FusedAssignParams& p, int64_t begin, int64_t end) {
#ifdef FC_PQ_X86
  if (active_kernel() == 3 && p.k <= INT32_MAX - 64) assign_fused_avx512(p, begin, end);
#else
  (void)p;
  (void)begin;
  (void)end;
#endif
}

// ---- top columns per row (IVF probe lists) ---------------------------------------------------------

namespace {

// A NaN ranks below every number (it never displaces one).
inline float rank_value(float v) { return v == v ? v : -std::numeric_limits<float>::infinity(); }

// (v, j) into the descending list vals/cols of n entries (cap at most; when full the last one is
// dropped). Columns arrive in increasing order, so a value equal to one held goes behind it: the lower
// column first among equal values.
inline void insert_descending(float* vals, int64_t* cols, int64_t& n, int64_t cap, float v, int64_t j) {
  int64_t pos = n < cap ? n++ : cap - 1;
  for (; pos > 0 && vals[pos - 1] < v; --pos) {
    vals[pos] = vals[pos - 1];
    cols[pos] = cols[pos - 1];
  }
  vals[pos] = v;
  cols[pos] = j;
}

// The first `count` columns fill the list; later columns (from j on) enter only when strictly above its
// last value.
void top_columns_fill(const float* row, int64_t count, float* vals, int64_t* cols) {
  int64_t n = 0;
  for (int64_t j = 0; j < count; ++j) insert_descending(vals, cols, n, count, rank_value(row[j]), j);
}

void top_columns_tail(const float* row, int64_t j, int64_t L, int64_t count, float* vals, int64_t* cols) {
  int64_t n = count;
  for (; j < L; ++j)
    if (row[j] > vals[count - 1]) insert_descending(vals, cols, n, count, row[j], j);  // NaN > x is false
}

#ifdef FC_PQ_X86
// 16 columns per compare against the current limit; only the (rare, once the list holds good values)
// columns above it are inserted one by one.
__attribute__((target("avx512f"))) int64_t top_columns_avx512(const float* row, int64_t j, int64_t L, int64_t count,
                                                              float* vals, int64_t* cols) {
  int64_t n = count;
  for (; j + 16 <= L; j += 16) {
    uint32_t above = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), _mm512_set1_ps(vals[count - 1]), _CMP_GT_OQ);
    while (above) {
      const int lane = __builtin_ctz(above);
      above &= above - 1;
      if (row[j + lane] > vals[count - 1]) insert_descending(vals, cols, n, count, row[j + lane], j + lane);
    }
  }
  return j;
}
#endif

}  // namespace

void pq_top_columns_cpu(const TopColumnsParams& p, int64_t begin, int64_t end) {
  std::vector<float> vals(static_cast<size_t>(p.count));
#ifdef FC_PQ_X86
  const bool simd = active_kernel() == 3;
#endif
  for (int64_t i = begin; i < end; ++i) {
    const float* row = p.scores + i * p.ld;
    int64_t* cols = p.out + i * p.count;
    top_columns_fill(row, p.count, vals.data(), cols);
    int64_t j = p.count;
#ifdef FC_PQ_X86
    if (simd) j = top_columns_avx512(row, j, p.L, p.count, vals.data(), cols);
#endif
    top_columns_tail(row, j, p.L, p.count, vals.data(), cols);
  }
}

// ---- k-means centroid sums ------------------------------------------------------------------------

void pq_centroid_sums_cpu(const CentroidSumParams& p, int64_t col_begin, int64_t col_end) {
  const int64_t M = p.M, dsub = p.dsub, ksub = p.ksub;
  if (col_begin >= col_end) return;
  const int64_t m_begin = col_begin / dsub, m_end = (col_end - 1) / dsub + 1;
  for (int64_t i = 0; i < p.n; ++i) {
    const float* x = p.x + i * p.x_stride;
    for (int64_t m = m_begin; m < m_end; ++m) {
      const int64_t code = p.codes8 ? int64_t(p.codes8[i * M + m]) : p.codes64[i * M + m];
      const int64_t t0 = std::max<int64_t>(col_begin - m * dsub, 0), t1 = std::min<int64_t>(col_end - m * dsub, dsub);
      double* dst = p.sums + (m * ksub + code) * dsub;
      const float* src = x + m * dsub;
      for (int64_t t = t0; t < t1; ++t) dst[t] += static_cast<double>(src[t]);
      if (t0 == 0 && p.counts) ++p.counts[m * ksub + code];
    }
  }
}

void pq_code_counts_cpu(const CentroidSumParams& p) {
  const int64_t M = p.M, ksub = p.ksub;
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t m = 0; m < M; ++m)
      ++p.counts[m * ksub + (p.codes8 ? int64_t(p.codes8[i * M + m]) : p.codes64[i * M + m])];
}

void pq_centroid_means_cpu(const CentroidMeanParams& p, int64_t col_begin, int64_t col_end) {
  const int64_t dsub = p.dsub, ksub = p.ksub;
  if (col_begin >= col_end) return;
  for (int64_t m = col_begin / dsub; m <= (col_end - 1) / dsub; ++m) {
    const int64_t t0 = std::max<int64_t>(col_begin - m * dsub, 0), t1 = std::min<int64_t>(col_end - m * dsub, dsub);
    for (int64_t j = 0; j < ksub; ++j) {
      const int64_t count = p.counts[m * ksub + j];
      const int64_t row = (m * ksub + j) * dsub;
      for (int64_t t = t0; t < t1; ++t) {
        const double v = count > 0 ? p.sums[row + t] / static_cast<double>(count) : static_cast<double>(p.old[row + t]);
        p.new64[row + t] = v;
        p.new32[row + t] = static_cast<float>(v);
      }
    }
  }
}

// ---- bounded top-k heap ---------------------------------------------------------------------------

namespace {

// Max-heap of the k best (key, id) seen so far: the root is the worst kept pair, so a candidate is
// kept iff it is better than the root (or the heap is not full). Total order: key, then id.
template <typename K>
struct TopK {
  K* keys;
  int64_t* ids;
  int64_t k;
  int64_t size = 0;

  static bool worse(K ka, int64_t ia, K kb, int64_t ib) { return ka > kb || (ka == kb && ia > ib); }
  bool full() const { return size == k; }

  void push(K key, int64_t id) {
    if (size < k) {
      int64_t i = size++;
      while (i > 0) {
        const int64_t parent = (i - 1) / 2;
        if (!worse(key, id, keys[parent], ids[parent])) break;
        keys[i] = keys[parent];
        ids[i] = ids[parent];
        i = parent;
      }
      keys[i] = key;
      ids[i] = id;
      return;
    }
    if (!worse(keys[0], ids[0], key, id)) return;
    int64_t i = 0;
    for (;;) {
      const int64_t l = 2 * i + 1, r = l + 1;
      if (l >= k) break;
      int64_t child = l;
      if (r < k && worse(keys[r], ids[r], keys[l], ids[l])) child = r;
      if (!worse(keys[child], ids[child], key, id)) break;
      keys[i] = keys[child];
      ids[i] = ids[child];
      i = child;
    }
    keys[i] = key;
    ids[i] = id;
  }

  // Sorted best first into (dist, ids); padding id −1, key +inf. to_dist maps a key to the output.
  template <typename F>
  void write_sorted(float* out_dist, int64_t* out_ids, F to_dist) {
    std::vector<std::pair<K, int64_t>> items(static_cast<size_t>(size));
    for (int64_t i = 0; i < size; ++i) items[i] = {keys[i], ids[i]};
    std::sort(items.begin(), items.end());
    for (int64_t i = 0; i < size; ++i) {
      out_dist[i] = to_dist(items[i].first);
      out_ids[i] = items[i].second;
    }
    for (int64_t i = size; i < k; ++i) {
      out_dist[i] = to_dist_pad(to_dist);
      out_ids[i] = -1;
    }
  }
  template <typename F>
  static float to_dist_pad(F to_dist) { return to_dist(std::numeric_limits<K>::has_infinity ? std::numeric_limits<K>::infinity() : std::numeric_limits<K>::max()); }
};

inline float key_to_dist(Metric metric, float key) { return metric == Metric::kIP ? -key : key; }

constexpr int64_t kQueryBlock = 8;  // queries sharing one block of code rows
constexpr int64_t kRowBlock = 128;  // code rows per block (≤ 128·M bytes, stays in L1)

// dist[r] = Σ_m lut[m·ksub + codes[r·M + m]] for rows 0..count−1; four rows at a time so the four
// gather-add chains run in parallel.
inline void adc_rows(const float* lut, const uint8_t* codes, int64_t M, int64_t ksub, int64_t count, float* dist) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const uint8_t* c0 = codes + r * M;
    const uint8_t* c1 = c0 + M;
    const uint8_t* c2 = c1 + M;
    const uint8_t* c3 = c2 + M;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float* t = lut + m * ksub;
      s0 += t[c0[m]];
      s1 += t[c1[m]];
      s2 += t[c2[m]];
      s3 += t[c3[m]];
    }
    dist[r] = s0;
    dist[r + 1] = s1;
    dist[r + 2] = s2;
    dist[r + 3] = s3;
  }
  for (; r < count; ++r) {
    const uint8_t* c = codes + r * M;
    float s = 0.f;
    for (int64_t m = 0; m < M; ++m) s += lut[m * ksub + c[m]];
    dist[r] = s;
  }
}

#ifdef FC_PQ_X86
// GCC 12's AVX-512 headers start some results from an undefined register (see the encode section).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
constexpr int kWideQueries = 16;  // queries per pass of the AVX-512 8-bit scans (one float lane each)

// Interleaved tables, entries·16 floats, 64-byte aligned (one aligned vector per entry).
struct AlignedTables {
  std::vector<float> storage;
  float* data;
  explicit AlignedTables(int64_t entries) : storage(static_cast<size_t>(entries * kWideQueries + 16)) {
    data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
  }
  AlignedTables(const AlignedTables&) = delete;  // `data` points into `storage`
  AlignedTables& operator=(const AlignedTables&) = delete;
};

// The tables of up to 16 queries (ascending) interleaved: lut_t[e·16 + j] = lut[q_j, e] (+ terms[e],
// a list's table, when given); lanes j ≥ count hold 0 (or terms[e]) and are never read. The code
// byte of (row, m) then selects one 64-byte vector holding entry (m, code) for all of them.
__attribute__((target("avx512f"))) void gather_tables(const ScanParams& p, const int64_t* queries, int count,
                                                      const float* terms, float* lut_t) {
  const int64_t entries = p.M * p.ksub;
  // queries[] ascends (visits are sorted), so the offsets from the first query's table fit int32
  // unless the group spans 2^31 floats; then plain loads.
  const float* base = p.lut + queries[0] * entries;
  if ((queries[count - 1] - queries[0] + 1) * entries >= (int64_t(1) << 31)) {
    for (int64_t e = 0; e < entries; ++e)
      for (int j = 0; j < kWideQueries; ++j)
        lut_t[e * kWideQueries + j] = j < count ? p.lut[queries[j] * entries + e] + (terms ? terms[e] : 0.0f) : 0.0f;
    return;
  }
  // 16 entries at a time: the 16 queries' rows of 16 consecutive entries, transposed in registers
  // (32-bit and 64-bit unpacks within 128-bit lanes, then two rounds of 128-bit lane shuffles: 64
  // shuffles per 256 floats, far cheaper than 16 gathers). Rows j ≥ count are zero.
  int64_t e0 = 0;
  for (; e0 + 16 <= entries; e0 += 16) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = j < count ? _mm512_loadu_ps(p.lut + queries[j] * entries + e0) : _mm512_setzero_ps();
    __m512 t[16], u[16];
    for (int j = 0; j < 16; j += 2) {
      t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);      // lane L: r_j[4L], r_j+1[4L], r_j[4L+1], r_j+1[4L+1]
      t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);  // lane L: the same for 4L+2, 4L+3
    }
    for (int g = 0; g < 4; ++g) {  // u[4g + c], lane L: rows 4g..4g+3 of entry 4L + c
      const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
      const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
      u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
      u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int c = 0; c < 4; ++c) {  // entry 4L + c = lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
      const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);
      const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
      const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
      __m512 out[4] = {_mm512_shuffle_f32x4(v0, v2, 0x88), _mm512_shuffle_f32x4(v0, v2, 0xdd),
                       _mm512_shuffle_f32x4(v1, v3, 0x88), _mm512_shuffle_f32x4(v1, v3, 0xdd)};
      for (int L = 0; L < 4; ++L) {
        const int64_t e = e0 + 4 * L + c;
        if (terms) out[L] = _mm512_add_ps(out[L], _mm512_set1_ps(terms[e]));  // lanes ≥ count are never read
        _mm512_store_ps(lut_t + e * kWideQueries, out[L]);
      }
    }
  }
  alignas(64) int32_t offsets[kWideQueries];
  for (int j = 0; j < kWideQueries; ++j)
    offsets[j] = static_cast<int32_t>(j < count ? (queries[j] - queries[0]) * entries : 0);
  const __m512i index = _mm512_load_si512(offsets);
  const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1u);
  for (int64_t e = e0; e < entries; ++e) {
    __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, index, base + e, 4);
    if (terms) v = _mm512_maskz_add_ps(lanes, v, _mm512_set1_ps(terms[e]));
    _mm512_store_ps(lut_t + e * kWideQueries, v);
  }
}

// The 16-query sums of rows [begin, end) of `codes` ([rows, M] bytes) against the interleaved tables lut_t
// ([M][ksub][16]: entry (m, c) holds the 16 queries' table values), four rows at a time so four independent
// add chains hide the load latency; each row's 16 sums go to offer(sums, row). Shared by the flat and the
// IVF list scans, which differ only in what offer does with a row.
template <typename Offer>
__attribute__((target("avx512f"))) inline void sum_rows_16_queries(const uint8_t* codes, int64_t M, int64_t ksub,
                                                                   const float* lut_t, int64_t begin, int64_t end,
                                                                   Offer& offer) {
  int64_t r = begin;
  for (; r + 4 <= end; r += 4) {
    const uint8_t* c0 = codes + r * M;
    const uint8_t* c1 = c0 + M;
    const uint8_t* c2 = c1 + M;
    const uint8_t* c3 = c2 + M;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t m = 0; m < M; ++m) {
      const float* t = lut_t + m * ksub * kWideQueries;
      s0 = _mm512_add_ps(s0, _mm512_load_ps(t + c0[m] * kWideQueries));
      s1 = _mm512_add_ps(s1, _mm512_load_ps(t + c1[m] * kWideQueries));
      s2 = _mm512_add_ps(s2, _mm512_load_ps(t + c2[m] * kWideQueries));
      s3 = _mm512_add_ps(s3, _mm512_load_ps(t + c3[m] * kWideQueries));
    }
    offer(s0, r);
    offer(s1, r + 1);
    offer(s2, r + 2);
    offer(s3, r + 3);
  }
  for (; r < end; ++r) {
    const uint8_t* c = codes + r * M;
    __m512 s = _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) s = _mm512_add_ps(s, _mm512_load_ps(lut_t + (m * ksub + c[m]) * kWideQueries));
    offer(s, r);
  }
}

// 8-bit flat ADC for 16 queries at once: per (row, m) one load + one add serve the 16 queries (cross-
// query code reuse: each code byte is read once for all of them). Every lane sums its M entries in m
// order starting from 0, like the scalar loop, so the distances are the same bits. Four rows are in
// flight at a time (four independent add chains). A row's 16 keys are compared with the 16 heap roots
// in one instruction; only lanes that beat their root (or whose heap is not yet full) touch a heap.
// Rows arrive in increasing id order, so an equal key never beats the root: strict test.
__attribute__((target("avx512f"))) void scan_flat_avx512(const ScanParams& p, const float* lut_t, int qn,
                                                         int64_t row_begin, int64_t row_end, TopK<float>* heaps) {
  const int64_t M = p.M, ksub = p.ksub;
  const bool ip = p.metric == Metric::kIP;
  const __mmask16 lanes = static_cast<__mmask16>((1u << qn) - 1u);
  alignas(64) float roots[kWideQueries];
  uint32_t not_full = 0;
  auto refresh = [&](int j) {
    roots[j] = heaps[j].full() ? heaps[j].keys[0] : std::numeric_limits<float>::infinity();
    not_full = heaps[j].full() ? (not_full & ~(1u << j)) : (not_full | (1u << j));
  };
  for (int j = 0; j < qn; ++j) refresh(j);
  for (int j = qn; j < kWideQueries; ++j) roots[j] = 0.0f;
  __m512 limit = _mm512_load_ps(roots);
  const __m512 sign = _mm512_set1_ps(ip ? -0.0f : 0.0f);
  alignas(64) float keys[kWideQueries];
  auto offer = [&](__m512 sum, int64_t row) __attribute__((target("avx512f"))) {
    const __m512 key = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sum), _mm512_castps_si512(sign)));
    uint32_t mask = (_mm512_cmp_ps_mask(key, limit, _CMP_LT_OQ) | not_full) & lanes;
    if (!mask) return;
    _mm512_store_ps(keys, key);
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      heaps[j].push(keys[j], row);
      refresh(j);
    }
    limit = _mm512_load_ps(roots);
  };
  sum_rows_16_queries(p.codes, M, ksub, lut_t, row_begin, row_end, offer);
}
#pragma GCC diagnostic pop
#endif

}  // namespace

void pq_scan_flat_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end,
                      float* out_dist, int64_t* out_ids, int64_t ld) {
  const int64_t M = p.M, ksub = p.ksub, k = p.k;
  const bool ip = p.metric == Metric::kIP;
#ifdef FC_PQ_X86
  if (active_kernel() == 3) {
    AlignedTables lut_t(M * ksub);
    std::vector<float> keys(static_cast<size_t>(kWideQueries * k));
    std::vector<int64_t> ids(static_cast<size_t>(kWideQueries * k));
    for (int64_t q0 = q_begin; q0 < q_end; q0 += kWideQueries) {
      const int qn = static_cast<int>(std::min<int64_t>(kWideQueries, q_end - q0));
      int64_t queries[kWideQueries];
      for (int j = 0; j < qn; ++j) queries[j] = q0 + j;
      gather_tables(p, queries, qn, nullptr, lut_t.data);
      std::vector<TopK<float>> heaps;
      for (int j = 0; j < qn; ++j) heaps.push_back(TopK<float>{keys.data() + j * k, ids.data() + j * k, k});
      scan_flat_avx512(p, lut_t.data, qn, row_begin, row_end, heaps.data());
      for (int j = 0; j < qn; ++j)
        heaps[j].write_sorted(out_dist + (q0 + j) * ld, out_ids + (q0 + j) * ld,
                              [&](float key) { return key_to_dist(p.metric, key); });
    }
    return;
  }
#endif
  std::vector<float> keys(static_cast<size_t>(kQueryBlock * k));
  std::vector<int64_t> ids(static_cast<size_t>(kQueryBlock * k));
  float dist[kRowBlock];
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kQueryBlock) {
    const int64_t qn = std::min(kQueryBlock, q_end - q0);
    std::vector<TopK<float>> heaps;
    for (int64_t j = 0; j < qn; ++j) heaps.push_back(TopK<float>{keys.data() + j * k, ids.data() + j * k, k});
    for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
      const int64_t count = std::min(kRowBlock, row_end - r0);
      const uint8_t* codes = p.codes + r0 * M;
      for (int64_t j = 0; j < qn; ++j) {
        adc_rows(p.lut + (q0 + j) * M * ksub, codes, M, ksub, count, dist);
        TopK<float>& heap = heaps[j];
        for (int64_t r = 0; r < count; ++r) {
          const float key = ip ? -dist[r] : dist[r];
          // Rows arrive in increasing id order, so an equal key never beats the root: strict test.
          if (!heap.full() || key < heap.keys[0]) heap.push(key, r0 + r);
        }
      }
    }
    for (int64_t j = 0; j < qn; ++j)
      heaps[j].write_sorted(out_dist + (q0 + j) * ld, out_ids + (q0 + j) * ld,
                            [&](float key) { return key_to_dist(p.metric, key); });
  }
}

#ifdef FC_PQ_X86
// GCC 12's AVX-512 headers start some results from an undefined register (see the encode section).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

// One inverted list for up to 16 (query, list) visits (lanes): as scan_flat_avx512 plus the per-lane
// bias (dist = bias + Σ_m table entries, the sum in m order from 0: the scalar path's arithmetic).
// Ids are not monotone across lists: candidates with a key equal to the root's are looked at too and
// the heap's (key, id) order decides.
__attribute__((target("avx512f"))) void scan_list_avx512(const ScanParams& p, const float* lut_t, int64_t list,
                                                         int count, const float* bias_lanes, TopK<float>* const* heaps) {
  const int64_t M = p.M, ksub = p.ksub;
  const bool ip = p.metric == Metric::kIP;
  const uint32_t lanes = (1u << count) - 1u;
  alignas(64) float roots[kWideQueries];
  uint32_t not_full = 0;
  auto refresh = [&](int j) {
    roots[j] = heaps[j]->full() ? heaps[j]->keys[0] : std::numeric_limits<float>::infinity();
    not_full = heaps[j]->full() ? (not_full & ~(1u << j)) : (not_full | (1u << j));
  };
  for (int j = 0; j < kWideQueries; ++j) {
    if (j < count) refresh(j);
    else roots[j] = 0.0f;
  }
  __m512 limit = _mm512_load_ps(roots);
  const __m512 bias = _mm512_load_ps(bias_lanes);
  const __m512 sign = _mm512_set1_ps(ip ? -0.0f : 0.0f);
  alignas(64) float keys[kWideQueries];
  auto offer = [&](__m512 sum, int64_t row) __attribute__((target("avx512f"))) {
    const __m512 d = _mm512_add_ps(bias, sum);
    const __m512 key = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(d), _mm512_castps_si512(sign)));
    uint32_t mask = (_mm512_cmp_ps_mask(key, limit, _CMP_LE_OQ) | not_full) & lanes;
    if (!mask) return;
    _mm512_store_ps(keys, key);
    const int64_t id = p.ids ? p.ids[row] : row;
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      TopK<float>& heap = *heaps[j];
      if (!heap.full() || TopK<float>::worse(heap.keys[0], heap.ids[0], keys[j], id)) {
        heap.push(keys[j], id);
        refresh(j);
      }
    }
    limit = _mm512_load_ps(roots);
  };
  const int64_t begin = p.list_offsets[list], end = p.list_offsets[list + 1];
  sum_rows_16_queries(p.codes, M, ksub, lut_t, begin, end, offer);
}

// The probes of queries [q_begin, q_end) inverted (sorted by list), then every list is scanned once
// per 16 of its visits: the visiting queries' tables (+ the list's table) are interleaved by gathers
// and each code byte serves all of them.
int64_t scan_ivf_grouped_avx512(const ScanParams& p, int64_t q_begin, int64_t q_end) {
  const int64_t M = p.M, ksub = p.ksub, k = p.k, nprobe = p.nprobe, nq = q_end - q_begin;
  int64_t bad = 0;
  // (phase · nlist + list, q·nprobe + probe slot): phase 0 holds every query's best list (slot 0),
  // which fills its heap with good candidates early (a tight threshold for the rest), phase 1 the others.
  std::vector<std::pair<int64_t, int64_t>> visits;
  visits.reserve(static_cast<size_t>(nq * nprobe));
  for (int64_t slot = q_begin * nprobe; slot < q_end * nprobe; ++slot) {
    const int64_t list = p.probes[slot];
    if (list == -1) continue;
    if (list < 0 || list >= p.nlist) {
      ++bad;
      continue;
    }
    if (p.list_offsets[list] < p.list_offsets[list + 1]) visits.push_back({(slot % nprobe > 0) * p.nlist + list, slot});
  }
  std::sort(visits.begin(), visits.end());
  std::vector<float> keys(static_cast<size_t>(nq * k));
  std::vector<int64_t> ids(static_cast<size_t>(nq * k));
  std::vector<TopK<float>> heaps;
  heaps.reserve(static_cast<size_t>(nq));
  for (int64_t j = 0; j < nq; ++j) heaps.push_back(TopK<float>{keys.data() + j * k, ids.data() + j * k, k});
  AlignedTables tables(M * ksub);
  float* lut_t = tables.data;
  alignas(64) float bias_lanes[kWideQueries];
  int64_t queries[kWideQueries];
  TopK<float>* lane_heaps[kWideQueries];
  for (size_t i = 0; i < visits.size();) {
    const int64_t bucket = visits[i].first, list = bucket % p.nlist;
    int count = 0;
    for (; i < visits.size() && visits[i].first == bucket && count < kWideQueries; ++i, ++count) {
      const int64_t slot = visits[i].second, q = slot / nprobe;
      queries[count] = q;
      bias_lanes[count] = p.bias ? p.bias[slot] : 0.0f;
      lane_heaps[count] = &heaps[q - q_begin];
    }
    for (int j = count; j < kWideQueries; ++j) bias_lanes[j] = 0.0f;
    gather_tables(p, queries, count, p.list_terms ? p.list_terms + list * M * ksub : nullptr, lut_t);
    scan_list_avx512(p, lut_t, list, count, bias_lanes, lane_heaps);
  }
  for (int64_t q = q_begin; q < q_end; ++q)
    heaps[q - q_begin].write_sorted(p.out_dist + q * k, p.out_ids + q * k,
                                    [&](float key) { return key_to_dist(p.metric, key); });
  return bad;
}

}  // namespace
#pragma GCC diagnostic pop
#endif

int64_t pq_scan_ivf_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end) {
#ifdef FC_PQ_X86
  if (active_kernel() == 3 && !p.lut_per_probe) return scan_ivf_grouped_avx512(p, q_begin, q_end);
#endif
  const int64_t M = p.M, ksub = p.ksub, k = p.k;
  const bool ip = p.metric == Metric::kIP;
  std::vector<float> keys(static_cast<size_t>(k));
  std::vector<int64_t> ids(static_cast<size_t>(k));
  std::vector<float> table(p.list_terms ? static_cast<size_t>(M * ksub) : 0);
  float dist[kRowBlock];
  int64_t bad = 0;
  for (int64_t q = q_begin; q < q_end; ++q) {
    TopK<float> heap{keys.data(), ids.data(), k};
    for (int64_t j = 0; j < p.nprobe; ++j) {
      const int64_t list = p.probes[q * p.nprobe + j];
      if (list == -1) continue;
      if (list < 0 || list >= p.nlist) {
        ++bad;
        continue;
      }
      const float* lut = p.lut + (p.lut_per_probe ? (q * p.nprobe + j) : q) * M * ksub;
      if (p.list_terms) {  // the table of (q, list): lut[q] + list_terms[list]
        const float* terms = p.list_terms + list * M * ksub;
        for (int64_t e = 0; e < M * ksub; ++e) table[e] = lut[e] + terms[e];
        lut = table.data();
      }
      const float bias = p.bias ? p.bias[q * p.nprobe + j] : 0.0f;
      const int64_t begin = p.list_offsets[list], end = p.list_offsets[list + 1];
      for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
        const int64_t count = std::min(kRowBlock, end - r0);
        adc_rows(lut, p.codes + r0 * M, M, ksub, count, dist);
        for (int64_t r = 0; r < count; ++r) {
          const float d = bias + dist[r];
          const float key = ip ? -d : d;
          const int64_t id = p.ids ? p.ids[r0 + r] : r0 + r;
          if (!heap.full() || TopK<float>::worse(heap.keys[0], heap.ids[0], key, id)) heap.push(key, id);
        }
      }
    }
    heap.write_sorted(p.out_dist + q * k, p.out_ids + q * k, [&](float key) { return key_to_dist(p.metric, key); });
  }
  return bad;
}

void pq_merge_topk_cpu(const float* part_dist, const int64_t* part_ids, int64_t parts, int64_t k, Metric metric,
                       int64_t q_begin, int64_t q_end, float* out_dist, int64_t* out_ids) {
  std::vector<float> keys(static_cast<size_t>(k));
  std::vector<int64_t> ids(static_cast<size_t>(k));
  for (int64_t q = q_begin; q < q_end; ++q) {
    TopK<float> heap{keys.data(), ids.data(), k};
    for (int64_t i = 0; i < parts * k; ++i) {
      const int64_t id = part_ids[q * parts * k + i];
      if (id < 0) continue;
      const float d = part_dist[q * parts * k + i];
      heap.push(metric == Metric::kIP ? -d : d, id);
    }
    heap.write_sorted(out_dist + q * k, out_ids + q * k, [&](float key) { return key_to_dist(metric, key); });
  }
}

// ---- 4-bit fast-scan --------------------------------------------------------------------------------

namespace {

// Per sub-quantizer m: lo_m = min_c key[m, c], span_m = max − min, key = lut (l2) or −lut (ip);
// a = 255 / max_m span_m maps the widest table onto 0..255 (1 when every table is flat), so every
// entry fits a byte and Σ_m ≤ 255·M < 2^16; offset = Σ_m lo_m (summed in m order).
void quantize_lut_portable(const float* lut, int64_t M, float sign, uint8_t* qlut, float* scale, float* offset) {
  const int64_t pairs = (M + 1) / 2;
  float mins[256];
  float max_span = 0.0f, total_min = 0.0f;
  for (int64_t m = 0; m < M; ++m) {
    float lo = sign * lut[m * 16], hi = lo;
    for (int64_t c = 1; c < 16; ++c) {
      const float v = sign * lut[m * 16 + c];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    mins[m] = lo;
    total_min += lo;
    max_span = std::max(max_span, hi - lo);
  }
  const float a = max_span > 0.0f ? 255.0f / max_span : 1.0f;
  for (int64_t i = 0; i < pairs * 32; ++i) qlut[i] = 0;
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* out = qlut + (m / 2) * 32 + (m % 2) * 16;
    for (int64_t c = 0; c < 16; ++c) {
      // floor(x + 0.5) clamped to [0, 255]: on the clamped value floor is the truncating conversion
      // (no libm call; a NaN clamps to 0 either way)
      const float v = std::min(255.0f, std::max(0.0f, (sign * lut[m * 16 + c] - mins[m]) * a + 0.5f));
      out[c] = static_cast<uint8_t>(static_cast<int>(v));
    }
  }
  *scale = a;
  *offset = total_min;
}

#ifdef FC_PQ_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's avx512fintrin pass-through operands
// The same bytes as the portable loop: one 16-entry table is one register; the arithmetic is the same
// sequence of separately rounded operations (the *_round_ps forms cannot be contracted into an FMA).
__attribute__((target("avx512f,avx512bw"))) void quantize_lut_avx512(const float* lut, int64_t M, float sign,
                                                                     uint8_t* qlut, float* scale, float* offset) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t pairs = (M + 1) / 2;
  const __m512 s = _mm512_set1_ps(sign);
  float mins[256];
  float max_span = 0.0f, total_min = 0.0f;
  for (int64_t m = 0; m < M; ++m) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(lut + m * 16), s);  // exact: sign is ±1
    const float lo = _mm512_reduce_min_ps(v), hi = _mm512_reduce_max_ps(v);
    mins[m] = lo;
    total_min += lo;
    max_span = std::max(max_span, hi - lo);
  }
  const float a = max_span > 0.0f ? 255.0f / max_span : 1.0f;
  const __m512 va = _mm512_set1_ps(a), half = _mm512_set1_ps(0.5f), zero = _mm512_setzero_ps(),
               top = _mm512_set1_ps(255.0f);
  for (int64_t m = 0; m < M; ++m) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(lut + m * 16), s);
    __m512 x = _mm512_mul_round_ps(_mm512_sub_round_ps(v, _mm512_set1_ps(mins[m]), kRound), va, kRound);
    x = _mm512_add_round_ps(x, half, kRound);
    x = _mm512_min_ps(top, _mm512_max_ps(x, zero));  // max_ps(NaN, 0) = 0, as std::max(0, NaN)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qlut + (m / 2) * 32 + (m % 2) * 16),
                     _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(x)));
  }
  if (M % 2) std::fill(qlut + (pairs - 1) * 32 + 16, qlut + pairs * 32, uint8_t(0));  // the pad table
  *scale = a;
  *offset = total_min;
}
#pragma GCC diagnostic pop
#endif

}  // namespace

void pq4_quantize_lut(const float* lut, int64_t M, Metric metric, uint8_t* qlut, float* scale, float* offset) {
  const float sign = metric == Metric::kIP ? -1.0f : 1.0f;
#ifdef FC_PQ_X86
  if (active_kernel() == 3) return quantize_lut_avx512(lut, M, sign, qlut, scale, offset);
#endif
  quantize_lut_portable(lut, M, sign, qlut, scale, offset);
}

namespace {

void block_portable(const uint8_t* codes, const uint8_t* qlut, int64_t pairs, uint16_t* out) {
  uint32_t acc[32] = {0};
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t h = 0; h < 2; ++h) {
      const uint8_t* c = codes + p * 32 + h * 16;
      const uint8_t* t = qlut + p * 32 + h * 16;
      for (int64_t v = 0; v < 16; ++v) {
        acc[v] += t[c[v] & 15];
        acc[v + 16] += t[c[v] >> 4];
      }
    }
  for (int v = 0; v < 32; ++v) out[v] = static_cast<uint16_t>(acc[v]);
}

#ifdef FC_PQ_X86
// GCC 12's AVX-512 headers build extract/insert results from a deliberately undefined register
// (_mm512_undefined_*), which -Wuninitialized reports once inlined here; the values are never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The 16 uint16 lanes of `even`/`odd` hold, per 128-bit lane (sub-quantizer parity), the sums of the
// even / odd bytes, i.e. of vectors 2t and 2t+1; add the lanes and interleave back into vector order.
__attribute__((target("avx2"))) inline void finish_avx2(__m256i a0, __m256i a1, uint16_t* out) {
  const __m256i even = _mm256_sub_epi16(a0, _mm256_slli_epi16(a1, 8));  // Σ low bytes (mod 2^16, exact)
  const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
  const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(a1), _mm256_extracti128_si256(a1, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(e, o));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8), _mm_unpackhi_epi16(e, o));
}

// One 256-bit register per sub-quantizer pair: vpshufb looks up the 16-entry table of sub-quantizer
// 2p in lane 0 and 2p+1 in lane 1, for the low nibbles (vectors 0..15) and high nibbles (16..31). The
// uint8 results are summed as uint16 with the odd/even trick: adding the register as 16-bit words
// accumulates low + 256·high, adding it shifted right by 8 accumulates the high (odd) bytes alone.
__attribute__((target("avx2"))) void block_avx2(const uint8_t* codes, const uint8_t* qlut, int64_t pairs, uint16_t* out) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32));
    const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qlut + p * 32));
    const __m256i rl = _mm256_shuffle_epi8(t, _mm256_and_si256(c, mask));
    const __m256i rh = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16(c, 4), mask));
    a0 = _mm256_add_epi16(a0, rl);
    a1 = _mm256_add_epi16(a1, _mm256_srli_epi16(rl, 8));
    b0 = _mm256_add_epi16(b0, rh);
    b1 = _mm256_add_epi16(b1, _mm256_srli_epi16(rh, 8));
  }
  finish_avx2(a0, a1, out);
  finish_avx2(b0, b1, out + 16);
}

// AVX-512BW, several queries per block. A 512-bit register holds the 32-byte rows of two pairs
// (128-bit lanes: sub-quantizers 2p, 2p+1, 2p+2, 2p+3 of the same 16 vectors), so one vpshufb does 64
// look-ups; the nibbles of a block are split once and reused by all QB queries of the group, whose
// accumulators (4 registers each) stay in registers for the whole block. An odd last pair goes in
// through a zero-extended 256-bit load (the zero upper table entries add nothing).
template <int QB>
__attribute__((target("avx512f,avx512bw"))) inline void block_sums_avx512(const uint8_t* codes,
                                                                          const uint8_t* const* qluts, int64_t pairs,
                                                                          __m512i* sums) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  __m512i a0[QB], a1[QB], b0[QB], b1[QB];
  for (int j = 0; j < QB; ++j) a0[j] = a1[j] = b0[j] = b1[j] = _mm512_setzero_si512();
  auto step = [&](__m512i c, auto table_of) __attribute__((target("avx512f,avx512bw"))) {
    const __m512i lo = _mm512_and_si512(c, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
    for (int j = 0; j < QB; ++j) {
      const __m512i t = table_of(j);
      const __m512i rl = _mm512_shuffle_epi8(t, lo);
      const __m512i rh = _mm512_shuffle_epi8(t, hi);
      // uint16 sums of uint8 look-ups: the register read as words adds low + 256·high bytes, the
      // register shifted right by 8 adds the high (odd-vector) bytes alone.
      a0[j] = _mm512_add_epi16(a0[j], rl);
      a1[j] = _mm512_add_epi16(a1[j], _mm512_srli_epi16(rl, 8));
      b0[j] = _mm512_add_epi16(b0[j], rh);
      b1[j] = _mm512_add_epi16(b1[j], _mm512_srli_epi16(rh, 8));
    }
  };
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2)
    step(_mm512_loadu_si512(codes + p * 32), [&](int j) __attribute__((target("avx512f,avx512bw"))) {
      return _mm512_loadu_si512(qluts[j] + p * 32);
    });
  if (p < pairs) {
    const __m256i* tail = reinterpret_cast<const __m256i*>(codes + p * 32);
    step(_mm512_zextsi256_si512(_mm256_loadu_si256(tail)), [&](int j) __attribute__((target("avx512f,avx512bw"))) {
      return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qluts[j] + p * 32)));
    });
  }
  // Per query: even-vector sums = a0 − (a1 << 8) (exact mod 2^16), odd = a1; the 4 lanes of each are
  // summed by two rounds of lane shuffles, giving R = [even 0..15 | odd 0..15 | even 16..31 | odd 16..31]
  // (8 words per lane), and one vpermw puts the 32 sums in vector order.
  const __m512i order = _mm512_set_epi16(31, 23, 30, 22, 29, 21, 28, 20, 27, 19, 26, 18, 25, 17, 24, 16,  //
                                         15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  for (int j = 0; j < QB; ++j) {
    const __m512i ea = _mm512_sub_epi16(a0[j], _mm512_slli_epi16(a1[j], 8));
    const __m512i eb = _mm512_sub_epi16(b0[j], _mm512_slli_epi16(b1[j], 8));
    const __m512i sa = _mm512_add_epi16(_mm512_shuffle_i64x2(ea, a1[j], 0x44), _mm512_shuffle_i64x2(ea, a1[j], 0xee));
    const __m512i sb = _mm512_add_epi16(_mm512_shuffle_i64x2(eb, b1[j], 0x44), _mm512_shuffle_i64x2(eb, b1[j], 0xee));
    const __m512i r = _mm512_add_epi16(_mm512_shuffle_i64x2(sa, sb, 0x88), _mm512_shuffle_i64x2(sa, sb, 0xdd));
    sums[j] = _mm512_permutexvar_epi16(order, r);
  }
}

__attribute__((target("avx512f,avx512bw"))) void block_avx512(const uint8_t* codes, const uint8_t* qlut, int64_t pairs,
                                                             uint16_t* out) {
  __m512i sums;
  block_sums_avx512<1>(codes, &qlut, pairs, &sums);
  _mm512_storeu_si512(out, sums);
}

// Bit v of the result is set when out[v] < threshold (threshold ≥ 1), vectors 0..31.
__attribute__((target("avx2"))) uint32_t below_avx2(const uint16_t* d, uint32_t threshold) {
  const __m256i limit = _mm256_set1_epi16(static_cast<short>(static_cast<uint16_t>(threshold - 1)));
  const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d));
  const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 16));
  // d ≤ limit ⇔ min(d, limit) == d (unsigned)
  const __m256i m0 = _mm256_cmpeq_epi16(_mm256_min_epu16(d0, limit), d0);
  const __m256i m1 = _mm256_cmpeq_epi16(_mm256_min_epu16(d1, limit), d1);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi16(m0, m1), 0xd8);
  return static_cast<uint32_t>(_mm256_movemask_epi8(packed));
}
#pragma GCC diagnostic pop
#endif

uint32_t below_portable(const uint16_t* d, uint32_t threshold) {
  uint32_t mask = 0;
  for (int v = 0; v < 32; ++v) mask |= static_cast<uint32_t>(d[v] < threshold) << v;
  return mask;
}

using BlockFn = void (*)(const uint8_t*, const uint8_t*, int64_t, uint16_t*);
using BelowFn = uint32_t (*)(const uint16_t*, uint32_t);

BlockFn block_fn(int kernel) {
#ifdef FC_PQ_X86
  if (kernel == 3) return block_avx512;
  if (kernel == 2) return block_avx2;
#endif
  return block_portable;
}

BelowFn below_fn(int kernel) {
#ifdef FC_PQ_X86
  if (kernel >= 2) return below_avx2;
#endif
  return below_portable;
}

constexpr int kFastQueryGroup = 4;       // queries sharing each block of codes (AVX-512: 16 accumulators)
constexpr int64_t kFastBlockChunk = 64;  // 32-vector blocks per chunk: ≤ 64·pairs·32 bytes of codes in L1/L2

// One query's fast-scan top-k collector, by (quantized sum, id). Two modes:
// * k ≤ kHeapMaxK: a bounded max-heap whose root is the exact k-th best so far — the tightest filter
//   (`limit` = the root's key once full), best when few candidates arrive per block;
// * larger k: a reservoir. Candidates whose sum is ≤ `limit` are appended to a buffer of cap = 2k + 32
//   entries (whole blocks at once, in registers, with AVX-512); a full buffer keeps its k best entries
//   and `limit` becomes the k-th best key. It always holds the k best entries seen so far (a dropped
//   entry has k better ones, a refused candidate a key above k kept keys). k = 100 over one IVF list of
//   ~1000 codes: ~330 sift-downs of a 100-entry heap (~9 µs) against a few selections (~5 µs).
// The reservoir's selections count keys (two byte-wise passes; sums < 2^16) instead of comparing
// entries: nth_element's partitions mispredict on every other entry and were most of a k = 100 search.
constexpr int64_t kHeapMaxK = 32;

struct KeyReservoir {
  uint32_t* keys;      // [cap + 32]: a whole block's candidates may be stored at once (the SIMD append)
  int64_t* ids;        // [cap + 32]
  uint32_t* tmp_keys;  // [cap], shared by the collectors of one thread (selections do not overlap)
  int64_t* tmp_ids;    // [cap], likewise
  int64_t k, cap;
  int64_t size = 0;
  int32_t limit = 65535;  // sums are ≤ 255 · 256 < 65535: everything passes until the first shrink
  TopK<uint32_t> heap{keys, ids, k};  // the heap mode's view of the same storage
  bool use_heap = k <= kHeapMaxK;

  // The count-th smallest key of entries [0, size) (1 ≤ count ≤ size); *below = how many are smaller.
  uint32_t kth_key(int64_t count, int64_t* below) const {
    uint32_t hist[256] = {};
    for (int64_t i = 0; i < size; ++i) ++hist[keys[i] >> 8];
    uint32_t hi = 0;
    int64_t n = 0;
    while (n + hist[hi] < count) n += hist[hi++];
    uint32_t low[256] = {};
    for (int64_t i = 0; i < size; ++i) low[keys[i] & 255] += (keys[i] >> 8) == hi;
    uint32_t lo = 0;
    while (n + low[lo] < count) n += low[lo++];
    *below = n;
    return hi << 8 | lo;
  }
  // Entries [0, count) become the best `count` (unordered): every key below the count-th key, and of
  // the entries holding it, the lowest ids. Returns that key.
  uint32_t keep_best(int64_t count) {
    int64_t below = 0;
    const uint32_t t = kth_key(count, &below);
    int64_t n = 0, ties = 0;
    for (int64_t i = 0; i < size; ++i) {  // branch-free compaction (n ≤ i: in place)
      const uint32_t key = keys[i];
      const int64_t id = ids[i];
      keys[n] = key;
      ids[n] = id;
      n += key < t;
      tmp_ids[ties] = id;
      ties += key == t;
    }
    const int64_t need = count - below;  // ≥ 1 entries holding key t
    if (ties > need) std::nth_element(tmp_ids, tmp_ids + (need - 1), tmp_ids + ties);
    for (int64_t i = 0; i < need; ++i) {
      keys[below + i] = t;
      ids[below + i] = tmp_ids[i];
    }
    size = count;
    return t;
  }
  // Entries [0, size) sorted by (key, id): a stable counting sort by key (low byte, then high byte),
  // then the ids within each run of equal keys (short runs).
  void sort_all() {
    uint32_t* from_k = keys;
    int64_t* from_i = ids;
    uint32_t* to_k = tmp_keys;
    int64_t* to_i = tmp_ids;
    for (int shift = 0; shift <= 8; shift += 8) {
      uint32_t start[257] = {};
      for (int64_t i = 0; i < size; ++i) ++start[((from_k[i] >> shift) & 255) + 1];
      for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
      for (int64_t i = 0; i < size; ++i) {
        const uint32_t slot = start[(from_k[i] >> shift) & 255]++;
        to_k[slot] = from_k[i];
        to_i[slot] = from_i[i];
      }
      std::swap(from_k, to_k);
      std::swap(from_i, to_i);
    }  // two passes: the data is back in keys / ids
    for (int64_t i = 0; i < size;) {
      int64_t j = i + 1;
      while (j < size && keys[j] == keys[i]) ++j;
      if (j - i > 1) std::sort(ids + i, ids + j);
      i = j;
    }
  }
  // Empty again (the storage is reused for the next query).
  void clear() {
    size = 0;
    heap.size = 0;
    limit = 65535;
  }
  // Keeps the k best entries; limit becomes the k-th best key.
  void shrink() { limit = static_cast<int32_t>(keep_best(k)); }
  void offer(uint16_t key, int64_t id) {
    if (key > limit) return;
    if (use_heap) {
      if (!heap.full() || TopK<uint32_t>::worse(heap.keys[0], heap.ids[0], key, id)) heap.push(key, id);
      if (heap.full()) limit = static_cast<int32_t>(heap.keys[0]);
      return;
    }
    if (size == cap) {
      shrink();
      if (key > limit) return;
    }
    keys[size] = key;
    ids[size] = id;
    ++size;
  }
  // Sorted best first into (dist, ids); padding id −1, dist to_dist(65535) (key_or_inf: +inf).
  template <typename F>
  void write_sorted(float* out_dist, int64_t* out_ids, F to_dist) {
    if (use_heap) size = heap.size;
    const int64_t kept = std::min(size, k);
    if (size > k) keep_best(k);
    sort_all();
    for (int64_t i = 0; i < kept; ++i) {
      out_dist[i] = to_dist(static_cast<uint16_t>(keys[i]));
      out_ids[i] = ids[i];
    }
    for (int64_t i = kept; i < k; ++i) {
      out_dist[i] = to_dist(std::numeric_limits<uint16_t>::max());
      out_ids[i] = -1;
    }
  }
};

// The collectors of `count` queries of one thread (arrays left uninitialised: new T[n], not zero-filled).
struct Reservoirs {
  int64_t cap, stride;
  std::unique_ptr<uint32_t[]> keys, tmp_keys;
  std::unique_ptr<int64_t[]> ids, tmp_ids;
  std::vector<KeyReservoir> of;
  Reservoirs(int64_t count, int64_t k)
      : cap(2 * k + 32),
        stride(cap + 32),
        keys(new uint32_t[static_cast<size_t>(count * stride)]),
        tmp_keys(new uint32_t[static_cast<size_t>(cap)]),
        ids(new int64_t[static_cast<size_t>(count * stride)]),
        tmp_ids(new int64_t[static_cast<size_t>(cap)]) {
    of.reserve(static_cast<size_t>(count));
    for (int64_t j = 0; j < count; ++j)
      of.push_back(KeyReservoir{keys.get() + j * stride, ids.get() + j * stride, tmp_keys.get(), tmp_ids.get(), k,
                                cap});
  }
};

// One group of up to kFastQueryGroup queries over blocks [b0, b1). Row r = 32·b + v is valid below
// row_end and has id row_ids[r] (row_ids == nullptr: id = r). A vector reaches its query's collector
// only when its quantized sum is ≤ the collector's limit; the (key, id) order then decides, so the
// result does not depend on the scan order.
struct FastScanGroup {
  const uint8_t* packed;
  int64_t pairs;
  int count;                                 // queries in the group, 1..kFastQueryGroup
  const uint8_t* qluts[kFastQueryGroup];     // [pairs, 32] each
  KeyReservoir* tops[kFastQueryGroup];
  const int64_t* row_ids;
  int64_t row_end;
};

inline void push_survivors(const FastScanGroup& g, int j, int64_t block, uint32_t mask, const uint16_t* d) {
  KeyReservoir& top = *g.tops[j];
  const int64_t base = block * 32;
  while (mask) {
    const int v = __builtin_ctz(mask);
    mask &= mask - 1;
    top.offer(d[v], g.row_ids ? g.row_ids[base + v] : base + v);
  }
}

inline uint32_t valid_rows(const FastScanGroup& g, int64_t block) {
  const int64_t valid = g.row_end - block * 32;
  return valid >= 32 ? 0xffffffffu : valid <= 0 ? 0u : (1u << valid) - 1u;
}

// Portable / AVX2: one query at a time, 32 sums per call, then a SIMD compare against the limit.
void scan_group_generic(int kernel, const FastScanGroup& g, int64_t b0, int64_t b1) {
  const BlockFn block = block_fn(kernel);
  const BelowFn below = below_fn(kernel);
  alignas(64) uint16_t d[32];
  for (int j = 0; j < g.count; ++j)
    for (int64_t b = b0; b < b1; ++b) {
      block(g.packed + b * g.pairs * 32, g.qluts[j], g.pairs, d);
      const uint32_t mask = below(d, static_cast<uint32_t>(g.tops[j]->limit) + 1u) & valid_rows(g, b);
      if (mask) push_survivors(g, j, b, mask, d);
    }
}

#ifdef FC_PQ_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's avx512fintrin pass-through operands
// Appends the candidates `mask` of one block (sums of rows base .. base + 31, ids row_ids[row] or the
// row itself) to the collector, which has room for them: keys widened to 32 bits and ids compressed
// in registers (a compress to memory is microcoded on some cores), then stored whole into the slack.
__attribute__((target("avx512f,avx512bw"))) inline void append_block_avx512(KeyReservoir& top, uint32_t mask,
                                                                           __m512i sums, const int64_t* row_ids,
                                                                           int64_t base) {
  const __mmask16 lo = static_cast<__mmask16>(mask), hi = static_cast<__mmask16>(mask >> 16);
  const int n_lo = __builtin_popcount(lo);
  uint32_t* keys = top.keys + top.size;
  _mm512_storeu_si512(keys, _mm512_maskz_compress_epi32(lo, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(sums))));
  _mm512_storeu_si512(keys + n_lo,
                      _mm512_maskz_compress_epi32(hi, _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(sums, 1))));
  int64_t* ids = top.ids + top.size;
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int q = 0; q < 4; ++q) {
    const __mmask8 part = static_cast<__mmask8>(mask >> (8 * q));
    if (!part) continue;
    const __m512i id = row_ids ? _mm512_loadu_si512(row_ids + base + 8 * q)
                               : _mm512_add_epi64(_mm512_set1_epi64(base + 8 * q), lanes);
    _mm512_storeu_si512(ids, _mm512_maskz_compress_epi64(part, id));
    ids += __builtin_popcount(part);
  }
  top.size += __builtin_popcount(mask);
}

// AVX-512: the group's sums stay in registers; one unsigned compare per query gives the 32-bit mask
// of candidates, appended to the query's collector in registers.
template <int QB>
__attribute__((target("avx512f,avx512bw"))) void scan_group_avx512(const FastScanGroup& g, int64_t b0, int64_t b1) {
  int32_t limit[QB];
  for (int j = 0; j < QB; ++j) limit[j] = g.tops[j]->limit;
  for (int64_t b = b0; b < b1; ++b) {
    __m512i sums[QB];
    block_sums_avx512<QB>(g.packed + b * g.pairs * 32, g.qluts, g.pairs, sums);
    const uint32_t valid = valid_rows(g, b);
    for (int j = 0; j < QB; ++j) {
      uint32_t mask = _mm512_mask_cmple_epu16_mask(valid, sums[j], _mm512_set1_epi16(static_cast<short>(limit[j])));
      if (!mask) continue;
      KeyReservoir& top = *g.tops[j];
      if (top.use_heap) {  // one by one: the heap's root (the limit) tightens with every push
        alignas(64) uint16_t d[32];
        _mm512_store_si512(d, sums[j]);
        push_survivors(g, j, b, mask, d);
        limit[j] = top.limit;
        continue;
      }
      if (top.size + __builtin_popcount(mask) > top.cap) {  // make room; the new limit may drop some
        top.shrink();
        limit[j] = top.limit;
        mask = _mm512_mask_cmple_epu16_mask(mask, sums[j], _mm512_set1_epi16(static_cast<short>(limit[j])));
      }
      append_block_avx512(top, mask, sums[j], g.row_ids, b * 32);
    }
  }
}
#pragma GCC diagnostic pop
#endif

void scan_group(int kernel, const FastScanGroup& g, int64_t b0, int64_t b1) {
#ifdef FC_PQ_X86
  if (kernel == 3) {
    switch (g.count) {
      case 4: return scan_group_avx512<4>(g, b0, b1);
      case 3: return scan_group_avx512<3>(g, b0, b1);
      case 2: return scan_group_avx512<2>(g, b0, b1);
      default: return scan_group_avx512<1>(g, b0, b1);
    }
  }
#endif
  scan_group_generic(kernel, g, b0, b1);
}

float key_or_inf(uint16_t key) {
  return key == std::numeric_limits<uint16_t>::max() ? std::numeric_limits<float>::infinity()
                                                      : static_cast<float>(key);
}

}  // namespace

const char* pq4_kernel_name() {
  const int kernel = active_kernel();
  return kernel == 3 ? "avx512bw" : kernel == 2 ? "avx2" : "portable";
}

void pq4_force_kernel(int force) { g_force.store(force); }

void pq4_block_distances(const uint8_t* block, const uint8_t* qlut, int64_t pairs, uint16_t* out) {
  block_fn(active_kernel())(block, qlut, pairs, out);
}

void pq4_scan_cpu(const FastScanParams& p, int64_t q_begin, int64_t q_end, int64_t block_begin, int64_t block_end,
                  float* out_dist, int64_t* out_ids, int64_t ld) {
  const int kernel = active_kernel();
  const int64_t k = p.k;
  // Queries in super-groups of 4 groups: each chunk of blocks is read from memory once per
  // super-group and then served from L1/L2 to its groups.
  constexpr int64_t kSuper = 4 * kFastQueryGroup;
  Reservoirs tops(std::min(kSuper, q_end - q_begin), k);
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kSuper) {
    const int64_t qn = std::min(kSuper, q_end - q0);
    for (int64_t j = 0; j < qn; ++j) tops.of[j].clear();
    for (int64_t b0 = block_begin; b0 < block_end; b0 += kFastBlockChunk) {
      const int64_t b1 = std::min(block_end, b0 + kFastBlockChunk);
      for (int64_t g0 = 0; g0 < qn; g0 += kFastQueryGroup) {
        FastScanGroup g{p.packed, p.pairs, static_cast<int>(std::min<int64_t>(kFastQueryGroup, qn - g0)), {}, {},
                        nullptr, p.n};
        for (int j = 0; j < g.count; ++j) {
          g.qluts[j] = p.qlut + (q0 + g0 + j) * p.pairs * 32;
          g.tops[j] = &tops.of[g0 + j];
        }
        scan_group(kernel, g, b0, b1);
      }
    }
    for (int64_t j = 0; j < qn; ++j) tops.of[j].write_sorted(out_dist + (q0 + j) * ld, out_ids + (q0 + j) * ld, key_or_inf);
  }
}

namespace {

// pq4_scan_ivf_cpu over one chunk of queries.
int64_t scan_ivf_chunk(const FastScanIvfParams& p, int kernel, int64_t q_begin, int64_t q_end) {
  const int64_t k = p.base.k, pairs = p.base.pairs, nq = q_end - q_begin;
  int64_t bad = 0;
  // Invert the probes of this query range (a counting sort by bucket), so that the queries sharing
  // a list are scanned together in groups. Two phases: first every query's best list (probe slot 0),
  // which fills its collector with good candidates and tightens its threshold early, then all other
  // (query, list) visits; bucket = phase · nlist + list.
  const int64_t buckets = 2 * p.nlist;
  std::vector<int64_t> first(static_cast<size_t>(buckets + 1), 0);
  for (int64_t q = q_begin; q < q_end; ++q)
    for (int64_t j = 0; j < p.nprobe; ++j) {
      const int64_t list = p.probes[q * p.nprobe + j];
      if (list == -1) continue;
      if (list < 0 || list >= p.nlist) {
        ++bad;
        continue;
      }
      ++first[(j > 0) * p.nlist + list + 1];
    }
  for (int64_t b = 0; b < buckets; ++b) first[b + 1] += first[b];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  std::vector<int64_t> by_list(static_cast<size_t>(first[buckets]));
  for (int64_t q = q_begin; q < q_end; ++q)
    for (int64_t j = 0; j < p.nprobe; ++j) {
      const int64_t list = p.probes[q * p.nprobe + j];
      if (list >= 0 && list < p.nlist) by_list[fill[(j > 0) * p.nlist + list]++] = q;
    }
  Reservoirs tops(nq, k);
  for (int64_t bucket = 0; bucket < buckets; ++bucket) {
    const int64_t list = bucket % p.nlist;
    const int64_t b0 = p.list_blocks[list], b1 = p.list_blocks[list + 1];
    if (b0 == b1 || p.list_sizes[list] == 0) continue;
    for (int64_t i = first[bucket]; i < first[bucket + 1]; i += kFastQueryGroup) {
      FastScanGroup g{p.base.packed, pairs, static_cast<int>(std::min<int64_t>(kFastQueryGroup, first[bucket + 1] - i)),
                      {}, {}, p.row_ids, b0 * 32 + p.list_sizes[list]};
      for (int j = 0; j < g.count; ++j) {
        const int64_t q = by_list[i + j];
        g.qluts[j] = p.base.qlut + q * pairs * 32;
        g.tops[j] = &tops.of[q - q_begin];
      }
      scan_group(kernel, g, b0, b1);
    }
  }
  for (int64_t q = q_begin; q < q_end; ++q)
    tops.of[q - q_begin].write_sorted(p.out_dist + q * k, p.out_ids + q * k, key_or_inf);
  return bad;
}

}  // namespace

int64_t pq4_scan_ivf_cpu(const FastScanIvfParams& p, int64_t q_begin, int64_t q_end) {
  // The collectors of all queries in a chunk live at once (the lists are scanned in list order):
  // chunks keep them within ~64 MiB per thread for any k (k = 100: 21k queries a chunk).
  const int kernel = active_kernel();
  const int64_t per_query = (2 * p.base.k + 64) * static_cast<int64_t>(sizeof(uint32_t) + sizeof(int64_t));
  const int64_t chunk = std::max<int64_t>(64, (int64_t(64) << 20) / per_query);
  int64_t bad = 0;
  for (int64_t c0 = q_begin; c0 < q_end; c0 += chunk) bad += scan_ivf_chunk(p, kernel, c0, std::min(q_end, c0 + chunk));
  return bad;
}

}  // namespace pq
}  // namespace fastcore

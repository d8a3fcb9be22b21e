// AVX-512 bodies of the float32 encode (the GEMM form with a register argmin; pq_encode_cpu in
// pq_encode_cpu.cpp dispatches here).
#include <algorithm>

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

namespace detail {

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

template void encode_rows_avx512<1>(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end);

}  // namespace detail

namespace {

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
      const __m512 low =
          _mm512_min_ps(_mm512_min_ps(_mm512_min_ps(acc[r][0], acc[r][1]), _mm512_min_ps(acc[r][2], acc[r][3])),
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

}  // namespace

namespace detail {

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

}  // namespace detail

#pragma GCC diagnostic pop
}  // namespace pq
}  // namespace fastcore
#endif  // FC_CPU_X86

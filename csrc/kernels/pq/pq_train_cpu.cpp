// CPU kernels of the pq family (math and contracts in pq.h): k-means training — the assignment from a
// GEMM (portable loop and dispatch; the AVX-512 scan and the fused tile kernel are in
// pq_train_avx512_cpu.cpp) and the centroid sums, counts and means.
#include <algorithm>
#include <cstdint>

#include "pq/pq_cpu_internal.h"

namespace fastcore {
namespace pq {
using namespace detail;  // the shared pieces of pq_cpu_internal.h

// ---- k-means assignment ---------------------------------------------------------------------------

namespace {

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

}  // namespace

void pq_assign_cpu(const AssignParams& p, int64_t begin, int64_t end) {
  if constexpr (kCpuX86) {
    if (active_cpu_isa() >= CpuIsa::kAvx512 && p.k <= INT32_MAX) return assign_rows_avx512(p, begin, end);
  }
  assign_rows_portable(p, begin, end);
}

// ---- fused k-means / IVF assignment (AVX-512 only: pq_train_avx512_cpu.cpp) -----------------------

bool pq_assign_fused_available() { return active_cpu_isa() >= CpuIsa::kAvx512; }

void pq_assign_fused_cpu(const FusedAssignParams& p, int64_t begin, int64_t end) {
  if constexpr (kCpuX86) {
    if (active_cpu_isa() >= CpuIsa::kAvx512 && p.k <= INT32_MAX - 64) assign_fused_avx512(p, begin, end);
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

}  // namespace pq
}  // namespace fastcore

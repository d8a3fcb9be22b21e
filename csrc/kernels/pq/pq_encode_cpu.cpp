// CPU kernels of the pq family (math and contracts in pq.h): distance tables and encode, portable loops
// and dispatch (the AVX-512 encode is in pq_encode_avx512_cpu.cpp).
//
// Tables/encode: per row and sub-space, the ksub partial sums live in a stack buffer and the loop over
// the dsub dimensions updates all ksub of them at once (contiguous, so it vectorises; FC_CPU_CLONES
// builds AVX-512/AVX2/SSE variants).
#include <algorithm>

#include "fastcore/cpu_vector.h"
#include "pq/pq_cpu_internal.h"

namespace fastcore {
namespace pq {
using namespace detail;  // the shared pieces of pq_cpu_internal.h

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

// Any ksub ≤ 256: the ksub values ‖c‖² − 2⟨x, c⟩ in a stack buffer (vectorised by the target
// clones), then a scalar argmin (strict <: the lower j wins ties).
FC_CPU_CLONES void encode_rows_portable(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end) {
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

}  // namespace

void pq_encode_cpu(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end) {
  if constexpr (kCpuX86) {
    if (active_cpu_isa() >= CpuIsa::kAvx512) {
      if (p.ksub == 256) return encode_rows_avx512_256(p, c_norms, begin, end);
      if (p.ksub == 16) return encode_rows_avx512<1>(p, c_norms, begin, end);
    }
  }
  encode_rows_portable(p, c_norms, begin, end);
}

}  // namespace pq
}  // namespace fastcore

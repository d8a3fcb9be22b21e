// CPU kernels of the pq family (math and contracts in pq.h): the 8-bit ADC scans with top-k (flat, IVF,
// merge of partial lists) and the IVF probe lists (top columns), portable loops and dispatch (the
// AVX-512 16-query scans are in pq_scan_avx512_cpu.cpp).
//
// ADC: several queries share each block of code rows (the codes are loaded once per block, the tables
// of the block's queries stay in L1/L2), and a bounded max-heap per query only sees rows that beat its
// current k-th best.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "pq/pq_cpu_internal.h"

namespace fastcore {
namespace pq {
using namespace detail;  // the shared pieces of pq_cpu_internal.h

// ---- top columns per row (IVF probe lists) --------------------------------------------------------

namespace {

// A NaN ranks below every number (it never displaces one).
inline float rank_value(float v) { return v == v ? v : -std::numeric_limits<float>::infinity(); }

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

}  // namespace

void pq_top_columns_cpu(const TopColumnsParams& p, int64_t begin, int64_t end) {
  std::vector<float> vals(static_cast<size_t>(p.count));
  const bool simd = active_cpu_isa() >= CpuIsa::kAvx512;
  for (int64_t i = begin; i < end; ++i) {
    const float* row = p.scores + i * p.ld;
    int64_t* cols = p.out + i * p.count;
    top_columns_fill(row, p.count, vals.data(), cols);
    int64_t j = p.count;
    if constexpr (kCpuX86) {
      if (simd) j = top_columns_avx512(row, j, p.L, p.count, vals.data(), cols);
    }
    top_columns_tail(row, j, p.L, p.count, vals.data(), cols);
  }
}

// ---- 8-bit ADC scan -------------------------------------------------------------------------------

namespace {

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

}  // namespace

void pq_scan_flat_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end,
                      float* out_dist, int64_t* out_ids, int64_t ld) {
  if constexpr (kCpuX86) {
    if (active_cpu_isa() >= CpuIsa::kAvx512)
      return scan_flat_grouped_avx512(p, q_begin, q_end, row_begin, row_end, out_dist, out_ids, ld);
  }
  const int64_t M = p.M, ksub = p.ksub, k = p.k;
  const bool ip = p.metric == Metric::kIP;
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

int64_t pq_scan_ivf_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end) {
  if constexpr (kCpuX86) {
    if (active_cpu_isa() >= CpuIsa::kAvx512 && !p.lut_per_probe) return scan_ivf_grouped_avx512(p, q_begin, q_end);
  }
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

}  // namespace pq
}  // namespace fastcore

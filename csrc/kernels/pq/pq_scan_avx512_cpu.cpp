// AVX-512 bodies of the 8-bit ADC scans (16 queries per pass over interleaved tables) and of the top
// columns per row (pq_scan_cpu.cpp dispatches here).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

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
    for (int j = 0; j < 16; ++j)
      r[j] = j < count ? _mm512_loadu_ps(p.lut + queries[j] * entries + e0) : _mm512_setzero_ps();
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

// One inverted list for up to 16 (query, list) visits (lanes): as scan_flat_avx512 plus the per-lane
// bias (dist = bias + Σ_m table entries, the sum in m order from 0: the scalar path's arithmetic).
// Ids are not monotone across lists: candidates with a key equal to the root's are looked at too and
// the heap's (key, id) order decides.
__attribute__((target("avx512f"))) void scan_list_avx512(const ScanParams& p, const float* lut_t, int64_t list,
                                                         int count, const float* bias_lanes,
                                                         TopK<float>* const* heaps) {
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
    if (j < count)
      refresh(j);
    else
      roots[j] = 0.0f;
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

}  // namespace

namespace detail {

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

// pq_scan_flat_cpu's AVX-512 path: the queries in groups of 16, each group's tables interleaved once.
void scan_flat_grouped_avx512(const ScanParams& p, int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end,
                              float* out_dist, int64_t* out_ids, int64_t ld) {
  const int64_t M = p.M, ksub = p.ksub, k = p.k;
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

}  // namespace detail

#pragma GCC diagnostic pop
}  // namespace pq
}  // namespace fastcore
#endif  // FC_CPU_X86

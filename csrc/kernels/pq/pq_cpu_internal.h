// Private header of the pq CPU kernels (pq_*_cpu.cpp, not part of pq.h's API): what the portable /
// dispatch files and the ISA files share, and the ISA bodies' declarations. Each job has a portable +
// dispatch file (pq_encode_cpu.cpp, pq_train_cpu.cpp, pq_scan_cpu.cpp, pq_fastscan_cpu.cpp) and its
// intrinsic bodies in pq_<job>_avx512_cpu.cpp / pq_fastscan_avx2_cpu.cpp, which compile on x86 alone.
// A dispatch file calls a body only inside `if constexpr (kCpuX86)` and when active_cpu_isa()
// (fastcore/cpu_isa.h) reaches the body's level; the declarations carry the definitions' target
// attributes (FC_TARGET), so both name the same function.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "fastcore/cpu_isa.h"
#include "pq/pq.h"

namespace fastcore {
namespace pq {
namespace detail {

// The free helpers are static (a private copy per file, as when the kernels lived in one file): shared
// vague-linkage copies, although inlined, changed the callers' register allocation.

// ---- encode ---------------------------------------------------------------------------------------

// Rows are taken in blocks so that the block's slice of x stays in L2 while the sub-spaces are
// visited one by one (each sub-space's codebook, dsub·ksub floats, then stays in L1).
constexpr int64_t kEncodeRowBlock = 128;

// ---- k-means assignment ---------------------------------------------------------------------------

// Key of column j (smaller is better): l2 ‖c_j‖² − 2G (one rounding; the FMA form is the same, 2G is
// exact), ip −G.
static inline float assign_key(const AssignParams& p, const float* g, int64_t j) {
  return p.metric == Metric::kL2 ? p.c_norms[j] - 2.0f * g[j] : -g[j];
}

static inline void assign_store(const AssignParams& p, int64_t i, int64_t best, float best_key) {
  p.assign[i] = best;
  if (p.min_dist) p.min_dist[i] = p.metric == Metric::kL2 ? std::max(0.0f, p.x_norms[i] + best_key) : -best_key;
}

// ---- top columns per row --------------------------------------------------------------------------

// (v, j) into the descending list vals/cols of n entries (cap at most; when full the last one is
// dropped). Columns arrive in increasing order, so a value equal to one held goes behind it: the lower
// column first among equal values.
static inline void insert_descending(float* vals, int64_t* cols, int64_t& n, int64_t cap, float v, int64_t j) {
  int64_t pos = n < cap ? n++ : cap - 1;
  for (; pos > 0 && vals[pos - 1] < v; --pos) {
    vals[pos] = vals[pos - 1];
    cols[pos] = cols[pos - 1];
  }
  vals[pos] = v;
  cols[pos] = j;
}

// ---- bounded top-k heap ---------------------------------------------------------------------------

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
  static float to_dist_pad(F to_dist) {
    return to_dist(std::numeric_limits<K>::has_infinity ? std::numeric_limits<K>::infinity()
                                                        : std::numeric_limits<K>::max());
  }
};

static inline float key_to_dist(Metric metric, float key) { return metric == Metric::kIP ? -key : key; }

// ---- 4-bit fast-scan collectors -------------------------------------------------------------------

constexpr int kFastQueryGroup = 4;  // queries sharing each block of codes (AVX-512: 16 accumulators)

// One query's fast-scan top-k collector, by (quantized sum, id). Two modes:
// * k ≤ kHeapMaxK: a bounded max-heap whose root is the exact k-th best so far — the tightest filter
//   (`limit` = the root's key once full), best when few candidates arrive per block;
// * larger k: a reservoir. Candidates whose sum is ≤ `limit` are appended to a buffer of cap = 2k + 32
//   entries (whole blocks at once, in registers, with AVX-512); a full buffer keeps its k best entries
//   and `limit` becomes the k-th best key. It always holds the k best entries seen so far (a dropped
//   entry has k better ones, a refused candidate a key above k kept keys). For large k a few selections
//   cost less than the hundreds of heap sift-downs one IVF list causes (docs/pq.md).
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
  int32_t limit = 65535;              // sums are ≤ 255 · 256 < 65535: everything passes until the first shrink
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

// One group of up to kFastQueryGroup queries over blocks [b0, b1). Row r = 32·b + v is valid below
// row_end and has id row_ids[r] (row_ids == nullptr: id = r). A vector reaches its query's collector
// only when its quantized sum is ≤ the collector's limit; the (key, id) order then decides, so the
// result does not depend on the scan order.
struct FastScanGroup {
  const uint8_t* packed;
  int64_t pairs;
  int count;                              // queries in the group, 1..kFastQueryGroup
  const uint8_t* qluts[kFastQueryGroup];  // [pairs, 32] each
  KeyReservoir* tops[kFastQueryGroup];
  const int64_t* row_ids;
  int64_t row_end;
};

static inline void push_survivors(const FastScanGroup& g, int j, int64_t block, uint32_t mask, const uint16_t* d) {
  KeyReservoir& top = *g.tops[j];
  const int64_t base = block * 32;
  while (mask) {
    const int v = __builtin_ctz(mask);
    mask &= mask - 1;
    top.offer(d[v], g.row_ids ? g.row_ids[base + v] : base + v);
  }
}

static inline uint32_t valid_rows(const FastScanGroup& g, int64_t block) {
  const int64_t valid = g.row_end - block * 32;
  return valid >= 32 ? 0xffffffffu : valid <= 0 ? 0u : (1u << valid) - 1u;
}

// ---- ISA bodies -----------------------------------------------------------------------------------
// pq_encode_avx512_cpu.cpp: pq_encode_cpu for ksub = 16·NV (instantiated for NV = 1) and ksub = 256.
template <int NV>
FC_TARGET("avx512f")
void encode_rows_avx512(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end);
extern template void encode_rows_avx512<1>(const TableParams<float>& p, const float* c_norms, int64_t begin,
                                           int64_t end);
FC_TARGET("avx512f")
void encode_rows_avx512_256(const TableParams<float>& p, const float* c_norms, int64_t begin, int64_t end);
// pq_train_avx512_cpu.cpp: pq_assign_cpu (k ≤ INT32_MAX) and pq_assign_fused_cpu (k ≤ INT32_MAX − 64).
FC_TARGET("avx512f") void assign_rows_avx512(const AssignParams& p, int64_t begin, int64_t end);
FC_TARGET("avx512f") void assign_fused_avx512(const FusedAssignParams& p, int64_t begin, int64_t end);
// pq_scan_avx512_cpu.cpp: columns j.. of one row of pq_top_columns_cpu (returns where the portable tail
// resumes), pq_scan_flat_cpu, and pq_scan_ivf_cpu with one table per query.
FC_TARGET("avx512f")
int64_t top_columns_avx512(const float* row, int64_t j, int64_t L, int64_t count, float* vals, int64_t* cols);
void scan_flat_grouped_avx512(const ScanParams& p, int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end,
                              float* out_dist, int64_t* out_ids, int64_t ld);
int64_t scan_ivf_grouped_avx512(const ScanParams& p, int64_t q_begin, int64_t q_end);
// pq_fastscan_avx2_cpu.cpp: one block's 32 sums, and the mask of sums below a threshold.
FC_TARGET("avx2") void block_avx2(const uint8_t* codes, const uint8_t* qlut, int64_t pairs, uint16_t* out);
FC_TARGET("avx2") uint32_t below_avx2(const uint16_t* d, uint32_t threshold);
// pq_fastscan_avx512_cpu.cpp: pq4_quantize_lut, one block's 32 sums, one group of queries over blocks.
FC_TARGET("avx512f,avx512bw")
void quantize_lut_avx512(const float* lut, int64_t M, float sign, uint8_t* qlut, float* scale, float* offset);
FC_TARGET("avx512f,avx512bw")
void block_avx512(const uint8_t* codes, const uint8_t* qlut, int64_t pairs, uint16_t* out);
void scan_group_avx512(const FastScanGroup& g, int64_t b0, int64_t b1);

}  // namespace detail
}  // namespace pq
}  // namespace fastcore

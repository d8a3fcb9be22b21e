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

// ---- k-means assignment ---------------------------------------------------------------------------

void pq_assign_cpu(const AssignParams& p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float* g = p.gram + i * p.k;
    int64_t best = 0;
    float best_value = p.c_norms[0] - 2.0f * g[0];
    for (int64_t j = 1; j < p.k; ++j) {
      const float v = p.c_norms[j] - 2.0f * g[j];
      if (v < best_value) {
        best_value = v;
        best = j;
      }
    }
    p.assign[i] = best;
    if (p.min_dist) p.min_dist[i] = std::max(0.0f, p.x_norms[i] + best_value);
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

}  // namespace

void pq_scan_flat_cpu(const ScanParams& p, int64_t q_begin, int64_t q_end, int64_t row_begin, int64_t row_end,
                      float* out_dist, int64_t* out_ids, int64_t ld) {
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
  const int64_t M = p.M, ksub = p.ksub, k = p.k;
  const bool ip = p.metric == Metric::kIP;
  std::vector<float> keys(static_cast<size_t>(k));
  std::vector<int64_t> ids(static_cast<size_t>(k));
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

void pq4_quantize_lut(const float* lut, int64_t M, Metric metric, uint8_t* qlut, float* scale, float* offset) {
  const int64_t pairs = (M + 1) / 2;
  const float sign = metric == Metric::kIP ? -1.0f : 1.0f;
  float max_span = 0.0f, total_min = 0.0f;
  float mins[256];
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
  // a maps the widest table onto 0..255; every entry then fits a byte and Σ_m ≤ 255·M < 2^16.
  const float a = max_span > 0.0f ? 255.0f / max_span : 1.0f;
  for (int64_t i = 0; i < pairs * 32; ++i) qlut[i] = 0;
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* out = qlut + (m / 2) * 32 + (m % 2) * 16;
    for (int64_t c = 0; c < 16; ++c) {
      const float v = std::floor((sign * lut[m * 16 + c] - mins[m]) * a + 0.5f);
      out[c] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, v)));
    }
  }
  *scale = a;
  *offset = total_min;
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

// Same with 512-bit registers: two pairs per instruction (lanes: 2p, 2p+1, 2p+2, 2p+3); an odd last
// pair goes in through a zero-extended 256-bit load (the zero upper table entries add nothing).
__attribute__((target("avx512f,avx512bw"))) inline void finish_avx512(__m512i a0, __m512i a1, uint16_t* out) {
  const __m512i even = _mm512_sub_epi16(a0, _mm512_slli_epi16(a1, 8));
  const __m256i e2 = _mm256_add_epi16(_mm512_castsi512_si256(even), _mm512_extracti64x4_epi64(even, 1));
  const __m256i o2 = _mm256_add_epi16(_mm512_castsi512_si256(a1), _mm512_extracti64x4_epi64(a1, 1));
  const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(e2), _mm256_extracti128_si256(e2, 1));
  const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(o2), _mm256_extracti128_si256(o2, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(e, o));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8), _mm_unpackhi_epi16(e, o));
}

__attribute__((target("avx512f,avx512bw"))) void block_avx512(const uint8_t* codes, const uint8_t* qlut, int64_t pairs,
                                                             uint16_t* out) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
  int64_t p = 0;
  auto step = [&](__m512i c, __m512i t) __attribute__((target("avx512f,avx512bw"))) {
    const __m512i rl = _mm512_shuffle_epi8(t, _mm512_and_si512(c, mask));
    const __m512i rh = _mm512_shuffle_epi8(t, _mm512_and_si512(_mm512_srli_epi16(c, 4), mask));
    a0 = _mm512_add_epi16(a0, rl);
    a1 = _mm512_add_epi16(a1, _mm512_srli_epi16(rl, 8));
    b0 = _mm512_add_epi16(b0, rh);
    b1 = _mm512_add_epi16(b1, _mm512_srli_epi16(rh, 8));
  };
  for (; p + 2 <= pairs; p += 2)
    step(_mm512_loadu_si512(codes + p * 32), _mm512_loadu_si512(qlut + p * 32));
  if (p < pairs)
    step(_mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + p * 32)), 0),
         _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qlut + p * 32)), 0));
  finish_avx512(a0, a1, out);
  finish_avx512(b0, b1, out + 16);
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

constexpr int64_t kFastQueryBlock = 4;
constexpr int64_t kFastBlockChunk = 64;  // 32-vector blocks per chunk: ≤ 64·pairs·32 bytes of codes in L1/L2

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
  const BlockFn block = block_fn(kernel);
  const BelowFn below = below_fn(kernel);
  const int64_t k = p.k, pairs = p.pairs;
  std::vector<uint16_t> keys(static_cast<size_t>(kFastQueryBlock * k));
  std::vector<int64_t> ids(static_cast<size_t>(kFastQueryBlock * k));
  alignas(64) uint16_t d[32];
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kFastQueryBlock) {
    const int64_t qn = std::min(kFastQueryBlock, q_end - q0);
    std::vector<TopK<uint16_t>> heaps;
    for (int64_t j = 0; j < qn; ++j) heaps.push_back(TopK<uint16_t>{keys.data() + j * k, ids.data() + j * k, k});
    for (int64_t b0 = block_begin; b0 < block_end; b0 += kFastBlockChunk) {
      const int64_t b1 = std::min(block_end, b0 + kFastBlockChunk);
      for (int64_t j = 0; j < qn; ++j) {
        const uint8_t* qlut = p.qlut + (q0 + j) * pairs * 32;
        TopK<uint16_t>& heap = heaps[j];
        for (int64_t b = b0; b < b1; ++b) {
          block(p.packed + b * pairs * 32, qlut, pairs, d);
          // Strictly below the root's key (ids rise within the scan, so an equal key never wins).
          const uint32_t threshold = heap.full() ? heap.keys[0] : 65536u;
          if (threshold == 0) continue;
          uint32_t mask = below(d, threshold);
          const int64_t base = b * 32;
          if (base + 32 > p.n) mask &= (1u << (p.n - base)) - 1u;  // drop the padding rows of the last block
          while (mask) {
            const int v = __builtin_ctz(mask);
            mask &= mask - 1;
            if (!heap.full() || d[v] < heap.keys[0]) heap.push(d[v], base + v);
          }
        }
      }
    }
    for (int64_t j = 0; j < qn; ++j)
      heaps[j].write_sorted(out_dist + (q0 + j) * ld, out_ids + (q0 + j) * ld, [](uint16_t key) {
        return key == std::numeric_limits<uint16_t>::max() ? std::numeric_limits<float>::infinity()
                                                            : static_cast<float>(key);
      });
  }
}

int64_t pq4_scan_ivf_cpu(const FastScanIvfParams& p, int64_t q_begin, int64_t q_end) {
  const int kernel = active_kernel();
  const BlockFn block = block_fn(kernel);
  const BelowFn below = below_fn(kernel);
  const int64_t k = p.base.k, pairs = p.base.pairs;
  std::vector<uint16_t> keys(static_cast<size_t>(k));
  std::vector<int64_t> ids(static_cast<size_t>(k));
  alignas(64) uint16_t d[32];
  int64_t bad = 0;
  for (int64_t q = q_begin; q < q_end; ++q) {
    TopK<uint16_t> heap{keys.data(), ids.data(), k};
    const uint8_t* qlut = p.base.qlut + q * pairs * 32;
    for (int64_t j = 0; j < p.nprobe; ++j) {
      const int64_t list = p.probes[q * p.nprobe + j];
      if (list == -1) continue;
      if (list < 0 || list >= p.nlist) {
        ++bad;
        continue;
      }
      const int64_t first = p.list_blocks[list], last = p.list_blocks[list + 1];
      const int64_t size = p.list_sizes[list];
      for (int64_t b = first; b < last; ++b) {
        block(p.base.packed + b * pairs * 32, qlut, pairs, d);
        // Ids are not monotone across lists: keep keys equal to the root's too and let the heap's
        // (key, id) order decide.
        const uint32_t threshold = heap.full() ? heap.keys[0] + 1u : 65536u;
        uint32_t mask = below(d, threshold);
        const int64_t valid = size - (b - first) * 32;
        if (valid < 32) mask &= (1u << valid) - 1u;
        while (mask) {
          const int v = __builtin_ctz(mask);
          mask &= mask - 1;
          const int64_t id = p.row_ids[b * 32 + v];
          if (!heap.full() || TopK<uint16_t>::worse(heap.keys[0], heap.ids[0], d[v], id)) heap.push(d[v], id);
        }
      }
    }
    heap.write_sorted(p.out_dist + q * k, p.out_ids + q * k, [](uint16_t key) {
      return key == std::numeric_limits<uint16_t>::max() ? std::numeric_limits<float>::infinity()
                                                          : static_cast<float>(key);
    });
  }
  return bad;
}

}  // namespace pq
}  // namespace fastcore

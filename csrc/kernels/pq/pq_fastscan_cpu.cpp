// CPU kernels of the pq family (math and contracts in pq.h): the 4-bit fast-scan — table quantization,
// block sums, the flat and IVF scans with their collectors — portable loops and dispatch (the vpshufb
// bodies are in pq_fastscan_avx2_cpu.cpp and pq_fastscan_avx512_cpu.cpp).
//
// Fast-scan: 16-entry uint8 tables looked up in registers with vpshufb (AVX2 / AVX-512BW, picked at run
// time), uint16 sums, SIMD threshold masks.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "pq/pq_cpu_internal.h"

namespace fastcore {
namespace pq {
using namespace detail;  // the shared pieces of pq_cpu_internal.h

// ---- 4-bit fast-scan ------------------------------------------------------------------------------

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

}  // namespace

void pq4_quantize_lut(const float* lut, int64_t M, Metric metric, uint8_t* qlut, float* scale, float* offset) {
  const float sign = metric == Metric::kIP ? -1.0f : 1.0f;
  if constexpr (kCpuX86) {
    if (active_cpu_isa() >= CpuIsa::kAvx512) return quantize_lut_avx512(lut, M, sign, qlut, scale, offset);
  }
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

uint32_t below_portable(const uint16_t* d, uint32_t threshold) {
  uint32_t mask = 0;
  for (int v = 0; v < 32; ++v) mask |= static_cast<uint32_t>(d[v] < threshold) << v;
  return mask;
}

using BlockFn = void (*)(const uint8_t*, const uint8_t*, int64_t, uint16_t*);
using BelowFn = uint32_t (*)(const uint16_t*, uint32_t);

BlockFn block_fn(CpuIsa kernel) {
  if constexpr (kCpuX86) {
    if (kernel >= CpuIsa::kAvx512) return block_avx512;
    if (kernel >= CpuIsa::kAvx2) return block_avx2;
  }
  return block_portable;
}

BelowFn below_fn(CpuIsa kernel) {
  if constexpr (kCpuX86) {
    if (kernel >= CpuIsa::kAvx2) return below_avx2;
  }
  return below_portable;
}

constexpr int64_t kFastBlockChunk = 64;  // 32-vector blocks per chunk: ≤ 64·pairs·32 bytes of codes in L1/L2

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
      of.push_back(
          KeyReservoir{keys.get() + j * stride, ids.get() + j * stride, tmp_keys.get(), tmp_ids.get(), k, cap});
  }
};

// Portable / AVX2: one query at a time, 32 sums per call, then a SIMD compare against the limit.
void scan_group_generic(CpuIsa kernel, const FastScanGroup& g, int64_t b0, int64_t b1) {
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

void scan_group(CpuIsa kernel, const FastScanGroup& g, int64_t b0, int64_t b1) {
  if constexpr (kCpuX86) {
    if (kernel >= CpuIsa::kAvx512) return scan_group_avx512(g, b0, b1);
  }
  scan_group_generic(kernel, g, b0, b1);
}

float key_or_inf(uint16_t key) {
  return key == std::numeric_limits<uint16_t>::max() ? std::numeric_limits<float>::infinity() : static_cast<float>(key);
}

}  // namespace

const char* pq4_kernel_name() {
  const CpuIsa kernel = active_cpu_isa();
  return kernel == CpuIsa::kAvx512 ? "avx512bw" : kernel == CpuIsa::kAvx2 ? "avx2" : "portable";
}

void pq4_block_distances(const uint8_t* block, const uint8_t* qlut, int64_t pairs, uint16_t* out) {
  block_fn(active_cpu_isa())(block, qlut, pairs, out);
}

void pq4_scan_cpu(const FastScanParams& p, int64_t q_begin, int64_t q_end, int64_t block_begin, int64_t block_end,
                  float* out_dist, int64_t* out_ids, int64_t ld) {
  const CpuIsa kernel = active_cpu_isa();
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
                        nullptr,  p.n};
        for (int j = 0; j < g.count; ++j) {
          g.qluts[j] = p.qlut + (q0 + g0 + j) * p.pairs * 32;
          g.tops[j] = &tops.of[g0 + j];
        }
        scan_group(kernel, g, b0, b1);
      }
    }
    for (int64_t j = 0; j < qn; ++j)
      tops.of[j].write_sorted(out_dist + (q0 + j) * ld, out_ids + (q0 + j) * ld, key_or_inf);
  }
}

namespace {

// pq4_scan_ivf_cpu over one chunk of queries.
int64_t scan_ivf_chunk(const FastScanIvfParams& p, CpuIsa kernel, int64_t q_begin, int64_t q_end) {
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
      FastScanGroup g{p.base.packed,
                      pairs,
                      static_cast<int>(std::min<int64_t>(kFastQueryGroup, first[bucket + 1] - i)),
                      {},
                      {},
                      p.row_ids,
                      b0 * 32 + p.list_sizes[list]};
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
  const CpuIsa kernel = active_cpu_isa();
  const int64_t per_query = (2 * p.base.k + 64) * static_cast<int64_t>(sizeof(uint32_t) + sizeof(int64_t));
  const int64_t chunk = std::max<int64_t>(64, (int64_t(64) << 20) / per_query);
  int64_t bad = 0;
  for (int64_t c0 = q_begin; c0 < q_end; c0 += chunk) bad += scan_ivf_chunk(p, kernel, c0, std::min(q_end, c0 + chunk));
  return bad;
}

}  // namespace pq
}  // namespace fastcore

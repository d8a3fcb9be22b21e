// AVX-512BW bodies of the 4-bit fast-scan: table quantization, several queries' block sums in registers,
// the in-register candidate append (pq_fastscan_cpu.cpp dispatches here).
#include <algorithm>
#include <cstdint>

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
    step(_mm512_loadu_si512(codes + p * 32),
         [&](int j) __attribute__((target("avx512f,avx512bw"))) { return _mm512_loadu_si512(qluts[j] + p * 32); });
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
    const __m512i id =
        row_ids ? _mm512_loadu_si512(row_ids + base + 8 * q) : _mm512_add_epi64(_mm512_set1_epi64(base + 8 * q), lanes);
    _mm512_storeu_si512(ids, _mm512_maskz_compress_epi64(part, id));
    ids += __builtin_popcount(part);
  }
  top.size += __builtin_popcount(mask);
}

// AVX-512: the group's sums stay in registers; one unsigned compare per query gives the 32-bit mask
// of candidates, appended to the query's collector in registers.
template <int QB>
__attribute__((target("avx512f,avx512bw"))) void scan_fixed_group_avx512(const FastScanGroup& g, int64_t b0,
                                                                         int64_t b1) {
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

}  // namespace

namespace detail {

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

__attribute__((target("avx512f,avx512bw"))) void block_avx512(const uint8_t* codes, const uint8_t* qlut, int64_t pairs,
                                                              uint16_t* out) {
  __m512i sums;
  block_sums_avx512<1>(codes, &qlut, pairs, &sums);
  _mm512_storeu_si512(out, sums);
}

// pq_fastscan_cpu.cpp's scan_group for AVX-512: the group's query count as a template argument.
void scan_group_avx512(const FastScanGroup& g, int64_t b0, int64_t b1) {
  switch (g.count) {
    case 4: return scan_fixed_group_avx512<4>(g, b0, b1);
    case 3: return scan_fixed_group_avx512<3>(g, b0, b1);
    case 2: return scan_fixed_group_avx512<2>(g, b0, b1);
    default: return scan_fixed_group_avx512<1>(g, b0, b1);
  }
}

}  // namespace detail

#pragma GCC diagnostic pop
}  // namespace pq
}  // namespace fastcore
#endif  // FC_CPU_X86

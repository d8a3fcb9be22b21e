// AVX2 bodies of the 4-bit fast-scan: one block's sums and the threshold mask (pq_fastscan_cpu.cpp
// dispatches here).
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

// The 16 uint16 lanes of `even`/`odd` hold, per 128-bit lane (sub-quantizer parity), the sums of the
// even / odd bytes, i.e. of vectors 2t and 2t+1; add the lanes and interleave back into vector order.
__attribute__((target("avx2"))) inline void finish_avx2(__m256i a0, __m256i a1, uint16_t* out) {
  const __m256i even = _mm256_sub_epi16(a0, _mm256_slli_epi16(a1, 8));  // Σ low bytes (mod 2^16, exact)
  const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
  const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(a1), _mm256_extracti128_si256(a1, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(e, o));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8), _mm_unpackhi_epi16(e, o));
}

}  // namespace

namespace detail {

// One 256-bit register per sub-quantizer pair: vpshufb looks up the 16-entry table of sub-quantizer
// 2p in lane 0 and 2p+1 in lane 1, for the low nibbles (vectors 0..15) and high nibbles (16..31). The
// uint8 results are summed as uint16 with the odd/even trick: adding the register as 16-bit words
// accumulates low + 256·high, adding it shifted right by 8 accumulates the high (odd) bytes alone.
__attribute__((target("avx2"))) void block_avx2(const uint8_t* codes, const uint8_t* qlut, int64_t pairs,
                                                uint16_t* out) {
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

}  // namespace detail

#pragma GCC diagnostic pop
}  // namespace pq
}  // namespace fastcore
#endif  // FC_CPU_X86

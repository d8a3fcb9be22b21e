// CPU kernel of the fused MoE router (math and determinism contract in topk_route.h).
//
// Per row: one pass for the max (kept per lane: the column maxima), one vectorised pass for
// exp(x − max) and its sum, a bounded top-k (only logits above a cheap lower bound of the k-th best
// are ranked), then the k weights. Two implementations of the float32-math rows:
// * AVX-512 (route_blocks_avx512, chosen at run time by active_cpu_isa()): reads float32 rows in place
//   and widens 16-bit rows 16 lanes at a time, exp by a degree-6 polynomial and vscalefps, and a
//   branch-free selection (vcompressps of the candidates, ranks by lane rotations). Branches that the
//   data decide (a candidate block or not, a rank loop of varying length) cost more than the whole
//   softmax: they mispredict about once per row on random logits.
// * portable (route_one_row, also for float64): compiled for AVX-512, AVX2 and baseline x86-64 and
//   picked at load time (GCC target_clones).
// Both return the same ids (selection is exact); weights and statistics agree to float32 rounding, as
// the bounds against the float64 reference say. Within one process the path is fixed, so results do
// not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "moe/topk_route.h"

#include "fastcore/cpu_vector.h"

#if FC_CPU_X86
#include <immintrin.h>
#endif

namespace fastcore {
namespace moe {
namespace {

// Lane count of the explicit partial reductions below: a float sum or max loop does not vectorise
// as written (the compiler may not reorder float adds), so rows are reduced in kLanes fixed lanes,
// then the lanes in order. The order is fixed, so results do not depend on the machine.
constexpr int kLanes = 16;

inline float vector_exp(float x) {
  Float8Lanes lanes = Float8Lanes{} + x;
  return exp_lanes(lanes)[0];
}
inline double vector_exp(double x) { return std::exp(x); }

// Copies row elements logits[base + e * col_stride], e < E, widened to Acc, into out.
template <typename Acc>
void widen_row(const void* logits, ScalarKind kind, int64_t base, int64_t col_stride, int64_t E, Acc* out) {
  if (col_stride == 1 && kind == ScalarKind::kFloat32 && sizeof(Acc) == sizeof(float)) {
    std::memcpy(out, static_cast<const float*>(logits) + base, sizeof(float) * E);
    return;
  }
  for (int64_t e = 0; e < E; ++e) out[e] = load_as<Acc>(logits, kind, base + e * col_stride);
}

// column_max[l] = max of key[e] over e ≡ l (mod kLanes); NaN is skipped, empty lanes stay −inf.
template <typename Acc>
inline void column_maxima(const Acc* key, int64_t E, Acc* column_max) {
  for (int l = 0; l < kLanes; ++l) column_max[l] = -std::numeric_limits<Acc>::infinity();
  int64_t e = 0;
  for (; e + kLanes <= E; e += kLanes)
    for (int l = 0; l < kLanes; ++l) column_max[l] = key[e + l] > column_max[l] ? key[e + l] : column_max[l];
  for (int l = 0; e + l < E; ++l) column_max[l] = key[e + l] > column_max[l] ? key[e + l] : column_max[l];
}

template <>
inline void column_maxima<float>(const float* key, int64_t E, float* column_max) {
  Float8Lanes low = Float8Lanes{} - INFINITY, high = low;
  int64_t e = 0;
  for (; e + kLanes <= E; e += kLanes) {
    Float8Lanes a, b;
    std::memcpy(&a, key + e, sizeof(a));
    std::memcpy(&b, key + e + 8, sizeof(b));
    low = select_lanes(a > low, a, low);
    high = select_lanes(b > high, b, high);
  }
  std::memcpy(column_max, &low, sizeof(low));
  std::memcpy(column_max + 8, &high, sizeof(high));
  for (int l = 0; e + l < E; ++l) column_max[l] = key[e + l] > column_max[l] ? key[e + l] : column_max[l];
}

// probs[e] = exp(x[e] − shift); returns Σ probs in lane order.
template <typename Acc>
inline Acc exp_and_sum(const Acc* x, Acc shift, int64_t E, Acc* probs) {
  Acc lanes[kLanes] = {};
  for (int64_t e = 0; e < E; ++e) {
    probs[e] = vector_exp(x[e] - shift);
    lanes[e % kLanes] += probs[e];
  }
  Acc sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

template <>
inline float exp_and_sum<float>(const float* x, float shift, int64_t E, float* probs) {
  constexpr int kVector = 8;  // 32-byte vectors: one AVX2 register, half an AVX-512 one, two SSE ones
  Float8Lanes lanes_low{}, lanes_high{};
  int64_t e = 0;
  for (; e + 2 * kVector <= E; e += 2 * kVector) {
    Float8Lanes low, high;
    std::memcpy(&low, x + e, sizeof(low));
    std::memcpy(&high, x + e + kVector, sizeof(high));
    const Float8Lanes p_low = exp_lanes(low - shift), p_high = exp_lanes(high - shift);
    std::memcpy(probs + e, &p_low, sizeof(p_low));
    std::memcpy(probs + e + kVector, &p_high, sizeof(p_high));
    lanes_low += p_low;
    lanes_high += p_high;
  }
  for (; e < E; e += kVector) {  // tail: pad with −inf, whose exp is 0
    const int64_t n = std::min<int64_t>(kVector, E - e);
    Float8Lanes chunk = Float8Lanes{} - INFINITY;
    std::memcpy(&chunk, x + e, sizeof(float) * n);
    const Float8Lanes p = exp_lanes(chunk - shift);
    std::memcpy(probs + e, &p, sizeof(float) * n);
    lanes_low += p;
  }
  float sum = 0;
  for (int l = 0; l < kVector; ++l) sum += lanes_low[l] + lanes_high[l];
  return sum;
}

// k-th largest of kLanes column maxima without sorting: count_i = #{j : max_j > max_i} for every
// lane at once, then the smallest max_i with count_i < k (exactly the values ≥ the k-th largest).
template <typename Acc>
inline Acc kth_largest_of_lanes(const Acc* column_max, int k) {
  int32_t greater[kLanes] = {};
  for (int j = 0; j < kLanes; ++j)
    for (int i = 0; i < kLanes; ++i) greater[i] += column_max[j] > column_max[i] ? 1 : 0;
  Acc bound = std::numeric_limits<Acc>::infinity();
  for (int i = 0; i < kLanes; ++i) bound = (greater[i] < k && column_max[i] < bound) ? column_max[i] : bound;
  return bound;
}

// Whether any of key[0..8) is ≥ bound.
template <typename Acc>
inline bool block_has_candidate(const Acc* key, Acc bound) {
  bool any = false;
  for (int l = 0; l < 8; ++l) any |= key[l] >= bound;
  return any;
}

template <>
inline bool block_has_candidate<float>(const float* key, float bound) {
  Float8Lanes block;
  std::memcpy(&block, key, sizeof(block));
  const Int8Lanes mask = block >= bound;
  uint64_t words[4];  // OR the 32-byte mask as four words: no horizontal vector reduction needed
  std::memcpy(words, &mask, sizeof(words));
  return (words[0] | words[1] | words[2] | words[3]) != 0;
}

// Selection by rank for short lists (n ≤ kMaxRanked): every key's rank under ranks_before is
// counted without branches (n² compares, vectorised), then the first k ranks are placed directly.
// `ids[i]` is the expert index of key[i], increasing in i (so equal keys rank by position).
constexpr int kMaxRanked = 32;

template <typename Acc>
inline void select_top_k_by_rank(const Acc* key, const int32_t* ids, int n, int k, Acc* top_keys, int64_t* top_ids) {
  int32_t rank[kMaxRanked] = {};
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < n; ++i) rank[i] += (key[j] > key[i]) | ((key[j] == key[i]) & (j < i)) ? 1 : 0;
  for (int i = 0; i < n; ++i)
    if (rank[i] < k) {
      top_keys[rank[i]] = key[i];
      top_ids[rank[i]] = ids[i];
    }
}

// The k best keys of a row under ranks_before, best first. A lower bound for the k-th best key is
// the k-th largest of the column maxima (distinct elements, so their k-th largest cannot exceed the
// row's; empty lanes only lower it). Indices of keys ≥ bound are compacted without branches inside
// blocks of 8 that hold one (about 1.5·k keys for random logits), and only those reach the sorted
// insertion. Keys must be NaN-free.
template <typename Acc>
inline void select_top_k(const Acc* key, int64_t E, int k, const Acc* column_max, Acc* top_keys, int64_t* top_ids,
                         int32_t* candidates) {
  const Acc bound = E <= kLanes ? -std::numeric_limits<Acc>::infinity() : kth_largest_of_lanes(column_max, k);
  int64_t count = 0;
  int64_t e = 0;
  constexpr int kBlock = 8;
  for (; e + kBlock <= E; e += kBlock) {
    if (!block_has_candidate(key + e, bound)) continue;
    for (int l = 0; l < kBlock; ++l) {
      candidates[count] = static_cast<int32_t>(e + l);
      count += key[e + l] >= bound ? 1 : 0;
    }
  }
  for (; e < E; ++e) {
    candidates[count] = static_cast<int32_t>(e);
    count += key[e] >= bound ? 1 : 0;
  }
  if (count <= kMaxRanked) {  // the usual case: rank the few candidates without branches
    Acc candidate_keys[kMaxRanked];
    for (int64_t c = 0; c < count; ++c) candidate_keys[c] = key[candidates[c]];
    return select_top_k_by_rank(candidate_keys, candidates, static_cast<int>(count), k, top_keys, top_ids);
  }
  // Many keys tie at the bound (e.g. a constant row): sorted insertion, linear in the count.
  for (int j = 0; j < k; ++j) {
    top_keys[j] = -std::numeric_limits<Acc>::infinity();
    top_ids[j] = std::numeric_limits<int64_t>::max();  // loses to any real element, −inf included
  }
  for (int64_t c = 0; c < count; ++c) topk_insert(top_keys, top_ids, k, key[candidates[c]], int64_t(candidates[c]));
}

// One row: writes weights/ids/lse and adds this row's probabilities and lse² to the block partials.
// `x` is scratch: NaN logits are overwritten with −inf (their selection key) after the softmax.
template <typename Acc>
FC_CPU_CLONES void route_one_row(Acc* x, int64_t E, int k, bool renormalize, Acc* probs, Acc* weights, int64_t* ids,
                                 Acc* lse_out, Acc* prob_sum, Acc* lse_sq_sum, int32_t* counts) {
  Acc column_max[kLanes];
  column_maxima(x, E, column_max);  // skips NaN; a NaN still makes `sum` NaN below
  Acc row_max = column_max[0];
  for (int l = 1; l < kLanes; ++l) row_max = column_max[l] > row_max ? column_max[l] : row_max;
  const Acc sum = exp_and_sum(x, row_max, E, probs);
  // NaN anywhere in the row, or a row of only −inf, makes sum NaN and so lse NaN (no distribution).
  const Acc lse = row_max + fc_log(sum);
  const Acc inv_sum = Acc(1) / sum;
  for (int64_t e = 0; e < E; ++e) {
    probs[e] *= inv_sum;
    prob_sum[e] += probs[e];
  }
  *lse_out = lse;
  *lse_sq_sum += lse * lse;

  if (sum != sum)  // NaN keys become −inf (column maxima already skip NaN, so they stay valid)
    for (int64_t e = 0; e < E; ++e) x[e] = selection_key(x[e]);
  Acc top_keys[kMaxTopK];
  int64_t top_ids[kMaxTopK];
  int32_t candidates[kMaxExperts];
  select_top_k(x, E, k, column_max, top_keys, top_ids, candidates);

  Acc selected_sum = 0;
  for (int j = 0; j < k; ++j) selected_sum += probs[top_ids[j]];
  const Acc scale = renormalize ? Acc(1) / selected_sum : Acc(1);
  for (int j = 0; j < k; ++j) {
    weights[j] = probs[top_ids[j]] * scale;
    ids[j] = top_ids[j];
    counts[top_ids[j]] += 1;
  }
}

template <typename Acc>
void route_blocks(const TopkRouteParams& p, int64_t block_begin, int64_t block_end) {
  const int64_t E = p.num_experts;
  Acc x[kMaxExperts];
  Acc probs[kMaxExperts];
  for (int64_t block = block_begin; block < block_end; ++block) {
    Acc* prob_sum = static_cast<Acc*>(p.partial_prob_sum) + block * E;
    Acc* lse_sq_sum = static_cast<Acc*>(p.partial_lse_sq_sum) + block;
    int32_t* counts = p.partial_counts + block * E;
    for (int64_t e = 0; e < E; ++e) {
      prob_sum[e] = 0;
      counts[e] = 0;
    }
    *lse_sq_sum = 0;
    const int64_t row_begin = block * p.rows_per_block;
    const int64_t row_end = std::min(p.num_tokens, row_begin + p.rows_per_block);
    for (int64_t row = row_begin; row < row_end; ++row) {
      widen_row(p.logits, p.logits_kind, row * p.row_stride, p.col_stride, E, x);
      route_one_row<Acc>(x, E, p.k, p.renormalize, probs, static_cast<Acc*>(p.weights) + row * p.k,
                         p.expert_ids + row * p.k, static_cast<Acc*>(p.lse) + row, prob_sum, lse_sq_sum, counts);
    }
  }
}

#if FC_CPU_X86
// ---- AVX-512 rows (float32 math; see the top of this file) ----------------------------------------
// GCC 12's avx512fintrin.h self-initialises its "undefined" vectors, which -Wmaybe-uninitialized
// reports once inlined (as in the pq and mux ISA files).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FC_ROUTE_AVX512 __attribute__((target("avx512f,avx512bw,popcnt")))
#define FC_ROUTE_AVX512_INLINE __attribute__((target("avx512f,avx512bw,popcnt"), always_inline)) inline

constexpr int kVec = 16;  // float32 lanes of a zmm register, = kLanes (the column maxima layout)
static_assert(kVec == kLanes, "the AVX-512 column maxima must have the portable layout (fallback selection)");

FC_ROUTE_AVX512_INLINE __mmask16 first_lanes(int64_t count) {  // the first min(count, 16) lanes
  return count >= kVec ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// exp(d) for d ≤ 0 or NaN (d = x − row max): d = n ln2 + r with |r| ≤ ln2/2, exp(r) by a degree-6
// minimax polynomial (relative error 2e-8 with float32 coefficients, below float32 rounding), 2^n by
// vscalefps. d is clamped at −106 first, where n = −153 and poly · 2^n < 2^-150 rounds to exactly 0: so
// −inf (a masked expert) gives exactly 0, and no r is computed from an infinite n. NaN passes the clamp
// (max returns its second operand when one is NaN) and propagates. Round to nearest by adding and
// removing 1.5·2^23.
FC_ROUTE_AVX512_INLINE __m512 exp_nonpositive(__m512 d) {
  d = _mm512_max_ps(_mm512_set1_ps(-106.0f), d);
  const __m512 shifter = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(d, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), d);  // Cody–Waite: n·ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 poly = _mm512_set1_ps(1.383684576e-03f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.374815807e-03f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.166822508e-02f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.666641980e-01f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.999999106e-01f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(poly, n);
}

// Lane i of the result: key[(i + R) mod 16].
template <int R>
FC_ROUTE_AVX512_INLINE __m512 rotate_lanes(__m512 key) {
  const __m512i bits = _mm512_castps_si512(key);
  return _mm512_castsi512_ps(_mm512_alignr_epi32(bits, bits, R));
}

// greater_count[i] = #{j : key[j] > key[i]}: all 15 other lanes, one rotation each.
template <int... R>
FC_ROUTE_AVX512_INLINE __m512i count_greater(__m512 key, std::integer_sequence<int, R...>) {
  __m512i count = _mm512_setzero_si512();
  const __m512i minus_one = _mm512_set1_epi32(-1);
  ((count =
        _mm512_mask_sub_epi32(count, _mm512_cmp_ps_mask(rotate_lanes<R + 1>(key), key, _CMP_GT_OQ), count, minus_one)),
   ...);
  return count;
}

// rank[i] = #{j : key[j] ranks before key[i]} under ranks_before, for lanes whose expert index increases
// with the lane (so "equal key, lower index" is "equal key, lower lane": in rotation R the lanes i ≥ 16 − R
// see lanes j = i + R − 16 < i). A permutation of 0..15 for NaN-free keys.
template <int... R>
FC_ROUTE_AVX512_INLINE __m512i rank_with_ties(__m512 key, std::integer_sequence<int, R...>) {
  __m512i rank = _mm512_setzero_si512();
  const __m512i minus_one = _mm512_set1_epi32(-1);
  ((rank = _mm512_mask_sub_epi32(rank,
                                 _mm512_cmp_ps_mask(rotate_lanes<R + 1>(key), key, _CMP_GT_OQ) |
                                     _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(0xffffu << (kVec - 1 - R)),
                                                             rotate_lanes<R + 1>(key), key, _CMP_EQ_OQ),
                                 rank, minus_one)),
   ...);
  return rank;
}

// The k-th largest of the 16 column maxima (NaN-free): the smallest one with fewer than k larger ones.
FC_ROUTE_AVX512_INLINE float kth_largest_of_lanes_avx512(__m512 column_max, int k) {
  const __m512i greater = count_greater(column_max, std::make_integer_sequence<int, kVec - 1>{});
  const __mmask16 within = _mm512_cmplt_epi32_mask(greater, _mm512_set1_epi32(k));
  return _mm512_mask_reduce_min_ps(within, column_max);
}

// Top k (k ≤ 16) of 16 candidate keys (NaN-free) with expert ids ids[0..16) increasing by lane; the first
// `count` lanes are real (count ≥ k), the rest are padding (−inf, ids above every real one). Strict
// ranks first: the sum of #{j : key_j > key_i} over all lanes is 120 minus the number of equal pairs, so
// it tells exactly whether any real key ties (the padding lanes tie among themselves, p(p−1)/2 pairs,
// and with a real key only if that key is −inf); only then are the ranks redone with the tie-break.
FC_ROUTE_AVX512_INLINE void top_k_of_16(__m512 key, const int32_t* ids, int count, int k, int64_t* top_ids) {
  __m512i rank = count_greater(key, std::make_integer_sequence<int, kVec - 1>{});
  const int pads = kVec - count;
  if (_mm512_reduce_add_epi32(rank) != 120 - pads * (pads - 1) / 2)
    rank = rank_with_ties(key, std::make_integer_sequence<int, kVec - 1>{});
  // Real lanes now hold distinct ranks below `count`, so rank j < k is held by exactly one lane.
  for (int j = 0; j < k; ++j) {
    const uint32_t lane = _mm512_cmpeq_epi32_mask(rank, _mm512_set1_epi32(j));
    top_ids[j] = ids[__builtin_ctz(lane)];
  }
}

// Rows of float32 values, read in place (contiguous float32) or widened into `scratch` first.
FC_ROUTE_AVX512_INLINE const float* row_as_float(const TopkRouteParams& p, int64_t row, float* scratch) {
  const int64_t E = p.num_experts, base = row * p.row_stride;
  if (p.col_stride != 1) {
    widen_row(p.logits, p.logits_kind, base, p.col_stride, E, scratch);
    return scratch;
  }
  if (p.logits_kind == ScalarKind::kFloat32) return static_cast<const float*>(p.logits) + base;
  const uint16_t* source = static_cast<const uint16_t*>(p.logits) + base;
  const bool bf16 = p.logits_kind == ScalarKind::kBFloat16;
  for (int64_t e = 0; e < E; e += kVec) {
    // 16-bit lanes of a masked 32-lane load (AVX-512BW), so the tail reads nothing past the row.
    const __mmask32 lanes =
        E - e >= kVec ? static_cast<__mmask32>(0xffff) : static_cast<__mmask32>((1u << (E - e)) - 1u);
    const __m256i half = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(lanes, source + e));
    const __m512 wide = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16))
                             : _mm512_cvtph_ps(half);  // exact, as float16_bits_to_float
    _mm512_mask_storeu_ps(scratch + e, static_cast<__mmask16>(lanes), wide);
  }
  return scratch;
}

FC_ROUTE_AVX512 void route_blocks_avx512(const TopkRouteParams& p, int64_t block_begin, int64_t block_end) {
  const int64_t E = p.num_experts;
  const int k = p.k;
  const int64_t full_vectors = E / kVec;
  const __mmask16 tail = first_lanes(E - full_vectors * kVec);  // 0 when E is a multiple of 16
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  const __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) float scratch[kMaxExperts];      // widened 16-bit or strided rows
  alignas(64) float exps[kMaxExperts + kVec];  // exp(x − max), unnormalised
  alignas(64) float keys[kMaxExperts];         // NaN-free selection keys (rows with NaN only)
  alignas(64) float candidate_keys[kMaxExperts + kVec];
  alignas(64) int32_t candidate_ids[kMaxExperts + kVec];
  for (int64_t block = block_begin; block < block_end; ++block) {
    float* prob_sum = static_cast<float*>(p.partial_prob_sum) + block * E;
    int32_t* counts = p.partial_counts + block * E;
    std::memset(prob_sum, 0, sizeof(float) * E);
    std::memset(counts, 0, sizeof(int32_t) * E);
    float lse_sq_sum = 0;
    const int64_t row_begin = block * p.rows_per_block;
    const int64_t row_end = std::min(p.num_tokens, row_begin + p.rows_per_block);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const float* x = row_as_float(p, row, scratch);
      // Column maxima (max returns its second operand for a NaN first one: NaN is skipped) and the max.
      __m512 column_max = minus_inf;
      for (int64_t v = 0; v < full_vectors; ++v) column_max = _mm512_max_ps(_mm512_loadu_ps(x + v * kVec), column_max);
      if (tail) column_max = _mm512_max_ps(_mm512_mask_loadu_ps(minus_inf, tail, x + full_vectors * kVec), column_max);
      const float row_max = _mm512_reduce_max_ps(column_max);
      // exp(x − max) and its sum (lanes past E load −inf, whose exp is 0; a NaN anywhere makes sum NaN).
      const __m512 shift = _mm512_set1_ps(row_max);
      __m512 lanes_sum = _mm512_setzero_ps();
      for (int64_t v = 0; v < full_vectors; ++v) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + v * kVec), shift));
        _mm512_store_ps(exps + v * kVec, e);
        lanes_sum = _mm512_add_ps(lanes_sum, e);
      }
      if (tail) {
        const __m512 chunk = _mm512_mask_loadu_ps(minus_inf, tail, x + full_vectors * kVec);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(chunk, shift));
        _mm512_store_ps(exps + full_vectors * kVec, e);
        lanes_sum = _mm512_add_ps(lanes_sum, e);
      }
      const float sum = _mm512_reduce_add_ps(lanes_sum);
      const float lse = row_max + std::log(sum);
      const float inv_sum = 1.0f / sum;
      const __m512 inv = _mm512_set1_ps(inv_sum);
      for (int64_t v = 0; v < full_vectors; ++v)
        _mm512_storeu_ps(prob_sum + v * kVec,
                         _mm512_fmadd_ps(_mm512_load_ps(exps + v * kVec), inv, _mm512_loadu_ps(prob_sum + v * kVec)));
      if (tail)
        _mm512_mask_storeu_ps(prob_sum + full_vectors * kVec, tail,
                              _mm512_fmadd_ps(_mm512_load_ps(exps + full_vectors * kVec), inv,
                                              _mm512_maskz_loadu_ps(tail, prob_sum + full_vectors * kVec)));
      static_cast<float*>(p.lse)[row] = lse;
      lse_sq_sum += lse * lse;

      // Selection on NaN-free keys: a row with NaN (sum is NaN) gets its keys with NaN → −inf.
      const float* key = x;
      if (sum != sum) {
        for (int64_t e = 0; e < E; ++e) keys[e] = selection_key(x[e]);
        key = keys;
      }
      int64_t top_ids[kMaxTopK];
      if (E <= kVec) {
        const __mmask16 real = first_lanes(E);
        _mm512_storeu_si512(candidate_ids, _mm512_mask_add_epi32(lane_index, static_cast<__mmask16>(~real), lane_index,
                                                                 _mm512_set1_epi32(kMaxExperts)));
        top_k_of_16(_mm512_mask_loadu_ps(minus_inf, real, key), candidate_ids, static_cast<int>(E), k, top_ids);
      } else {
        alignas(64) float column_max_lanes[kVec];
        _mm512_store_ps(column_max_lanes, column_max);
        const __m512 bound = _mm512_set1_ps(kth_largest_of_lanes_avx512(column_max, k));
        int64_t count = 0;
        for (int64_t v = 0; v * kVec < E; ++v) {
          const __mmask16 lanes = v < full_vectors ? static_cast<__mmask16>(0xffff) : tail;
          const __m512 chunk = _mm512_maskz_loadu_ps(lanes, key + v * kVec);
          const __mmask16 chosen = _mm512_mask_cmp_ps_mask(lanes, chunk, bound, _CMP_GE_OQ);
          // Register-form compress, then a full store: the memory form is microcoded on some CPUs.
          _mm512_storeu_ps(candidate_keys + count, _mm512_maskz_compress_ps(chosen, chunk));
          _mm512_storeu_si512(
              candidate_ids + count,
              _mm512_maskz_compress_epi32(chosen, _mm512_add_epi32(lane_index, _mm512_set1_epi32(v * kVec))));
          count += __builtin_popcount(chosen);
        }
        if (count <= kVec) {
          _mm512_storeu_si512(candidate_ids + count, _mm512_add_epi32(lane_index, _mm512_set1_epi32(kMaxExperts)));
          top_k_of_16(_mm512_mask_loadu_ps(minus_inf, first_lanes(count), candidate_keys), candidate_ids,
                      static_cast<int>(count), k, top_ids);
        } else {  // many keys at or above the bound (ties, large k): the portable selection
          float top_keys[kMaxTopK];
          int32_t candidates[kMaxExperts];
          select_top_k(key, E, k, column_max_lanes, top_keys, top_ids, candidates);
        }
      }

      float selected_sum = 0;
      for (int j = 0; j < k; ++j) selected_sum += exps[top_ids[j]] * inv_sum;
      const float scale = p.renormalize ? 1.0f / selected_sum : 1.0f;
      float* weights = static_cast<float*>(p.weights) + row * k;
      int64_t* ids = p.expert_ids + row * k;
      for (int j = 0; j < k; ++j) {
        weights[j] = exps[top_ids[j]] * inv_sum * scale;
        ids[j] = top_ids[j];
        counts[top_ids[j]] += 1;
      }
    }
    static_cast<float*>(p.partial_lse_sq_sum)[block] = lse_sq_sum;
  }
}

#pragma GCC diagnostic pop
#endif  // FC_CPU_X86

template <typename Acc>
void reduce_partials(const TopkRouteParams& p, Acc* z_loss, Acc* mean_prob) {
  const int64_t E = p.num_experts;
  // Block partials are added in block order in double: fixed order, and no precision loss even
  // when T runs to tens of millions.
  double lse_sq = 0;
  for (int64_t b = 0; b < p.num_blocks; ++b) lse_sq += static_cast<const Acc*>(p.partial_lse_sq_sum)[b];
  const double inv_tokens = p.num_tokens > 0 ? 1.0 / static_cast<double>(p.num_tokens) : 0.0;
  *z_loss = static_cast<Acc>(lse_sq * inv_tokens);
  for (int64_t e = 0; e < E; ++e) {
    double prob = 0;
    int64_t count = 0;
    for (int64_t b = 0; b < p.num_blocks; ++b) {
      prob += static_cast<const Acc*>(p.partial_prob_sum)[b * E + e];
      count += p.partial_counts[b * E + e];
    }
    mean_prob[e] = static_cast<Acc>(prob * inv_tokens);
    p.counts[e] = count;
  }
}

template <typename Acc>
void backward_rows(const TopkRouteBackwardParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t E = p.num_experts;
  const int k = p.k;
  const Acc inv_tokens = Acc(1) / static_cast<Acc>(p.num_tokens);
  const Acc* grad_mean_prob = static_cast<const Acc*>(p.grad_mean_prob);
  Acc x[kMaxExperts];
  Acc probs[kMaxExperts];
  Acc dense_grad[kMaxExperts];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Acc lse = static_cast<const Acc*>(p.lse)[row];
    const int64_t* ids = p.expert_ids + row * k;
    const Acc* w = static_cast<const Acc*>(p.weights) + row * k;
    const Acc* gw = static_cast<const Acc*>(p.grad_weights) + row * k;
    Acc* dx = static_cast<Acc*>(p.grad_logits) + row * E;
    widen_row(p.logits, p.logits_kind, row * p.row_stride, p.col_stride, E, x);
    for (int64_t e = 0; e < E; ++e) {
      probs[e] = route_probability(x[e], lse);
      dense_grad[e] = grad_mean_prob[e] * inv_tokens;
    }
    Acc selected_dot = 0;  // Σ_i w_i gw_i
    for (int j = 0; j < k; ++j) selected_dot += w[j] * gw[j];
    if (!p.renormalize)
      for (int j = 0; j < k; ++j) dense_grad[ids[j]] += gw[j];
    Acc dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += probs[e] * dense_grad[e];
    const Acc c = Acc(2) * *static_cast<const Acc*>(p.grad_z_loss) * lse * inv_tokens;
    for (int64_t e = 0; e < E; ++e) dx[e] = route_grad_element(probs[e], dense_grad[e], dot, c);
    if (p.renormalize)
      for (int j = 0; j < k; ++j) dx[ids[j]] += w[j] * (gw[j] - selected_dot);
  }
}

}  // namespace

void topk_route_cpu_blocks(const TopkRouteParams& params, int64_t block_begin, int64_t block_end) {
  if (params.logits_kind == ScalarKind::kFloat64) return route_blocks<double>(params, block_begin, block_end);
#if FC_CPU_X86
  if (active_cpu_isa() >= CpuIsa::kAvx512) return route_blocks_avx512(params, block_begin, block_end);
#endif
  route_blocks<float>(params, block_begin, block_end);
}

void topk_route_cpu_reduce(const TopkRouteParams& params, void* z_loss, void* mean_prob) {
  if (params.logits_kind == ScalarKind::kFloat64)
    reduce_partials<double>(params, static_cast<double*>(z_loss), static_cast<double*>(mean_prob));
  else
    reduce_partials<float>(params, static_cast<float*>(z_loss), static_cast<float*>(mean_prob));
}

void topk_route_backward_cpu_rows(const TopkRouteBackwardParams& params, int64_t row_begin, int64_t row_end) {
  if (params.logits_kind == ScalarKind::kFloat64)
    backward_rows<double>(params, row_begin, row_end);
  else
    backward_rows<float>(params, row_begin, row_end);
}

}  // namespace moe
}  // namespace fastcore

// CPU kernel of the fused MoE router (math and determinism contract in topk_route.h).
//
// Per row: widen the row into a stack buffer, one pass for the max, one vectorised pass for
// exp(x − max) and its sum, a bounded top-k (only logits above a cheap lower bound of the k-th best
// reach the insertion), then the k weights. The hot row function is compiled for AVX-512, AVX2 and baseline x86-64 and picked
// at load time (GCC target_clones), so one binary is fast everywhere and portable.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "moe/topk_route.h"

#include "fastcore/cpu_vector.h"

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
  if (params.logits_kind == ScalarKind::kFloat64)
    route_blocks<double>(params, block_begin, block_end);
  else
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

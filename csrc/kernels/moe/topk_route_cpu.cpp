// CPU kernel of the fused MoE router (math and determinism contract in topk_route.h).
//
// Per row: widen the row into a stack buffer, one pass for the max, one vectorised pass for
// exp(x − max) and its sum, a bounded top-k (only logits above a cheap lower bound of the k-th best
// reach the insertion), then the k weights. The hot row function is compiled for AVX-512, AVX2 and baseline x86-64 and picked
// at load time (GCC target_clones), so one binary is fast everywhere and portable.
#include <cmath>
#include <cstring>
#include <limits>

#include "moe/topk_route.h"

// 64-byte vectors only live inside this file's inline functions; the psABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define FC_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FC_CPU_CLONES
#endif

namespace fastcore {
namespace moe {
namespace {

// Lane count of the explicit partial reductions below: a float sum or max loop does not vectorise
// as written (the compiler may not reorder float adds), so rows are reduced in kLanes fixed lanes,
// then the lanes in order. The order is fixed, so results do not depend on the machine.
constexpr int kLanes = 16;

// exp(x) for 16 float32 lanes at once (GCC vector extensions, lowered to AVX-512, AVX2 or SSE by
// the target clone): x = n ln2 + r with |r| ≤ ln2/2, exp(r) by its degree-7 Taylor polynomial
// (truncation < 5e-9 relative), 2^n through the exponent bits. Below −87.3 it returns 0 (true value
// < 1.2e-38, far below what a probability sum resolves); above 88.7 +inf; NaN propagates.
typedef float Float16Lanes __attribute__((vector_size(64)));
typedef int32_t Int16Lanes __attribute__((vector_size(64)));

inline Float16Lanes exp_lanes(Float16Lanes x) {
  const Float16Lanes low = x < -87.3f ? Float16Lanes{} - 87.3f : x;
  const Float16Lanes clamped = low > 88.7f ? Float16Lanes{} + 88.7f : low;
  // Round to nearest by adding and removing 1.5·2^23 (no libm call, so it vectorises).
  const Float16Lanes n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // Cody–Waite split of ln2 so r is exact to float precision.
  Float16Lanes r = clamped - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  Float16Lanes poly = Float16Lanes{} + 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const Int16Lanes exponent_bits = (__builtin_convertvector(n, Int16Lanes) + 127) << 23;
  Float16Lanes result = poly * reinterpret_cast<Float16Lanes>(exponent_bits);
  result = x < -87.3f ? Float16Lanes{} : result;
  result = x > 88.7f ? Float16Lanes{} + INFINITY : result;
  return x != x ? x : result;
}

inline float vector_exp(float x) {
  Float16Lanes lanes = Float16Lanes{} + x;
  return exp_lanes(lanes)[0];
}
inline double vector_exp(double x) { return std::exp(x); }

template <typename Acc>
void widen_row(const TopkRouteParams& p, int64_t row, Acc* out) {
  const int64_t base = row * p.row_stride;
  const int64_t E = p.num_experts;
  if (p.col_stride == 1 && p.logits_kind == ScalarKind::kFloat32 && sizeof(Acc) == sizeof(float)) {
    std::memcpy(out, static_cast<const float*>(p.logits) + base, sizeof(float) * E);
    return;
  }
  for (int64_t e = 0; e < E; ++e) out[e] = load_as<Acc>(p.logits, p.logits_kind, base + e * p.col_stride);
}

template <typename Acc>
inline Acc lane_max(const Acc* x, int64_t E) {
  Acc lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<Acc>::infinity();
  int64_t e = 0;
  for (; e + kLanes <= E; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = x[e + l] > lanes[l] ? x[e + l] : lanes[l];
  for (; e < E; ++e) lanes[0] = x[e] > lanes[0] ? x[e] : lanes[0];
  Acc m = lanes[0];
  for (int l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
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
  Float16Lanes lanes{};
  int64_t e = 0;
  for (; e + kLanes <= E; e += kLanes) {
    Float16Lanes chunk;
    std::memcpy(&chunk, x + e, sizeof(chunk));
    const Float16Lanes p = exp_lanes(chunk - shift);
    std::memcpy(probs + e, &p, sizeof(p));
    lanes += p;
  }
  if (e < E) {  // tail: pad with −inf, whose exp is 0
    Float16Lanes chunk = Float16Lanes{} - INFINITY;
    std::memcpy(&chunk, x + e, sizeof(float) * (E - e));
    const Float16Lanes p = exp_lanes(chunk - shift);
    std::memcpy(probs + e, &p, sizeof(float) * (E - e));
    lanes += p;
  }
  float sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
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

// The k best keys of a row under ranks_before, best first. A lower bound for the k-th best key is
// the k-th largest of the kLanes column maxima (kLanes distinct elements: their k-th largest cannot
// exceed the row's). Indices of keys ≥ bound are compacted without branches (about 1.5·k of them for
// random logits), and only those reach the sorted insertion. Keys must be NaN-free.
template <typename Acc>
inline void select_top_k(const Acc* key, int64_t E, int k, Acc* top_keys, int64_t* top_ids, int32_t* candidates) {
  Acc bound = -std::numeric_limits<Acc>::infinity();
  if (E >= 2 * kLanes && k <= kLanes) {
    Acc column_max[kLanes];
    for (int l = 0; l < kLanes; ++l) column_max[l] = key[l];
    int64_t e = kLanes;
    for (; e + kLanes <= E; e += kLanes)
      for (int l = 0; l < kLanes; ++l) column_max[l] = key[e + l] > column_max[l] ? key[e + l] : column_max[l];
    bound = kth_largest_of_lanes(column_max, k);
  }
  int64_t count = 0;
  for (int64_t e = 0; e < E; ++e) {
    candidates[count] = static_cast<int32_t>(e);
    count += key[e] >= bound ? 1 : 0;
  }
  for (int j = 0; j < k; ++j) {
    top_keys[j] = -std::numeric_limits<Acc>::infinity();
    top_ids[j] = std::numeric_limits<int64_t>::max();  // loses to any real element, −inf included
  }
  for (int64_t c = 0; c < count; ++c) topk_insert(top_keys, top_ids, k, key[candidates[c]], int64_t(candidates[c]));
}

// One row: writes weights/ids/lse and adds this row's probabilities and lse² to the block partials.
// `x` is scratch: NaN logits are overwritten with −inf (their selection key) after the softmax.
template <typename Acc>
FC_CPU_CLONES void route_one_row(Acc* x, int64_t E, int k, bool renormalize, Acc* probs,
                                 Acc* weights, int64_t* ids, Acc* lse_out, Acc* prob_sum,
                                 Acc* lse_sq_sum, int32_t* counts) {
  const Acc row_max = lane_max(x, E);  // ignores NaN; a NaN still makes `sum` NaN below
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

  if (sum != sum)
    for (int64_t e = 0; e < E; ++e) x[e] = selection_key(x[e]);
  Acc top_keys[kMaxTopK];
  int64_t top_ids[kMaxTopK];
  int32_t candidates[kMaxExperts];
  select_top_k(x, E, k, top_keys, top_ids, candidates);

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
      widen_row(p, row, x);
      route_one_row<Acc>(x, E, p.k, p.renormalize, probs, static_cast<Acc*>(p.weights) + row * p.k,
                         p.expert_ids + row * p.k, static_cast<Acc*>(p.lse) + row, prob_sum,
                         lse_sq_sum, counts);
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
  Acc probs[kMaxExperts];
  Acc dense_grad[kMaxExperts];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const Acc lse = static_cast<const Acc*>(p.lse)[row];
    const int64_t* ids = p.expert_ids + row * k;
    const Acc* w = static_cast<const Acc*>(p.weights) + row * k;
    const Acc* gw = static_cast<const Acc*>(p.grad_weights) + row * k;
    Acc* dx = static_cast<Acc*>(p.grad_logits) + row * E;
    for (int64_t e = 0; e < E; ++e) {
      probs[e] = route_probability(load_as<Acc>(p.logits, p.logits_kind, row * p.row_stride + e * p.col_stride), lse);
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

void topk_route_backward_cpu_rows(const TopkRouteBackwardParams& params, int64_t row_begin,
                                  int64_t row_end) {
  if (params.logits_kind == ScalarKind::kFloat64)
    backward_rows<double>(params, row_begin, row_end);
  else
    backward_rows<float>(params, row_begin, row_end);
}

}  // namespace moe
}  // namespace fastcore

// The CPU router kernel against a naive double-precision implementation written here from the math
// in topk_route.h: ids exact, weights and statistics close, NaN/-inf/tie rows, block partition
// independence, and the backward against central finite differences.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "check.h"
#include "moe/topk_route.h"

using namespace fastcore;
using namespace fastcore::moe;

namespace {

struct Routed {
  std::vector<double> weights, lse, mean_prob;
  std::vector<int64_t> ids, counts;
  double z_loss = 0;
};

// Runs the kernel on float or double logits [T, E] (contiguous), blocks in one call or one by one.
template <typename Acc>
Routed run_kernel(const std::vector<Acc>& logits, int64_t T, int64_t E, int k, bool renormalize, bool block_by_block) {
  std::vector<Acc> weights(T * k), lse(T), partial_prob, partial_lse, z(1), mean_prob(E);
  std::vector<int64_t> ids(T * k), counts(E);
  TopkRouteParams p;
  p.logits = logits.data();
  p.logits_kind = sizeof(Acc) == 8 ? ScalarKind::kFloat64 : ScalarKind::kFloat32;
  p.num_tokens = T;
  p.num_experts = E;
  p.row_stride = E;
  p.col_stride = 1;
  p.k = k;
  p.renormalize = renormalize;
  p.weights = weights.data();
  p.expert_ids = ids.data();
  p.lse = lse.data();
  p.counts = counts.data();
  p.rows_per_block = route_rows_per_block(T, E, 256);
  p.num_blocks = (T + p.rows_per_block - 1) / p.rows_per_block;
  partial_prob.resize(p.num_blocks * E);
  partial_lse.resize(p.num_blocks);
  std::vector<int32_t> partial_counts(p.num_blocks * E);
  p.partial_prob_sum = partial_prob.data();
  p.partial_lse_sq_sum = partial_lse.data();
  p.partial_counts = partial_counts.data();
  if (block_by_block) {
    for (int64_t b = p.num_blocks - 1; b >= 0; --b) topk_route_cpu_blocks(p, b, b + 1);
  } else {
    topk_route_cpu_blocks(p, 0, p.num_blocks);
  }
  topk_route_cpu_reduce(p, z.data(), mean_prob.data());
  Routed r;
  r.weights.assign(weights.begin(), weights.end());
  r.lse.assign(lse.begin(), lse.end());
  r.mean_prob.assign(mean_prob.begin(), mean_prob.end());
  r.ids = ids;
  r.counts = counts;
  r.z_loss = z[0];
  return r;
}

// Straight from the formulas, in double.
Routed run_naive(const std::vector<float>& logits, int64_t T, int64_t E, int k, bool renormalize) {
  Routed r;
  r.mean_prob.assign(E, 0.0);
  r.counts.assign(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    const float* x = logits.data() + t * E;
    double m = -INFINITY;
    for (int64_t e = 0; e < E; ++e)
      if (!std::isnan(x[e])) m = std::max(m, double(x[e]));
    double s = 0;
    for (int64_t e = 0; e < E; ++e) s += std::exp(double(x[e]) - m);
    const double lse = m + std::log(s);
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int64_t e) { return std::isnan(x[e]) ? -INFINITY : double(x[e]); };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) > key(b); });
    double selected = 0;
    for (int j = 0; j < k; ++j) selected += std::exp(double(x[order[j]]) - lse);
    for (int j = 0; j < k; ++j) {
      const double p = std::exp(double(x[order[j]]) - lse);
      r.weights.push_back(renormalize ? p / selected : p);
      r.ids.push_back(order[j]);
      r.counts[order[j]] += 1;
    }
    for (int64_t e = 0; e < E; ++e) r.mean_prob[e] += std::exp(double(x[e]) - lse) / T;
    r.z_loss += lse * lse / T;
    r.lse.push_back(lse);
  }
  return r;
}

double max_relative(const std::vector<double>& a, const std::vector<double>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(b[i])) {
      if (!std::isnan(a[i])) return INFINITY;
      continue;
    }
    worst = std::max(worst, std::fabs(a[i] - b[i]) / std::max(std::fabs(b[i]), 1e-30));
  }
  return worst;
}

void check_random(int64_t T, int64_t E, int k, bool renormalize, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(T * E);
  for (auto& v : logits) v = normal(gen);
  const Routed got = run_kernel(logits, T, E, k, renormalize, false);
  const Routed want = run_naive(logits, T, E, k, renormalize);
  FC_EXPECT(got.ids == want.ids, "ids T=%lld E=%lld k=%d", (long long)T, (long long)E, k);
  FC_EXPECT(got.counts == want.counts, "counts T=%lld E=%lld k=%d", (long long)T, (long long)E, k);
  FC_EXPECT(max_relative(got.weights, want.weights) < 2e-6, "weights E=%lld k=%d: %g", (long long)E, k,
            max_relative(got.weights, want.weights));
  for (int64_t t = 0; t < T; ++t)  // lse can be near 0, so the bound scales with max(1, |lse|)
    FC_EXPECT(std::fabs(got.lse[t] - want.lse[t]) < 2e-6 * std::max(1.0, std::fabs(want.lse[t])), "lse[%lld]",
              (long long)t);
  FC_EXPECT(std::fabs(got.z_loss - want.z_loss) / want.z_loss < 2e-6, "z_loss %g vs %g", got.z_loss, want.z_loss);
  for (int64_t e = 0; e < E; ++e)
    FC_EXPECT(std::fabs(got.mean_prob[e] - want.mean_prob[e]) < 1e-6, "mean_prob[%lld]", (long long)e);
  const Routed again = run_kernel(logits, T, E, k, renormalize, true);
  FC_EXPECT(again.weights == got.weights && again.mean_prob == got.mean_prob && again.z_loss == got.z_loss,
            "blocks run separately must give bitwise the same result");
}

void check_special_rows() {
  const int64_t E = 19;
  const int k = 6;
  std::vector<float> logits(5 * E, 0.0f);                         // row 0: all ties
  for (int64_t e = 0; e < E; ++e) logits[1 * E + e] = -INFINITY;  // row 1: all -inf
  logits[1 * E + 11] = 2.0f;
  for (int64_t e = 0; e < E; ++e) logits[2 * E + e] = NAN;  // row 2: all NaN
  logits[3 * E + 5] = NAN;                                  // row 3: one NaN
  logits[3 * E + 9] = 4.0f;
  for (int64_t e = 0; e < E; ++e) logits[4 * E + e] = float(e % 3);  // row 4: repeated values
  const Routed got = run_kernel(logits, 5, E, k, true, false);
  const Routed want = run_naive(logits, 5, E, k, true);
  FC_EXPECT(got.ids == want.ids, "special rows: ids");
  for (int64_t id : got.ids) FC_EXPECT(id >= 0 && id < E, "id %lld out of range", (long long)id);
  for (int j = 0; j < k; ++j) {
    FC_EXPECT(got.ids[j] == j, "ties go to the lower index");
    FC_EXPECT(std::isnan(got.weights[2 * k + j]) && std::isnan(got.weights[3 * k + j]), "NaN rows give NaN weights");
  }
  FC_EXPECT(got.ids[k] == 11 && got.ids[k + 1] == 0 && got.weights[k] == 1.0, "one finite expert among -inf");
  FC_EXPECT(got.ids[3 * k] == 9, "NaN ranks as -inf");
}

// Backward in double against central differences of L = Σ gw·w + gz·z + Σ gP·P.
void check_backward(bool renormalize, std::mt19937& gen) {
  const int64_t T = 5, E = 11;
  const int k = 3;
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> logits(T * E), gw(T * k), gp(E);
  for (auto& v : logits) v = normal(gen);
  for (auto& v : gw) v = normal(gen);
  for (auto& v : gp) v = normal(gen);
  const double gz = 0.7;
  auto loss = [&](const std::vector<double>& x) {
    const Routed r = run_kernel(x, T, E, k, renormalize, false);
    double l = gz * r.z_loss;
    for (int64_t i = 0; i < T * k; ++i) l += gw[i] * r.weights[i];
    for (int64_t e = 0; e < E; ++e) l += gp[e] * r.mean_prob[e];
    return l;
  };
  const Routed r = run_kernel(logits, T, E, k, renormalize, false);
  std::vector<double> weights(r.weights), lse(r.lse), grad(T * E);
  TopkRouteBackwardParams p;
  p.logits = logits.data();
  p.logits_kind = ScalarKind::kFloat64;
  p.num_tokens = T;
  p.num_experts = E;
  p.row_stride = E;
  p.col_stride = 1;
  p.k = k;
  p.renormalize = renormalize;
  p.expert_ids = r.ids.data();
  p.weights = weights.data();
  p.lse = lse.data();
  p.grad_weights = gw.data();
  p.grad_mean_prob = gp.data();
  p.grad_z_loss = &gz;
  p.grad_logits = grad.data();
  topk_route_backward_cpu_rows(p, 0, T);
  for (int64_t i = 0; i < T * E; ++i) {
    std::vector<double> plus(logits), minus(logits);
    plus[i] += 1e-6;
    minus[i] -= 1e-6;
    const double numeric = (loss(plus) - loss(minus)) / 2e-6;
    FC_EXPECT(std::fabs(numeric - grad[i]) < 1e-7, "d/dx[%lld]: analytic %g, numeric %g", (long long)i, grad[i],
              numeric);
  }
}

// The statistics blocks: at least min_rows rows, partial buffers bounded (about 4M entries) for any T.
void check_block_sizes() {
  for (int64_t T : {int64_t(1), int64_t(255), int64_t(4099), int64_t(1) << 26, int64_t(30000000), int64_t(1) << 34})
    for (int64_t E : {int64_t(1), int64_t(8), int64_t(1024)}) {
      const int64_t rows = route_rows_per_block(T, E, 256);
      const int64_t blocks = (T + rows - 1) / rows;
      FC_EXPECT(rows >= 256, "rows per block %lld", (long long)rows);
      FC_EXPECT(blocks * E <= (int64_t(1) << 22) + E, "T=%lld E=%lld: %lld partial entries", (long long)T, (long long)E,
                (long long)(blocks * E));
      FC_EXPECT(rows * kMaxTopK < (int64_t(1) << 31), "int32 partial counts would overflow");
    }
}

}  // namespace

int main() {
  check_block_sizes();
  std::mt19937 gen(1234);
  for (int64_t E : {1, 3, 8, 17, 61, 128, 1024})
    for (int k : {1, 2, 8, 16})
      if (k <= E)
        for (int64_t T : {1, 7, 300, 700}) check_random(T, E, k, (k + T) % 2 == 0, gen);
  check_special_rows();
  check_backward(true, gen);
  check_backward(false, gen);
  std::printf("test_topk_route: %d failure(s)\n", fc_failures());
  return fc_failures() == 0 ? 0 : 1;
}

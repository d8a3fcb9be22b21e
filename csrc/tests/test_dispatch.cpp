// The CPU dispatch / combine kernels against naive implementations written here from the contract in
// dispatch.h: exact plans whatever the chunking (and in whatever order chunks run), out-of-range ids
// counted and never used as an index, strided row copies of 2/4/8-byte elements, combine and its
// backward in fixed order (bitwise equal to a plain loop), and malformed plans refused without an
// out-of-bounds read. Run under ASan/UBSan in CI (cmake -DFASTCORE_SANITIZE=ON).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "moe/dispatch.h"

using namespace fastcore;
using namespace fastcore::moe;

namespace {

struct Plan {
  std::vector<int64_t> offsets, slot_to_token, token_slot;
  int64_t bad = 0;
};

// Stable counting sort the obvious way: experts in order, slots in order within each expert.
Plan naive_plan(const std::vector<int64_t>& ids, const std::vector<char>& kept, int64_t T, int64_t k, int64_t E) {
  Plan plan;
  const int64_t N = T * k;
  plan.token_slot.assign(N, -1);
  for (int64_t e = 0; e < E; ++e) {
    plan.offsets.push_back(static_cast<int64_t>(plan.slot_to_token.size()));
    for (int64_t i = 0; i < N; ++i)
      if (ids[i] == e && (kept.empty() || kept[i])) {
        plan.token_slot[i] = static_cast<int64_t>(plan.slot_to_token.size());
        plan.slot_to_token.push_back(i / k);
      }
  }
  plan.offsets.push_back(static_cast<int64_t>(plan.slot_to_token.size()));
  return plan;
}

// The kernel's plan, with `slots_per_chunk` chunks run one by one in reverse order (as threads may).
Plan kernel_plan(const std::vector<int64_t>& ids, const std::vector<char>& kept, int64_t T, int64_t k, int64_t E,
                 int64_t slots_per_chunk) {
  Plan plan;
  const int64_t N = T * k;
  std::unique_ptr<bool[]> kept_array(new bool[kept.size() + 1]);
  for (size_t i = 0; i < kept.size(); ++i) kept_array[i] = kept[i] != 0;
  DispatchParams p;
  p.expert_ids = ids.data();
  p.kept = kept.empty() ? nullptr : kept_array.get();
  p.num_tokens = T;
  p.k = k;
  p.num_experts = E;
  p.slots_per_chunk = slots_per_chunk;
  p.num_chunks = (N + slots_per_chunk - 1) / slots_per_chunk;
  std::vector<int64_t> chunk_counts(p.num_chunks * E + 1, -99), bad(p.num_chunks + 1, -99);
  plan.offsets.assign(E + 1, -99);
  plan.token_slot.assign(N, -99);
  p.chunk_counts = chunk_counts.data();
  p.num_bad_ids = bad.data();
  p.expert_offsets = plan.offsets.data();
  p.token_slot = plan.token_slot.data();
  for (int64_t c = p.num_chunks - 1; c >= 0; --c) dispatch_count_cpu(p, c, c + 1);
  for (int64_t c = 0; c < p.num_chunks; ++c) plan.bad += bad[c];
  if (plan.bad > 0) return plan;
  const int64_t S = dispatch_scan_cpu(p);
  plan.slot_to_token.assign(S, -99);
  p.slot_to_token = plan.slot_to_token.data();
  for (int64_t c = p.num_chunks - 1; c >= 0; --c) dispatch_scatter_cpu(p, c, c + 1);
  return plan;
}

void check_plans(std::mt19937& gen) {
  for (int64_t E : {1, 3, 8, 64})
    for (int64_t k : {1, 2, 8})
      for (int64_t T : {0, 1, 7, 333}) {
        if (k > E) continue;
        std::uniform_int_distribution<int64_t> expert(0, E - 1);
        std::bernoulli_distribution keep(0.7);
        std::vector<int64_t> ids(T * k);
        std::vector<char> kept(T * k);
        for (auto& id : ids) id = expert(gen);
        for (auto& kk : kept) kk = keep(gen);
        for (bool masked : {false, true}) {
          const std::vector<char> mask = masked ? kept : std::vector<char>();
          const Plan want = naive_plan(ids, mask, T, k, E);
          for (int64_t chunk : {int64_t(1), int64_t(3), int64_t(64), std::max<int64_t>(T * k, 1)}) {
            const Plan got = kernel_plan(ids, mask, T, k, E, chunk);
            FC_EXPECT(got.bad == 0, "T=%lld E=%lld", (long long)T, (long long)E);
            FC_EXPECT(got.offsets == want.offsets, "offsets T=%lld E=%lld k=%lld chunk=%lld", (long long)T,
                      (long long)E, (long long)k, (long long)chunk);
            FC_EXPECT(got.slot_to_token == want.slot_to_token, "slot_to_token T=%lld chunk=%lld", (long long)T,
                      (long long)chunk);
            FC_EXPECT(got.token_slot == want.token_slot, "token_slot T=%lld chunk=%lld", (long long)T,
                      (long long)chunk);
          }
        }
      }
}

void check_bad_ids() {
  const int64_t T = 9, k = 2, E = 4;
  std::vector<int64_t> ids(T * k, 1);
  ids[5] = -1;
  ids[11] = E;
  ids[12] = int64_t(1) << 60;
  ids[13] = INT64_MIN;
  const std::vector<char> kept(T * k, 1);
  const Plan got = kernel_plan(ids, kept, T, k, E, 4);
  FC_EXPECT(got.bad == 4, "bad ids counted: %lld", (long long)got.bad);
  // Guard of the scatter itself (the torch layer never runs it with bad ids): bad slots become -1.
  DispatchParams p;
  std::vector<int64_t> counts(E, 0), offsets(E + 1, 0), slot_to_token(T * k, -5), token_slot(T * k, -5);
  p.expert_ids = ids.data();
  p.num_tokens = T;
  p.k = k;
  p.num_experts = E;
  p.slots_per_chunk = T * k;
  p.num_chunks = 1;
  p.chunk_counts = counts.data();
  p.expert_offsets = offsets.data();
  offsets[2] = offsets[3] = offsets[4] = T * k - 4;  // expert 1 owns positions [0, T*k - 4)
  p.slot_to_token = slot_to_token.data();
  p.token_slot = token_slot.data();
  dispatch_scatter_cpu(p, 0, 1);
  FC_EXPECT(token_slot[5] == -1 && token_slot[11] == -1 && token_slot[12] == -1 && token_slot[13] == -1,
            "bad slots must be dropped");
}

template <typename Element>
void check_gather(int64_t element_size) {
  const int64_t T = 13, H = 7, S = 9;
  std::vector<Element> x(T * (H + 2) * 2);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<Element>(i * 7 + 1);
  // x[t, h] at t * 1 + h * (2T): a transposed layout.
  std::vector<int64_t> src = {3, 0, 12, 12, 5, 1, 7, 0, 2};
  std::vector<Element> out(S * H, Element(0));
  GatherRowsParams g;
  g.in = x.data();
  g.in_row_stride = 1;
  g.in_col_stride = 2 * T;
  g.in_rows = T;
  g.src_row = src.data();
  g.out = out.data();
  g.rows = S;
  g.cols = H;
  g.element_size = static_cast<int32_t>(element_size);
  FC_EXPECT(gather_rows_cpu(g, 0, 4) + gather_rows_cpu(g, 4, S) == 0, "no bad rows");
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h)
      FC_EXPECT(out[s * H + h] == x[src[s] + h * 2 * T], "gather element %lld,%lld size %lld", (long long)s,
                (long long)h, (long long)element_size);
  src[4] = T;  // out of range: counted, not read
  src[5] = -1;
  FC_EXPECT(gather_rows_cpu(g, 0, S) == 2, "bad rows counted");
}

void check_combine(std::mt19937& gen) {
  const int64_t T = 57, k = 3, E = 5, H = 11;
  std::uniform_int_distribution<int64_t> expert(0, E - 1);
  std::bernoulli_distribution keep(0.7);
  std::normal_distribution<float> normal;
  std::vector<int64_t> ids(T * k);
  std::vector<char> kept(T * k);
  for (auto& id : ids) id = expert(gen);
  for (auto& kk : kept) kk = keep(gen);
  const Plan plan = naive_plan(ids, kept, T, k, E);
  const int64_t S = static_cast<int64_t>(plan.slot_to_token.size());
  std::vector<float> y(S * H), w(T * k), grad_out(T * H);
  for (auto& v : y) v = normal(gen);
  for (auto& v : w) v = normal(gen);
  for (auto& v : grad_out) v = normal(gen);
  for (int64_t i = 0; i < T * k; ++i)
    if (!kept[i]) w[i] = NAN;  // dropped slots must not be read into any sum
  std::vector<float> out(T * H, NAN), grad_y(S * H, NAN), grad_w(T * k, NAN);
  CombineParams p;
  p.y = y.data();
  p.weights = w.data();
  p.token_slot = plan.token_slot.data();
  p.slot_to_token = plan.slot_to_token.data();
  p.num_tokens = T;
  p.k = k;
  p.num_rows = S;
  p.hidden = H;
  p.grad_out = grad_out.data();
  p.out = out.data();
  p.grad_y = grad_y.data();
  p.grad_weights = grad_w.data();
  FC_EXPECT(combine_cpu(p, 0, 20) + combine_cpu(p, 20, T) == 0, "combine: no bad slots");
  FC_EXPECT(combine_backward_y_cpu(p, 0, S) == 0, "grad_y: no bad rows");
  FC_EXPECT(combine_backward_weights_cpu(p, 0, T) == 0, "grad_w: no bad slots");
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float want = 0.0f;  // the same float operations in the same order: bitwise equal
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = plan.token_slot[t * k + j];
        if (s >= 0) want += w[t * k + j] * y[s * H + h];
      }
      FC_EXPECT(std::memcmp(&want, &out[t * H + h], sizeof(float)) == 0, "combine (%lld, %lld): %g vs %g", (long long)t,
                (long long)h, want, out[t * H + h]);
      bool bad = false;  // the CPU row loop and the shared per-element body (used by CUDA) agree bitwise
      const float body = combine_element<float>(p, t, h, bad);
      FC_EXPECT(!bad && std::memcmp(&body, &out[t * H + h], sizeof(float)) == 0, "combine_element (%lld, %lld)",
                (long long)t, (long long)h);
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = plan.token_slot[t * k + j];
      double dot = 0.0;
      if (s >= 0) {
        for (int64_t h = 0; h < H; ++h) {
          dot += double(grad_out[t * H + h]) * y[s * H + h];
          FC_EXPECT(grad_y[s * H + h] == w[t * k + j] * grad_out[t * H + h], "grad_y (%lld, %lld)", (long long)s,
                    (long long)h);
        }
      }
      FC_EXPECT(std::fabs(grad_w[t * k + j] - dot) <= 1e-5 * (1.0 + std::fabs(dot)), "grad_w (%lld, %lld)",
                (long long)t, (long long)j);
      FC_EXPECT(s >= 0 || grad_w[t * k + j] == 0.0f, "dropped slot: zero weight gradient");
    }
  // No weights: unit weights (the dispatch backward); dropped slots still skipped.
  p.weights = nullptr;
  FC_EXPECT(combine_cpu(p, 0, T) == 0, "unit combine");
  for (int64_t t = 0; t < T; ++t) {
    float want = 0.0f;
    for (int64_t j = 0; j < k; ++j)
      if (plan.token_slot[t * k + j] >= 0) want += y[plan.token_slot[t * k + j] * H];
    FC_EXPECT(want == out[t * H], "unit combine row %lld", (long long)t);
  }
  // A malformed plan is counted and never dereferenced (ASan checks the "never").
  std::vector<int64_t> bad_slots = plan.token_slot, bad_tokens = plan.slot_to_token;
  bad_slots[4] = S;
  bad_slots[7] = -2;
  bad_slots[9] = int64_t(1) << 50;
  if (S > 0) bad_tokens[0] = T;
  p.token_slot = bad_slots.data();
  p.slot_to_token = bad_tokens.data();
  p.weights = w.data();
  FC_EXPECT(combine_cpu(p, 0, T) == 3, "combine counts bad tokens (rows with a bad slot)");
  FC_EXPECT(combine_backward_weights_cpu(p, 0, T) == 3, "grad_w counts bad slots");
  FC_EXPECT(combine_backward_y_cpu(p, 0, S) == (S > 0 ? 1 : 0), "grad_y counts bad tokens");
}

void check_double() {
  const int64_t T = 2, k = 2, S = 3, H = 2;
  const std::vector<double> y = {1, 2, 3, 4, 5, 6}, w = {0.5, 2, 1, -1};
  const std::vector<int64_t> token_slot = {2, 0, -1, 1};
  std::vector<double> out(T * H, NAN);
  CombineParams p;
  p.y = y.data();
  p.y_kind = ScalarKind::kFloat64;
  p.weights = w.data();
  p.weights_kind = ScalarKind::kFloat64;
  p.token_slot = token_slot.data();
  p.num_tokens = T;
  p.k = k;
  p.num_rows = S;
  p.hidden = H;
  p.out = out.data();
  FC_EXPECT(combine_cpu(p, 0, T) == 0, "double combine");
  FC_EXPECT(out[0] == 0.5 * 5 + 2 * 1 && out[1] == 0.5 * 6 + 2 * 2 && out[2] == -3 && out[3] == -4, "double values");
}

}  // namespace

int main() {
  std::mt19937 gen(1234);
  check_plans(gen);
  check_bad_ids();
  check_gather<uint16_t>(2);
  check_gather<uint32_t>(4);
  check_gather<uint64_t>(8);
  check_combine(gen);
  check_double();
  std::printf("test_dispatch: %d failure(s)\n", fc_failures());
  return fc_failures() == 0 ? 0 : 1;
}

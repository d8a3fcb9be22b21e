// The CPU fused attention and the mux/demux loops against naive double loops written here from the
// formulas in attention.h / mux_demux.h: odd head sizes (padding lanes), several key blocks (online
// softmax rescaling), masks, causal, fully masked rows (zeros, lse = −inf), float and double, forward and
// backward, at the AVX-512 and the portable level (the 16-bit conversions: test_half.cpp). Run under
// ASan/UBSan in CI.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "fastcore/cpu_isa.h"
#include "mux/attention.h"
#include "fastcore/common.h"
#include "mux/mux_demux.h"

using namespace fastcore;
using namespace fastcore::mux;

namespace {

struct Case {
  int64_t B, H, Lq, Lk, D, q_tile, kv_block;
  bool causal, bool_mask, padding;
  int64_t Hk = 0;  // kv heads (grouped-query attention; 0 = H)
};

double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <typename T>
void run_case(const Case& c, ScalarKind kind, double bound) {
  std::mt19937 rng(42);
  std::normal_distribution<double> normal;
  const int64_t Hk = c.Hk > 0 ? c.Hk : c.H, G = c.H / Hk;
  const int64_t nq = c.B * c.H * c.Lq * c.D, nk = c.B * Hk * c.Lk * c.D;
  std::vector<T> q(nq), k(nk), v(nk), go(nq), out(nq), gq(nq), gk(nk), gv(nk), lse(c.B * c.H * c.Lq);
  for (auto& x : q) x = static_cast<T>(normal(rng));
  for (auto& x : k) x = static_cast<T>(normal(rng));
  for (auto& x : v) x = static_cast<T>(normal(rng));
  for (auto& x : go) x = static_cast<T>(normal(rng));
  std::vector<char> mask_storage(c.Lq * c.Lk, 1);
  for (int64_t i = 0; i < c.Lq * c.Lk; ++i) mask_storage[i] = (rng() % 4) != 0;
  if (c.Lq > 2)
    for (int64_t j = 0; j < c.Lk; ++j) mask_storage[2 * c.Lk + j] = 0;  // row 2: fully masked
  std::vector<char> pad(c.B * c.Lk, 0);
  if (c.padding)
    for (int64_t j = 0; j < c.Lk; j += 3) pad[j] = 1;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.D));

  AttentionParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.kind = kind;
  const int64_t sq[4] = {c.H * c.Lq * c.D, c.Lq * c.D, c.D, 1}, sk[4] = {Hk * c.Lk * c.D, c.Lk * c.D, c.D, 1};
  for (int d = 0; d < 4; ++d) {
    p.q_stride[d] = sq[d];
    p.k_stride[d] = sk[d];
    p.v_stride[d] = sk[d];
  }
  p.batch = c.B;
  p.heads = c.H;
  p.kv_heads = c.Hk;
  p.len_q = c.Lq;
  p.len_k = c.Lk;
  p.head_dim = c.D;
  if (c.bool_mask) {
    p.mask = mask_storage.data();
    p.mask_kind = MaskKind::kBool;
    p.mask_stride[2] = c.Lk;
    p.mask_stride[3] = 1;
  }
  if (c.padding) {
    p.key_padding = reinterpret_cast<const bool*>(pad.data());
    p.key_padding_stride[0] = c.Lk;
    p.key_padding_stride[1] = 1;
  }
  p.causal = c.causal;
  p.scale = scale;
  p.q_tile = c.q_tile;
  p.kv_block = c.kv_block;
  p.out = out.data();
  p.lse = lse.data();
  attention_forward_cpu(p, 0, attention_forward_tasks(p));
  p.grad_out = go.data();
  p.grad_q = gq.data();
  p.grad_k = gk.data();
  p.grad_v = gv.data();
  attention_backward_cpu(p, 0, c.B * Hk);

  // naive double reference: full score matrix per (b, h); query head h reads kv head h / G (bk below)
  std::vector<double> ro(nq, 0), rq(nq, 0), rk(nk, 0), rv(nk, 0), ao(nq), aq(nq), ak(nk), av(nk);
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    const int64_t b = bh / c.H, bk = b * Hk + (bh % c.H) / G;
    std::vector<double> prob(c.Lq * c.Lk, 0.0);
    for (int64_t i = 0; i < c.Lq; ++i) {
      double mx = -INFINITY;
      std::vector<double> s(c.Lk);
      for (int64_t j = 0; j < c.Lk; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < c.D; ++d)
          dot += double(q[(bh * c.Lq + i) * c.D + d]) * double(k[(bk * c.Lk + j) * c.D + d]);
        bool keep =
            (!c.bool_mask || mask_storage[i * c.Lk + j]) && !(c.padding && pad[b * c.Lk + j]) && !(c.causal && j > i);
        s[j] = keep ? dot * scale : -INFINITY;
        mx = std::max(mx, s[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < c.Lk; ++j) sum += mx == -INFINITY ? 0.0 : std::exp(s[j] - mx);
      if (sum == 0) {
        FC_EXPECT(std::isinf(double(lse[bh * c.Lq + i])) && lse[bh * c.Lq + i] < 0, "lse of a fully masked row");
      } else {
        FC_EXPECT(std::fabs(double(lse[bh * c.Lq + i]) - (mx + std::log(sum))) < 1e-4, "lse row %ld", long(i));
      }
      for (int64_t j = 0; j < c.Lk; ++j) prob[i * c.Lk + j] = sum == 0 ? 0.0 : std::exp(s[j] - mx) / sum;
      for (int64_t d = 0; d < c.D; ++d) {
        double acc = 0;
        for (int64_t j = 0; j < c.Lk; ++j) acc += prob[i * c.Lk + j] * double(v[(bk * c.Lk + j) * c.D + d]);
        ro[(bh * c.Lq + i) * c.D + d] = acc;
      }
    }
    for (int64_t i = 0; i < c.Lq; ++i) {
      double delta = 0;
      for (int64_t d = 0; d < c.D; ++d) delta += double(go[(bh * c.Lq + i) * c.D + d]) * ro[(bh * c.Lq + i) * c.D + d];
      for (int64_t j = 0; j < c.Lk; ++j) {
        const double pij = prob[i * c.Lk + j];
        double dp = 0;
        for (int64_t d = 0; d < c.D; ++d)
          dp += double(go[(bh * c.Lq + i) * c.D + d]) * double(v[(bk * c.Lk + j) * c.D + d]);
        const double ds = pij * (dp - delta);
        for (int64_t d = 0; d < c.D; ++d) {
          rv[(bk * c.Lk + j) * c.D + d] += pij * double(go[(bh * c.Lq + i) * c.D + d]);
          rk[(bk * c.Lk + j) * c.D + d] += scale * ds * double(q[(bh * c.Lq + i) * c.D + d]);
          rq[(bh * c.Lq + i) * c.D + d] += scale * ds * double(k[(bk * c.Lk + j) * c.D + d]);
        }
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    ao[i] = out[i];
    aq[i] = gq[i];
  }
  for (int64_t i = 0; i < nk; ++i) {
    ak[i] = gk[i];
    av[i] = gv[i];
  }
  FC_EXPECT(rel_error(ao, ro) < bound, "out error %g (D=%ld Lq=%ld Lk=%ld)", rel_error(ao, ro), long(c.D), long(c.Lq),
            long(c.Lk));
  FC_EXPECT(rel_error(aq, rq) < 5 * bound, "dq error %g", rel_error(aq, rq));
  FC_EXPECT(rel_error(ak, rk) < 5 * bound, "dk error %g", rel_error(ak, rk));
  FC_EXPECT(rel_error(av, rv) < 5 * bound, "dv error %g", rel_error(av, rv));
  if (c.bool_mask && c.Lq > 2)
    for (int64_t d = 0; d < c.D; ++d) FC_EXPECT(out[2 * c.D + d] == T(0), "fully masked row must be 0");
}

void test_hadamard_mux() {
  const int64_t B = 2, N = 3, L = 4, d = 5;
  std::vector<float> x(B * N * L * d), keys(N * d), out(B * L * d), go(B * L * d), gx(B * N * L * d), gk(B * N * d);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.3f * i);
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = std::cos(0.7f * i);
  for (size_t i = 0; i < go.size(); ++i) go[i] = std::sin(1.1f * i);
  HadamardMuxParams p;
  p.x = x.data();
  p.keys = keys.data();
  p.batch = B;
  p.instances = N;
  p.length = L;
  p.dim = d;
  p.out = out.data();
  p.grad_out = go.data();
  p.grad_x = gx.data();
  p.grad_keys_partial = gk.data();
  hadamard_mux_forward_cpu(p, 0, B * L);
  hadamard_mux_backward_cpu(p, 0, B * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l)
      for (int64_t c = 0; c < d; ++c) {
        double expected = 0;
        for (int64_t i = 0; i < N; ++i) expected += double(x[((b * N + i) * L + l) * d + c]) * keys[i * d + c];
        FC_EXPECT(std::fabs(out[(b * L + l) * d + c] - expected / N) < 1e-6, "mux out");
        for (int64_t i = 0; i < N; ++i)
          FC_EXPECT(std::fabs(gx[((b * N + i) * L + l) * d + c] - go[(b * L + l) * d + c] * keys[i * d + c] / N) < 1e-6,
                    "mux grad_x");
      }
}

}  // namespace

int main() {
  const Case cases[] = {
      {1, 1, 1, 1, 1, 64, 512, false, false, false},
      {2, 3, 7, 9, 13, 4, 512, false, true, false},
      {1, 2, 37, 70, 24, 16, 16, true, false, true},  // several key blocks: online rescaling
      {1, 1, 20, 33, 200, 7, 8, false, true, true},
      {1, 1, 9, 5, 256, 64, 2, true, true, false},
      // grouped kv heads: query tiles that cross head boundaries (q_tile 5 over 3-row heads), the few-rows,
      // rows-in-lanes (8 < G·Lq ≤ 16, unmasked, split key blocks) and packed paths
      {2, 4, 3, 40, 13, 5, 16, true, true, true, 2},
      {1, 6, 1, 600, 64, 7, 512, false, false, false, 2},
      {1, 8, 2, 30, 16, 16, 16, false, false, false, 1},
      {1, 6, 2, 20, 8, 5, 8, false, false, false, 1},
      {1, 4, 9, 21, 33, 64, 8, true, false, true, 1},
  };
  // The AVX-512 path (where the CPU has it), then the generic one (the ISA cap at portable).
  for (const int cap : {0, static_cast<int>(CpuIsa::kPortable)}) {
    set_cpu_isa_cap(cap);
    for (const Case& c : cases) {
      run_case<float>(c, ScalarKind::kFloat32, 2e-5);
      run_case<double>(c, ScalarKind::kFloat64, 1e-12);
    }
  }
  set_cpu_isa_cap(0);
  test_hadamard_mux();
  if (fc_failures() == 0) std::printf("test_mux_attention: all passed\n");
  return fc_failures() == 0 ? 0 : 1;
}

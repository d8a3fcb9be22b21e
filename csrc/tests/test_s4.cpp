// Native tests of the s4 CPU kernels (run under ASan/UBSan in CI): each kernel against a direct
// std::complex<double> evaluation of its formula in s4.h, at odd sizes that exercise the vector tails,
// plus the 16-bit store round trips.
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "s4/s4.h"

using namespace fastcore;
using namespace fastcore::s4;
using cd = std::complex<double>;

namespace {

std::mt19937 rng(7);
double uniform() { return std::uniform_real_distribution<double>(-1.0, 1.0)(rng); }

std::vector<float> random_complex(int64_t count, double re_shift = 0.0, double im_scale = 1.0) {
  std::vector<float> out(2 * count);
  for (int64_t i = 0; i < count; ++i) {
    out[2 * i] = static_cast<float>(uniform() + re_shift);
    out[2 * i + 1] = static_cast<float>(im_scale * uniform());
  }
  return out;
}

cd at(const std::vector<float>& v, int64_t i) { return cd(v[2 * i], v[2 * i + 1]); }

double rel(double err, double norm) { return norm > 0 ? std::sqrt(err / norm) : std::sqrt(err); }

void test_cauchy() {
  for (bool conj : {true, false}) {
    const int64_t B = 3, N = 5, L = 21;  // L: 2 full vectors of 8 + a tail of 5
    std::vector<float> v = random_complex(B * N), w = random_complex(B * N, -1.5), z = random_complex(L, 0.0, 3.0);
    std::vector<float> g = random_complex(B * L), out(2 * B * L), gv(2 * B * N), gw(2 * B * N);
    std::vector<float> zr(L), zi(L), gr(B * L), gi(B * L);
    for (int64_t l = 0; l < L; ++l) zr[l] = z[2 * l], zi[l] = z[2 * l + 1];
    for (int64_t i = 0; i < B * L; ++i) gr[i] = g[2 * i], gi[i] = g[2 * i + 1];
    CauchyParams<float> p;
    p.v = v.data();
    p.w = w.data();
    p.z = z.data();
    p.out = out.data();
    p.grad_v = gv.data();
    p.grad_w = gw.data();
    p.batch = B;
    p.states = N;
    p.nodes = L;
    p.conj_symmetric = conj;
    const int64_t tiles = (L + kCauchyTile - 1) / kCauchyTile;
    cauchy_forward_cpu<float>(p, zr.data(), zi.data(), 0, B * tiles);
    cauchy_backward_cpu<float>(p, zr.data(), zi.data(), gr.data(), gi.data(), 0, B * N);
    double err = 0, norm = 0, gerr = 0, gnorm = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t l = 0; l < L; ++l) {
        cd expected = 0;
        for (int64_t n = 0; n < N; ++n) {
          expected += at(v, b * N + n) / (at(z, l) - at(w, b * N + n));
          if (conj) expected += std::conj(at(v, b * N + n)) / (at(z, l) - std::conj(at(w, b * N + n)));
        }
        err += std::norm(at(out, b * L + l) - expected);
        norm += std::norm(expected);
      }
      for (int64_t n = 0; n < N; ++n) {
        cd ev = 0, ew = 0;
        for (int64_t l = 0; l < L; ++l) {
          const cd gg = at(g, b * L + l), r1 = std::conj(1.0 / (at(z, l) - at(w, b * N + n)));
          ev += gg * r1;
          ew += gg * r1 * r1;
          if (conj) {
            const cd r2 = 1.0 / (at(z, l) - std::conj(at(w, b * N + n)));
            ev += std::conj(gg) * r2;
            ew += std::conj(gg) * r2 * r2;
          }
        }
        ew *= std::conj(at(v, b * N + n));
        gerr += std::norm(at(gv, b * N + n) - ev) + std::norm(at(gw, b * N + n) - ew);
        gnorm += std::norm(ev) + std::norm(ew);
      }
    }
    FC_EXPECT(rel(err, norm) < 1e-5, "cauchy forward rel error %g (conj %d)", rel(err, norm), int(conj));
    FC_EXPECT(rel(gerr, gnorm) < 1e-5, "cauchy backward rel error %g (conj %d)", rel(gerr, gnorm), int(conj));
  }
}

void test_vandermonde() {
  const int64_t B = 2, N = 3, L = 150;  // 2 full blocks of 64 + a partial one
  std::vector<float> v = random_complex(B * N), x(2 * B * N), out(B * L), g(B * L), gv(2 * B * N), gx(2 * B * N);
  for (int64_t i = 0; i < B * N; ++i) {
    x[2 * i] = static_cast<float>(-0.01 - 0.02 * std::fabs(uniform()));
    x[2 * i + 1] = static_cast<float>(2.0 * uniform());
  }
  for (auto& value : g) value = static_cast<float>(uniform());
  VandermondeParams<float> p;
  p.v = v.data();
  p.x = x.data();
  p.out = out.data();
  p.grad_out = g.data();
  p.grad_v = gv.data();
  p.grad_x = gx.data();
  p.batch = B;
  p.states = N;
  p.length = L;
  vandermonde_forward_cpu<float>(p, 0, B);
  vandermonde_backward_cpu<float>(p, 0, B * N);
  double err = 0, norm = 0, gerr = 0, gnorm = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      double expected = 0;
      for (int64_t n = 0; n < N; ++n)
        expected += 2 * (at(v, b * N + n) * std::exp(at(x, b * N + n) * double(l))).real();
      err += (out[b * L + l] - expected) * (out[b * L + l] - expected);
      norm += expected * expected;
    }
    for (int64_t n = 0; n < N; ++n) {
      cd ev = 0, ex = 0;
      for (int64_t l = 0; l < L; ++l) {
        const cd e = std::conj(std::exp(at(x, b * N + n) * double(l)));
        ev += 2.0 * double(g[b * L + l]) * e;
        ex += 2.0 * double(l) * double(g[b * L + l]) * e;
      }
      ex *= std::conj(at(v, b * N + n));
      gerr += std::norm(at(gv, b * N + n) - ev) + std::norm(at(gx, b * N + n) - ex);
      gnorm += std::norm(ev) + std::norm(ex);
    }
  }
  FC_EXPECT(rel(err, norm) < 1e-5, "vandermonde forward rel error %g", rel(err, norm));
  FC_EXPECT(rel(gerr, gnorm) < 1e-5, "vandermonde backward rel error %g", rel(gerr, gnorm));
}

void test_step() {
  const int64_t B = 2, H = 11, N = 21;  // two 8-state vectors + 5 tail states; a full and a partial 8-head tile
  std::vector<float> s = random_complex(B * H * N), a = random_complex(H * N), bb = random_complex(H * N),
                     c = random_complex(H * N), u(B * H), D(H), y(B * H), ns(2 * B * H * N);
  for (auto& value : u) value = static_cast<float>(uniform());
  for (auto& value : D) value = static_cast<float>(uniform());
  StepParams<float> p;
  p.state = s.data();
  p.u = u.data();
  p.dA = a.data();
  p.dB = bb.data();
  p.C = c.data();
  p.D = D.data();
  p.y = y.data();
  p.new_state = ns.data();
  p.batch = B;
  p.heads = H;
  p.states = N;
  ssm_step_cpu<float>(p, 0, 4);  // heads [0, 4) and [4, H): as two threads would split them
  ssm_step_cpu<float>(p, 4, H);
  for (int64_t row = 0; row < B * H; ++row) {
    const int64_t h = row % H;
    double expected = D[h] * u[row];
    for (int64_t n = 0; n < N; ++n) {
      const cd next = at(a, h * N + n) * at(s, row * N + n) + at(bb, h * N + n) * double(u[row]);
      FC_EXPECT(std::abs(at(ns, row * N + n) - next) < 1e-5, "step state (%ld, %ld)", long(row), long(n));
      expected += 2 * (at(c, h * N + n) * next).real();
    }
    FC_EXPECT(std::fabs(y[row] - expected) < 1e-5, "step y row %ld: %g vs %g", long(row), y[row], expected);
  }
}

void test_half_stores() {
  // every half / bfloat16 bit pattern (finite) round-trips through float
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float h = float16_bits_to_float(static_cast<uint16_t>(bits));
    if (!std::isnan(h)) FC_EXPECT(float_to_float16_bits(h) == bits, "half round trip %x", bits);
    const float bf = bfloat16_bits_to_float(static_cast<uint16_t>(bits));
    if (!std::isnan(bf)) FC_EXPECT(float_to_bfloat16_bits(bf) == bits, "bf16 round trip %x", bits);
  }
  FC_EXPECT(float_to_float16_bits(1.0f + 1.0f / 4096.0f) == 0x3c00u, "half ties to even");
  FC_EXPECT(float_to_float16_bits(70000.0f) == 0x7c00u, "half overflow to inf");
}

}  // namespace

int main() {
  test_cauchy();
  test_vandermonde();
  test_step();
  test_half_stores();
  if (fc_failures() == 0) std::printf("test_s4: all passed\n");
  return fc_failures() == 0 ? 0 : 1;
}

// CPU loops of the Hadamard mux and the fused index-demux epilogue (see mux_demux.h for the math).
// Element loads go through load_as/store_as; the dtype switch is loop-invariant, so -O3 unswitches it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fastcore/cpu_vector.h"
#include "fastcore/common.h"
#include "mux/mux_demux.h"

namespace fastcore {
namespace mux {
namespace {

template <typename Acc>
void hadamard_forward(const HadamardMuxParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t N = p.instances, L = p.length, d = p.dim;
  const Acc inv_n = Acc(1) / static_cast<Acc>(N);
  std::vector<Acc> acc(d);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / L, l = row % L;
    std::fill(acc.begin(), acc.end(), Acc(0));
    for (int64_t i = 0; i < N; ++i) {  // fixed instance order
      const int64_t x_offset = ((b * N + i) * L + l) * d, v_offset = i * d;
      for (int64_t c = 0; c < d; ++c)
        acc[c] += load_as<Acc>(p.x, p.x_kind, x_offset + c) * load_as<Acc>(p.keys, p.x_kind, v_offset + c);
    }
    for (int64_t c = 0; c < d; ++c) store_as<Acc>(p.out, p.x_kind, row * d + c, acc[c] * inv_n);
  }
}

// float32 fast path (contiguous float rows): out_row = (Σ_i x_i ⊙ v_i) · (1/N), accumulated in the output
// row itself in the same fixed instance order; the feature loop is plain elementwise and vectorises.
FC_CPU_CLONES void hadamard_forward_float(const HadamardMuxParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t N = p.instances, L = p.length, d = p.dim;
  const float inv_n = 1.0f / static_cast<float>(N);
  const float* x = static_cast<const float*>(p.x);
  const float* keys = static_cast<const float*>(p.keys);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / L, l = row % L;
    float* __restrict__ out = static_cast<float*>(p.out) + row * d;
    const float* __restrict__ x0 = x + (b * N * L + l) * d;
    for (int64_t c = 0; c < d; ++c) out[c] = x0[c] * keys[c];
    for (int64_t i = 1; i < N; ++i) {
      const float* __restrict__ xi = x + ((b * N + i) * L + l) * d;
      const float* __restrict__ vi = keys + i * d;
      for (int64_t c = 0; c < d; ++c) out[c] += xi[c] * vi[c];
    }
    for (int64_t c = 0; c < d; ++c) out[c] *= inv_n;
  }
}

template <typename Acc>
void hadamard_backward(const HadamardMuxParams& p, int64_t task_begin, int64_t task_end) {
  const int64_t N = p.instances, L = p.length, d = p.dim;
  const Acc inv_n = Acc(1) / static_cast<Acc>(N);
  std::vector<Acc> key(d), partial(d);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t b = task / N, i = task % N;
    for (int64_t c = 0; c < d; ++c) key[c] = load_as<Acc>(p.keys, p.x_kind, i * d + c) * inv_n;
    std::fill(partial.begin(), partial.end(), Acc(0));
    for (int64_t l = 0; l < L; ++l) {
      const int64_t g_offset = (b * L + l) * d, x_offset = ((b * N + i) * L + l) * d;
      for (int64_t c = 0; c < d; ++c) {
        const Acc g = load_as<Acc>(p.grad_out, p.x_kind, g_offset + c);
        store_as<Acc>(p.grad_x, p.x_kind, x_offset + c, g * key[c]);
        if (p.grad_keys_partial != nullptr) partial[c] += g * load_as<Acc>(p.x, p.x_kind, x_offset + c);
      }
    }
    if (p.grad_keys_partial != nullptr) {
      Acc* dst = static_cast<Acc*>(p.grad_keys_partial) + task * d;
      for (int64_t c = 0; c < d; ++c) dst[c] = partial[c] * inv_n;
    }
  }
}

// erf for 8 float32 lanes: Abramowitz & Stegun 7.1.26, erf(|x|) = 1 − t·P(t)·exp(−x²) with
// t = 1/(1 + 0.3275911 |x|), absolute error < 1.5e-7 (below float32's resolution of GELU's output scale);
// the sign is restored by symmetry.
FC_VECTOR_INLINE Float8Lanes erf_lanes(Float8Lanes x) {
  const Int8Lanes negative = x < Float8Lanes{};
  const Float8Lanes ax = select_lanes(negative, -x, x);
  const Float8Lanes t = 1.0f / (1.0f + 0.3275911f * ax);
  Float8Lanes poly = Float8Lanes{} + 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const Float8Lanes y = 1.0f - poly * t * exp_lanes(-ax * ax);
  return select_lanes(negative, -y, y);
}

// z = a + c and g = GELU(z) = z Φ(z) for a row of e floats, 8 lanes at a time (scalar erf for the tail).
FC_CPU_CLONES void gelu_row_float(const float* a, const float* c, int64_t e, float* z, float* g) {
  int64_t k = 0;
  for (; k + 8 <= e; k += 8) {
    Float8Lanes za, zc;
    std::memcpy(&za, a + k, sizeof(za));
    std::memcpy(&zc, c + k, sizeof(zc));
    const Float8Lanes zz = za + zc;
    const Float8Lanes gg = 0.5f * zz * (1.0f + erf_lanes(zz * 0.70710678118654752f));
    std::memcpy(z + k, &zz, sizeof(zz));
    std::memcpy(g + k, &gg, sizeof(gg));
  }
  for (; k < e; ++k) {
    z[k] = a[k] + c[k];
    g[k] = gelu_exact<float>(z[k]);
  }
}

template <typename Acc>
inline void gelu_row(const Acc* a, const Acc* c, int64_t e, Acc* z, Acc* g) {
  for (int64_t k = 0; k < e; ++k) {
    z[k] = a[k] + c[k];
    g[k] = gelu_exact<Acc>(z[k]);
  }
}

template <>
inline void gelu_row<float>(const float* a, const float* c, int64_t e, float* z, float* g) {
  gelu_row_float(a, c, e, z, g);
}

// One demux row: g = GELU(a + c) into `g`, returns (μ, r = 1/√(σ² + eps)).
template <typename Acc>
inline void demux_row_stats(const Acc* a, const Acc* c, int64_t e, double eps, Acc* z, Acc* g, Acc& mean, Acc& rstd) {
  gelu_row<Acc>(a, c, e, z, g);
  Acc sum = Acc(0);
  for (int64_t k = 0; k < e; ++k) sum += g[k];
  mean = sum / static_cast<Acc>(e);
  Acc var = Acc(0);
  for (int64_t k = 0; k < e; ++k) var += (g[k] - mean) * (g[k] - mean);
  var /= static_cast<Acc>(e);
  rstd = Acc(1) / std::sqrt(var + static_cast<Acc>(eps));
}

FC_VECTOR_INLINE float sum_lanes(Float8Lanes v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// float32 forward rows, every pass 8 lanes wide (a scalar loop takes the e % 8 tail):
//   g = GELU(a + c) and Σ g;  Σ (g − μ)² (two-pass variance);  out = (g − μ) r γ + β.
// Row-wise float reductions do not vectorise by themselves (no reassociation without -ffast-math),
// hence the explicit lanes.
FC_CPU_CLONES void demux_forward_float(const DemuxParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t N = p.instances, L = p.length, e = p.dim, e8 = e / 8 * 8;
  const float* A = static_cast<const float*>(p.a);
  const float* C = static_cast<const float*>(p.c);
  const float* gamma = static_cast<const float*>(p.gamma);
  const float* beta = static_cast<const float*>(p.beta);
  const bool float_out = p.out_kind == ScalarKind::kFloat32;
  std::vector<float> g_row(e);
  float* g = g_row.data();
  for (int64_t row = row_begin; row < row_end; ++row) {  // row = (b·N + i)·L + t
    const int64_t t = row % L, bi = row / L, b = bi / N, i = bi % N;
    const float* a = A + b * p.a_batch_stride + i * e;
    const float* c = C + (b * L + t) * e;
    Float8Lanes sum8{};
    float sum = 0.0f;
    for (int64_t k = 0; k < e8; k += 8) {
      Float8Lanes za, zc;
      std::memcpy(&za, a + k, sizeof(za));
      std::memcpy(&zc, c + k, sizeof(zc));
      const Float8Lanes z = za + zc;
      const Float8Lanes gg = 0.5f * z * (1.0f + erf_lanes(z * 0.70710678118654752f));
      std::memcpy(g + k, &gg, sizeof(gg));
      sum8 += gg;
    }
    for (int64_t k = e8; k < e; ++k) {
      g[k] = gelu_exact<float>(a[k] + c[k]);
      sum += g[k];
    }
    const float mean = (sum_lanes(sum8) + sum) / static_cast<float>(e);
    Float8Lanes var8{};
    float var = 0.0f;
    for (int64_t k = 0; k < e8; k += 8) {
      Float8Lanes gg;
      std::memcpy(&gg, g + k, sizeof(gg));
      const Float8Lanes centred = gg - mean;
      var8 += centred * centred;
    }
    for (int64_t k = e8; k < e; ++k) var += (g[k] - mean) * (g[k] - mean);
    const float rstd = 1.0f / std::sqrt((sum_lanes(var8) + var) / static_cast<float>(e) + static_cast<float>(p.eps));
    if (float_out) {
      float* out = static_cast<float*>(p.out) + row * e;
      for (int64_t k = 0; k < e8; k += 8) {
        Float8Lanes gg, gm, bt;
        std::memcpy(&gg, g + k, sizeof(gg));
        std::memcpy(&gm, gamma + k, sizeof(gm));
        std::memcpy(&bt, beta + k, sizeof(bt));
        const Float8Lanes y = (gg - mean) * rstd * gm + bt;
        std::memcpy(out + k, &y, sizeof(y));
      }
      for (int64_t k = e8; k < e; ++k) out[k] = (g[k] - mean) * rstd * gamma[k] + beta[k];
    } else {
      for (int64_t k = 0; k < e; ++k)
        store_as<float>(p.out, p.out_kind, row * e + k, (g[k] - mean) * rstd * gamma[k] + beta[k]);
    }
  }
}

template <typename Acc>
void demux_forward(const DemuxParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t N = p.instances, L = p.length, e = p.dim;
  const Acc* A = static_cast<const Acc*>(p.a);
  const Acc* C = static_cast<const Acc*>(p.c);
  const Acc* gamma = static_cast<const Acc*>(p.gamma);
  const Acc* beta = static_cast<const Acc*>(p.beta);
  std::vector<Acc> z(e), g(e);
  for (int64_t row = row_begin; row < row_end; ++row) {  // row = (b·N + i)·L + t
    const int64_t t = row % L, bi = row / L, b = bi / N, i = bi % N;
    Acc mean, rstd;
    demux_row_stats<Acc>(A + b * p.a_batch_stride + i * e, C + (b * L + t) * e, e, p.eps, z.data(), g.data(), mean,
                         rstd);
    for (int64_t k = 0; k < e; ++k)
      store_as<Acc>(p.out, p.out_kind, row * e + k, (g[k] - mean) * rstd * gamma[k] + beta[k]);
  }
}

template <typename Acc>
void demux_backward(const DemuxParams& p, int64_t batch_begin, int64_t batch_end) {
  const int64_t N = p.instances, L = p.length, e = p.dim;
  const Acc* A = static_cast<const Acc*>(p.a);
  const Acc* C = static_cast<const Acc*>(p.c);
  const Acc* gamma = static_cast<const Acc*>(p.gamma);
  std::vector<Acc> z(e), g(e), dz(e);
  for (int64_t b = batch_begin; b < batch_end; ++b) {
    Acc* dA = static_cast<Acc*>(p.grad_a) + b * N * e;
    Acc* dC = static_cast<Acc*>(p.grad_c) + b * L * e;
    Acc* dgamma = static_cast<Acc*>(p.grad_gamma_partial) + b * e;
    Acc* dbeta = static_cast<Acc*>(p.grad_beta_partial) + b * e;
    std::fill(dA, dA + N * e, Acc(0));
    std::fill(dC, dC + L * e, Acc(0));
    std::fill(dgamma, dgamma + e, Acc(0));
    std::fill(dbeta, dbeta + e, Acc(0));
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t t = 0; t < L; ++t) {
        const int64_t row = (b * N + i) * L + t;
        Acc mean, rstd;
        demux_row_stats<Acc>(A + b * p.a_batch_stride + i * e, C + (b * L + t) * e, e, p.eps, z.data(), g.data(), mean,
                             rstd);
        // mean(dĝ) and mean(dĝ ĝ) with dĝ = dy γ
        Acc sum_dg = Acc(0), sum_dg_g = Acc(0);
        for (int64_t k = 0; k < e; ++k) {
          const Acc dy = load_as<Acc>(p.grad_out, p.out_kind, row * e + k);
          const Acc ghat = (g[k] - mean) * rstd;
          dgamma[k] += dy * ghat;
          dbeta[k] += dy;
          const Acc dghat = dy * gamma[k];
          sum_dg += dghat;
          sum_dg_g += dghat * ghat;
          g[k] = ghat;    // keep ĝ
          dz[k] = dghat;  // keep dĝ
        }
        const Acc mean_dg = sum_dg / static_cast<Acc>(e), mean_dg_g = sum_dg_g / static_cast<Acc>(e);
        Acc* dA_row = dA + i * e;
        Acc* dC_row = dC + t * e;
        for (int64_t k = 0; k < e; ++k) {
          const Acc dgk = rstd * (dz[k] - mean_dg - g[k] * mean_dg_g);
          const Acc dzk = dgk * gelu_exact_grad<Acc>(z[k]);
          dA_row[k] += dzk;
          dC_row[k] += dzk;
        }
      }
    }
  }
}

}  // namespace

void hadamard_mux_forward_cpu(const HadamardMuxParams& p, int64_t row_begin, int64_t row_end) {
  if (p.x_kind == ScalarKind::kFloat64)
    hadamard_forward<double>(p, row_begin, row_end);
  else if (p.x_kind == ScalarKind::kFloat32)
    hadamard_forward_float(p, row_begin, row_end);
  else
    hadamard_forward<float>(p, row_begin, row_end);
}

void hadamard_mux_backward_cpu(const HadamardMuxParams& p, int64_t task_begin, int64_t task_end) {
  if (p.x_kind == ScalarKind::kFloat64)
    hadamard_backward<double>(p, task_begin, task_end);
  else
    hadamard_backward<float>(p, task_begin, task_end);
}

void demux_forward_cpu(const DemuxParams& p, int64_t row_begin, int64_t row_end) {
  if (p.is_double)
    demux_forward<double>(p, row_begin, row_end);
  else
    demux_forward_float(p, row_begin, row_end);
}

void demux_backward_cpu(const DemuxParams& p, int64_t batch_begin, int64_t batch_end) {
  if (p.is_double)
    demux_backward<double>(p, batch_begin, batch_end);
  else
    demux_backward<float>(p, batch_begin, batch_end);
}

}  // namespace mux
}  // namespace fastcore

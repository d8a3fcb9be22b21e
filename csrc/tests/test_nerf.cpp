// The CPU nerf kernels against facts derived here from the contract in nerf.h: slab-test edge cases (zero
// direction components, start inside, degenerate and zero-thickness boxes), the grid update rule and its
// bit packing, marching with a full grid = the uniform lattice t0 + k·step exactly, no sample in an empty
// cell, exact two-pass allocation, volume rendering against a direct evaluation of the formulas, the
// analytic constant-density opacity 1 − exp(−σ·L), exactly-zero contribution and gradient after early
// stop, the closed-form backward against central finite differences, malformed packed_info kept in bounds,
// and Block-NeRF weights. Run under ASan/UBSan in CI (cmake -DFASTCORE_SANITIZE=ON).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "nerf/nerf.h"

using namespace fastcore;
using namespace fastcore::nerf;

namespace {

void test_ray_box() {
  const double box[6] = {-1, -1, -1, 1, 1, 1};
  double tn, tf;
  const double o0[3] = {-3, 0, 0}, d0[3] = {1, 0, 0};
  FC_EXPECT(ray_box<double>(o0, d0, box, tn, tf) && tn == 2.0 && tf == 4.0, "axis ray: %g %g", tn, tf);
  const double o1[3] = {0, 0, 0}, d1[3] = {0, 0, 2};
  FC_EXPECT(ray_box<double>(o1, d1, box, tn, tf) && tn == 0.0 && tf == 0.5, "inside: %g %g", tn, tf);
  const double o2[3] = {-3, 2, 0};
  FC_EXPECT(!ray_box<double>(o2, d0, box, tn, tf) && std::isinf(tn) && std::isinf(tf), "zero component outside");
  const double o3[3] = {3, 0, 0};
  FC_EXPECT(!ray_box<double>(o3, d0, box, tn, tf), "behind");
  const double bad[6] = {1, 0, 0, 0, 1, 1};
  FC_EXPECT(!ray_box<double>(o0, d0, bad, tn, tf), "degenerate box");
  const double flat[6] = {0.5, -1, -1, 0.5, 1, 1};
  FC_EXPECT(ray_box<double>(o0, d0, flat, tn, tf) && tn == 3.5 && tf == 3.5, "zero thickness: %g %g", tn, tf);
}

void test_grid_update() {
  const int64_t N = 13;
  std::vector<float> density(N, 0.02f), sampled(N, -INFINITY), out(N);
  density[0] = -1.0f;
  std::vector<int64_t> idx = {0, 3, 3, 5, 12};
  std::vector<float> values = {5.0f, 0.001f, 0.5f, 0.0f, 0.3f};
  std::vector<uint8_t> bits((N + 7) / 8, 0xAB);
  GridUpdateParams<float> p;
  p.density = density.data();
  p.cell_indices = idx.data();
  p.values = values.data();
  p.num_cells = N;
  p.num_samples = static_cast<int64_t>(idx.size());
  p.decay = 0.95f;
  p.sampled_max = sampled.data();
  p.out = out.data();
  p.bitfield = bits.data();
  grid_scatter_max_cpu<float>(p);
  grid_update_cells_cpu<float>(p, 0, N);
  FC_EXPECT(out[0] == -1.0f, "culled cell changed: %g", out[0]);
  FC_EXPECT(out[3] == 0.5f && out[12] == 0.3f, "max of samples: %g %g", out[3], out[12]);
  FC_EXPECT(out[5] == 0.95f * 0.02f, "decay: %g", out[5]);
  FC_EXPECT(out[1] == 0.02f, "unsampled unchanged: %g", out[1]);
  p.threshold = 0.1f;
  grid_pack_cpu<float>(p, 0, 2);
  FC_EXPECT(bits[0] == (1u << 3) && bits[1] == (1u << 4), "bits %x %x", bits[0], bits[1]);
}

MarchParams<double> march_params(const std::vector<double>& o, const std::vector<double>& d,
                                 const std::vector<uint8_t>& bits, int64_t res, double step) {
  MarchParams<double> p;
  p.rays_o = o.data();
  p.rays_d = d.data();
  p.num_rays = static_cast<int64_t>(o.size() / 3);
  p.bitfield = bits.data();
  p.resolution = res;
  p.levels = 1;
  for (int a = 0; a < 3; ++a) {
    p.boxes[0][a] = -1;
    p.boxes[0][a + 3] = 1;
  }
  p.far_plane = INFINITY;
  p.step_size = step;
  p.max_samples = 100000;
  return p;
}

void test_march() {
  const int64_t res = 8, R = 64;
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> uni(-1.5, 1.5);
  std::normal_distribution<double> normal;
  std::vector<double> o(3 * R), d(3 * R);
  for (int64_t i = 0; i < 3 * R; ++i) {
    o[i] = uni(rng);
    d[i] = normal(rng);
  }
  const double step = 0.03;
  // full grid: exactly the uniform lattice, clipped at the exit
  std::vector<uint8_t> full(res * res * res / 8, 0xFF);
  auto p = march_params(o, d, full, res, step);
  std::vector<int64_t> counts(R), offsets(R);
  p.counts = counts.data();
  march_count_cpu<double>(p, 0, R);
  int64_t S = 0;
  for (int64_t r = 0; r < R; ++r) {
    offsets[r] = S;
    S += counts[r];
  }
  std::vector<int64_t> ray_idx(S, -7);
  std::vector<double> ts(S, NAN), te(S, NAN);
  p.offsets = offsets.data();
  p.ray_indices = ray_idx.data();
  p.t_starts = ts.data();
  p.t_ends = te.data();
  march_fill_cpu<double>(p, 0, R);
  for (int64_t r = 0; r < R; ++r) {
    double tn, tf;
    const bool hit = ray_box<double>(&o[3 * r], &d[3 * r], p.boxes[0], tn, tf) && tf > tn;
    const int64_t expect = hit ? static_cast<int64_t>(std::ceil((tf - tn) / step)) : 0;
    FC_EXPECT(std::llabs(counts[r] - expect) <= 1, "ray %lld: %lld samples, lattice has %lld", (long long)r,
              (long long)counts[r], (long long)expect);
    for (int64_t k = 0; k < counts[r]; ++k) {
      const int64_t s = offsets[r] + k;
      FC_EXPECT(ray_idx[s] == r && ts[s] == tn + k * step, "ray %lld sample %lld off the lattice", (long long)r,
                (long long)k);
      const double end = tn + (k + 1) * step;
      FC_EXPECT(te[s] == (end < tf ? end : tf), "ray %lld sample %lld end", (long long)r, (long long)k);
    }
  }
  // partial grid: every sample's midpoint lies in an occupied cell; writes stay inside the exact allocation
  std::vector<uint8_t> part(res * res * res / 8);
  for (auto& b : part) b = static_cast<uint8_t>(rng() & rng());  // ~25% occupied
  auto q = march_params(o, d, part, res, step);
  q.counts = counts.data();
  march_count_cpu<double>(q, 0, R);
  S = 0;
  for (int64_t r = 0; r < R; ++r) {
    offsets[r] = S;
    S += counts[r];
  }
  std::vector<int64_t> ri(S);
  std::vector<double> a(S), b(S);
  q.offsets = offsets.data();
  q.ray_indices = ri.data();
  q.t_starts = a.data();
  q.t_ends = b.data();
  march_fill_cpu<double>(q, 0, R);
  FC_EXPECT(S > 50, "too few samples: %lld", (long long)S);
  for (int64_t s = 0; s < S; ++s) {
    const double mid = 0.5 * (a[s] + b[s]);
    double x[3];
    int level;
    int64_t cell[3];
    for (int k = 0; k < 3; ++k) x[k] = o[3 * ri[s] + k] + mid * d[3 * ri[s] + k];
    FC_EXPECT(grid_cell_of<double>(q, x, level, cell) && grid_occupied<double>(q, level, cell),
              "sample %lld in an empty cell", (long long)s);
  }
}

std::vector<double> render(const std::vector<double>& sig, const std::vector<double>& rgb,
                           const std::vector<double>& ts, const std::vector<double>& te, double eps) {
  // direct evaluation of the formulas (products of (1 − α), not the kernel's running sum)
  std::vector<double> out(5, 0.0);
  double trans = 1.0;
  for (size_t i = 0; i < sig.size(); ++i) {
    if (trans < eps) break;
    const double alpha = 1.0 - std::exp(-sig[i] * (te[i] - ts[i]));
    const double w = trans * alpha;
    for (int c = 0; c < 3; ++c) out[c] += w * rgb[3 * i + c];
    out[3] += w;
    out[4] += w * 0.5 * (ts[i] + te[i]);
    trans *= 1.0 - alpha;
  }
  return out;
}

void test_render() {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  const int64_t S = 9;
  std::vector<double> sig(S), rgb(3 * S), ts(S), te(S);
  double t = 0.2;
  for (int64_t i = 0; i < S; ++i) {
    sig[i] = 3.0 * uni(rng);
    for (int c = 0; c < 3; ++c) rgb[3 * i + c] = uni(rng);
    ts[i] = t;
    t += 0.05 + 0.3 * uni(rng);
    te[i] = t;
  }
  std::vector<int64_t> info = {0, S, S, 0};  // one ray with every sample, one empty ray
  std::vector<double> color(6), opacity(2), depth(2), weights(S, NAN);
  RenderParams<double> p;
  p.sigmas = sig.data();
  p.rgbs = rgb.data();
  p.t_starts = ts.data();
  p.t_ends = te.data();
  p.packed_info = info.data();
  p.num_rays = 2;
  p.num_samples = S;
  p.early_stop_eps = 0.0;
  p.color = color.data();
  p.opacity = opacity.data();
  p.depth = depth.data();
  p.weights = weights.data();
  render_forward_cpu<double>(p, 0, 2);
  const auto want = render(sig, rgb, ts, te, 0.0);
  for (int c = 0; c < 3; ++c) FC_EXPECT(std::fabs(color[c] - want[c]) < 1e-13, "color %d", c);
  FC_EXPECT(std::fabs(opacity[0] - want[3]) < 1e-13 && std::fabs(depth[0] - want[4]) < 1e-13, "opacity/depth");
  FC_EXPECT(opacity[1] == 0.0 && color[3] == 0.0 && depth[1] == 0.0, "empty ray is transparent");
  // analytic: constant density over total length L gives 1 − exp(−σL) whatever the partition
  std::vector<double> constant(S, 1.3);
  p.sigmas = constant.data();
  render_forward_cpu<double>(p, 0, 1);
  FC_EXPECT(std::fabs(opacity[0] - (1.0 - std::exp(-1.3 * (te[S - 1] - ts[0])))) < 1e-14, "analytic opacity");
  p.sigmas = sig.data();
  // backward vs central finite differences of L = g·C + ga·A + gd·D + Σ gw·w
  const std::vector<double> gc = {0.3, -0.7, 1.1, 0, 0, 0}, ga = {0.4, 0}, gd = {-0.2, 0};
  std::vector<double> gw(S);
  for (auto& v : gw) v = uni(rng) - 0.5;
  auto loss = [&](const std::vector<double>& s, const std::vector<double>& c) {
    RenderParams<double> q = p;
    std::vector<double> col(6), op(2), dp(2), w(S);
    q.sigmas = s.data();
    q.rgbs = c.data();
    q.color = col.data();
    q.opacity = op.data();
    q.depth = dp.data();
    q.weights = w.data();
    render_forward_cpu<double>(q, 0, 1);
    double l = gc[0] * col[0] + gc[1] * col[1] + gc[2] * col[2] + ga[0] * op[0] + gd[0] * dp[0];
    for (int64_t i = 0; i < S; ++i) l += gw[i] * w[i];
    return l;
  };
  render_forward_cpu<double>(p, 0, 2);
  std::vector<double> gs(S, NAN), grgb(3 * S, NAN);
  p.grad_color = gc.data();
  p.grad_opacity = ga.data();
  p.grad_depth = gd.data();
  p.grad_weights = gw.data();
  p.grad_sigmas = gs.data();
  p.grad_rgbs = grgb.data();
  render_backward_cpu<double>(p, 0, 2);
  for (int64_t i = 0; i < S; ++i) {
    auto plus = sig, minus = sig;
    plus[i] += 1e-6;
    minus[i] -= 1e-6;
    const double fd = (loss(plus, rgb) - loss(minus, rgb)) / 2e-6;
    FC_EXPECT(std::fabs(fd - gs[i]) < 1e-7, "grad sigma %lld: fd %g analytic %g", (long long)i, fd, gs[i]);
    auto cp = rgb, cm = rgb;
    cp[3 * i + 1] += 1e-6;
    cm[3 * i + 1] -= 1e-6;
    const double fdc = (loss(sig, cp) - loss(sig, cm)) / 2e-6;
    FC_EXPECT(std::fabs(fdc - grgb[3 * i + 1]) < 1e-7, "grad rgb %lld", (long long)i);
  }
  // early stop: after T < eps, weights and gradients are exactly zero
  std::vector<double> dense(S, 1000.0);  // σδ >= 50: T < 1e-4 after the first sample
  p.sigmas = dense.data();
  p.early_stop_eps = 1e-4;
  render_forward_cpu<double>(p, 0, 2);
  render_backward_cpu<double>(p, 0, 2);
  FC_EXPECT(weights[0] > 0.9, "first sample opaque");
  for (int64_t i = 1; i < S; ++i)
    FC_EXPECT(weights[i] == 0.0 && gs[i] == 0.0 && grgb[3 * i] == 0.0, "sample %lld after stop", (long long)i);
  // malformed packed_info (run past S): the ray is skipped, nothing read out of bounds
  std::vector<int64_t> bad = {3, S, 0, -1};
  p.packed_info = bad.data();
  render_forward_cpu<double>(p, 0, 2);
  FC_EXPECT(opacity[0] == 0.0 && opacity[1] == 0.0, "malformed runs are skipped");
}

// The float CPU path walks 8 rays per vector lane group (nerf_cpu.cpp): against the scalar body of nerf.h
// evaluated in double on the same float inputs, over ragged runs (empty, 1 sample, longer than the rest),
// a malformed run, early stops, weights and the backward with grad_weights; and a ray's result must not
// depend on the rays that share its group (each ray alone, and the whole range, bitwise equal).
void test_render_float_lanes() {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  const int64_t R = 21;
  std::vector<int64_t> info;
  int64_t S = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t count = r == 3 ? 0 : r == 5 ? 1 : r == 8 ? 40 : 1 + static_cast<int64_t>(uni(rng) * 17);
    info.push_back(S);
    info.push_back(count);
    S += count;
  }
  info[2 * 12 + 1] = S + 5;  // ray 12's run leaves [0, S): skipped, as the scalar body skips it
  std::vector<float> sig(S), rgb(3 * S), ts(S), te(S), gw(S);
  for (int64_t i = 0; i < S; ++i) {
    sig[i] = (i % 7 == 0 ? 40.0f : 4.0f) * uni(rng);  // some rays reach the early stop
    for (int c = 0; c < 3; ++c) rgb[3 * i + c] = uni(rng);
    ts[i] = 0.1f + 0.02f * static_cast<float>(i % 50);
    te[i] = ts[i] + 0.02f + 0.1f * uni(rng);
    gw[i] = uni(rng) - 0.5f;
  }
  std::vector<double> sig_d(sig.begin(), sig.end()), rgb_d(rgb.begin(), rgb.end()), ts_d(ts.begin(), ts.end()),
      te_d(te.begin(), te.end()), gw_d(gw.begin(), gw.end());
  std::vector<float> gc(3 * R), ga(R), gd(R);
  for (auto* v : {&gc, &ga, &gd})
    for (float& x : *v) x = uni(rng) - 0.5f;
  std::vector<double> gc_d(gc.begin(), gc.end()), ga_d(ga.begin(), ga.end()), gd_d(gd.begin(), gd.end());
  struct Out {
    std::vector<float> color, opacity, depth, weights, grad_sigmas, grad_rgbs;
  };
  auto run_float = [&](int64_t begin, int64_t end, Out& o) {
    RenderParams<float> p;
    p.sigmas = sig.data();
    p.rgbs = rgb.data();
    p.t_starts = ts.data();
    p.t_ends = te.data();
    p.packed_info = info.data();
    p.num_rays = R;
    p.num_samples = S;
    p.early_stop_eps = 1e-3f;
    p.color = o.color.data();
    p.opacity = o.opacity.data();
    p.depth = o.depth.data();
    p.weights = o.weights.data();
    render_forward_cpu<float>(p, begin, end);
    p.grad_color = gc.data();
    p.grad_opacity = ga.data();
    p.grad_depth = gd.data();
    p.grad_weights = gw.data();
    p.grad_sigmas = o.grad_sigmas.data();
    p.grad_rgbs = o.grad_rgbs.data();
    render_backward_cpu<float>(p, begin, end);
  };
  auto fresh = [&]() {
    return Out{std::vector<float>(3 * R),   std::vector<float>(R),       std::vector<float>(R),
               std::vector<float>(S, 0.0f), std::vector<float>(S, 0.0f), std::vector<float>(3 * S, 0.0f)};
  };
  Out whole = fresh(), alone = fresh();
  run_float(0, R, whole);
  for (int64_t r = 0; r < R; ++r) run_float(r, r + 1, alone);
  FC_EXPECT(whole.color == alone.color && whole.opacity == alone.opacity && whole.depth == alone.depth &&
                whole.weights == alone.weights && whole.grad_sigmas == alone.grad_sigmas &&
                whole.grad_rgbs == alone.grad_rgbs,
            "float render: a ray's result depends on the rays grouped with it");
  // The scalar body in double on the same inputs.
  std::vector<double> color(3 * R), opacity(R), depth(R), weights(S, 0.0), gs(S, 0.0), grgb(3 * S, 0.0);
  RenderParams<double> q;
  q.sigmas = sig_d.data();
  q.rgbs = rgb_d.data();
  q.t_starts = ts_d.data();
  q.t_ends = te_d.data();
  q.packed_info = info.data();
  q.num_rays = R;
  q.num_samples = S;
  q.early_stop_eps = static_cast<double>(1e-3f);
  q.color = color.data();
  q.opacity = opacity.data();
  q.depth = depth.data();
  q.weights = weights.data();
  for (int64_t r = 0; r < R; ++r) render_forward_ray<double>(q, r);
  q.grad_color = gc_d.data();
  q.grad_opacity = ga_d.data();
  q.grad_depth = gd_d.data();
  q.grad_weights = gw_d.data();
  q.grad_sigmas = gs.data();
  q.grad_rgbs = grgb.data();
  for (int64_t r = 0; r < R; ++r) render_backward_ray<double>(q, r);
  auto close = [](double got, double want) { return std::fabs(got - want) <= 2e-5 * (1.0 + std::fabs(want)); };
  for (int64_t r = 0; r < R; ++r) {
    FC_EXPECT(close(whole.opacity[r], opacity[r]) && close(whole.depth[r], depth[r]), "float ray %lld opacity/depth",
              (long long)r);
    for (int c = 0; c < 3; ++c)
      FC_EXPECT(close(whole.color[3 * r + c], color[3 * r + c]), "float ray %lld color", (long long)r);
  }
  FC_EXPECT(whole.opacity[3] == 0.0f && whole.opacity[12] == 0.0f, "empty and malformed rays are transparent");
  FC_EXPECT(opacity[0] > 0.0, "the double body rendered something");
  int stopped = 0;
  for (int64_t i = 0; i < S; ++i) {
    FC_EXPECT(close(whole.weights[i], weights[i]), "float weight %lld: %g vs %g", (long long)i, whole.weights[i],
              weights[i]);
    FC_EXPECT(close(whole.grad_sigmas[i], gs[i]), "float grad sigma %lld: %g vs %g", (long long)i, whole.grad_sigmas[i],
              gs[i]);
    for (int c = 0; c < 3; ++c)
      FC_EXPECT(close(whole.grad_rgbs[3 * i + c], grgb[3 * i + c]), "float grad rgb %lld", (long long)i);
    if (weights[i] == 0.0 && whole.weights[i] == 0.0 && whole.grad_sigmas[i] == 0.0) ++stopped;
  }
  FC_EXPECT(stopped > 0, "the case must contain early-stopped samples");
}

void test_composite() {
  const int64_t K = 3, R = 2;
  std::vector<double> colors(K * R * 3), centers = {1, 0, 0, 0, 2, 0, 10, 0, 0}, camera = {0, 0, 0};
  for (size_t i = 0; i < colors.size(); ++i) colors[i] = 0.1 * static_cast<double>(i);
  std::vector<double> vis = {1, 0, 1, 0, 0.01, 0};  // ray 1: nothing eligible
  std::vector<double> out(R * 3), w(K * R);
  CompositeParams<double> p;
  p.colors = colors.data();
  p.camera = camera.data();
  p.centers = centers.data();
  p.visibility = vis.data();
  p.num_blocks = K;
  p.num_rays = R;
  p.power = 2.0;
  p.threshold = 0.05;
  p.radius = INFINITY;
  p.out = out.data();
  p.weights = w.data();
  composite_cpu<double>(p, 0, R);
  FC_EXPECT(std::fabs(w[0] - 0.8) < 1e-14 && std::fabs(w[2] - 0.2) < 1e-14 && w[4] == 0.0, "idw %g %g %g", w[0], w[2],
            w[4]);
  FC_EXPECT(w[1] == 1.0 && w[3] == 0.0 && w[5] == 0.0, "fallback to the nearest block");
  FC_EXPECT(std::fabs(out[3] - colors[3]) < 1e-15, "fallback colour");
}

}  // namespace

int main() {
  test_ray_box();
  test_grid_update();
  test_march();
  test_render();
  test_render_float_lanes();
  test_composite();
  if (fc_failures()) std::fprintf(stderr, "%d failure(s)\n", fc_failures());
  return fc_failures() ? 1 : 0;
}

// CPU loops of the nerf kernels: each runs the shared per-ray / per-cell body of nerf.h over a range
// (the torch glue splits the range with at::parallel_for). Explicit instantiations for float and double.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fastcore/cpu_vector.h"
#include "nerf/nerf.h"

namespace fastcore {
namespace nerf {
namespace {

// ---- float volume rendering, 8 rays at a time ------------------------------------------------------
// The per-ray sweep is a chain of two transcendentals a sample (T_i = exp(−τ_i) and α_i = −expm1(−σ_i δ_i));
// scalar libm calls made it slower than a dense torch composition. Here each of 8 vector lanes walks one ray
// (the lanes of a group step through sample i of their rays together, a lane whose ray is shorter or has
// stopped early is masked), with exp_lanes / expm1_lanes. Every operation is lane-wise, so a ray's result
// does not depend on which rays share its group (thread count and range splits change nothing), and the
// forward, the rounds and the backward evaluate T_i and α_i with the same operations, so they agree on the
// early stop (one RaySweep below). The sweep carries T_{i+1} = exp(−(τ_i + x_i)) to the next sample.
constexpr int kRayLanes = 8;

// expm1(y): |y| < ln2/2 by its degree-8 Taylor polynomial in Horner form (relative truncation < 6e-10),
// otherwise exp(y) − 1 (cancellation costs at most ~3.4 ulp there). NaN propagates through the exp branch.
FC_VECTOR_INLINE Float8Lanes expm1_lanes(Float8Lanes y) {
  const Int8Lanes small = (y > -0.34657359f) & (y < 0.34657359f);
  Float8Lanes poly = Float8Lanes{} + 1.0f / 40320.0f;
  poly = poly * y + 1.0f / 5040.0f;
  poly = poly * y + 1.0f / 720.0f;
  poly = poly * y + 1.0f / 120.0f;
  poly = poly * y + 1.0f / 24.0f;
  poly = poly * y + 1.0f / 6.0f;
  poly = poly * y + 0.5f;
  poly = poly * y + 1.0f;
  return select_lanes(small, poly * y, exp_lanes(y) - 1.0f);
}

// One group's rays [r0, r0 + lanes): sample runs (begin, count; count 0 for a run the glue rejected).
struct RayGroup {
  int64_t begin[kRayLanes], count[kRayLanes];
  bool valid[kRayLanes];
  int64_t longest = 0;
};

inline RayGroup ray_group(const RenderParams<float>& p, int64_t r0, int lanes) {
  RayGroup g;
  for (int l = 0; l < kRayLanes; ++l) {
    int64_t begin = 0, end = 0;
    g.valid[l] = l < lanes && render_run<float>(p, r0 + l, begin, end);
    g.begin[l] = g.valid[l] ? begin : 0;
    g.count[l] = g.valid[l] ? end - begin : 0;
    g.longest = std::max(g.longest, g.count[l]);
  }
  return g;
}

// Sample i of every lane's ray (zeros, and in_range 0, for a lane past its run's end).
struct SampleLanes {
  Float8Lanes sigma, t_start, t_end, red, green, blue, grad_weight;
  Int8Lanes in_range;
};

FC_VECTOR_INLINE SampleLanes load_samples(const RenderParams<float>& p, const RayGroup& g, int64_t i) {
  SampleLanes s{};
  for (int l = 0; l < kRayLanes; ++l) {
    if (i >= g.count[l]) continue;
    const int64_t at = g.begin[l] + i;
    s.sigma[l] = p.sigmas[at];
    s.t_start[l] = p.t_starts[at];
    s.t_end[l] = p.t_ends[at];
    s.red[l] = p.rgbs[3 * at];
    s.green[l] = p.rgbs[3 * at + 1];
    s.blue[l] = p.rgbs[3 * at + 2];
    if (p.grad_weights) s.grad_weight[l] = p.grad_weights[at];
    s.in_range[l] = -1;
  }
  return s;
}

// The front-to-back sweep of a lane group, one sample at a time: `take` decides which lanes take sample i
// (in range and not stopped: T_i < eps stops a ray for good, because its τ no longer grows; `!(T < eps)`
// keeps a NaN transmittance going, as the scalar body does) and evaluates x_i = σ_i δ_i, w_i = T_i α_i (0
// where not live) and T_{i+1} = exp(−(τ_i + x_i)); `advance` moves the live lanes on. The forward, the
// backward's weight sweep and its main sweep all step through this one object, so they agree on the stop.
struct RaySweep {
  Float8Lanes tau{}, trans{};
  Int8Lanes live{};
  Float8Lanes delta{}, x{}, w{}, tau_next{}, trans_next{};

  FC_VECTOR_INLINE explicit RaySweep(Float8Lanes start_tau) : tau(start_tau), trans(exp_lanes(-start_tau)) {}
  FC_VECTOR_INLINE void take(const SampleLanes& s, float eps) {
    live = s.in_range & ~(trans < eps);
    delta = s.t_end - s.t_start;
    x = s.sigma * delta;
    w = select_lanes(live, trans * -expm1_lanes(-x), Float8Lanes{});
    tau_next = tau + x;
    trans_next = exp_lanes(-tau_next);
  }
  FC_VECTOR_INLINE void advance() {
    trans = select_lanes(live, trans_next, trans);
    tau = select_lanes(live, tau_next, tau);
  }
};

FC_CPU_CLONES void render_forward_float(const RenderParams<float>& p, int64_t ray_begin, int64_t ray_end) {
  const Float8Lanes zero{};
  for (int64_t r0 = ray_begin; r0 < ray_end; r0 += kRayLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kRayLanes, ray_end - r0));
    const RayGroup g = ray_group(p, r0, lanes);
    Float8Lanes tau = zero;
    if (p.tau)
      for (int l = 0; l < lanes; ++l) tau[l] = g.valid[l] ? p.tau[r0 + l] : 0.0f;
    RaySweep sweep(tau);
    Float8Lanes c0 = zero, c1 = zero, c2 = zero, acc = zero, dep = zero;
    for (int64_t i = 0; i < g.longest; ++i) {
      const SampleLanes s = load_samples(p, g, i);
      sweep.take(s, p.early_stop_eps);
      const Float8Lanes w = sweep.w;
      c0 += w * s.red;
      c1 += w * s.green;
      c2 += w * s.blue;
      acc += w;
      dep += w * (0.5f * (s.t_start + s.t_end));
      if (p.weights)
        for (int l = 0; l < kRayLanes; ++l)
          if (i < g.count[l]) p.weights[g.begin[l] + i] = w[l];
      sweep.advance();
    }
    tau = sweep.tau;
    for (int l = 0; l < lanes; ++l) {
      const int64_t r = r0 + l;
      if (p.tau && g.valid[l]) p.tau[r] = tau[l];
      if (p.out_rows) {
        const int64_t row = p.out_rows[r];
        p.color[3 * row] += c0[l];
        p.color[3 * row + 1] += c1[l];
        p.color[3 * row + 2] += c2[l];
        p.opacity[row] += acc[l];
        p.depth[row] += dep[l];
      } else {
        p.color[3 * r] = c0[l];
        p.color[3 * r + 1] = c1[l];
        p.color[3 * r + 2] = c2[l];
        p.opacity[r] = acc[l];
        p.depth[r] = dep[l];
      }
    }
  }
}

// The backward of nerf.h's render_backward_ray, lane-wise (same formulas, see there).
FC_CPU_CLONES void render_backward_float(const RenderParams<float>& p, int64_t ray_begin, int64_t ray_end) {
  const Float8Lanes zero{};
  for (int64_t r0 = ray_begin; r0 < ray_end; r0 += kRayLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kRayLanes, ray_end - r0));
    const RayGroup g = ray_group(p, r0, lanes);
    Float8Lanes g0 = zero, g1 = zero, g2 = zero, ga = zero, gd = zero, total = zero;
    for (int l = 0; l < lanes; ++l) {
      if (!g.valid[l]) continue;
      const int64_t r = r0 + l;
      g0[l] = p.grad_color[3 * r];
      g1[l] = p.grad_color[3 * r + 1];
      g2[l] = p.grad_color[3 * r + 2];
      ga[l] = p.grad_opacity[r];
      gd[l] = p.grad_depth[r];
      total[l] = g0[l] * p.color[3 * r] + g1[l] * p.color[3 * r + 1] + g2[l] * p.color[3 * r + 2] +
                 ga[l] * p.opacity[r] + gd[l] * p.depth[r];
    }
    if (p.grad_weights) {  // Σ g_w,i w_i needs w: one extra sweep
      RaySweep sweep(zero);
      for (int64_t i = 0; i < g.longest; ++i) {
        const SampleLanes s = load_samples(p, g, i);
        sweep.take(s, p.early_stop_eps);
        total += select_lanes(sweep.live, s.grad_weight * sweep.w, zero);
        sweep.advance();
      }
    }
    RaySweep sweep(zero);
    Float8Lanes prefix = zero;
    for (int64_t i = 0; i < g.longest; ++i) {
      const SampleLanes s = load_samples(p, g, i);
      sweep.take(s, p.early_stop_eps);
      const Int8Lanes live = sweep.live;
      const Float8Lanes w = sweep.w;
      Float8Lanes u = g0 * s.red + g1 * s.green + g2 * s.blue + ga + gd * (0.5f * (s.t_start + s.t_end));
      if (p.grad_weights) u += s.grad_weight;
      prefix += select_lanes(live, w * u, zero);
      const Float8Lanes grad_sigma = select_lanes(live, sweep.delta * (sweep.trans_next * u - (total - prefix)), zero);
      const Float8Lanes grad_red = select_lanes(live, w * g0, zero), grad_green = select_lanes(live, w * g1, zero),
                        grad_blue = select_lanes(live, w * g2, zero);
      for (int l = 0; l < kRayLanes; ++l) {
        if (i >= g.count[l]) continue;
        const int64_t at = g.begin[l] + i;
        p.grad_sigmas[at] = grad_sigma[l];
        p.grad_rgbs[3 * at] = grad_red[l];
        p.grad_rgbs[3 * at + 1] = grad_green[l];
        p.grad_rgbs[3 * at + 2] = grad_blue[l];
      }
      sweep.advance();
    }
  }
}

}  // namespace

template <typename T>
void ray_aabb_cpu(const AabbParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  for (int64_t r = ray_begin; r < ray_end; ++r)
    for (int64_t a = 0; a < p.num_boxes; ++a) aabb_element<T>(p, r, a);
}

// Serial scatter-max (the glue has checked every index): sampled_max[c] = max over c's samples.
template <typename T>
void grid_scatter_max_cpu(const GridUpdateParams<T>& p) {
  for (int64_t i = 0; i < p.num_samples; ++i) {
    const int64_t c = p.cell_indices[i];
    if (c < 0 || c >= p.num_cells) continue;
    const T v = p.values[i];
    if (v > p.sampled_max[c]) p.sampled_max[c] = v;
  }
}

template <typename T>
void grid_update_cells_cpu(const GridUpdateParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) grid_update_cell<T>(p, c);
}

template <typename T>
void grid_pack_cpu(const GridUpdateParams<T>& p, int64_t byte_begin, int64_t byte_end) {
  for (int64_t b = byte_begin; b < byte_end; ++b) grid_pack_byte<T>(p, b);
}

template <typename T>
void march_count_cpu(const MarchParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  for (int64_t r = ray_begin; r < ray_end; ++r) p.counts[r] = march_ray<T>(p, r, 0, false);
}

template <typename T>
void march_fill_cpu(const MarchParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  for (int64_t r = ray_begin; r < ray_end; ++r) {
    const int64_t count = march_ray<T>(p, r, p.offsets[r], true);
    if (p.counts) p.counts[r] = count;  // the single-pass (padded) mode's counts; pass 2 rewrites pass 1's
  }
}

template <typename T>
void render_forward_cpu(const RenderParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  if constexpr (std::is_same_v<T, float>) {
    render_forward_float(p, ray_begin, ray_end);
  } else {
    for (int64_t r = ray_begin; r < ray_end; ++r) render_forward_ray<T>(p, r);
  }
}

template <typename T>
void render_backward_cpu(const RenderParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  if constexpr (std::is_same_v<T, float>) {
    render_backward_float(p, ray_begin, ray_end);
  } else {
    for (int64_t r = ray_begin; r < ray_end; ++r) render_backward_ray<T>(p, r);
  }
}

template <typename T>
void composite_cpu(const CompositeParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  for (int64_t r = ray_begin; r < ray_end; ++r) composite_ray<T>(p, r);
}

#define FC_NERF_INSTANTIATE(T)                                                          \
  template void ray_aabb_cpu<T>(const AabbParams<T>&, int64_t, int64_t);                \
  template void grid_scatter_max_cpu<T>(const GridUpdateParams<T>&);                    \
  template void grid_update_cells_cpu<T>(const GridUpdateParams<T>&, int64_t, int64_t); \
  template void grid_pack_cpu<T>(const GridUpdateParams<T>&, int64_t, int64_t);         \
  template void march_count_cpu<T>(const MarchParams<T>&, int64_t, int64_t);            \
  template void march_fill_cpu<T>(const MarchParams<T>&, int64_t, int64_t);             \
  template void render_forward_cpu<T>(const RenderParams<T>&, int64_t, int64_t);        \
  template void render_backward_cpu<T>(const RenderParams<T>&, int64_t, int64_t);       \
  template void composite_cpu<T>(const CompositeParams<T>&, int64_t, int64_t);

FC_NERF_INSTANTIATE(float)
FC_NERF_INSTANTIATE(double)
#undef FC_NERF_INSTANTIATE

}  // namespace nerf
}  // namespace fastcore

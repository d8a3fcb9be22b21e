// NeRF ray/AABB, occupancy-grid update, ray marching, volume rendering (forward + recomputing backward)
// and Block-NeRF compositing, torch-free. The per-ray / per-cell bodies below are FC_HOST_DEVICE and used
// unchanged by the CPU loops (nerf_cpu.cpp) and the CUDA kernels (nerf.cu) — DESIGN rule 2 — and mirror
// python/fastcore_ai/reference/nerf.py operation for operation (float64 inputs give the same bits on CPU).
//
// Scalar type T is float (float32 inputs, float32 math) or double (float64 inputs). Every tensor is
// contiguous; indices and offsets are int64.
//
// Conventions:
//   box = [x0, y0, z0, x1, y1, z1]; ray point o + t·d, t >= 0.
//   grid: `levels` cascades of res³ cells, level l = base box scaled by 2^l about its centre; cell
//   (l, i, j, k) has flat index l·res³ + (i·res + j)·res + k; occupied = bit (index & 7) of byte index >> 3.
//   packed samples: ray r owns samples [start_r, start_r + count_r), packed_info[r] = (start_r, count_r).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastcore/common.h"

namespace fastcore {
namespace nerf {

constexpr int kMaxLevels = 16;

FC_HOST_DEVICE float fc_expm1(float x) { return expm1f(x); }
FC_HOST_DEVICE double fc_expm1(double x) { return expm1(x); }
template <typename T>
FC_HOST_DEVICE T fc_inf() {
  return static_cast<T>(INFINITY);
}

// ---- 1. ray / AABB ----------------------------------------------------------------------------------

template <typename T>
struct AabbParams {
  const T* rays_o = nullptr;  // [R, 3]
  const T* rays_d = nullptr;  // [R, 3]
  const T* aabbs = nullptr;   // [A, 6]
  int64_t num_rays = 0, num_boxes = 0;
  T* t_near = nullptr;  // [R, A]
  T* t_far = nullptr;   // [R, A]
  bool* hit = nullptr;  // [R, A]
};

// Slab test of the half-line t >= 0 against one box. Per axis the slab is [(lo−o)/d, (hi−o)/d] (sorted);
// d = 0 gives the whole line when lo <= o <= hi and nothing otherwise (never 0·inf = NaN).
// t_near = max(0, max entry), t_far = min exit, hit = t_far >= t_near; a box with hi < lo on some axis,
// or a miss, gives (inf, inf, false).
template <typename T>
FC_HOST_DEVICE bool ray_box(const T* o, const T* d, const T* box, T& t_near, T& t_far) {
  T t0 = -fc_inf<T>(), t1 = fc_inf<T>();
  for (int a = 0; a < 3; ++a) {
    const T lo = box[a], hi = box[a + 3];
    if (lo > hi) {
      t_near = t_far = fc_inf<T>();
      return false;
    }
    T s0, s1;
    if (d[a] == T(0)) {
      const bool inside = lo <= o[a] && o[a] <= hi;
      s0 = inside ? -fc_inf<T>() : fc_inf<T>();
      s1 = inside ? fc_inf<T>() : -fc_inf<T>();
    } else {
      const T p = (lo - o[a]) / d[a], q = (hi - o[a]) / d[a];
      s0 = p <= q ? p : q;
      s1 = p <= q ? q : p;
    }
    if (s0 > t0) t0 = s0;
    if (s1 < t1) t1 = s1;
  }
  if (t0 < T(0)) t0 = T(0);
  if (!(t1 >= t0)) {
    t_near = t_far = fc_inf<T>();
    return false;
  }
  t_near = t0;
  t_far = t1;
  return true;
}

template <typename T>
FC_HOST_DEVICE void aabb_element(const AabbParams<T>& p, int64_t r, int64_t a) {
  const int64_t out = r * p.num_boxes + a;
  p.hit[out] = ray_box<T>(p.rays_o + 3 * r, p.rays_d + 3 * r, p.aabbs + 6 * a, p.t_near[out], p.t_far[out]);
}

// ---- 2. occupancy grid update -------------------------------------------------------------------------
//   new[c] = max(decay · old[c], max_{i: idx_i = c} v_i)  for sampled cells with old[c] >= 0, else old[c]
//   occupied[c] = new[c] > thr, thr = min(threshold, mean of the non-negative new values) (torch glue)
// Step 1 (scatter) writes sampled_max[c] = max over the samples of c (init −inf); max is order-free, so the
// CUDA atomic version is deterministic too. Step 2 (per cell) and step 3 (per byte) are elementwise.

template <typename T>
struct GridUpdateParams {
  const T* density = nullptr;             // [N] old values
  const int64_t* cell_indices = nullptr;  // [M]
  const T* values = nullptr;              // [M]
  int64_t num_cells = 0, num_samples = 0;
  T decay = T(0.95);
  T* sampled_max = nullptr;     // [N] scratch, −inf where unsampled
  T* out = nullptr;             // [N] new values
  T threshold = T(0.01);        // the final threshold min(threshold, mean), for packing
  uint8_t* bitfield = nullptr;  // [ceil(N / 8)]
};

template <typename T>
FC_HOST_DEVICE void grid_update_cell(const GridUpdateParams<T>& p, int64_t c) {
  const T old = p.density[c], sampled = p.sampled_max[c];
  T value = old;
  if (old >= T(0) && sampled > -fc_inf<T>()) {
    const T decayed = p.decay * old;
    value = decayed > sampled ? decayed : sampled;
  }
  p.out[c] = value;
}

template <typename T>
FC_HOST_DEVICE void grid_pack_byte(const GridUpdateParams<T>& p, int64_t byte) {
  unsigned bits = 0;
  for (int b = 0; b < 8; ++b) {
    const int64_t c = byte * 8 + b;
    if (c < p.num_cells && p.out[c] > p.threshold) bits |= 1u << b;
  }
  p.bitfield[byte] = static_cast<uint8_t>(bits);
}

// ---- 3. ray marching ------------------------------------------------------------------------------------
//   [t0, t1] = [max(near, entry), min(far, exit)] of the outermost level's box; dt(t) = max(cone·t, step).
//   cone = 0: t_k = t0 + (k + u)·step (closed form); cone > 0: τ_0 = t0 + u·dt(t0), τ_{k+1} = τ_k + dt(τ_k).
//   Sample k = [t_k, min(t_{k+1}, t1)], emitted when the cell holding its midpoint (finest level whose box
//   holds it) is occupied; an empty cell is skipped by whole steps to the first k whose step midpoint is at
//   or past the cell's exit, so skipping never moves the lattice. At most max_samples per ray.
// Pass 1 (counts != nullptr) counts, the glue scans the counts into offsets, pass 2 fills: memory is exact.
// Rounds of a few steps per ray instead run the fill pass alone into max_samples slots per ray (offsets
// i·stride; it also writes the counts and saves the stops) and compact afterwards: one march instead of two.

template <typename T>
struct MarchParams {
  const T* rays_o = nullptr;    // [R, 3]
  const T* rays_d = nullptr;    // [R, 3]
  const T* jitter_u = nullptr;  // [R] in [0, 1), or nullptr (u = 0)
  int64_t num_rays = 0;
  const uint8_t* bitfield = nullptr;  // [ceil(levels·res³ / 8)]
  int64_t resolution = 128;
  int32_t levels = 1;
  T boxes[kMaxLevels][6] = {};  // level boxes (computed on the host in double, like the reference)
  T near_plane = T(0), far_plane = T(0), step_size = T(1e-3), cone_angle = T(0);
  int64_t max_samples = 1024;
  int64_t* counts = nullptr;         // pass 1: [R]
  const int64_t* offsets = nullptr;  // pass 2: [R] first sample of each ray
  int64_t* ray_indices = nullptr;    // pass 2: [S]
  T* t_starts = nullptr;             // pass 2: [S]
  T* t_ends = nullptr;               // pass 2: [S]
  // Resumable marching (rendering in rounds): with rows set, "ray" i of this call (num_rays = n rows) is
  // the input ray rows[i]; it resumes at lattice step start_k[i] (t = start_t[i] when cone > 0; k = 0 is
  // the ray's start) and pass 1 saves where it stopped in next_k / next_t (+inf: the ray reached its end),
  // so rounds of max_samples steps emit exactly the samples of one march, in pieces.
  const int64_t* rows = nullptr;             // [n] or nullptr (ray i = input ray i, from its start)
  const int64_t* start_k = nullptr;          // [n]
  const T* start_t = nullptr;                // [n]
  const int64_t* row_max_samples = nullptr;  // [n] per-row cap (replaces max_samples), or nullptr
  int64_t* next_k = nullptr;                 // [n], written by the pass that has it set
  T* next_t = nullptr;                       // [n]
  T* positions = nullptr;                    // pass 2: [S, 3] midpoints o + m·d (the field's input), or nullptr
  T* directions = nullptr;                   // pass 2: [S, 3] d of the sample's ray, or nullptr
};

// The finest level whose box holds x and the cell there (clamped to the grid); false outside every level.
template <typename T>
FC_HOST_DEVICE bool grid_cell_of(const MarchParams<T>& p, const T* x, int& level, int64_t* cell) {
  for (int l = 0; l < p.levels; ++l) {
    const T* box = p.boxes[l];
    bool inside = true;
    for (int a = 0; a < 3; ++a) inside = inside && box[a] <= x[a] && x[a] <= box[a + 3];
    if (!inside) continue;
    // x lies in the box, so (x − box)/size·res >= 0 and truncation is floor: an inline conversion, where floor
    // was a libm call per axis and sample in the default-ISA CPU build (three per marched sample)
    for (int a = 0; a < 3; ++a) {
      const T size = box[a + 3] - box[a];
      int64_t i = 0;
      if (size > T(0)) i = static_cast<int64_t>((x[a] - box[a]) / size * static_cast<T>(p.resolution));
      if (i < 0) i = 0;
      if (i > p.resolution - 1) i = p.resolution - 1;
      cell[a] = i;
    }
    level = l;
    return true;
  }
  return false;
}

template <typename T>
FC_HOST_DEVICE bool grid_occupied(const MarchParams<T>& p, int level, const int64_t* cell) {
  const int64_t res = p.resolution;
  const int64_t index = static_cast<int64_t>(level) * res * res * res + (cell[0] * res + cell[1]) * res + cell[2];
  return (p.bitfield[index >> 3] >> (index & 7)) & 1;
}

// t where the ray leaves the cell (the nearest face ahead on each axis with d != 0).
template <typename T>
FC_HOST_DEVICE T grid_cell_exit(const MarchParams<T>& p, const T* o, const T* d, int level, const int64_t* cell) {
  const T* box = p.boxes[level];
  T t = fc_inf<T>();
  for (int a = 0; a < 3; ++a) {
    if (d[a] == T(0)) continue;
    const T size = (box[a + 3] - box[a]) / static_cast<T>(p.resolution);
    const T face = box[a] + static_cast<T>(cell[a] + (d[a] > T(0) ? 1 : 0)) * size;
    const T ta = (face - o[a]) / d[a];
    if (ta < t) t = ta;
  }
  return t;
}

// From an empty cell of a one-level grid: walks the cells ahead face by face (Amanatides–Woo; one division
// per face crossed, by grid_cell_exit's formula) while they are empty, and returns the t where the ray enters
// the next occupied cell, or leaves the grid. The marcher then skips the lattice steps whose midpoints lie
// before it in one jump instead of testing every empty cell's midpoint. (The reference marcher skips one
// empty cell at a time; the samples are the same, tested bit for bit in float64.)
template <typename T>
FC_HOST_DEVICE T empty_run_exit(const MarchParams<T>& p, const T* o, const T* d, const int64_t* start_cell) {
  const T* box = p.boxes[0];
  const int64_t res = p.resolution;
  int64_t cell[3] = {start_cell[0], start_cell[1], start_cell[2]};
  T t_face[3];
  auto face_t = [&](int a) {
    const T size = (box[a + 3] - box[a]) / static_cast<T>(res);
    const T face = box[a] + static_cast<T>(cell[a] + (d[a] > T(0) ? 1 : 0)) * size;
    return (face - o[a]) / d[a];
  };
  for (int a = 0; a < 3; ++a) t_face[a] = d[a] == T(0) ? fc_inf<T>() : face_t(a);
  for (int64_t crossings = 0; crossings < 3 * res + 3; ++crossings) {
    int a = 0;
    if (t_face[1] < t_face[a]) a = 1;
    if (t_face[2] < t_face[a]) a = 2;
    const T t = t_face[a];
    cell[a] += d[a] > T(0) ? 1 : -1;
    if (cell[a] < 0 || cell[a] >= res || !(t < fc_inf<T>()) || grid_occupied<T>(p, 0, cell)) return t;
    t_face[a] = face_t(a);
  }
  return fc_inf<T>();
}

// Marches ray i (input ray rows[i] when resuming); writes its samples from `base` in pass 2 (write).
// Returns the count; pass 1 of a resumable march also saves the next lattice step.
template <typename T>
FC_HOST_DEVICE int64_t march_ray(const MarchParams<T>& p, int64_t i, int64_t base, bool write) {
  const int64_t r = p.rows ? p.rows[i] : i;
  const T* o = p.rays_o + 3 * r;
  const T* d = p.rays_d + 3 * r;
  const T u = p.jitter_u ? p.jitter_u[r] : T(0);
  const bool save = p.next_k != nullptr;
  T t_near, t_far;
  const bool hit = ray_box<T>(o, d, p.boxes[p.levels - 1], t_near, t_far);
  const T t0 = p.near_plane > t_near ? p.near_plane : t_near;
  const T t1 = p.far_plane < t_far ? p.far_plane : t_far;
  if (!hit || !(t1 > t0)) {
    if (save) {
      p.next_k[i] = 0;
      p.next_t[i] = fc_inf<T>();
    }
    return 0;
  }
  const T step = p.step_size, cone = p.cone_angle;
  const bool uniform = cone == T(0);
  auto dt_at = [&](T t) {
    const T c = cone * t;
    return c > step ? c : step;
  };
  const int64_t max_samples = p.row_max_samples ? p.row_max_samples[i] : p.max_samples;
  int64_t count = 0, k = p.start_k ? p.start_k[i] : 0;
  // (0 + u)·step == u·step exactly, so a fresh ray starts where the one-shot march starts
  T t = uniform ? t0 + (static_cast<T>(k) + u) * step : (k == 0 ? t0 + u * dt_at(t0) : p.start_t[i]);
  bool reached_end = false;
  while (count < max_samples) {
    if (!(t < t1)) {
      reached_end = true;
      break;
    }
    const T t_next = uniform ? t0 + (static_cast<T>(k + 1) + u) * step : t + dt_at(t);
    const T t_end = t_next < t1 ? t_next : t1;
    const T mid = T(0.5) * (t + t_end);
    T x[3];
    for (int a = 0; a < 3; ++a) x[a] = o[a] + mid * d[a];
    int level = 0;
    int64_t cell[3] = {0, 0, 0};
    const bool in_grid = grid_cell_of<T>(p, x, level, cell);
    if (in_grid && grid_occupied<T>(p, level, cell)) {
      if (write) {
        const int64_t s = base + count;
        p.ray_indices[s] = i;
        p.t_starts[s] = t;
        p.t_ends[s] = t_end;
        if (p.positions)
          for (int a = 0; a < 3; ++a) p.positions[3 * s + a] = x[a];
        if (p.directions)
          for (int a = 0; a < 3; ++a) p.directions[3 * s + a] = d[a];
      }
      ++count;
      ++k;
      t = t_next;
      continue;
    }
    // Uniform steps on a one-level grid skip a whole run of empty cells (to one lattice step before the next
    // occupied cell's entry, a margin for the walk's rounding: that step's midpoint is tested as usual);
    // otherwise this cell (the samples stay on the same lattice either way).
    const bool run = uniform && p.levels == 1 && in_grid;
    const T t_exit = !in_grid ? t_next
                     : run    ? empty_run_exit<T>(p, o, d, cell)
                              : grid_cell_exit<T>(p, o, d, level, cell);
    if (!(t_exit < t1)) {  // every remaining midpoint lies in empty cells
      reached_end = true;
      break;
    }
    if (uniform) {
      // first k' with midpoint t0 + (k' + u + 1/2)·step >= t_exit, at least one step ahead
      const double kk = ceil(static_cast<double>((t_exit - t0) / step - u - T(0.5)));
      const int64_t k_new = static_cast<int64_t>(kk) - (run ? 1 : 0);
      k = k_new > k + 1 ? k_new : k + 1;
      t = t0 + (static_cast<T>(k) + u) * step;
    } else {
      ++k;
      t = t_next;
      while (t < t1) {
        const T dt = dt_at(t);
        if (t + T(0.5) * dt >= t_exit) break;
        ++k;
        t = t + dt;
      }
    }
  }
  if (save) {
    p.next_k[i] = k;
    p.next_t[i] = reached_end || !(t < t1) ? fc_inf<T>() : t;
  }
  return count;
}

// ---- 4. volume rendering ----------------------------------------------------------------------------
//   δ_i = t_end − t_start, m_i = (t_start + t_end)/2, τ_i = Σ_{j<i} σ_j δ_j, T_i = exp(−τ_i),
//   α_i = −expm1(−σ_i δ_i), w_i = T_i α_i while T_i >= eps (then 0 for the rest of the ray):
//   C = Σ w_i c_i, A = Σ w_i, D = Σ w_i m_i.
// Backward, from per-ray outputs only: every output is linear in w, so with
//   u_i = g_C·c_i + g_A + g_D m_i + g_w,i   and   U = Σ_i w_i u_i = g_C·C + g_A A + g_D D + Σ_i g_w,i w_i,
//   ∂L/∂c_i = w_i g_C,   ∂L/∂σ_i = δ_i (T_{i+1} u_i − (U − U_{≤i}))      (U_{≤i} = Σ_{j<=i} w_j u_j)
// (∂w_j/∂σ_i = δ_i T_{i+1} for j = i, −δ_i w_j for j > i). The backward re-runs the forward sweep with the
// same operations, so the early-stop test picks the same samples: the dropped ones get exactly zero.

template <typename T>
struct RenderParams {
  const T* sigmas = nullptr;             // [S]
  const T* rgbs = nullptr;               // [S, 3]
  const T* t_starts = nullptr;           // [S]
  const T* t_ends = nullptr;             // [S]
  const int64_t* packed_info = nullptr;  // [R, 2]
  int64_t num_rays = 0, num_samples = 0;
  T early_stop_eps = T(1e-4);
  T* color = nullptr;               // [R, 3] (forward out, backward in)
  T* opacity = nullptr;             // [R]
  T* depth = nullptr;               // [R]
  T* weights = nullptr;             // [S] or nullptr
  const T* grad_color = nullptr;    // [R, 3]
  const T* grad_opacity = nullptr;  // [R]
  const T* grad_depth = nullptr;    // [R]
  const T* grad_weights = nullptr;  // [S] or nullptr
  T* grad_sigmas = nullptr;         // [S]
  T* grad_rgbs = nullptr;           // [S, 3]
  // Rendering in rounds (forward only): ray r of this call continues a ray that already holds optical
  // depth tau[r] (in/out: the sweep starts at T = exp(−tau[r]) and saves where it stopped, so the early
  // stop is the one-shot sweep's), and adds its C, A, D to row out_rows[r] of color / opacity / depth.
  T* tau = nullptr;                   // [R] or nullptr (fresh rays, τ = 0)
  const int64_t* out_rows = nullptr;  // [R] or nullptr (write row r)
};

// True when ray r's run lies inside [0, S) (the glue validates; this keeps a malformed call in bounds).
template <typename T>
FC_HOST_DEVICE bool render_run(const RenderParams<T>& p, int64_t r, int64_t& begin, int64_t& end) {
  begin = p.packed_info[2 * r];
  const int64_t count = p.packed_info[2 * r + 1];
  end = begin + count;
  return begin >= 0 && count >= 0 && end <= p.num_samples;
}

template <typename T>
FC_HOST_DEVICE void render_forward_ray(const RenderParams<T>& p, int64_t r) {
  int64_t begin, end;
  T c0 = 0, c1 = 0, c2 = 0, acc = 0, dep = 0;
  if (render_run<T>(p, r, begin, end)) {
    T tau = p.tau ? p.tau[r] : T(0);
    int64_t s = begin;
    for (; s < end; ++s) {
      const T trans = fc_exp(-tau);
      if (trans < p.early_stop_eps) break;
      const T delta = p.t_ends[s] - p.t_starts[s];
      const T x = p.sigmas[s] * delta;
      const T w = trans * -fc_expm1(-x);
      c0 += w * p.rgbs[3 * s];
      c1 += w * p.rgbs[3 * s + 1];
      c2 += w * p.rgbs[3 * s + 2];
      acc += w;
      dep += w * (T(0.5) * (p.t_starts[s] + p.t_ends[s]));
      if (p.weights) p.weights[s] = w;
      tau += x;
    }
    if (p.weights)
      for (; s < end; ++s) p.weights[s] = T(0);
    if (p.tau) p.tau[r] = tau;
  }
  if (p.out_rows) {
    const int64_t row = p.out_rows[r];
    p.color[3 * row] += c0;
    p.color[3 * row + 1] += c1;
    p.color[3 * row + 2] += c2;
    p.opacity[row] += acc;
    p.depth[row] += dep;
    return;
  }
  p.color[3 * r] = c0;
  p.color[3 * r + 1] = c1;
  p.color[3 * r + 2] = c2;
  p.opacity[r] = acc;
  p.depth[r] = dep;
}

template <typename T>
FC_HOST_DEVICE void render_backward_ray(const RenderParams<T>& p, int64_t r) {
  int64_t begin, end;
  if (!render_run<T>(p, r, begin, end)) return;
  const T g0 = p.grad_color[3 * r], g1 = p.grad_color[3 * r + 1], g2 = p.grad_color[3 * r + 2];
  const T ga = p.grad_opacity[r], gd = p.grad_depth[r];
  T total =
      g0 * p.color[3 * r] + g1 * p.color[3 * r + 1] + g2 * p.color[3 * r + 2] + ga * p.opacity[r] + gd * p.depth[r];
  if (p.grad_weights) {  // Σ g_w,i w_i needs w: one extra sweep
    T tau = 0;
    for (int64_t s = begin; s < end; ++s) {
      const T trans = fc_exp(-tau);
      if (trans < p.early_stop_eps) break;
      const T x = p.sigmas[s] * (p.t_ends[s] - p.t_starts[s]);
      total += p.grad_weights[s] * (trans * -fc_expm1(-x));
      tau += x;
    }
  }
  T tau = 0, prefix = 0;
  int64_t s = begin;
  for (; s < end; ++s) {
    const T trans = fc_exp(-tau);
    if (trans < p.early_stop_eps) break;
    const T delta = p.t_ends[s] - p.t_starts[s];
    const T x = p.sigmas[s] * delta;
    const T w = trans * -fc_expm1(-x);
    const T trans_next = fc_exp(-(tau + x));
    const T c0 = p.rgbs[3 * s], c1 = p.rgbs[3 * s + 1], c2 = p.rgbs[3 * s + 2];
    T u = g0 * c0 + g1 * c1 + g2 * c2 + ga + gd * (T(0.5) * (p.t_starts[s] + p.t_ends[s]));
    if (p.grad_weights) u += p.grad_weights[s];
    prefix += w * u;
    p.grad_sigmas[s] = delta * (trans_next * u - (total - prefix));
    p.grad_rgbs[3 * s] = w * g0;
    p.grad_rgbs[3 * s + 1] = w * g1;
    p.grad_rgbs[3 * s + 2] = w * g2;
    tau += x;
  }
  for (; s < end; ++s) {
    p.grad_sigmas[s] = T(0);
    p.grad_rgbs[3 * s] = p.grad_rgbs[3 * s + 1] = p.grad_rgbs[3 * s + 2] = T(0);
  }
}

// ---- 5. Block-NeRF compositing ------------------------------------------------------------------------
//   d_kr = ‖c_r − x_k‖; eligible when visibility[k, r] >= threshold and d_kr <= radius (inf: no radius);
//   w_kr = d_kr^(−p) / Σ_eligible d^(−p), computed as exp(−p log d − max) for range; eligible blocks at
//   d = 0 share the weight equally; no eligible block: weight 1 on the nearest block (lowest k on ties).

template <typename T>
struct CompositeParams {
  const T* colors = nullptr;  // [K, R, 3]
  const T* camera = nullptr;  // [3] or [R, 3]
  bool camera_per_ray = false;
  const T* centers = nullptr;     // [K, 3]
  const T* visibility = nullptr;  // [K, R]
  int64_t num_blocks = 0, num_rays = 0;
  T power = T(4), threshold = T(0.05), radius = T(0);  // radius = inf: none
  T* out = nullptr;                                    // [R, 3]
  T* weights = nullptr;                                // [K, R]
};

template <typename T>
FC_HOST_DEVICE T composite_distance(const CompositeParams<T>& p, int64_t k, int64_t r) {
  const T* c = p.camera + (p.camera_per_ray ? 3 * r : 0);
  const T* x = p.centers + 3 * k;
  const T a = c[0] - x[0], b = c[1] - x[1], e = c[2] - x[2];
  return sqrt(a * a + b * b + e * e);
}

template <typename T>
FC_HOST_DEVICE void composite_ray(const CompositeParams<T>& p, int64_t r) {
  const int64_t K = p.num_blocks, R = p.num_rays;
  int64_t eligible = 0, at_zero = 0, nearest = 0;
  T top = -fc_inf<T>(), nearest_d = fc_inf<T>();
  for (int64_t k = 0; k < K; ++k) {
    const T dist = composite_distance<T>(p, k, r);
    if (dist < nearest_d) {
      nearest_d = dist;
      nearest = k;
    }
    if (!(p.visibility[k * R + r] >= p.threshold && dist <= p.radius)) continue;
    ++eligible;
    if (dist == T(0)) {
      ++at_zero;
    } else {
      const T logw = -p.power * fc_log(dist);
      if (logw > top) top = logw;
    }
  }
  T total = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T dist = composite_distance<T>(p, k, r);
    T w = 0;
    if (eligible == 0) {
      w = k == nearest ? T(1) : T(0);
    } else if (p.visibility[k * R + r] >= p.threshold && dist <= p.radius) {
      if (at_zero > 0)
        w = dist == T(0) ? T(1) : T(0);
      else
        w = fc_exp(-p.power * fc_log(dist) - top);
    }
    p.weights[k * R + r] = w;
    total += w;
  }
  T o0 = 0, o1 = 0, o2 = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T w = p.weights[k * R + r] / total;
    p.weights[k * R + r] = w;
    const T* c = p.colors + (k * R + r) * 3;
    o0 += w * c[0];
    o1 += w * c[1];
    o2 += w * c[2];
  }
  p.out[3 * r] = o0;
  p.out[3 * r + 1] = o1;
  p.out[3 * r + 2] = o2;
}

// ---- CPU entry points (nerf_cpu.cpp), each over a [begin, end) range (DESIGN rule 3)
template <typename T>
void ray_aabb_cpu(const AabbParams<T>& p, int64_t ray_begin, int64_t ray_end);
template <typename T>
void grid_scatter_max_cpu(
    const GridUpdateParams<T>& p);  // serial, O(M); returns bad count via cell_indices check in glue
template <typename T>
void grid_update_cells_cpu(const GridUpdateParams<T>& p, int64_t begin, int64_t end);
template <typename T>
void grid_pack_cpu(const GridUpdateParams<T>& p, int64_t byte_begin, int64_t byte_end);
template <typename T>
void march_count_cpu(const MarchParams<T>& p, int64_t ray_begin, int64_t ray_end);
template <typename T>
void march_fill_cpu(const MarchParams<T>& p, int64_t ray_begin, int64_t ray_end);
template <typename T>
void render_forward_cpu(const RenderParams<T>& p, int64_t ray_begin, int64_t ray_end);
template <typename T>
void render_backward_cpu(const RenderParams<T>& p, int64_t ray_begin, int64_t ray_end);
template <typename T>
void composite_cpu(const CompositeParams<T>& p, int64_t ray_begin, int64_t ray_end);

// ---- CUDA entry points (nerf.cu); return a cudaError_t as int (0 = success). Empty sizes launch nothing.
template <typename T>
int ray_aabb_cuda(const AabbParams<T>& p, void* stream);
template <typename T>
int grid_update_cuda(const GridUpdateParams<T>& p, void* stream);  // scatter + cells
template <typename T>
int grid_pack_cuda(const GridUpdateParams<T>& p, void* stream);
template <typename T>
int march_count_cuda(const MarchParams<T>& p, void* stream);
template <typename T>
int march_fill_cuda(const MarchParams<T>& p, void* stream);
template <typename T>
int render_forward_cuda(const RenderParams<T>& p, void* stream);
template <typename T>
int render_backward_cuda(const RenderParams<T>& p, void* stream);
template <typename T>
int composite_cuda(const CompositeParams<T>& p, void* stream);

}  // namespace nerf
}  // namespace fastcore

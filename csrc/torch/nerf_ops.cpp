// Torch glue of the nerf kernels: checks of what the kernels rely on (the user-facing validation with
// full messages lives in fastcore_ai.ops.nerf), allocation, params filling, at::parallel_for (CPU) or
// the CUDA launches. Host syncs: ray_march reads the total sample count S once (the scan of the per-ray
// counts) and the level boxes (6 numbers); occupancy_grid_update reads the mean for the threshold.
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cuda_call.h"
#include "nerf/nerf.h"
#include "tensor_params.h"

namespace fastcore {
namespace nerf {
namespace {

void check_float(const at::Tensor& t, const char* op, const char* name) {
  FC_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, name,
           " must be float32 or float64, got ", t.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  FC_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, name,
           " must have the dtype and device of the first input");
}

constexpr int64_t kRayGrain = 64;
constexpr int64_t kMaxPaddedSlots = int64_t(1) << 21;  // 2^21 slots × 40 bytes (t, t, row, x, d) = 80 MiB

}  // namespace

std::vector<at::Tensor> ray_aabb_intersect(const at::Tensor& rays_o, const at::Tensor& rays_d,
                                           const at::Tensor& aabbs) {
  constexpr const char* op = "ray_aabb_intersect";
  check_float(rays_o, op, "rays_o");
  check_like(rays_d, rays_o, op, "rays_d");
  check_like(aabbs, rays_o, op, "aabbs");
  FC_CHECK(rays_o.dim() == 2 && rays_o.size(1) == 3 && rays_d.sizes() == rays_o.sizes(), op,
           "rays_o and rays_d must be [R, 3]");
  FC_CHECK(aabbs.dim() == 2 && aabbs.size(1) == 6, op, "aabbs must be [A, 6]");
  const int64_t R = rays_o.size(0), A = aabbs.size(0);
  at::Tensor o = rays_o.contiguous(), d = rays_d.contiguous(), b = aabbs.contiguous();
  at::Tensor near = at::empty({R, A}, o.options()), far = at::empty({R, A}, o.options());
  at::Tensor hit = at::empty({R, A}, o.options().dtype(at::kBool));
  if (R == 0 || A == 0) return {near, far, hit};
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "nerf_ray_aabb", [&] {
    AabbParams<scalar_t> p;
    p.rays_o = o.data_ptr<scalar_t>();
    p.rays_d = d.data_ptr<scalar_t>();
    p.aabbs = b.data_ptr<scalar_t>();
    p.num_rays = R;
    p.num_boxes = A;
    p.t_near = near.data_ptr<scalar_t>();
    p.t_far = far.data_ptr<scalar_t>();
    p.hit = hit.data_ptr<bool>();
    if (o.is_cuda()) {
      FC_CUDA_CALL(op, "launch", o.device(), ray_aabb_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, R, std::max<int64_t>(1, 4096 / A),
                       [&](int64_t b0, int64_t e0) { ray_aabb_cpu<scalar_t>(p, b0, e0); });
    }
  });
  return {near, far, hit};
}

std::vector<at::Tensor> occupancy_grid_update(const at::Tensor& density, const at::Tensor& cell_indices,
                                              const at::Tensor& values, double decay, double threshold) {
  constexpr const char* op = "occupancy_grid_update";
  check_float(density, op, "density");
  check_like(values, density, op, "values");
  FC_CHECK(density.dim() == 1 && cell_indices.dim() == 1 && values.dim() == 1 && cell_indices.size(0) == values.size(0),
           op, "density must be [N], cell_indices and values [M]");
  FC_CHECK(cell_indices.scalar_type() == at::kLong && cell_indices.device() == density.device(), op,
           "cell_indices must be int64 on density's device");
  const int64_t N = density.size(0), M = values.size(0);
  at::Tensor dens = density.contiguous(), idx = cell_indices.contiguous(), vals = values.contiguous();
  if (M > 0) {
    const bool bad = (idx < 0).logical_or(idx >= N).any().item<bool>();
    TORCH_CHECK_VALUE(!bad, "fastcore_ai.ops.", op, ": cell_indices must lie in [0, N) = [0, ", N, ")");
  }
  at::Tensor out = at::empty({N}, dens.options());
  at::Tensor bits = at::empty({(N + 7) / 8}, dens.options().dtype(at::kByte));
  if (N == 0) return {out, bits};
  at::Tensor sampled = at::full({N}, -std::numeric_limits<double>::infinity(), dens.options());
  AT_DISPATCH_FLOATING_TYPES(dens.scalar_type(), "nerf_grid_update", [&] {
    GridUpdateParams<scalar_t> p;
    p.density = dens.data_ptr<scalar_t>();
    p.cell_indices = idx.data_ptr<int64_t>();
    p.values = vals.data_ptr<scalar_t>();
    p.num_cells = N;
    p.num_samples = M;
    p.decay = static_cast<scalar_t>(decay);
    p.sampled_max = sampled.data_ptr<scalar_t>();
    p.out = out.data_ptr<scalar_t>();
    p.bitfield = bits.data_ptr<uint8_t>();
    if (dens.is_cuda()) {
      FC_CUDA_CALL(op, "update launch", dens.device(), grid_update_cuda<scalar_t>(p, current_stream()));
    } else {
      grid_scatter_max_cpu<scalar_t>(p);
      at::parallel_for(0, N, 16384, [&](int64_t b0, int64_t e0) { grid_update_cells_cpu<scalar_t>(p, b0, e0); });
    }
    // threshold = min(threshold, mean of the live (non-negative) cells), in float64 (one host read)
    const at::Tensor live = out.ge(0);
    const int64_t n_live = live.sum().item<int64_t>();
    double mean = 0.0;
    if (n_live > 0)
      mean = at::where(live, out, at::zeros({}, out.options())).to(at::kDouble).sum().item<double>() / n_live;
    p.threshold = static_cast<scalar_t>(std::min(threshold, mean));
    if (dens.is_cuda()) {
      FC_CUDA_CALL(op, "pack launch", dens.device(), grid_pack_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, (N + 7) / 8, 4096, [&](int64_t b0, int64_t e0) { grid_pack_cpu<scalar_t>(p, b0, e0); });
    }
  });
  return {out, bits};
}

namespace {
// The resumable march of NeRFRenderer's rounds (see MarchParams): rows [n] into the rays, where each resumes
// (start_k, start_t [n]); outputs where each stopped (next_k, next_t [n]) and the samples' field inputs.
struct MarchRound {
  at::Tensor rows, start_k, start_t, max_samples;
  at::Tensor next_k, next_t, positions, directions;
};

std::vector<at::Tensor> march_impl(const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& aabb,
                                   const at::Tensor& bitfield, int64_t resolution, int64_t levels, double near_plane,
                                   double far_plane, double step_size, double cone_angle, int64_t max_samples,
                                   const std::optional<at::Tensor>& jitter_u, MarchRound* round) {
  constexpr const char* op = "ray_march";
  check_float(rays_o, op, "rays_o");
  check_like(rays_d, rays_o, op, "rays_d");
  FC_CHECK(rays_o.dim() == 2 && rays_o.size(1) == 3 && rays_d.sizes() == rays_o.sizes(), op,
           "rays_o and rays_d must be [R, 3]");
  FC_CHECK(levels >= 1 && levels <= kMaxLevels, op, "levels must satisfy 1 <= levels <= ", kMaxLevels);
  FC_CHECK(resolution >= 1 && resolution <= 4096, op, "resolution must satisfy 1 <= resolution <= 4096");
  const int64_t cells = levels * resolution * resolution * resolution;
  FC_CHECK(bitfield.scalar_type() == at::kByte && bitfield.dim() == 1 && bitfield.size(0) == (cells + 7) / 8 &&
               bitfield.device() == rays_o.device(),
           op, "bitfield must be uint8 [ceil(levels·res³/8)] on the rays' device");
  FC_CHECK(aabb.numel() == 6, op, "aabb must have 6 numbers");
  FC_CHECK(step_size > 0 && cone_angle >= 0 && max_samples >= 0, op, "step_size must be > 0, cone_angle >= 0");
  const int64_t num_input_rays = rays_o.size(0);
  at::Tensor o = rays_o.contiguous(), d = rays_d.contiguous(), bits = bitfield.contiguous();
  at::Tensor u;
  if (jitter_u.has_value()) {
    check_like(*jitter_u, rays_o, op, "jitter_u");
    FC_CHECK(jitter_u->dim() == 1 && jitter_u->size(0) == num_input_rays, op, "jitter_u must be [R]");
    u = jitter_u->contiguous();
  }
  const auto long_opts = o.options().dtype(at::kLong);
  int64_t R = num_input_rays;  // rays marched by this call (rows of a round)
  if (round != nullptr) {
    R = round->rows.numel();
    FC_CHECK(round->rows.scalar_type() == at::kLong && round->start_k.scalar_type() == at::kLong &&
                 round->rows.dim() == 1 && round->start_k.sizes() == round->rows.sizes() &&
                 round->start_t.sizes() == round->rows.sizes() && round->max_samples.scalar_type() == at::kLong &&
                 round->max_samples.sizes() == round->rows.sizes() && round->rows.device() == o.device() &&
                 round->start_k.device() == o.device() && round->max_samples.device() == o.device(),
             op, "rows, start_k and max_samples must be int64 [n], start_t [n], on the rays' device");
    check_like(round->start_t, rays_o, op, "start_t");
    if (R > 0) {
      const bool bad = (round->rows < 0).logical_or(round->rows >= num_input_rays).any().item<bool>();
      TORCH_CHECK_VALUE(!bad, "fastcore_ai.ops.", op, ": rows must lie in [0, R) = [0, ", num_input_rays, ")");
    }
    round->rows = round->rows.contiguous();
    round->start_k = round->start_k.contiguous();
    round->start_t = round->start_t.contiguous();
    round->max_samples = round->max_samples.contiguous();
    round->next_k = at::empty({R}, long_opts);
    round->next_t = at::empty({R}, o.options());
  }
  // A round of a few steps per ray marches once into max_samples slots per ray and compacts (see nerf.h);
  // a big budget (e.g. forward's second march of whole rays) keeps the exact two-pass allocation.
  int64_t stride = 0;
  if (round != nullptr && R > 0) stride = std::max<int64_t>(0, round->max_samples.max().item<int64_t>());
  const bool padded = round != nullptr && stride > 0 && R * stride <= kMaxPaddedSlots;
  at::Tensor counts = at::empty({R}, long_opts);
  const at::Tensor box = aabb.to(at::kDouble).cpu().contiguous();
  const double* b = box.data_ptr<double>();
  at::Tensor ray_indices, t_starts, t_ends, packed_info = at::empty({R, 2}, long_opts);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "nerf_ray_march", [&] {
    MarchParams<scalar_t> p;
    p.rays_o = o.data_ptr<scalar_t>();
    p.rays_d = d.data_ptr<scalar_t>();
    p.jitter_u = u.defined() ? u.data_ptr<scalar_t>() : nullptr;
    p.num_rays = R;
    p.bitfield = bits.data_ptr<uint8_t>();
    p.resolution = resolution;
    p.levels = static_cast<int32_t>(levels);
    for (int l = 0; l < levels; ++l) {  // the reference's grid_level_aabbs, in double
      const double scale = static_cast<double>(int64_t(1) << l);
      for (int a = 0; a < 3; ++a) {
        const double centre = (b[a] + b[a + 3]) * 0.5, half = (b[a + 3] - b[a]) * 0.5 * scale;
        p.boxes[l][a] = static_cast<scalar_t>(centre - half);
        p.boxes[l][a + 3] = static_cast<scalar_t>(centre + half);
      }
    }
    p.near_plane = static_cast<scalar_t>(near_plane);
    p.far_plane = static_cast<scalar_t>(far_plane);
    p.step_size = static_cast<scalar_t>(step_size);
    p.cone_angle = static_cast<scalar_t>(cone_angle);
    p.max_samples = max_samples;
    p.counts = counts.data_ptr<int64_t>();
    if (round != nullptr) {
      p.rows = round->rows.data_ptr<int64_t>();
      p.start_k = round->start_k.data_ptr<int64_t>();
      p.start_t = round->start_t.data_ptr<scalar_t>();
      p.row_max_samples = round->max_samples.data_ptr<int64_t>();
      p.next_k = round->next_k.data_ptr<int64_t>();
      p.next_t = round->next_t.data_ptr<scalar_t>();
    }
    if (padded) {
      const int64_t slots = R * stride;
      const at::Tensor slot_offsets = at::arange(R, long_opts) * stride;
      at::Tensor slot_rows = at::empty({slots}, long_opts), slot_starts = at::empty({slots}, o.options()),
                 slot_ends = at::empty({slots}, o.options()), slot_positions = at::empty({slots, 3}, o.options()),
                 slot_directions = at::empty({slots, 3}, o.options());
      p.offsets = slot_offsets.data_ptr<int64_t>();
      p.ray_indices = slot_rows.data_ptr<int64_t>();
      p.t_starts = slot_starts.data_ptr<scalar_t>();
      p.t_ends = slot_ends.data_ptr<scalar_t>();
      p.positions = slot_positions.data_ptr<scalar_t>();
      p.directions = slot_directions.data_ptr<scalar_t>();
      if (o.is_cuda()) {
        FC_CUDA_CALL(op, "fill launch", o.device(), march_fill_cuda<scalar_t>(p, current_stream()));
      } else {
        at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) { march_fill_cpu<scalar_t>(p, b0, e0); });
      }
      const at::Tensor ends = at::cumsum(counts, 0);
      packed_info = at::stack({ends - counts, counts}, 1).contiguous();
      if (!o.is_cuda()) {
        // Each ray's samples are the first counts[r] of its slots: one parallel copy packs them (the mask,
        // nonzero and five gathers below were ~8% of a render_inference on the CPU).
        const int64_t* cnt = counts.data_ptr<int64_t>();
        const int64_t* end = ends.data_ptr<int64_t>();
        const int64_t S = end[R - 1];
        ray_indices = at::empty({S}, long_opts);
        t_starts = at::empty({S}, o.options());
        t_ends = at::empty({S}, o.options());
        round->positions = at::empty({S, 3}, o.options());
        round->directions = at::empty({S, 3}, o.options());
        int64_t* out_rows = ray_indices.data_ptr<int64_t>();
        scalar_t* out_starts = t_starts.data_ptr<scalar_t>();
        scalar_t* out_ends = t_ends.data_ptr<scalar_t>();
        scalar_t* out_pos = round->positions.data_ptr<scalar_t>();
        scalar_t* out_dir = round->directions.data_ptr<scalar_t>();
        at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) {
          for (int64_t r = b0; r < e0; ++r) {
            const int64_t n = cnt[r], to = end[r] - n, from = r * stride;
            std::copy_n(p.ray_indices + from, n, out_rows + to);
            std::copy_n(p.t_starts + from, n, out_starts + to);
            std::copy_n(p.t_ends + from, n, out_ends + to);
            std::copy_n(p.positions + 3 * from, 3 * n, out_pos + 3 * to);
            std::copy_n(p.directions + 3 * from, 3 * n, out_dir + 3 * to);
          }
        });
        return;
      }
      const at::Tensor used = (at::arange(stride, long_opts).unsqueeze(0) < counts.unsqueeze(1)).reshape({-1});
      const at::Tensor keep = used.nonzero().squeeze(1);  // the host sync for S
      ray_indices = slot_rows.index_select(0, keep);
      t_starts = slot_starts.index_select(0, keep);
      t_ends = slot_ends.index_select(0, keep);
      round->positions = slot_positions.index_select(0, keep);
      round->directions = slot_directions.index_select(0, keep);
      return;
    }
    if (R > 0) {
      if (o.is_cuda()) {
        FC_CUDA_CALL(op, "count launch", o.device(), march_count_cuda<scalar_t>(p, current_stream()));
      } else {
        at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) { march_count_cpu<scalar_t>(p, b0, e0); });
      }
    }
    p.next_k = nullptr;  // pass 2 re-runs from the same start; the stops were saved by pass 1
    p.next_t = nullptr;
    const at::Tensor ends = at::cumsum(counts, 0);
    const at::Tensor starts = ends - counts;
    packed_info = at::stack({starts, counts}, 1).contiguous();
    const int64_t S = R > 0 ? ends[R - 1].item<int64_t>() : 0;  // the one host sync for the size
    ray_indices = at::empty({S}, long_opts);
    t_starts = at::empty({S}, o.options());
    t_ends = at::empty({S}, o.options());
    if (round != nullptr) {
      round->positions = at::empty({S, 3}, o.options());
      round->directions = at::empty({S, 3}, o.options());
      p.positions = round->positions.data_ptr<scalar_t>();
      p.directions = round->directions.data_ptr<scalar_t>();
    }
    if (S == 0) return;
    p.offsets = starts.data_ptr<int64_t>();
    p.ray_indices = ray_indices.data_ptr<int64_t>();
    p.t_starts = t_starts.data_ptr<scalar_t>();
    p.t_ends = t_ends.data_ptr<scalar_t>();
    if (o.is_cuda()) {
      FC_CUDA_CALL(op, "fill launch", o.device(), march_fill_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) { march_fill_cpu<scalar_t>(p, b0, e0); });
    }
  });
  return {ray_indices, t_starts, t_ends, packed_info};
}
}  // namespace

std::vector<at::Tensor> ray_march(const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& aabb,
                                  const at::Tensor& bitfield, int64_t resolution, int64_t levels, double near_plane,
                                  double far_plane, double step_size, double cone_angle, int64_t max_samples,
                                  const std::optional<at::Tensor>& jitter_u) {
  return march_impl(rays_o, rays_d, aabb, bitfield, resolution, levels, near_plane, far_plane, step_size, cone_angle,
                    max_samples, jitter_u, nullptr);
}

std::vector<at::Tensor> ray_march_round(const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& aabb,
                                        const at::Tensor& bitfield, int64_t resolution, int64_t levels,
                                        double near_plane, double far_plane, double step_size, double cone_angle,
                                        const std::optional<at::Tensor>& jitter_u, const at::Tensor& rows,
                                        const at::Tensor& start_k, const at::Tensor& start_t,
                                        const at::Tensor& max_samples) {
  MarchRound round{rows, start_k, start_t, max_samples, {}, {}, {}, {}};
  std::vector<at::Tensor> out = march_impl(rays_o, rays_d, aabb, bitfield, resolution, levels, near_plane, far_plane,
                                           step_size, cone_angle, 0, jitter_u, &round);
  out.insert(out.end(), {round.next_k, round.next_t, round.positions, round.directions});
  return out;
}

namespace {
template <typename T>
RenderParams<T> render_params(const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& t_starts,
                              const at::Tensor& t_ends, const at::Tensor& packed_info, double eps) {
  RenderParams<T> p;
  p.sigmas = sigmas.data_ptr<T>();
  p.rgbs = rgbs.data_ptr<T>();
  p.t_starts = t_starts.data_ptr<T>();
  p.t_ends = t_ends.data_ptr<T>();
  p.packed_info = packed_info.data_ptr<int64_t>();
  p.num_rays = packed_info.size(0);
  p.num_samples = sigmas.size(0);
  p.early_stop_eps = static_cast<T>(eps);
  return p;
}

void check_render_inputs(const char* op, const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& t_starts,
                         const at::Tensor& t_ends, const at::Tensor& packed_info) {
  check_float(sigmas, op, "sigmas");
  check_like(rgbs, sigmas, op, "rgbs");
  check_like(t_starts, sigmas, op, "t_starts");
  check_like(t_ends, sigmas, op, "t_ends");
  const int64_t S = sigmas.numel();
  FC_CHECK(sigmas.dim() == 1 && rgbs.dim() == 2 && rgbs.size(0) == S && rgbs.size(1) == 3 &&
               t_starts.sizes() == sigmas.sizes() && t_ends.sizes() == sigmas.sizes(),
           op, "sigmas, t_starts, t_ends must be [S] and rgbs [S, 3]");
  FC_CHECK(packed_info.dim() == 2 && packed_info.size(1) == 2 && packed_info.scalar_type() == at::kLong &&
               packed_info.device() == sigmas.device(),
           op, "packed_info must be int64 [R, 2] on the samples' device");
}
}  // namespace

std::vector<at::Tensor> volume_render_forward(const at::Tensor& sigmas, const at::Tensor& rgbs,
                                              const at::Tensor& t_starts, const at::Tensor& t_ends,
                                              const at::Tensor& packed_info, double eps, bool need_weights) {
  constexpr const char* op = "volume_render";
  check_render_inputs(op, sigmas, rgbs, t_starts, t_ends, packed_info);
  at::Tensor sg = sigmas.contiguous(), rg = rgbs.contiguous(), ts = t_starts.contiguous(), te = t_ends.contiguous(),
             pi = packed_info.contiguous();
  const int64_t R = pi.size(0), S = sg.size(0);
  at::Tensor color = at::empty({R, 3}, sg.options()), opacity = at::empty({R}, sg.options()),
             depth = at::empty({R}, sg.options());
  at::Tensor weights = at::empty({need_weights ? S : 0}, sg.options());
  if (R == 0) return {color, opacity, depth, weights};
  AT_DISPATCH_FLOATING_TYPES(sg.scalar_type(), "nerf_render_forward", [&] {
    auto p = render_params<scalar_t>(sg, rg, ts, te, pi, eps);
    p.color = color.data_ptr<scalar_t>();
    p.opacity = opacity.data_ptr<scalar_t>();
    p.depth = depth.data_ptr<scalar_t>();
    p.weights = need_weights ? weights.data_ptr<scalar_t>() : nullptr;
    if (sg.is_cuda()) {
      FC_CUDA_CALL(op, "forward launch", sg.device(), render_forward_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) { render_forward_cpu<scalar_t>(p, b0, e0); });
    }
  });
  return {color, opacity, depth, weights};
}

void volume_render_round(const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& t_starts,
                         const at::Tensor& t_ends, const at::Tensor& packed_info, double eps, at::Tensor& tau,
                         const at::Tensor& out_rows, at::Tensor& color, at::Tensor& opacity, at::Tensor& depth) {
  constexpr const char* op = "volume_render";
  check_render_inputs(op, sigmas, rgbs, t_starts, t_ends, packed_info);
  const int64_t R = packed_info.size(0), rows = color.size(0);
  check_like(tau, sigmas, op, "tau");
  for (const at::Tensor* t : {&color, &opacity, &depth}) check_like(*t, sigmas, op, "an accumulator");
  FC_CHECK(tau.dim() == 1 && tau.size(0) == R && tau.is_contiguous() && out_rows.scalar_type() == at::kLong &&
               out_rows.dim() == 1 && out_rows.size(0) == R && out_rows.device() == sigmas.device(),
           op, "tau must be contiguous [R] and out_rows int64 [R]");
  FC_CHECK(color.dim() == 2 && color.size(1) == 3 && color.is_contiguous() && opacity.is_contiguous() &&
               depth.is_contiguous() && opacity.numel() == rows && depth.numel() == rows,
           op, "color, opacity, depth must be contiguous [N, 3], [N], [N]");
  if (R == 0) return;
  const bool bad = (out_rows < 0).logical_or(out_rows >= rows).any().item<bool>();
  TORCH_CHECK_VALUE(!bad, "fastcore_ai.ops.", op, ": out_rows must lie in [0, N) = [0, ", rows, ")");
  at::Tensor sg = sigmas.contiguous(), rg = rgbs.contiguous(), ts = t_starts.contiguous(), te = t_ends.contiguous(),
             pi = packed_info.contiguous(), orow = out_rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES(sg.scalar_type(), "nerf_render_round", [&] {
    auto p = render_params<scalar_t>(sg, rg, ts, te, pi, eps);
    p.color = color.data_ptr<scalar_t>();
    p.opacity = opacity.data_ptr<scalar_t>();
    p.depth = depth.data_ptr<scalar_t>();
    p.tau = tau.data_ptr<scalar_t>();
    p.out_rows = orow.data_ptr<int64_t>();
    if (sg.is_cuda()) {
      FC_CUDA_CALL(op, "round launch", sg.device(), render_forward_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) { render_forward_cpu<scalar_t>(p, b0, e0); });
    }
  });
}

std::vector<at::Tensor> volume_render_backward(const at::Tensor& grad_color, const at::Tensor& grad_opacity,
                                               const at::Tensor& grad_depth,
                                               const std::optional<at::Tensor>& grad_weights, const at::Tensor& sigmas,
                                               const at::Tensor& rgbs, const at::Tensor& t_starts,
                                               const at::Tensor& t_ends, const at::Tensor& packed_info,
                                               const at::Tensor& color, const at::Tensor& opacity,
                                               const at::Tensor& depth, double eps) {
  constexpr const char* op = "volume_render_backward";
  check_render_inputs(op, sigmas, rgbs, t_starts, t_ends, packed_info);
  const int64_t R = packed_info.size(0), S = sigmas.numel();
  for (const at::Tensor* t : {&grad_color, &grad_opacity, &grad_depth, &color, &opacity, &depth})
    check_like(*t, sigmas, op, "a per-ray tensor");
  FC_CHECK(grad_color.sizes() == color.sizes() && color.dim() == 2 && color.size(0) == R && grad_opacity.numel() == R &&
               grad_depth.numel() == R && opacity.numel() == R && depth.numel() == R,
           op, "per-ray tensors must be [R, 3] / [R]");
  at::Tensor gw;
  if (grad_weights.has_value()) {
    check_like(*grad_weights, sigmas, op, "grad_weights");
    FC_CHECK(grad_weights->numel() == S, op, "grad_weights must be [S]");
    gw = grad_weights->contiguous();
  }
  at::Tensor sg = sigmas.contiguous(), rg = rgbs.contiguous(), ts = t_starts.contiguous(), te = t_ends.contiguous(),
             pi = packed_info.contiguous(), gc = grad_color.contiguous(), ga = grad_opacity.contiguous(),
             gd = grad_depth.contiguous(), c = color.contiguous(), a = opacity.contiguous(), dp = depth.contiguous();
  // samples outside every ray's run (none for a packed_info from ray_march) get zero gradient
  at::Tensor grad_sigmas = at::zeros({S}, sg.options()), grad_rgbs = at::zeros({S, 3}, sg.options());
  if (R == 0 || S == 0) return {grad_sigmas, grad_rgbs};
  AT_DISPATCH_FLOATING_TYPES(sg.scalar_type(), "nerf_render_backward", [&] {
    auto p = render_params<scalar_t>(sg, rg, ts, te, pi, eps);
    p.color = c.data_ptr<scalar_t>();
    p.opacity = a.data_ptr<scalar_t>();
    p.depth = dp.data_ptr<scalar_t>();
    p.grad_color = gc.data_ptr<scalar_t>();
    p.grad_opacity = ga.data_ptr<scalar_t>();
    p.grad_depth = gd.data_ptr<scalar_t>();
    p.grad_weights = gw.defined() ? gw.data_ptr<scalar_t>() : nullptr;
    p.grad_sigmas = grad_sigmas.data_ptr<scalar_t>();
    p.grad_rgbs = grad_rgbs.data_ptr<scalar_t>();
    if (sg.is_cuda()) {
      FC_CUDA_CALL(op, "backward launch", sg.device(), render_backward_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, R, kRayGrain, [&](int64_t b0, int64_t e0) { render_backward_cpu<scalar_t>(p, b0, e0); });
    }
  });
  return {grad_sigmas, grad_rgbs};
}

std::vector<at::Tensor> composite_blocks(const at::Tensor& colors, const at::Tensor& camera_pos,
                                         const at::Tensor& block_centers, const at::Tensor& visibility, double power,
                                         double threshold, double radius) {
  constexpr const char* op = "composite_blocks";
  check_float(colors, op, "colors");
  check_like(camera_pos, colors, op, "camera_pos");
  check_like(block_centers, colors, op, "block_centers");
  check_like(visibility, colors, op, "visibility");
  FC_CHECK(colors.dim() == 3 && colors.size(2) == 3, op, "colors must be [K, R, 3]");
  const int64_t K = colors.size(0), R = colors.size(1);
  FC_CHECK(block_centers.dim() == 2 && block_centers.size(0) == K && block_centers.size(1) == 3, op,
           "block_centers must be [K, 3]");
  FC_CHECK(visibility.dim() == 2 && visibility.size(0) == K && visibility.size(1) == R, op,
           "visibility must be [K, R]");
  const bool per_ray = camera_pos.dim() == 2;
  FC_CHECK((camera_pos.dim() == 1 && camera_pos.size(0) == 3) ||
               (per_ray && camera_pos.size(0) == R && camera_pos.size(1) == 3),
           op, "camera_pos must be [3] or [R, 3]");
  FC_CHECK(K >= 1, op, "colors must hold at least one block");
  at::Tensor col = colors.contiguous(), cam = camera_pos.contiguous(), cen = block_centers.contiguous(),
             vis = visibility.contiguous();
  at::Tensor out = at::empty({R, 3}, col.options()), weights = at::empty({K, R}, col.options());
  if (R == 0) return {out, weights};
  AT_DISPATCH_FLOATING_TYPES(col.scalar_type(), "nerf_composite", [&] {
    CompositeParams<scalar_t> p;
    p.colors = col.data_ptr<scalar_t>();
    p.camera = cam.data_ptr<scalar_t>();
    p.camera_per_ray = per_ray;
    p.centers = cen.data_ptr<scalar_t>();
    p.visibility = vis.data_ptr<scalar_t>();
    p.num_blocks = K;
    p.num_rays = R;
    p.power = static_cast<scalar_t>(power);
    p.threshold = static_cast<scalar_t>(threshold);
    p.radius = static_cast<scalar_t>(radius);
    p.out = out.data_ptr<scalar_t>();
    p.weights = weights.data_ptr<scalar_t>();
    if (col.is_cuda()) {
      FC_CUDA_CALL(op, "launch", col.device(), composite_cuda<scalar_t>(p, current_stream()));
    } else {
      at::parallel_for(0, R, std::max<int64_t>(1, 4096 / K),
                       [&](int64_t b0, int64_t e0) { composite_cpu<scalar_t>(p, b0, e0); });
    }
  });
  return {out, weights};
}

}  // namespace nerf

void bind_nerf(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("nerf_ray_aabb_intersect", &nerf::ray_aabb_intersect, "ray/AABB slab test -> (t_near, t_far, hit)",
        py::arg("rays_o"), py::arg("rays_d"), py::arg("aabbs"));
  m.def("nerf_occupancy_grid_update", &nerf::occupancy_grid_update, "grid EMA-max update + bitfield packing",
        py::arg("density"), py::arg("cell_indices"), py::arg("values"), py::arg("decay"), py::arg("threshold"));
  m.def("nerf_ray_march", &nerf::ray_march, "two-pass occupancy-grid ray marching -> packed samples", py::arg("rays_o"),
        py::arg("rays_d"), py::arg("aabb"), py::arg("bitfield"), py::arg("resolution"), py::arg("levels"),
        py::arg("near"), py::arg("far"), py::arg("step_size"), py::arg("cone_angle"), py::arg("max_samples"),
        py::arg("jitter_u"));
  m.def("nerf_ray_march_round", &nerf::ray_march_round,
        "one round of resumable marching -> (ray rows, t_starts, t_ends, packed_info, next_k, next_t, positions, "
        "directions)",
        py::arg("rays_o"), py::arg("rays_d"), py::arg("aabb"), py::arg("bitfield"), py::arg("resolution"),
        py::arg("levels"), py::arg("near"), py::arg("far"), py::arg("step_size"), py::arg("cone_angle"),
        py::arg("jitter_u"), py::arg("rows"), py::arg("start_k"), py::arg("start_t"), py::arg("max_samples"));
  m.def("nerf_volume_render_round", &nerf::volume_render_round,
        "render one round's segments behind optical depth tau (updated) and add them to rows of color/opacity/depth",
        py::arg("sigmas"), py::arg("rgbs"), py::arg("t_starts"), py::arg("t_ends"), py::arg("packed_info"),
        py::arg("early_stop_eps"), py::arg("tau"), py::arg("out_rows"), py::arg("color"), py::arg("opacity"),
        py::arg("depth"));
  m.def("nerf_volume_render", &nerf::volume_render_forward,
        "packed volume rendering -> (color, opacity, depth, weights)", py::arg("sigmas"), py::arg("rgbs"),
        py::arg("t_starts"), py::arg("t_ends"), py::arg("packed_info"), py::arg("early_stop_eps"),
        py::arg("need_weights"));
  m.def("nerf_volume_render_backward", &nerf::volume_render_backward, "recomputing backward of volume rendering",
        py::arg("grad_color"), py::arg("grad_opacity"), py::arg("grad_depth"), py::arg("grad_weights"),
        py::arg("sigmas"), py::arg("rgbs"), py::arg("t_starts"), py::arg("t_ends"), py::arg("packed_info"),
        py::arg("color"), py::arg("opacity"), py::arg("depth"), py::arg("early_stop_eps"));
  m.def("nerf_composite_blocks", &nerf::composite_blocks, "Block-NeRF inverse-distance compositing -> (out, weights)",
        py::arg("colors"), py::arg("camera_pos"), py::arg("block_centers"), py::arg("visibility"), py::arg("power"),
        py::arg("threshold"), py::arg("radius"));
}
}  // namespace fastcore

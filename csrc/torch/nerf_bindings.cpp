// pybind11 bindings of the nerf family (NeRF ray marching and rendering): `fastcore_ai._C.nerf_*`.
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace fastcore {
namespace nerf {
std::vector<at::Tensor> ray_aabb_intersect(const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& aabbs);
std::vector<at::Tensor> occupancy_grid_update(const at::Tensor& density, const at::Tensor& cell_indices,
                                              const at::Tensor& values, double decay, double threshold);
std::vector<at::Tensor> ray_march(const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& aabb,
                                  const at::Tensor& bitfield, int64_t resolution, int64_t levels, double near_plane,
                                  double far_plane, double step_size, double cone_angle, int64_t max_samples,
                                  const std::optional<at::Tensor>& jitter_u);
std::vector<at::Tensor> ray_march_round(const at::Tensor& rays_o, const at::Tensor& rays_d, const at::Tensor& aabb,
                                        const at::Tensor& bitfield, int64_t resolution, int64_t levels, double near_plane,
                                        double far_plane, double step_size, double cone_angle,
                                        const std::optional<at::Tensor>& jitter_u, const at::Tensor& rows,
                                        const at::Tensor& start_k, const at::Tensor& start_t,
                                        const at::Tensor& max_samples);
void volume_render_round(const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& t_starts,
                         const at::Tensor& t_ends, const at::Tensor& packed_info, double eps, at::Tensor& tau,
                         const at::Tensor& out_rows, at::Tensor& color, at::Tensor& opacity, at::Tensor& depth);
std::vector<at::Tensor> volume_render_forward(const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& t_starts,
                                              const at::Tensor& t_ends, const at::Tensor& packed_info, double eps,
                                              bool need_weights);
std::vector<at::Tensor> volume_render_backward(const at::Tensor& grad_color, const at::Tensor& grad_opacity,
                                               const at::Tensor& grad_depth, const std::optional<at::Tensor>& grad_weights,
                                               const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& t_starts,
                                               const at::Tensor& t_ends, const at::Tensor& packed_info,
                                               const at::Tensor& color, const at::Tensor& opacity, const at::Tensor& depth,
                                               double eps);
std::vector<at::Tensor> composite_blocks(const at::Tensor& colors, const at::Tensor& camera_pos, const at::Tensor& block_centers,
                                         const at::Tensor& visibility, double power, double threshold, double radius);
}  // namespace nerf

void bind_nerf(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("nerf_ray_aabb_intersect", &nerf::ray_aabb_intersect, "ray/AABB slab test -> (t_near, t_far, hit)",
        py::arg("rays_o"), py::arg("rays_d"), py::arg("aabbs"));
  m.def("nerf_occupancy_grid_update", &nerf::occupancy_grid_update, "grid EMA-max update + bitfield packing",
        py::arg("density"), py::arg("cell_indices"), py::arg("values"), py::arg("decay"), py::arg("threshold"));
  m.def("nerf_ray_march", &nerf::ray_march, "two-pass occupancy-grid ray marching -> packed samples",
        py::arg("rays_o"), py::arg("rays_d"), py::arg("aabb"), py::arg("bitfield"), py::arg("resolution"),
        py::arg("levels"), py::arg("near"), py::arg("far"), py::arg("step_size"), py::arg("cone_angle"),
        py::arg("max_samples"), py::arg("jitter_u"));
  m.def("nerf_ray_march_round", &nerf::ray_march_round,
        "one round of resumable marching -> (ray rows, t_starts, t_ends, packed_info, next_k, next_t, positions, "
        "directions)", py::arg("rays_o"), py::arg("rays_d"), py::arg("aabb"), py::arg("bitfield"), py::arg("resolution"),
        py::arg("levels"), py::arg("near"), py::arg("far"), py::arg("step_size"), py::arg("cone_angle"),
        py::arg("jitter_u"), py::arg("rows"), py::arg("start_k"), py::arg("start_t"), py::arg("max_samples"));
  m.def("nerf_volume_render_round", &nerf::volume_render_round,
        "render one round's segments behind optical depth tau (updated) and add them to rows of color/opacity/depth",
        py::arg("sigmas"), py::arg("rgbs"), py::arg("t_starts"), py::arg("t_ends"), py::arg("packed_info"),
        py::arg("early_stop_eps"), py::arg("tau"), py::arg("out_rows"), py::arg("color"), py::arg("opacity"),
        py::arg("depth"));
  m.def("nerf_volume_render", &nerf::volume_render_forward, "packed volume rendering -> (color, opacity, depth, weights)",
        py::arg("sigmas"), py::arg("rgbs"), py::arg("t_starts"), py::arg("t_ends"), py::arg("packed_info"),
        py::arg("early_stop_eps"), py::arg("need_weights"));
  m.def("nerf_volume_render_backward", &nerf::volume_render_backward, "recomputing backward of volume rendering",
        py::arg("grad_color"), py::arg("grad_opacity"), py::arg("grad_depth"), py::arg("grad_weights"), py::arg("sigmas"),
        py::arg("rgbs"), py::arg("t_starts"), py::arg("t_ends"), py::arg("packed_info"), py::arg("color"),
        py::arg("opacity"), py::arg("depth"), py::arg("early_stop_eps"));
  m.def("nerf_composite_blocks", &nerf::composite_blocks, "Block-NeRF inverse-distance compositing -> (out, weights)",
        py::arg("colors"), py::arg("camera_pos"), py::arg("block_centers"), py::arg("visibility"), py::arg("power"),
        py::arg("threshold"), py::arg("radius"));
}
}  // namespace fastcore

// CPU loops of the nerf kernels: each runs the shared per-ray / per-cell body of nerf.h over a range
// (the torch glue splits the range with at::parallel_for). Explicit instantiations for float and double.
#include <cstdint>

#include "nerf/nerf.h"

namespace fastcore {
namespace nerf {

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
  for (int64_t r = ray_begin; r < ray_end; ++r) render_forward_ray<T>(p, r);
}

template <typename T>
void render_backward_cpu(const RenderParams<T>& p, int64_t ray_begin, int64_t ray_end) {
  for (int64_t r = ray_begin; r < ray_end; ++r) render_backward_ray<T>(p, r);
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

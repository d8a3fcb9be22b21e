"""NeRF ray marching and rendering: functional ops.

  ray_aabb_intersect     rays × boxes slab test                                  (reference, cpu, cuda, triton)
  occupancy_grid_update  instant-ngp grid update (max(decay·old, new)) + bitfield (reference, cpu, cuda)
  ray_march              occupancy-grid marching -> packed samples (two passes)  (reference, cpu, cuda)
  volume_render          packed front-to-back compositing, O(R) backward         (reference, cpu, cuda, triton)
  composite_blocks       Block-NeRF inverse-distance image compositing           (reference, cpu, cuda, triton)
  march_round, render_round   eager helpers of nn.NeRFRenderer's rounds (resumable march, render behind a
                         ray's optical depth, accumulated in place)                 (reference, cpu, cuda)

Layering (DESIGN): validate (shapes, dtypes, devices here; data-dependent checks — non-finite or
zero-length directions, malformed packed_info — inside the registered op, so torch.compile(fullgraph=True)
traces the public function) -> choose backend -> registered torch ops `fastcore_ai::nerf_*` (fake impls,
autograd for volume_render and composite_blocks) -> backend (`_C`, Triton, or fastcore_ai.reference.nerf).
Math and conventions: fastcore_ai.reference.nerf and csrc/kernels/nerf/nerf.h.

Host syncs: ray_march reads the sample count S (data-dependent output size) once, and the data checks
read one flag each; volume_render's checks of packed_info read one flag.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_bool, check_int, check_tensor
from ..reference import nerf as _ref
from ._define import define_op, native_impls

__all__ = [
    "ray_aabb_intersect",
    "occupancy_grid_update",
    "ray_march",
    "volume_render",
    "composite_blocks",
    "RayAabbHits",
    "PackedSamples",
    "RenderOutput",
    "MAX_GRID_LEVELS",
]

MAX_GRID_LEVELS = 16
_AABB = "ray_aabb_intersect"
_GRID = "occupancy_grid_update"
_MARCH = "ray_march"
_RENDER = "volume_render"
_COMPOSITE = "composite_blocks"
_FLOATS = (torch.float32, torch.float64)
_F32_F64 = frozenset({torch.float32, torch.float64})
_F32 = frozenset({torch.float32})


def _table(op: str, triton: bool) -> backends.OpTable:
    priority = ("cuda", "triton", "cpu", "reference") if triton else ("cuda", "cpu", "reference")
    return backends.OpTable(
        op, priority, {name: backends.Support(_F32 if name == "triton" else _F32_F64) for name in priority}
    )


for _op, _has_triton in ((_AABB, True), (_GRID, False), (_MARCH, False), (_RENDER, True), (_COMPOSITE, True)):
    backends.register_op(_table(_op, _has_triton))


class RayAabbHits(NamedTuple):
    """t_near, t_far [R, A] (inf where missed), hit [R, A] bool."""

    t_near: Tensor
    t_far: Tensor
    hit: Tensor


class PackedSamples(NamedTuple):
    """Packed samples of ray_march: ray r owns samples packed_info[r, 0] : packed_info[r, 0] + packed_info[r, 1]."""

    ray_indices: Tensor
    t_starts: Tensor
    t_ends: Tensor
    packed_info: Tensor


class RenderOutput(NamedTuple):
    """rgb [R, 3], opacity [R], depth [R] (Σ w·t_mid; divide by opacity for the expected depth),
    weights [S] or None."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    weights: Optional[Tensor]


def _err(op: str, message: str) -> str:
    return f"fastcore_ai.ops.{op}: {message}"


def _same(op: str, name: str, value: Tensor, ref_name: str, ref: Tensor, dtype: bool = True) -> None:
    if value.device != ref.device or (dtype and value.dtype != ref.dtype):
        what = "dtype and device" if dtype else "device"
        raise ValueError(
            _err(
                op,
                f"{name} must have {ref_name}'s {what} ({str(ref.dtype).replace('torch.', '')} on "
                f"{ref.device}), got {_describe(value)}",
            )
        )


def _check_float(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_err(op, f"{name} must be a float, got {type(value).__name__} {value!r}"))
    if math.isnan(value):
        raise ValueError(_err(op, f"{name} must not be NaN"))


def _check_rays(op: str, rays_o: Tensor, rays_d: Tensor) -> None:
    check_tensor(op, "rays_o", rays_o, ndim=2, dtypes=_FLOATS, layout="[R, 3]")
    check_tensor(op, "rays_d", rays_d, ndim=2, dtypes=_FLOATS, layout="[R, 3]")
    if rays_o.shape[1] != 3:
        raise ValueError(_err(op, f"rays_o must have shape [R, 3], got {_describe(rays_o)}"))
    if rays_d.shape != rays_o.shape:
        raise ValueError(_err(op, f"rays_d must have rays_o's shape {tuple(rays_o.shape)}, got {_describe(rays_d)}"))
    _same(op, "rays_d", rays_d, "rays_o", rays_o)


def _check_ray_values(op: str, rays_o: Tensor, rays_d: Tensor) -> None:
    """Data checks (one host read): finite origins/directions, no zero-length direction."""
    if rays_o.numel() == 0:
        return
    finite = torch.isfinite(rays_o).all() & torch.isfinite(rays_d).all()
    nonzero = (rays_d != 0).any(1).all()
    flags = torch.stack([finite, nonzero]).tolist()
    if not flags[0]:
        raise ValueError(_err(op, "rays_o and rays_d must be finite, got NaN or inf (e.g. a NaN direction)"))
    if not flags[1]:
        raise ValueError(
            _err(op, "rays_d must have no zero-length direction (a ray needs a direction), got a row of zeros")
        )


def _check_packed_info(op: str, packed_info: Tensor, num_samples: int) -> None:
    """packed_info rows (start, count) must be non-negative, in bounds and in order (runs don't overlap)."""
    if packed_info.shape[0] == 0:
        return
    starts, counts = packed_info[:, 0], packed_info[:, 1]
    ends = starts + counts
    ok = (starts >= 0).all() & (counts >= 0).all() & (ends <= num_samples).all()
    ordered = (starts[1:] >= ends[:-1]).all() if packed_info.shape[0] > 1 else ok
    flags = torch.stack([ok, ordered]).tolist()
    if not flags[0]:
        raise ValueError(
            _err(
                op,
                f"packed_info rows (start, count) must satisfy start >= 0, count >= 0 and "
                f"start + count <= S = {num_samples}",
            )
        )
    if not flags[1]:
        raise ValueError(
            _err(
                op,
                "packed_info must be monotonic: each ray's run must start at or after the previous "
                "ray's end (start[r+1] >= start[r] + count[r])",
            )
        )


def _native_mod():
    return _native.native()


# ---- 1. ray_aabb_intersect ------------------------------------------------------------------------------


def _check_aabb_values(rays_o, rays_d, aabbs):
    _check_ray_values(_AABB, rays_o, rays_d)


@define_op(
    "nerf_ray_aabb_intersect",
    impls=native_impls(
        "nerf_ray_aabb_intersect", triton_launcher=("nerf", "ray_aabb_intersect"), reference=_ref.ray_aabb_intersect
    ),
    check=_check_aabb_values,
)
def _aabb_op(rays_o: Tensor, rays_d: Tensor, aabbs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    shape = (rays_o.shape[0], aabbs.shape[0])
    return rays_o.new_empty(shape), rays_o.new_empty(shape), rays_o.new_empty(shape, dtype=torch.bool)


def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabbs: Tensor, *, backend: str = "auto") -> RayAabbHits:
    """Intersect R rays o + t·d (t >= 0) with A axis-aligned boxes [x0, y0, z0, x1, y1, z1].

    Returns RayAabbHits(t_near, t_far, hit), each [R, A]: t_near = max(0, entry) (a ray starting inside a
    box has t_near = 0), t_far = exit, hit = t_far >= t_near; misses, boxes behind the ray and degenerate
    boxes (x1 < x0 on an axis) give t_near = t_far = inf and hit = False; a zero direction component is
    exact (no NaN). rays float32/float64 [R, 3] with finite values and non-zero directions (checked),
    aabbs [A, 6] of the same dtype. Not differentiable.
    """
    _check_rays(_AABB, rays_o, rays_d)
    check_tensor(_AABB, "aabbs", aabbs, ndim=2, dtypes=_FLOATS, layout="[A, 6]")
    if aabbs.shape[1] != 6:
        raise ValueError(_err(_AABB, f"aabbs must have shape [A, 6] (x0, y0, z0, x1, y1, z1), got {_describe(aabbs)}"))
    _same(_AABB, "aabbs", aabbs, "rays_o", rays_o)
    chosen = backends.select(_AABB, backend, rays_o.device, rays_o.dtype, "rays_o")
    return RayAabbHits(*_aabb_op(rays_o, rays_d, aabbs, backend=chosen))


# ---- 2. occupancy_grid_update ---------------------------------------------------------------------------


def _check_grid_values(density, cell_indices, values, decay, threshold):
    if cell_indices.numel():
        bad = ((cell_indices < 0) | (cell_indices >= density.shape[0])).any()
        if bool(bad):
            raise ValueError(_err(_GRID, f"cell_indices must lie in [0, N) = [0, {density.shape[0]})"))


@define_op(
    "nerf_occupancy_grid_update",
    impls=native_impls("nerf_occupancy_grid_update", reference=_ref.occupancy_grid_update),
    check=_check_grid_values,
)
def _grid_op(
    density: Tensor, cell_indices: Tensor, values: Tensor, decay: float, threshold: float
) -> Tuple[Tensor, Tensor]:
    n = density.shape[0]
    return density.new_empty((n,)), density.new_empty(((n + 7) // 8,), dtype=torch.uint8)


def occupancy_grid_update(
    density: Tensor,
    cell_indices: Tensor,
    values: Tensor,
    decay: float = 0.95,
    threshold: float = 0.01,
    *,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One occupancy-grid update (instant-ngp's rule; the per-cell work of nn.OccupancyGrid.update).

    density [N] float32/float64: current cell values (negative = culled, never changes); cell_indices [M]
    int64 in [0, N) (checked); values [M]: the new optical thickness σ(x)·dt at a jittered point of each
    listed cell (duplicates take the max).
      new[c] = max(decay · old[c], max over c's values)   (sampled, non-culled cells; others unchanged)
      occupied[c] = new[c] > min(threshold, mean of the non-negative new values)
    Returns (new density [N], bitfield [ceil(N/8)] uint8 with bit c%8 of byte c//8 = occupied[c]).
    """
    check_tensor(_GRID, "density", density, ndim=1, dtypes=_FLOATS, layout="[N]")
    check_tensor(_GRID, "cell_indices", cell_indices, ndim=1, dtypes=(torch.int64,), layout="[M]")
    check_tensor(_GRID, "values", values, ndim=1, dtypes=_FLOATS, layout="[M]")
    if values.shape != cell_indices.shape:
        raise ValueError(
            _err(_GRID, f"values must have cell_indices' shape {tuple(cell_indices.shape)}, got {_describe(values)}")
        )
    _same(_GRID, "values", values, "density", density)
    _same(_GRID, "cell_indices", cell_indices, "density", density, dtype=False)
    _check_float(_GRID, "decay", decay)
    _check_float(_GRID, "threshold", threshold)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(_err(_GRID, f"decay must satisfy 0 <= decay <= 1, got {decay}"))
    chosen = backends.select(_GRID, backend, density.device, density.dtype, "density")
    return _grid_op(density, cell_indices, values, float(decay), float(threshold), backend=chosen)


# ---- 3. ray_march --------------------------------------------------------------------------------------


def _check_march_values(rays_o, rays_d, *rest):
    _check_ray_values(_MARCH, rays_o, rays_d)


@define_op("nerf_ray_march", impls=native_impls("nerf_ray_march", reference=_ref.ray_march), check=_check_march_values)
def _march_op(
    rays_o: Tensor,
    rays_d: Tensor,
    aabb: Tensor,
    bitfield: Tensor,
    resolution: int,
    levels: int,
    near: float,
    far: float,
    step_size: float,
    cone_angle: float,
    max_samples: int,
    jitter_u: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    num_samples = torch.library.get_ctx().new_dynamic_size()  # S: data-dependent
    R = rays_o.shape[0]
    return (
        rays_o.new_empty((num_samples,), dtype=torch.int64),
        rays_o.new_empty((num_samples,)),
        rays_o.new_empty((num_samples,)),
        rays_o.new_empty((R, 2), dtype=torch.int64),
    )


def _check_grid(op: str, grid, rays_o: Tensor) -> Tuple[Tensor, Tensor, int, int]:
    missing = [name for name in ("aabb", "bitfield", "resolution", "levels") if not hasattr(grid, name)]
    if missing:
        raise TypeError(
            _err(
                op,
                f"grid must be an OccupancyGrid (or have aabb, bitfield, resolution, levels), got "
                f"{type(grid).__name__} without {', '.join(missing)}",
            )
        )
    aabb, bits, res, levels = grid.aabb, grid.bitfield, grid.resolution, grid.levels
    check_int(op, "grid.resolution", res, 1, 1024)
    check_int(op, "grid.levels", levels, 1, MAX_GRID_LEVELS)
    check_tensor(op, "grid.aabb", aabb, ndim=1, dtypes=_FLOATS, layout="[6]")
    if aabb.shape[0] != 6:
        raise ValueError(_err(op, f"grid.aabb must have 6 numbers, got {_describe(aabb)}"))
    check_tensor(op, "grid.bitfield", bits, ndim=1, dtypes=(torch.uint8,), layout="[ceil(levels·res³/8)]")
    need = (levels * res**3 + 7) // 8
    if bits.shape[0] != need:
        raise ValueError(_err(op, f"grid.bitfield must have ceil(levels·res³/8) = {need} bytes, got {_describe(bits)}"))
    _same(op, "grid.bitfield", bits, "rays_o", rays_o, dtype=False)
    return aabb.to(rays_o.device, rays_o.dtype), bits, res, levels


def ray_march(
    rays_o: Tensor,
    rays_d: Tensor,
    grid,
    near: float = 0.0,
    far: float = math.inf,
    step_size: float = math.sqrt(3) / 1024,
    cone_angle: float = 0.0,
    max_samples_per_ray: int = 1024,
    jitter: bool = False,
    generator: Optional[torch.Generator] = None,
    *,
    backend: str = "auto",
) -> PackedSamples:
    """March rays through an occupancy grid and return the samples that lie in occupied cells, packed.

    Steps dt(t) = max(t · cone_angle, step_size) on a lattice starting at the entry of the grid's outermost
    box (clipped to [near, far]); with jitter the lattice is shifted by u·dt, u ~ U[0, 1) per ray (from
    `generator`). Empty cells are skipped by whole steps (samples stay on the lattice); a sample is kept
    when the cell holding its midpoint is occupied; at most max_samples_per_ray per ray. Two passes
    (count, then fill) allocate exactly S samples (one host read of S).

    Args: rays float32/float64 [R, 3] (finite, non-zero directions; checked); grid: an nn.OccupancyGrid
      (anything with aabb [6], bitfield uint8, resolution, levels); 0 <= near < far; step_size > 0.
    Returns PackedSamples(ray_indices [S] int64, t_starts [S], t_ends [S], packed_info [R, 2] int64).
    Not differentiable.
    """
    _check_rays(_MARCH, rays_o, rays_d)
    aabb, bits, res, levels = _check_grid(_MARCH, grid, rays_o)
    for name, value in (("near", near), ("far", far), ("step_size", step_size), ("cone_angle", cone_angle)):
        _check_float(_MARCH, name, value)
    if not (0.0 <= near < far):
        raise ValueError(_err(_MARCH, f"near and far must satisfy 0 <= near < far, got near={near}, far={far}"))
    if not (0.0 < step_size < math.inf):
        raise ValueError(_err(_MARCH, f"step_size must be a finite number > 0, got {step_size}"))
    if not (0.0 <= cone_angle < math.inf):
        raise ValueError(_err(_MARCH, f"cone_angle must be a finite number >= 0, got {cone_angle}"))
    check_int(_MARCH, "max_samples_per_ray", max_samples_per_ray, 0, 2**31 - 1)
    check_bool(_MARCH, "jitter", jitter)
    chosen = backends.select(_MARCH, backend, rays_o.device, rays_o.dtype, "rays_o")
    u = None
    if jitter:
        u = torch.rand(rays_o.shape[0], generator=generator, dtype=rays_o.dtype, device=rays_o.device)
    return PackedSamples(
        *_march_op(
            rays_o,
            rays_d,
            aabb,
            bits,
            res,
            levels,
            float(near),
            float(far),
            float(step_size),
            float(cone_angle),
            max_samples_per_ray,
            u,
            backend=chosen,
        )
    )


# ---- 4. volume_render ----------------------------------------------------------------------------------


def _render_reference(sigmas, rgbs, t_starts, t_ends, packed_info, eps, need_weights):
    color, opacity, depth, weights = _ref.volume_render(sigmas, rgbs, t_starts, t_ends, packed_info, eps)
    return color, opacity, depth, (weights if need_weights else weights.new_empty((0,)))


def _check_render_values(sigmas, rgbs, t_starts, t_ends, packed_info, eps, need_weights):
    _check_packed_info(_RENDER, packed_info, sigmas.shape[0])


def _render_backward_reference(
    g_color, g_opacity, g_depth, g_weights, sigmas, rgbs, t_starts, t_ends, packed_info, color, opacity, depth, eps
):
    return _ref.volume_render_backward(
        g_color, g_opacity, g_depth, g_weights, sigmas, rgbs, t_starts, t_ends, packed_info, eps
    )


@define_op(
    "nerf_volume_render_backward",
    impls=native_impls(
        "nerf_volume_render_backward",
        triton_launcher=("nerf", "volume_render_backward"),
        reference=_render_backward_reference,
    ),
    contiguous_args=("grad_color", "grad_opacity", "grad_depth", "grad_weights"),
)  # autograd may expand them
def _render_backward_op(
    grad_color: Tensor,
    grad_opacity: Tensor,
    grad_depth: Tensor,
    grad_weights: Optional[Tensor],
    sigmas: Tensor,
    rgbs: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    packed_info: Tensor,
    color: Tensor,
    opacity: Tensor,
    depth: Tensor,
    early_stop_eps: float,
) -> Tuple[Tensor, Tensor]:
    return torch.empty_like(sigmas, memory_format=torch.contiguous_format), torch.empty_like(
        rgbs, memory_format=torch.contiguous_format
    )


def _render_setup_context(ctx, inputs, output):
    sigmas, rgbs, t_starts, t_ends, packed_info, eps, need_weights, backend = inputs
    color, opacity, depth, weights = output
    # Only per-ray outputs are saved besides the inputs themselves: O(R) extra memory; the backward
    # recomputes T and w with the forward's own sweep.
    ctx.save_for_backward(sigmas, rgbs, t_starts, t_ends, packed_info, color, opacity, depth)
    ctx.eps, ctx.need_weights, ctx.backend = eps, need_weights, backend


def _render_backward(ctx, g_color, g_opacity, g_depth, g_weights):
    sigmas, rgbs, t_starts, t_ends, packed_info, color, opacity, depth = ctx.saved_tensors
    g_color = torch.zeros_like(color) if g_color is None else g_color
    g_opacity = torch.zeros_like(opacity) if g_opacity is None else g_opacity
    g_depth = torch.zeros_like(depth) if g_depth is None else g_depth
    if not ctx.need_weights:
        g_weights = None
    grad_s, grad_c = _render_backward_op(
        g_color,
        g_opacity,
        g_depth,
        g_weights,
        sigmas,
        rgbs,
        t_starts,
        t_ends,
        packed_info,
        color,
        opacity,
        depth,
        ctx.eps,
        backend=ctx.backend,
    )
    return grad_s, grad_c, None, None, None, None, None, None


@define_op(
    "nerf_volume_render",
    impls=native_impls("nerf_volume_render", triton_launcher=("nerf", "volume_render"), reference=_render_reference),
    autograd=(_render_setup_context, _render_backward),
    check=_check_render_values,
)
def _render_op(
    sigmas: Tensor,
    rgbs: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    packed_info: Tensor,
    early_stop_eps: float,
    need_weights: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(color [R, 3], opacity [R], depth [R], weights [S] or [0])."""
    R = packed_info.shape[0]
    return (
        sigmas.new_empty((R, 3)),
        sigmas.new_empty((R,)),
        sigmas.new_empty((R,)),
        sigmas.new_empty((sigmas.shape[0] if need_weights else 0,)),
    )


def volume_render(
    sigmas: Tensor,
    rgbs: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    packed_info: Tensor,
    background: Optional[Tensor] = None,
    early_stop_eps: float = 1e-4,
    return_weights: bool = False,
    *,
    backend: str = "auto",
) -> RenderOutput:
    """Front-to-back volume rendering of packed samples.

    Per ray, samples i in order: δ_i = t_end − t_start, α_i = 1 − exp(−σ_i δ_i), T_i = exp(−Σ_{j<i} σ_j δ_j),
    w_i = T_i α_i while T_i >= early_stop_eps and 0 after (identically in forward and backward):
      rgb = Σ w_i c_i + (1 − opacity)·background,  opacity = Σ w_i,  depth = Σ w_i (t_start + t_end)/2.
    Args: sigmas [S] (>= 0), rgbs [S, 3], t_starts, t_ends [S] float32/float64; packed_info [R, 2] int64
      (start, count) runs in order (checked); background None, [3] or [R, 3]; return_weights adds w [S].
    Differentiable w.r.t. sigmas, rgbs (and background); the backward saves only per-ray outputs and
    recomputes the sweep (closed form, O(R) extra memory).
    """
    check_tensor(_RENDER, "sigmas", sigmas, ndim=1, dtypes=_FLOATS, layout="[S]")
    S = sigmas.shape[0]
    check_tensor(_RENDER, "rgbs", rgbs, ndim=2, dtypes=_FLOATS, layout="[S, 3]")
    if rgbs.shape != (S, 3):
        raise ValueError(
            _err(_RENDER, f"rgbs must have shape [S, 3] = [{S}, 3] (S = len(sigmas)), got {_describe(rgbs)}")
        )
    for name, value in (("t_starts", t_starts), ("t_ends", t_ends)):
        check_tensor(_RENDER, name, value, ndim=1, dtypes=_FLOATS, layout="[S]")
        if value.shape[0] != S:
            raise ValueError(_err(_RENDER, f"{name} must have S = len(sigmas) = {S} entries, got {_describe(value)}"))
    for name, value in (("rgbs", rgbs), ("t_starts", t_starts), ("t_ends", t_ends)):
        _same(_RENDER, name, value, "sigmas", sigmas)
    check_tensor(_RENDER, "packed_info", packed_info, ndim=2, dtypes=(torch.int64,), layout="[R, 2]")
    if packed_info.shape[1] != 2:
        raise ValueError(
            _err(_RENDER, f"packed_info must have shape [R, 2] (start, count), got {_describe(packed_info)}")
        )
    _same(_RENDER, "packed_info", packed_info, "sigmas", sigmas, dtype=False)
    _check_float(_RENDER, "early_stop_eps", early_stop_eps)
    if not 0.0 <= early_stop_eps < 1.0:
        raise ValueError(_err(_RENDER, f"early_stop_eps must satisfy 0 <= eps < 1, got {early_stop_eps}"))
    check_bool(_RENDER, "return_weights", return_weights)
    R = packed_info.shape[0]
    if background is not None:
        if not isinstance(background, Tensor) or background.dtype not in _FLOATS:
            raise TypeError(_err(_RENDER, f"background must be a float tensor [3] or [R, 3], got {background!r}"))
        if background.shape not in ((3,), (R, 3)):
            raise ValueError(
                _err(_RENDER, f"background must have shape [3] or [R, 3] = [{R}, 3], got {_describe(background)}")
            )
        _same(_RENDER, "background", background, "sigmas", sigmas, dtype=False)
    chosen = backends.select(_RENDER, backend, sigmas.device, sigmas.dtype, "sigmas")
    color, opacity, depth, weights = _render_op(
        sigmas, rgbs, t_starts, t_ends, packed_info, float(early_stop_eps), return_weights, backend=chosen
    )
    if background is not None:
        color = color + (1.0 - opacity)[:, None] * background.to(color.dtype)
    return RenderOutput(color, opacity, depth, weights if return_weights else None)


# ---- rendering in rounds (nn.NeRFRenderer) ---------------------------------------------------------------
# Eager helpers of the renderer's rounds, not registered ops: they resume state and update accumulators in
# place, without autograd. On cpu/cuda they run ray_march's and volume_render's kernels (the same per-ray
# bodies, with the resume / accumulate fields of MarchParams / RenderParams); elsewhere the reference's
# ray_march_round / volume_render_round.


class MarchRound(NamedTuple):
    """One round of resumable marching over n rows: row [S] (which row each sample belongs to), t_starts [S],
    t_ends [S], packed_info [n, 2], next_k [n] and next_t [n] (where each row stopped; next_t = +inf: the
    ray reached its end), positions [S, 3] (midpoints o + t_mid·d) and directions [S, 3] (the field's input)."""

    row: Tensor
    t_starts: Tensor
    t_ends: Tensor
    packed_info: Tensor
    next_k: Tensor
    next_t: Tensor
    positions: Tensor
    directions: Tensor


def check_rays(op: str, rays_o: Tensor, rays_d: Tensor) -> None:
    """The rays checks of every op (shapes, dtypes, finite values, non-zero directions), for callers that
    run the round helpers below many times on the same rays."""
    _check_rays(op, rays_o, rays_d)
    _check_ray_values(op, rays_o, rays_d)


def _native_rounds(tensor: Tensor) -> bool:
    return backends.select(_MARCH, "auto", tensor.device, tensor.dtype, "rays_o") in ("cpu", "cuda")


def march_round(
    rays_o: Tensor,
    rays_d: Tensor,
    grid,
    rows: Tensor,
    start_k: Tensor,
    start_t: Tensor,
    max_samples: Tensor,
    near: float,
    far: float,
    step_size: float,
    cone_angle: float,
    jitter_u: Optional[Tensor] = None,
) -> MarchRound:
    """Rows `rows` [n] of the rays march on ray_march's lattice from lattice step start_k [n] (start_t [n]: its t
    when cone_angle > 0; k = 0 is the ray's start) until max_samples [n] samples or their end; rounds fed with
    the returned (next_k, next_t) emit exactly ray_march's samples, in pieces (tested). jitter_u [R] as
    ray_march's. Rays are checked once by the caller (check_rays)."""
    aabb = grid.aabb.to(rays_o.device, rays_o.dtype)
    impl = _native_mod().nerf_ray_march_round if _native_rounds(rays_o) else _ref.ray_march_round
    return MarchRound(
        *impl(
            rays_o,
            rays_d,
            aabb,
            grid.bitfield,
            grid.resolution,
            grid.levels,
            float(near),
            float(far),
            float(step_size),
            float(cone_angle),
            jitter_u,
            rows,
            start_k,
            start_t,
            max_samples,
        )
    )


def render_round(
    sigmas: Tensor,
    rgbs: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    packed_info: Tensor,
    early_stop_eps: float,
    tau: Tensor,
    out_rows: Tensor,
    color: Tensor,
    opacity: Tensor,
    depth: Tensor,
) -> None:
    """In place: render the packed segments [R] behind the optical depth tau [R] their rays already hold
    (T_i = exp(−(tau + Σ_{j<i} σ_j δ_j)), so the early stop is volume_render's on the whole ray), add their
    C, A, D to rows out_rows [R] of color [N, 3], opacity [N], depth [N], and advance tau to where the sweep
    stopped (a ray is finished once exp(−tau) < early_stop_eps)."""
    impl = _native_mod().nerf_volume_render_round if _native_rounds(sigmas) else _ref.volume_render_round
    impl(sigmas, rgbs, t_starts, t_ends, packed_info, float(early_stop_eps), tau, out_rows, color, opacity, depth)


# ---- 5. composite_blocks ------------------------------------------------------------------------------


def _composite_reference(colors, camera, centers, visibility, power, threshold, radius):
    w = _ref.composite_blocks_weights(
        camera, centers, visibility, power, threshold, None if radius == math.inf else radius
    )
    w = w.to(colors.dtype)
    return (w[:, :, None] * colors).sum(0), w


def _composite_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _composite_backward(ctx, grad_out, grad_weights):
    (weights,) = ctx.saved_tensors
    grad_colors = None if grad_out is None else weights[:, :, None] * grad_out[None, :, :]
    return grad_colors, None, None, None, None, None, None, None


@define_op(
    "nerf_composite_blocks",
    impls=native_impls(
        "nerf_composite_blocks", triton_launcher=("nerf", "composite_blocks"), reference=_composite_reference
    ),
    autograd=(_composite_setup_context, _composite_backward),
)
def _composite_op(
    colors: Tensor,
    camera_pos: Tensor,
    block_centers: Tensor,
    visibility: Tensor,
    power: float,
    threshold: float,
    radius: float,
) -> Tuple[Tensor, Tensor]:
    """(out [R, 3], weights [K, R])."""
    K, R = colors.shape[0], colors.shape[1]
    return colors.new_empty((R, 3)), colors.new_empty((K, R))


def composite_blocks(
    colors: Tensor,
    camera_pos: Tensor,
    block_centers: Tensor,
    visibility: Tensor,
    power: float = 4.0,
    visibility_threshold: float = 0.05,
    radius: Optional[float] = None,
    *,
    return_weights: bool = False,
    backend: str = "auto",
):
    """Block-NeRF image-space compositing: out[r] = Σ_k w_kr colors[k, r] with inverse-distance weights.

    d_kr = ‖camera − block_centers[k]‖ (camera_pos [3], or [R, 3] per ray); block k is eligible for ray r
    when visibility[k, r] >= visibility_threshold and d_kr <= radius (radius None: no limit);
    w_kr = d_kr^(−power) / Σ_eligible d^(−power). A camera at an eligible block's centre gives that block
    (shared equally among such blocks) all the weight. Defined result for a ray with no eligible block:
    the colour of its nearest block (lowest index on ties).
    Args: colors [K, R, 3] (K >= 1), block_centers [K, 3], visibility [K, R], float32/float64.
    Returns out [R, 3] (and weights [K, R] when return_weights). Differentiable w.r.t. colors.
    """
    check_tensor(_COMPOSITE, "colors", colors, ndim=3, dtypes=_FLOATS, layout="[K, R, 3]")
    K, R = colors.shape[0], colors.shape[1]
    if colors.shape[2] != 3 or K < 1:
        raise ValueError(_err(_COMPOSITE, f"colors must have shape [K, R, 3] with K >= 1, got {_describe(colors)}"))
    if not isinstance(camera_pos, Tensor) or camera_pos.dtype not in _FLOATS:
        raise TypeError(_err(_COMPOSITE, f"camera_pos must be a float tensor [3] or [R, 3], got {camera_pos!r}"))
    if camera_pos.shape not in ((3,), (R, 3)):
        raise ValueError(
            _err(_COMPOSITE, f"camera_pos must have shape [3] or [R, 3] = [{R}, 3], got {_describe(camera_pos)}")
        )
    check_tensor(_COMPOSITE, "block_centers", block_centers, ndim=2, dtypes=_FLOATS, layout="[K, 3]")
    if block_centers.shape != (K, 3):
        raise ValueError(
            _err(_COMPOSITE, f"block_centers must have shape [K, 3] = [{K}, 3], got {_describe(block_centers)}")
        )
    check_tensor(_COMPOSITE, "visibility", visibility, ndim=2, dtypes=_FLOATS, layout="[K, R]")
    if visibility.shape != (K, R):
        raise ValueError(
            _err(_COMPOSITE, f"visibility must have shape [K, R] = [{K}, {R}], got {_describe(visibility)}")
        )
    for name, value in (("camera_pos", camera_pos), ("block_centers", block_centers), ("visibility", visibility)):
        _same(_COMPOSITE, name, value, "colors", colors)
    _check_float(_COMPOSITE, "power", power)
    _check_float(_COMPOSITE, "visibility_threshold", visibility_threshold)
    if not 0.0 < power < math.inf:
        raise ValueError(_err(_COMPOSITE, f"power must be a finite number > 0, got {power}"))
    if radius is not None:
        _check_float(_COMPOSITE, "radius", radius)
        if not radius > 0:
            raise ValueError(_err(_COMPOSITE, f"radius must be > 0 or None, got {radius}"))
    check_bool(_COMPOSITE, "return_weights", return_weights)
    chosen = backends.select(_COMPOSITE, backend, colors.device, colors.dtype, "colors")
    out, weights = _composite_op(
        colors,
        camera_pos,
        block_centers,
        visibility,
        float(power),
        float(visibility_threshold),
        math.inf if radius is None else float(radius),
        backend=chosen,
    )
    return (out, weights) if return_weights else out

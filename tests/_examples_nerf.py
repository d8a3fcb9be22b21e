"""Sample calls of the nerf ops (format: tests/_examples.py)."""

import math

import torch

from fastcore_ai import nn, ops
from test_nerf import packed_samples

_F64 = torch.float64


def _rays(R, dtype=_F64):
    o = torch.rand(R, 3, dtype=dtype) * 3 - 1.5
    d = torch.randn(R, 3, dtype=dtype)
    d[0, 0] = 0.0  # a zero direction component (exact slab test)
    o[1] = 0.1  # starts inside the unit box
    return o, d


def _boxes(dtype=_F64):
    return torch.tensor([[-1.0, -1, -1, 1, 1, 1], [0.0, 0, 0, 0.5, 0.5, 0.5], [1.0, 1, 1, 0, 0, 0]], dtype=dtype)


def _grid(res=4, levels=1, fraction=0.4):
    grid = nn.OccupancyGrid([-1.0, -1, -1, 1, 1, 1], resolution=res, levels=levels)
    occupied = (torch.rand(levels * res**3) < fraction).to(torch.uint8)
    occupied = torch.nn.functional.pad(occupied, (0, (-occupied.numel()) % 8)).view(-1, 8)
    grid.bitfield.copy_((occupied << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8))
    return grid


def _packed(R, max_count=4, dtype=_F64):
    return packed_samples(R, max_count=max_count, dtype=dtype)  # the nerf tests' generator (an empty ray included)


def _composite_inputs(K=3, R=6, per_ray=True, dtype=_F64):
    colors = torch.rand(K, R, 3, dtype=dtype)
    camera = torch.randn(R, 3, dtype=dtype) if per_ray else torch.randn(3, dtype=dtype)
    centers = torch.randn(K, 3, dtype=dtype) * 2
    visibility = torch.rand(K, R, dtype=dtype)
    visibility[:, 0] = 0.0  # ray 0: no eligible block -> nearest-block fallback
    return colors, camera, centers, visibility


# ---- registered ops ---------------------------------------------------------------------------------


def _aabb():
    o, d = _rays(9)
    return [(o, d, _boxes()), (o.float()[:5], d.float()[:5], _boxes(torch.float32)[:1])]


def _grid_update():
    density = torch.rand(64, dtype=_F64) * 0.02
    density[3] = -1.0  # a culled cell
    idx = torch.randint(0, 64, (30,))
    return [
        (density, idx, torch.rand(30, dtype=_F64) * 0.02, 0.95, 0.01),
        (density.float()[:13], idx[:0], torch.rand(0), 0.5, 0.01),
    ]


def _march():
    o, d = _rays(9)
    grid = _grid(res=4, levels=2)
    aabb, bits = grid.aabb.to(_F64), grid.bitfield
    return [
        (o, d, aabb, bits, 4, 2, 0.0, math.inf, 0.1, 0.0, 64, None),
        (o, d, aabb, bits, 4, 2, 0.2, 3.0, 0.05, 0.01, 5, torch.rand(9, dtype=_F64)),
    ]


def _render():
    sigmas, rgbs, ts, te, packed = _packed(7)
    sigmas, rgbs = sigmas.requires_grad_(True), rgbs.requires_grad_(True)
    return [(sigmas, rgbs, ts, te, packed, 1e-4, False), (sigmas, rgbs, ts, te, packed, 1e-2, True)]


def _render_backward():
    sigmas, rgbs, ts, te, packed = _packed(7)
    R = packed.shape[0]
    cases = []
    for need_weights in (False, True):
        color, opacity, depth, _ = torch.ops.fastcore_ai.nerf_volume_render(
            sigmas, rgbs, ts, te, packed, 1e-4, need_weights, "cpu"
        )
        g_weights = torch.randn(sigmas.shape[0], dtype=_F64) if need_weights else None
        cases.append(
            (
                torch.randn(R, 3, dtype=_F64),
                torch.randn(R, dtype=_F64),
                torch.randn(R, dtype=_F64),
                g_weights,
                sigmas,
                rgbs,
                ts,
                te,
                packed,
                color,
                opacity,
                depth,
                1e-4,
            )
        )
    return cases


def _composite():
    colors, camera, centers, visibility = _composite_inputs()
    colors2, camera2, centers2, visibility2 = _composite_inputs(K=2, R=5, per_ray=False)
    return [
        (colors.requires_grad_(True), camera, centers, visibility, 4.0, 0.05, math.inf),
        (colors2, camera2, centers2, visibility2, 2.0, 0.1, 2.5),
    ]


REGISTERED = {
    "nerf_ray_aabb_intersect": _aabb,
    "nerf_occupancy_grid_update": _grid_update,
    "nerf_ray_march": _march,
    "nerf_volume_render": _render,
    "nerf_volume_render_backward": _render_backward,
    "nerf_composite_blocks": _composite,
}


# ---- public ops under torch.compile ------------------------------------------------------------------


def _public_aabb():
    o, d = _rays(9, torch.float32)
    return (lambda o, d, boxes: tuple(ops.ray_aabb_intersect(o, d, boxes)), (o, d, _boxes(torch.float32)))


def _public_grid_update():
    density = torch.rand(64) * 0.02
    idx = torch.randint(0, 64, (30,))
    return (
        lambda density, idx, values: ops.occupancy_grid_update(density, idx, values, 0.9, 0.01),
        (density, idx, torch.rand(30) * 0.02),
    )


def _public_march():
    grid = _grid(res=4, levels=2)
    o, d = _rays(9, torch.float32)
    return (lambda o, d: tuple(ops.ray_march(o, d, grid, step_size=0.05, max_samples_per_ray=16)), (o, d))


def _public_render():
    sigmas, rgbs, ts, te, packed = _packed(7, dtype=torch.float32)
    return (
        lambda sigmas, rgbs, ts, te, packed, background: tuple(
            ops.volume_render(sigmas, rgbs, ts, te, packed, background=background, return_weights=True)
        ),
        (sigmas, rgbs, ts, te, packed, torch.rand(3)),
    )


def _public_composite():
    colors, camera, centers, visibility = _composite_inputs(dtype=torch.float32)
    return (
        lambda colors, camera, centers, visibility: ops.composite_blocks(
            colors, camera, centers, visibility, radius=3.0, return_weights=True
        ),
        (colors, camera, centers, visibility),
    )


PUBLIC = {
    "ray_aabb_intersect": _public_aabb,
    "occupancy_grid_update": _public_grid_update,
    "ray_march": _public_march,
    "volume_render": _public_render,
    "composite_blocks": _public_composite,
}

"""NeRF ray marching and rendering: layers.

OccupancyGrid   instant-ngp-style multi-level occupancy grid (density per cell + packed bitfield,
                update rule of ops.occupancy_grid_update), saved with state_dict.
NeRFRenderer    field -> march -> render: `forward` for training (differentiable into the field),
                `render_inference` in rounds over the rays still alive, with early termination and
                compaction, in chunks (memory bounded whatever the image size).
BlockNeRF       renders the blocks eligible for a camera and composites them (ops.composite_blocks).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["OccupancyGrid", "NeRFRenderer", "BlockNeRF"]


def _as_aabb(aabb) -> Tensor:
    box = torch.as_tensor(aabb, dtype=torch.float32).reshape(-1)
    if box.numel() != 6 or not bool((box[3:] > box[:3]).all()):
        raise ValueError(
            f"fastcore_ai.nn: aabb must be 6 numbers [x0, y0, z0, x1, y1, z1] with x1 > x0 etc., got {box.tolist()}"
        )
    return box


def _pack(occupied: Tensor) -> Tensor:
    """[N] bool -> [ceil(N/8)] uint8, bit b of byte i = occupied[8i + b]."""
    n = occupied.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=occupied.device)
    padded[:n] = occupied.reshape(-1).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32, device=occupied.device)
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


class OccupancyGrid(nn.Module):
    """Occupancy grid over `aabb` with `levels` cascades of resolution³ cells (level l covers 2^l times the
    box about its centre, as instant-ngp's cascades).

    Buffers (in state_dict): aabb [6], density [levels·res³] float32 (optical thickness σ·step_size per
    cell; negative = culled), bitfield [ceil(levels·res³/8)] uint8. A new grid is fully occupied.
    `update(density_fn, step)`: all cells while step < warmup_steps, then a random quarter of each level
    plus up to as many currently occupied cells; one jittered point per chosen cell;
    value = density_fn(x) · step_size; new = max(decay·old, value); occupied = new > min(threshold, mean).
    """

    def __init__(
        self,
        aabb,
        resolution: int = 128,
        levels: int = 1,
        step_size: Optional[float] = None,
        decay: float = 0.95,
        threshold: float = 0.01,
        warmup_steps: int = 256,
    ):
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= 1024:
            raise ValueError(
                f"fastcore_ai.nn.OccupancyGrid: resolution must be an int in [1, 1024], got {resolution!r}"
            )
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= ops.MAX_GRID_LEVELS:
            raise ValueError(
                f"fastcore_ai.nn.OccupancyGrid: levels must be an int in [1, {ops.MAX_GRID_LEVELS}], got {levels!r}"
            )
        box = _as_aabb(aabb)
        self.resolution, self.levels = resolution, levels
        # instant-ngp's minimum step √3/1024 of a unit cube: the box diagonal / 1024
        self.step_size = float(step_size) if step_size is not None else float((box[3:] - box[:3]).norm()) / 1024
        self.decay, self.threshold, self.warmup_steps = float(decay), float(threshold), int(warmup_steps)
        cells = levels * resolution**3
        self.register_buffer("aabb", box)
        self.register_buffer("density", torch.zeros(cells))
        self.register_buffer("bitfield", torch.full(((cells + 7) // 8,), 255, dtype=torch.uint8))

    @property
    def num_cells(self) -> int:
        return self.levels * self.resolution**3

    def level_aabbs(self) -> Tensor:
        """[levels, 6] boxes of the cascades."""
        lo, hi = self.aabb[:3].double(), self.aabb[3:].double()
        centre, half = (lo + hi) * 0.5, (hi - lo) * 0.5
        scale = (2.0 ** torch.arange(self.levels, dtype=torch.float64, device=self.aabb.device))[:, None]
        return torch.cat([centre - half * scale, centre + half * scale], 1).to(self.aabb.dtype)

    @property
    def occupied(self) -> Tensor:
        """[levels, res, res, res] bool view of the bitfield."""
        bits = (self.bitfield[:, None].to(torch.int32) >> torch.arange(8, device=self.bitfield.device)) & 1
        res = self.resolution
        return bits.reshape(-1)[: self.num_cells].bool().reshape(self.levels, res, res, res)

    @torch.no_grad()
    def set_occupied(self, occupied: Tensor) -> None:
        """Set the bitfield from a [levels, res, res, res] (or flat) bool mask; density follows (1/0)."""
        flat = occupied.reshape(-1).to(self.bitfield.device)
        if flat.numel() != self.num_cells:
            raise ValueError(
                f"fastcore_ai.nn.OccupancyGrid.set_occupied: need {self.num_cells} cells, got {flat.numel()}"
            )
        self.bitfield.copy_(_pack(flat.bool()))
        self.density.copy_(flat.to(self.density.dtype))

    def cell_points(self, cell_indices: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """A uniformly jittered point inside each listed cell, [M, 3]."""
        res = self.resolution
        level = torch.div(cell_indices, res**3, rounding_mode="floor")
        rem = cell_indices - level * res**3
        ijk = torch.stack(
            [
                torch.div(rem, res * res, rounding_mode="floor"),
                torch.div(rem, res, rounding_mode="floor") % res,
                rem % res,
            ],
            1,
        )
        boxes = self.level_aabbs()[level]
        jitter = torch.rand(ijk.shape, generator=generator, device=ijk.device, dtype=boxes.dtype)
        return boxes[:, :3] + (ijk.to(boxes.dtype) + jitter) / res * (boxes[:, 3:] - boxes[:, :3])

    @torch.no_grad()
    def update(
        self,
        density_fn: Callable[[Tensor], Tensor],
        step: int,
        chunk: int = 1 << 18,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        """One grid update (see the class docstring). density_fn(x [M, 3]) -> σ [M] (or [M, 1])."""
        device = self.density.device
        cells_per_level = self.resolution**3
        if step < self.warmup_steps:
            indices = torch.arange(self.num_cells, device=device)
        else:
            chosen = []
            occupied = self.occupied.reshape(self.levels, -1)
            for level in range(self.levels):
                base = level * cells_per_level
                quarter = max(1, cells_per_level // 4)
                chosen.append(base + torch.randint(cells_per_level, (quarter,), generator=generator, device=device))
                occ = occupied[level].nonzero().reshape(-1)
                if occ.numel() > quarter:
                    occ = occ[torch.randint(occ.numel(), (quarter,), generator=generator, device=device)]
                chosen.append(base + occ)
            indices = torch.cat(chosen)
        values = []
        for begin in range(0, indices.numel(), chunk):
            x = self.cell_points(indices[begin : begin + chunk], generator)
            values.append(density_fn(x).reshape(-1).to(self.density.dtype) * self.step_size)
        values = torch.cat(values) if values else self.density.new_empty(0)
        was_occupied = bool(self.bitfield.any())
        density, bitfield = ops.occupancy_grid_update(self.density, indices, values, self.decay, self.threshold)
        self.density.copy_(density)
        self.bitfield.copy_(bitfield)
        if was_occupied and not bool(bitfield.any()):
            # An empty grid makes ray_march return no samples at all: a silent black render. Said once per
            # emptying (a grid that stays empty does not repeat it).
            largest = float(values.max()) if values.numel() else float("nan")
            warnings.warn(
                "fastcore_ai.nn.OccupancyGrid.update: this update left every cell empty (the largest sampled "
                f"sigma*step_size was {largest:.3g}, the occupancy threshold is {self.threshold:.3g}), so "
                "ray_march will return no samples; check density_fn's scale or lower `threshold`",
                RuntimeWarning,
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        return (
            f"aabb={[round(v, 4) for v in self.aabb.tolist()]}, resolution={self.resolution}, levels={self.levels}, "
            f"step_size={self.step_size:.3g}"
        )


class NeRFRenderer(nn.Module):
    """Occupancy-grid NeRF renderer around any radiance field `field(x [S, 3], d [S, 3]) -> (σ [S], rgb [S, 3])`.

    render_inference(rays_o, rays_d, chunk) -> RenderOutput without grad: rays in chunks of `chunk`; in each
    chunk, rounds march only the rays still alive a few occupied steps further (resuming the lattice where
    they stopped), run the field on those samples, and render the segments behind the optical depth each ray
    holds; a ray drops out when its transmittance falls below early_stop_eps or it reaches its end. The field
    thus skips the samples behind the early stop (except the rest of a ray's last round). Memory is bounded
    by samples_per_round (field batch) and O(chunk) state.
    forward(rays_o, rays_d) -> ops.RenderOutput (jittered lattice in training mode): when autograd is needed
    (grad enabled and the field's parameters or the rays require grad) march -> field on every marched
    sample -> ops.volume_render (differentiable into the field and the rays; O(R) saved by the renderer;
    samples behind a ray's early stop get exactly zero gradient); otherwise the image in rounds, as
    render_inference. field_batch: samples per field call (None: 2^16 on the CPU, the whole round on a GPU).
    """

    def __init__(
        self,
        field: nn.Module,
        aabb=None,
        grid: Optional[OccupancyGrid] = None,
        resolution: int = 128,
        levels: int = 1,
        step_size: Optional[float] = None,
        cone_angle: float = 0.0,
        near: float = 0.0,
        far: float = math.inf,
        early_stop_eps: float = 1e-4,
        background: Optional[Tensor] = None,
        max_samples_per_ray: int = 1024,
        field_batch: Optional[int] = None,
    ):
        super().__init__()
        if grid is None:
            if aabb is None:
                raise ValueError("fastcore_ai.nn.NeRFRenderer: give aabb or grid")
            grid = OccupancyGrid(aabb, resolution=resolution, levels=levels, step_size=step_size)
        self.field, self.grid = field, grid
        self.step_size = float(step_size) if step_size is not None else grid.step_size
        self.cone_angle, self.near, self.far = float(cone_angle), float(near), float(far)
        self.early_stop_eps, self.max_samples_per_ray = float(early_stop_eps), int(max_samples_per_ray)
        if field_batch is not None and (
            isinstance(field_batch, bool) or not isinstance(field_batch, int) or field_batch < 1
        ):
            raise ValueError(
                f"fastcore_ai.nn.NeRFRenderer: field_batch must be a positive int or None, got {field_batch!r}"
            )
        self.field_batch = field_batch
        self.register_buffer(
            "background", None if background is None else torch.as_tensor(background, dtype=torch.float32)
        )

    # On the CPU the field runs on batches of at most this many samples (on a GPU on the whole round). The
    # per-sample cost of a small MLP field depends on the batch mostly through glibc: activations of a few MiB
    # come from the heap, and whether it trims them back to the kernel after every batch (so the next batch
    # page-faults them in again) depends on the sizes it has seen. 2^16 was fastest on both bench scenes
    # (docs/nerf.md, "The CPU field batch").
    CPU_FIELD_BATCH = 1 << 16

    def _run_field(self, x: Tensor, d: Tensor):
        """field(x, d) -> (σ [S], rgb [S, 3]) in batches of field_batch samples (see CPU_FIELD_BATCH)."""
        batch = self.field_batch or (self.CPU_FIELD_BATCH if x.device.type == "cpu" else x.shape[0])
        if x.shape[0] <= batch:
            sigma, rgb = self.field(x, d)
            return sigma.reshape(-1), rgb.reshape(-1, 3)
        parts = [self.field(x[s : s + batch], d[s : s + batch]) for s in range(0, x.shape[0], batch)]
        return torch.cat([p[0].reshape(-1) for p in parts]), torch.cat([p[1].reshape(-1, 3) for p in parts])

    def _field(self, rays_o: Tensor, rays_d: Tensor, ray_indices: Tensor, t_starts: Tensor, t_ends: Tensor):
        t_mid = (0.5 * (t_starts + t_ends))[:, None]
        d = rays_d[ray_indices]
        return self._run_field(rays_o[ray_indices] + t_mid * d, d)

    def forward(self, rays_o: Tensor, rays_d: Tensor) -> ops.RenderOutput:
        needs_graph = torch.is_grad_enabled() and (
            rays_o.requires_grad or rays_d.requires_grad or any(p.requires_grad for p in self.field.parameters())
        )
        if needs_graph:  # training: autograd through the field on every marched sample
            with torch.no_grad():
                samples = ops.ray_march(
                    rays_o,
                    rays_d,
                    self.grid,
                    near=self.near,
                    far=self.far,
                    step_size=self.step_size,
                    cone_angle=self.cone_angle,
                    max_samples_per_ray=self.max_samples_per_ray,
                    jitter=self.training,
                )
            sigma, rgb = self._field(rays_o, rays_d, samples.ray_indices, samples.t_starts, samples.t_ends)
            return ops.volume_render(
                sigma.to(rays_o.dtype),
                rgb.to(rays_o.dtype),
                samples.t_starts,
                samples.t_ends,
                samples.packed_info,
                background=self.background,
                early_stop_eps=self.early_stop_eps,
            )
        # no autograd: the same image in rounds (the field skips the samples behind each ray's early stop)
        ops.nerf.check_rays("ray_march", rays_o, rays_d)
        R = rays_o.shape[0]
        jitter_u = torch.rand(R, dtype=rays_o.dtype, device=rays_o.device) if self.training else None
        color, opacity, depth = rays_o.new_zeros(R, 3), rays_o.new_zeros(R), rays_o.new_zeros(R)
        with torch.no_grad():
            self._render_rounds(rays_o.contiguous(), rays_d.contiguous(), color, opacity, depth, 1 << 18, 64, jitter_u)
        if self.background is not None:
            color = color + (1.0 - opacity)[:, None] * self.background.to(color.dtype)
        return ops.RenderOutput(color, opacity, depth, None)

    @torch.no_grad()
    def render_inference(
        self,
        rays_o: Tensor,
        rays_d: Tensor,
        chunk: int = 1 << 16,
        samples_per_round: int = 1 << 18,
        max_steps_per_round: int = 64,
    ) -> ops.RenderOutput:
        ops.nerf.check_rays("ray_march", rays_o, rays_d)
        R = rays_o.shape[0]
        rgb = rays_o.new_zeros(R, 3)
        opacity = rays_o.new_zeros(R)
        depth = rays_o.new_zeros(R)
        for begin in range(0, R, chunk):
            sl = slice(begin, min(R, begin + chunk))
            self._render_rounds(
                rays_o[sl].contiguous(),
                rays_d[sl].contiguous(),
                rgb[sl],
                opacity[sl],
                depth[sl],
                samples_per_round,
                max_steps_per_round,
            )
        if self.background is not None:
            rgb = rgb + (1.0 - opacity)[:, None] * self.background.to(rgb.dtype)
        return ops.RenderOutput(rgb, opacity, depth, None)

    def _render_rounds(
        self,
        rays_o: Tensor,
        rays_d: Tensor,
        color: Tensor,
        opacity: Tensor,
        depth: Tensor,
        samples_per_round: int,
        max_steps: int,
        jitter_u: Optional[Tensor] = None,
    ) -> None:
        """Renders the rays into color/opacity/depth (zeros, or views of the output; accumulated in place) in
        rounds.

        Each round the n alive rays march min(max_steps, samples_per_round / n) more occupied steps from where
        they stopped (resumable march: together the rounds emit exactly ray_march's samples), the field runs
        on those samples only, and the segments are composited behind the optical depth τ each ray holds, so
        the early stop is volume_render's. A ray leaves the round robin when T = exp(−τ) < early_stop_eps, at
        its end or after max_samples_per_ray samples: the field never runs on the samples behind a ray's
        early stop except the rest of its last round.
        """
        n = rays_o.shape[0]
        device = rays_o.device
        rows = torch.arange(n, device=device)
        step_k = torch.zeros(n, dtype=torch.int64, device=device)
        step_t = rays_o.new_zeros(n)
        tau = rays_o.new_zeros(n)
        emitted = torch.zeros(n, dtype=torch.int64, device=device)
        while rows.numel() > 0:
            steps = max(1, min(max_steps, samples_per_round // rows.numel()))
            cap = (self.max_samples_per_ray - emitted).clamp_(max=steps)
            march = ops.nerf.march_round(
                rays_o,
                rays_d,
                self.grid,
                rows,
                step_k,
                step_t,
                cap,
                self.near,
                self.far,
                self.step_size,
                self.cone_angle,
                jitter_u,
            )
            if march.t_starts.numel() > 0:
                sigma, rgb = self._run_field(march.positions, march.directions)
                ops.nerf.render_round(
                    sigma.to(rays_o.dtype),
                    rgb.to(rays_o.dtype),
                    march.t_starts,
                    march.t_ends,
                    march.packed_info,
                    self.early_stop_eps,
                    tau,
                    rows,
                    color,
                    opacity,
                    depth,
                )
            emitted += march.packed_info[:, 1]
            alive = (
                torch.isfinite(march.next_t)
                & (torch.exp(-tau) >= self.early_stop_eps)
                & (emitted < self.max_samples_per_ray)
            )
            keep = alive.nonzero().squeeze(1)  # once: five boolean masks would each search the mask again
            rows, step_k, step_t, tau, emitted = (
                rows[keep],
                march.next_k[keep],
                march.next_t[keep],
                tau[keep],
                emitted[keep],
            )


class BlockNeRF(nn.Module):
    """Block-NeRF: K renderers (anything with render_inference(rays_o, rays_d, chunk=...) -> RenderOutput)
    with block centres [K, 3]; `forward(rays_o, rays_d, camera_pos=None, visibility=None)` renders the
    blocks eligible for at least one ray (within `radius` of the camera and visibility >= threshold; plus
    each remaining ray's nearest block, composite_blocks' fallback) and composites their images with
    inverse-distance weights ‖camera − centre‖^(−power). camera_pos defaults to the ray origins ([R, 3]);
    visibility [K, R] defaults to all ones (pass e.g. a visibility network's mean prediction per block)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        block_centers,
        power: float = 4.0,
        visibility_threshold: float = 0.05,
        radius: Optional[float] = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        centers = torch.as_tensor(block_centers, dtype=torch.float32)
        if centers.shape != (len(self.blocks), 3):
            raise ValueError(
                f"fastcore_ai.nn.BlockNeRF: block_centers must be [K, 3] with K = {len(self.blocks)}, "
                f"got {tuple(centers.shape)}"
            )
        self.register_buffer("block_centers", centers)
        self.power, self.visibility_threshold, self.radius = float(power), float(visibility_threshold), radius

    @torch.no_grad()
    def forward(
        self,
        rays_o: Tensor,
        rays_d: Tensor,
        camera_pos: Optional[Tensor] = None,
        visibility: Optional[Tensor] = None,
        chunk: int = 16384,
    ) -> Tensor:
        K, R = len(self.blocks), rays_o.shape[0]
        camera = rays_o if camera_pos is None else camera_pos.to(rays_o.dtype)
        centers = self.block_centers.to(rays_o.dtype)
        vis = rays_o.new_ones(K, R) if visibility is None else visibility.to(rays_o.dtype)
        cam = camera.reshape(-1, 3)
        dist = torch.linalg.vector_norm(cam[None, :, :] - centers[:, None, :], dim=-1).expand(K, R)
        eligible = vis >= self.visibility_threshold
        if self.radius is not None:
            eligible = eligible & (dist <= self.radius)
        needed = eligible.any(1)
        orphan = ~eligible.any(0)
        if bool(orphan.any()):
            needed[torch.argmin(dist[:, orphan], 0).unique()] = True
        colors = rays_o.new_zeros(K, R, 3)
        for k in needed.nonzero().reshape(-1).tolist():
            colors[k] = self.blocks[k].render_inference(rays_o, rays_d, chunk=chunk).rgb
        return ops.composite_blocks(
            colors,
            camera,
            centers,
            vis,
            power=self.power,
            visibility_threshold=self.visibility_threshold,
            radius=self.radius,
        )

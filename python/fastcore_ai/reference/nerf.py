"""NeRF ray marching and rendering: pure-torch references (the float64 oracle of every backend).

Same math, operation for operation, as csrc/kernels/nerf/nerf.h. Readable first: the marcher is a
Python loop over rays and steps in Python floats (float64), the renderer a segmented scan in torch.

Conventions shared by every op:
  rays: origins o [R, 3], directions d [R, 3] (not necessarily unit; t is in units of |d|), point o + t·d.
  boxes: [x0, y0, z0, x1, y1, z1].
  packed samples: sample s belongs to ray ray_indices[s]; ray r owns the contiguous run
    packed_info[r] = (start, count) of the flat [S] arrays; intervals [t_starts[s], t_ends[s]].
  occupancy grid with `levels` cascades of res³ cells: level l covers the base box scaled by 2^l about
    its centre; cell (l, i, j, k) has flat index l·res³ + (i·res + j)·res + k, and its bit is
    bit (index mod 8) of byte index // 8 of the bitfield.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "ray_aabb_intersect",
    "occupancy_grid_update",
    "pack_bitfield",
    "grid_level_aabbs",
    "ray_march",
    "ray_march_round",
    "volume_render",
    "volume_render_round",
    "volume_render_backward",
    "composite_blocks",
    "composite_blocks_weights",
]


# ---- 1. ray / AABB --------------------------------------------------------------------------------


def _slab(o: float, d: float, lo: float, hi: float) -> Tuple[float, float]:
    """The t-interval where o + t·d lies in [lo, hi] on one axis (empty: (inf, -inf)).
    d = 0: the whole line when lo <= o <= hi, else nothing (no 0·inf = NaN)."""
    if d == 0.0:
        return (-math.inf, math.inf) if lo <= o <= hi else (math.inf, -math.inf)
    a, b = (lo - o) / d, (hi - o) / d
    return (a, b) if a <= b else (b, a)


def ray_box(o: Sequence[float], d: Sequence[float], box: Sequence[float]) -> Tuple[float, float, bool]:
    """(t_near, t_far, hit) of the half-line t >= 0: t_near = max(0, entry), t_far = exit; a miss (or a
    degenerate box with x1 < x0 on some axis, or a box entirely behind the origin) gives (inf, inf, False)."""
    t0, t1 = -math.inf, math.inf
    for a in range(3):
        if box[a] > box[a + 3]:
            return math.inf, math.inf, False
        s0, s1 = _slab(o[a], d[a], box[a], box[a + 3])
        t0, t1 = max(t0, s0), min(t1, s1)
    t0 = max(t0, 0.0)
    if not t1 >= t0:
        return math.inf, math.inf, False
    return t0, t1, True


def ray_aabb_intersect(rays_o: Tensor, rays_d: Tensor, aabbs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Slab test of R rays against A axis-aligned boxes.

    t_near[r, a] = max(0, max_axis min(t_lo, t_hi)), t_far[r, a] = min_axis max(t_lo, t_hi) with
    t_lo = (lo − o)/d per axis; an axis with d = 0 constrains nothing when lo <= o <= hi and excludes
    the ray otherwise. hit = t_far >= t_near (a ray starting inside has t_near = 0; a box of zero
    thickness can be hit; a box with x1 < x0 never). Misses get t_near = t_far = inf.
    Shapes: rays [R, 3], aabbs [A, 6] -> t_near, t_far [R, A] (rays' dtype), hit [R, A] bool.
    """
    R, A = rays_o.shape[0], aabbs.shape[0]
    o, d, b = rays_o.double().tolist(), rays_d.double().tolist(), aabbs.double().tolist()
    near = torch.empty(R, A, dtype=torch.float64)
    far = torch.empty(R, A, dtype=torch.float64)
    hit = torch.empty(R, A, dtype=torch.bool)
    for r in range(R):
        for a in range(A):
            near[r, a], far[r, a], hit[r, a] = ray_box(o[r], d[r], b[a])
    device, dtype = rays_o.device, rays_o.dtype
    return near.to(device, dtype), far.to(device, dtype), hit.to(device)


# ---- 2. occupancy grid update ----------------------------------------------------------------------


def pack_bitfield(occupied: Tensor) -> Tensor:
    """[N] bool -> [ceil(N / 8)] uint8, bit b of byte i = occupied[8·i + b] (missing tail bits 0)."""
    n = occupied.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int64, device=occupied.device)
    padded[:n] = occupied.reshape(-1).to(torch.int64)
    shifts = torch.arange(8, device=occupied.device, dtype=torch.int64)
    return (padded.view(-1, 8) << shifts).sum(1).to(torch.uint8)


def occupancy_grid_update(
    density: Tensor, cell_indices: Tensor, values: Tensor, decay: float = 0.95, threshold: float = 0.01
) -> Tuple[Tensor, Tensor]:
    """One instant-ngp / nerfacc grid update (the per-cell work of OccupancyGrid.update).

    density [N] float: the grid's current values (a negative cell is culled and never changes).
    cell_indices [M] int64 in [0, N), values [M]: freshly evaluated optical thickness at jittered points
    of those cells (a cell may appear several times: it takes the max, order-free).
      new[c] = max(decay · old[c], max_{i: idx_i = c} values_i)  for sampled cells with old[c] >= 0
      new[c] = old[c]                                            otherwise
      occupied[c] = new[c] > min(threshold, mean_{c': new[c'] >= 0} new[c'])
    Returns (new density [N] in density's dtype, bitfield [ceil(N/8)] uint8 = pack_bitfield(occupied)).
    """
    work = density.double()
    sampled_max = torch.full_like(work, -math.inf).scatter_reduce(0, cell_indices, values.double(), "amax")
    touched = torch.zeros_like(work, dtype=torch.bool)
    touched[cell_indices] = True
    update = touched & (work >= 0)
    new = torch.where(update, torch.maximum(decay * work, sampled_max), work)
    live = new >= 0
    mean = new[live].mean() if bool(live.any()) else torch.tensor(0.0, dtype=torch.float64)
    thr = min(threshold, float(mean))
    return new.to(density.dtype), pack_bitfield(new > thr)


def grid_level_aabbs(aabb: Sequence[float], levels: int) -> List[List[float]]:
    """Level l's box: the base box scaled by 2^l about its centre."""
    lo, hi = [float(v) for v in aabb[:3]], [float(v) for v in aabb[3:]]
    out = []
    for level in range(levels):
        scale = float(2**level)
        centre = [(lo[a] + hi[a]) * 0.5 for a in range(3)]
        half = [(hi[a] - lo[a]) * 0.5 * scale for a in range(3)]
        out.append([centre[a] - half[a] for a in range(3)] + [centre[a] + half[a] for a in range(3)])
    return out


# ---- 3. ray marching ------------------------------------------------------------------------------


def _cell_of(x: Sequence[float], boxes, res: int):
    """(level, i, j, k) of the finest level whose box holds x, or None outside every level."""
    for level, box in enumerate(boxes):
        if all(box[a] <= x[a] <= box[a + 3] for a in range(3)):
            idx = []
            for a in range(3):
                size = box[a + 3] - box[a]
                i = int(math.floor((x[a] - box[a]) / size * res)) if size > 0 else 0
                idx.append(min(max(i, 0), res - 1))
            return level, idx[0], idx[1], idx[2]
    return None


def _cell_exit(o, d, box, res: int, cell) -> float:
    """t where the ray leaves the cell `cell` (DDA: nearest face ahead on each axis)."""
    t = math.inf
    for a in range(3):
        if d[a] == 0.0:
            continue
        size = (box[a + 3] - box[a]) / res
        face = box[a] + (cell[a] + (1 if d[a] > 0 else 0)) * size
        t = min(t, (face - o[a]) / d[a])
    return t


def ray_march(
    rays_o: Tensor,
    rays_d: Tensor,
    aabb: Tensor,
    bitfield: Tensor,
    resolution: int,
    levels: int,
    near: float = 0.0,
    far: float = math.inf,
    step_size: float = 1e-3,
    cone_angle: float = 0.0,
    max_samples_per_ray: int = 1024,
    jitter_u: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """March every ray through the occupancy grid and return the packed samples in occupied cells.

    Range: [t0, t1] = [max(near, entry), min(far, exit)] of the outermost level's box (no samples when
    it misses or t1 <= t0). Lattice: dt(t) = max(cone_angle · t, step_size);
      cone_angle = 0:  t_k = t0 + (k + u) · step_size                       (closed form, no drift)
      cone_angle > 0:  τ_0 = t0 + u · dt(t0), τ_{k+1} = τ_k + dt(τ_k)
    with u = jitter_u[r] ∈ [0, 1) (0 without jitter). Sample k is the interval [t_k, min(t_{k+1}, t1)],
    emitted (while t_k < t1 and fewer than max_samples_per_ray were emitted) when the cell holding its
    midpoint, at the finest level whose box holds it, is occupied. An empty cell is skipped by whole
    steps: to the first k whose midpoint lies at or past the cell's exit (so samples stay on the lattice).
    Returns ray_indices [S] int64, t_starts [S], t_ends [S] (rays' dtype), packed_info [R, 2] int64.
    """
    R = rays_o.shape[0]
    march = _Marcher(rays_o, rays_d, aabb, bitfield, resolution, levels, near, far, step_size, cone_angle, jitter_u)
    ray_idx: List[int] = []
    starts: List[float] = []
    ends: List[float] = []
    info = []
    for r in range(R):
        first = len(starts)
        ray_starts, ray_ends, _, _ = march.ray(r, max_samples_per_ray)
        ray_idx += [r] * len(ray_starts)
        starts += ray_starts
        ends += ray_ends
        info.append([first, len(starts) - first])
    return march.pack(ray_idx, starts, ends, info)


def ray_march_round(
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
    jitter_u: Optional[Tensor],
    rows: Tensor,
    start_k: Tensor,
    start_t: Tensor,
    max_samples: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One round of resumable marching (NeRFRenderer's rounds): row i marches ray rows[i] on the lattice of
    ray_march, from lattice step start_k[i] (t = start_t[i] when cone_angle > 0; k = 0 is the ray's start),
    for at most max_samples[i] emitted samples, and stops where one-shot marching would have gone on; so
    rounds emit exactly ray_march's samples, in pieces.
    Returns (row of each sample [S], t_starts [S], t_ends [S], packed_info [n, 2] per row, next_k [n],
    next_t [n] (+inf when the ray reached its end), positions [S, 3] = o + t_mid·d, directions [S, 3])."""
    march = _Marcher(rays_o, rays_d, aabb, bitfield, resolution, levels, near, far, step_size, cone_angle, jitter_u)
    row_idx: List[int] = []
    starts: List[float] = []
    ends: List[float] = []
    info, next_k, next_t = [], [], []
    for i, (r, k, t, cap) in enumerate(
        zip(rows.tolist(), start_k.tolist(), start_t.double().tolist(), max_samples.tolist())
    ):
        first = len(starts)
        ray_starts, ray_ends, k_stop, t_stop = march.ray(r, cap, k, t)
        row_idx += [i] * len(ray_starts)
        starts += ray_starts
        ends += ray_ends
        info.append([first, len(starts) - first])
        next_k.append(k_stop)
        next_t.append(t_stop)
    row_indices, t_starts, t_ends, packed_info = march.pack(row_idx, starts, ends, info)
    device, dtype = rays_o.device, rays_o.dtype
    rays = rows[row_indices] if row_indices.numel() else row_indices
    mid = (0.5 * (t_starts.double() + t_ends.double()))[:, None]
    positions = (rays_o.double()[rays] + mid * rays_d.double()[rays]).to(dtype)
    return (
        row_indices,
        t_starts,
        t_ends,
        packed_info,
        torch.tensor(next_k, dtype=torch.int64, device=device),
        torch.tensor(next_t, dtype=torch.float64).to(device, dtype),
        positions,
        rays_d[rays].clone(),
    )


class _Marcher:
    """The per-ray lattice walk shared by ray_march and ray_march_round (Python floats, float64)."""

    def __init__(self, rays_o, rays_d, aabb, bitfield, resolution, levels, near, far, step_size, cone_angle, jitter_u):
        self.o_all, self.d_all = rays_o.double().tolist(), rays_d.double().tolist()
        self.boxes = grid_level_aabbs(aabb.double().tolist(), levels)
        self.bits = bitfield.to(torch.int64).tolist()
        self.u_all = jitter_u.double().tolist() if jitter_u is not None else [0.0] * rays_o.shape[0]
        self.res, self.near, self.far, self.step, self.cone = resolution, near, far, step_size, cone_angle
        self.device, self.dtype = rays_o.device, rays_o.dtype

    def occupied(self, cell) -> bool:
        level, i, j, k = cell
        res = self.res
        index = level * res**3 + (i * res + j) * res + k
        return (self.bits[index >> 3] >> (index & 7)) & 1 == 1

    def ray(self, r: int, max_samples: int, k: int = 0, t_resume: float = 0.0):
        """Samples of ray r from lattice step k (t_resume when cone > 0 and k > 0) -> (starts, ends, k, t) with
        (k, t) where it stopped (t = inf when it reached its end)."""
        o, d, u = self.o_all[r], self.d_all[r], self.u_all[r]
        step_size, cone_angle, res = self.step, self.cone, self.res
        starts: List[float] = []
        ends: List[float] = []
        t_near, t_far, hit = ray_box(o, d, self.boxes[-1])
        t0, t1 = max(self.near, t_near), min(self.far, t_far)
        if not (hit and t1 > t0):
            return starts, ends, 0, math.inf
        if cone_angle == 0.0:
            t = t0 + (k + u) * step_size
        else:
            t = t0 + u * max(cone_angle * t0, step_size) if k == 0 else t_resume
        while len(starts) < max_samples:
            if not t < t1:
                return starts, ends, k, math.inf
            t_next = t0 + (k + 1 + u) * step_size if cone_angle == 0.0 else t + max(cone_angle * t, step_size)
            t_end = min(t_next, t1)
            mid = 0.5 * (t + t_end)
            x = [o[a] + mid * d[a] for a in range(3)]
            cell = _cell_of(x, self.boxes, res)
            if cell is not None and self.occupied(cell):
                starts.append(t)
                ends.append(t_end)
                k, t = k + 1, t_next
                continue
            t_exit = t_next if cell is None else _cell_exit(o, d, self.boxes[cell[0]], res, cell[1:])
            if not t_exit < t1:
                return starts, ends, k, math.inf  # every remaining midpoint lies in this empty cell
            # skip whole steps: the first lattice point whose step midpoint is at or past the exit
            if cone_angle == 0.0:
                k_new = math.ceil((t_exit - t0) / step_size - u - 0.5)
                k = max(k + 1, k_new)
                t = t0 + (k + u) * step_size
            else:
                k, t = k + 1, t_next
                while t < t1:
                    step = max(cone_angle * t, step_size)
                    if t + 0.5 * step >= t_exit:
                        break
                    k, t = k + 1, t + step
        return starts, ends, k, (t if t < t1 else math.inf)

    def pack(self, indices, starts, ends, info):
        device, dtype = self.device, self.dtype
        return (
            torch.tensor(indices, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.float64).to(device, dtype),
            torch.tensor(ends, dtype=torch.float64).to(device, dtype),
            torch.tensor(info, dtype=torch.int64, device=device).reshape(len(info), 2),
        )


# ---- 4. volume rendering --------------------------------------------------------------------------


def volume_render(
    sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, packed_info: Tensor, early_stop_eps: float = 1e-4
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Front-to-back compositing of packed samples (differentiable through torch autograd).

    Per ray, samples i in order, δ_i = t_end − t_start, m_i = (t_start + t_end)/2:
      τ_i = Σ_{j<i} σ_j δ_j,  T_i = exp(−τ_i),  α_i = 1 − exp(−σ_i δ_i),  w_i = T_i α_i · [T_i >= eps]
      C = Σ w_i c_i [R, 3],  A = Σ w_i [R],  D = Σ w_i m_i [R] (divide by A for the expected depth).
    Samples after the transmittance falls below early_stop_eps contribute exactly zero (and, by the
    mask, get exactly zero gradient). Returns (C, A, D, weights [S]) in sigmas' dtype.
    """
    R, S = packed_info.shape[0], sigmas.shape[0]
    dtype = sigmas.dtype
    counts = packed_info[:, 1]
    ray_of = torch.repeat_interleave(torch.arange(R, device=sigmas.device), counts)
    # sample position inside its ray: s − start(ray)
    owned = torch.repeat_interleave(packed_info[:, 0], counts)
    if owned.numel() != S or (S and not torch.equal(owned + _ranks(counts), torch.arange(S, device=sigmas.device))):
        raise ValueError("reference volume_render: packed_info must tile the samples as (start, count) runs in order")
    delta = (t_ends - t_starts).to(dtype)
    tau_i = sigmas * delta
    exclusive = _segment_exclusive_sum(tau_i, packed_info, ray_of)
    trans = torch.exp(-exclusive)
    alpha = -torch.expm1(-tau_i)
    alive = (trans >= early_stop_eps).to(dtype)
    weights = trans * alpha * alive
    mid = 0.5 * (t_starts + t_ends).to(dtype)
    color = torch.zeros(R, rgbs.shape[1], dtype=dtype, device=sigmas.device).index_add(
        0, ray_of, weights[:, None] * rgbs
    )
    opacity = torch.zeros(R, dtype=dtype, device=sigmas.device).index_add(0, ray_of, weights)
    depth = torch.zeros(R, dtype=dtype, device=sigmas.device).index_add(0, ray_of, weights * mid)
    return color, opacity, depth, weights


def volume_render_round(
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
    """One round of rendering in rounds (NeRFRenderer.render_inference), in place: the R packed segments
    continue rays that already hold optical depth tau [R]; their weights are volume_render's with
    T_i = exp(−(tau + Σ_{j<i} σ_j δ_j)) (so the early stop is the one-shot sweep's), their C, A, D are added
    to rows out_rows [R] of color [N, 3], opacity [N], depth [N], and tau grows by the σδ of the samples
    before the stop."""
    R = packed_info.shape[0]
    ray_of = torch.repeat_interleave(torch.arange(R, device=sigmas.device), packed_info[:, 1])
    tau_i = sigmas * (t_ends - t_starts).to(sigmas.dtype)
    trans = torch.exp(-(_segment_exclusive_sum(tau_i, packed_info, ray_of) + tau[ray_of]))
    alive = trans >= early_stop_eps
    weights = torch.where(alive, trans * -torch.expm1(-tau_i), torch.zeros_like(trans))
    rows = out_rows[ray_of]
    color.index_add_(0, rows, weights[:, None] * rgbs)
    opacity.index_add_(0, rows, weights)
    depth.index_add_(0, rows, weights * 0.5 * (t_starts + t_ends).to(sigmas.dtype))
    tau.index_add_(0, ray_of, torch.where(alive, tau_i, torch.zeros_like(tau_i)))


def _segment_exclusive_sum(values: Tensor, packed_info: Tensor, ray_of: Tensor) -> Tensor:
    """Per-ray exclusive prefix sum of packed values: a global cumsum minus each ray's base."""
    inclusive = torch.cumsum(values, 0)
    ray_base = torch.zeros(packed_info.shape[0], dtype=values.dtype, device=values.device)
    nonempty = packed_info[:, 1] > 0
    first = packed_info[:, 0][nonempty]
    ray_base[nonempty] = inclusive[first] - values[first]
    return inclusive - values - ray_base[ray_of]


def volume_render_backward(
    grad_color: Tensor,
    grad_opacity: Tensor,
    grad_depth: Tensor,
    grad_weights: Optional[Tensor],
    sigmas: Tensor,
    rgbs: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    packed_info: Tensor,
    early_stop_eps: float = 1e-4,
) -> Tuple[Tensor, Tensor]:
    """Closed-form gradient of volume_render (torch ops, no autograd) -> (grad_sigmas [S], grad_rgbs [S, 3]).

    Every output is linear in w, so with u_i = g_C·c_i + g_A + g_D m_i + g_w,i (per-ray g's of the sample's
    ray) and the per-ray suffix Σ_{j>i} w_j u_j:
      ∂L/∂c_i = w_i g_C,   ∂L/∂σ_i = δ_i (T_{i+1} u_i − Σ_{j>i} w_j u_j)   for samples with T_i >= eps, else 0
    (∂w_j/∂σ_i = δ_i T_{i+1} for j = i, −δ_i w_j for j > i; samples after the stop have w = 0).
    """
    R = packed_info.shape[0]
    dtype, device = sigmas.dtype, sigmas.device
    counts = packed_info[:, 1]
    ray_of = torch.repeat_interleave(torch.arange(R, device=device), counts)
    delta = (t_ends - t_starts).to(dtype)
    tau_i = sigmas * delta
    exclusive = _segment_exclusive_sum(tau_i, packed_info, ray_of)
    trans = torch.exp(-exclusive)
    alive = trans >= early_stop_eps
    weights = torch.where(alive, trans * -torch.expm1(-tau_i), torch.zeros_like(trans))
    trans_next = torch.exp(-(exclusive + tau_i))
    mid = 0.5 * (t_starts + t_ends).to(dtype)
    u = (grad_color[ray_of] * rgbs).sum(1) + grad_opacity[ray_of] + grad_depth[ray_of] * mid
    if grad_weights is not None:
        u = u + grad_weights
    wu = weights * u
    total = torch.zeros(R, dtype=dtype, device=device).index_add(0, ray_of, wu)
    suffix = total[ray_of] - (_segment_exclusive_sum(wu, packed_info, ray_of) + wu)
    grad_sigmas = torch.where(alive, delta * (trans_next * u - suffix), torch.zeros_like(u))
    grad_rgbs = weights[:, None] * grad_color[ray_of]
    return grad_sigmas, grad_rgbs


def _ranks(counts: Tensor) -> Tensor:
    """[0, 1, ..., c_0 − 1, 0, 1, ..., c_1 − 1, ...]."""
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=counts.device)
    ends = torch.cumsum(counts, 0)
    return torch.arange(total, device=counts.device) - torch.repeat_interleave(ends - counts, counts)


# ---- 5. Block-NeRF compositing ---------------------------------------------------------------------


def composite_blocks_weights(
    camera_pos: Tensor,
    block_centers: Tensor,
    visibility: Tensor,
    power: float = 4.0,
    visibility_threshold: float = 0.05,
    radius: Optional[float] = None,
) -> Tensor:
    """[K, R] inverse-distance weights of Block-NeRF's image-space compositing.

    d_kr = ‖c_r − x_k‖ (c_r = camera_pos, [3] or per ray [R, 3]); block k is eligible for ray r when
    visibility[k, r] >= visibility_threshold and (radius is None or d_kr <= radius);
      w_kr = d_kr^(−p) / Σ_{eligible k'} d_k'r^(−p)  over eligible k (0 for the others).
    A camera exactly at an eligible block's centre (d = 0) shares the weight equally among the
    eligible blocks at d = 0. A ray with no eligible block falls back to its nearest block (ties: lowest
    k) with weight 1, so every ray gets a defined colour.
    """
    K, R = visibility.shape
    cam = camera_pos.double().reshape(-1, 3).expand(R, 3) if camera_pos.dim() == 1 else camera_pos.double()
    dist = torch.linalg.vector_norm(cam[None, :, :] - block_centers.double()[:, None, :], dim=-1)  # [K, R]
    eligible = visibility.double() >= visibility_threshold
    if radius is not None:
        eligible &= dist <= radius
    zero = eligible & (dist == 0)
    any_zero = zero.any(0, keepdim=True)
    # log-space normalisation: log w = −p log d − max (stable for large p or tiny distances)
    logw = torch.where(
        eligible & ~zero, -power * torch.log(dist.clamp_min(1e-300)), torch.tensor(-math.inf, dtype=torch.float64)
    )
    top = logw.max(0, keepdim=True).values
    raw = torch.where(eligible & ~zero, torch.exp(logw - torch.where(torch.isfinite(top), top, 0)), 0.0)
    raw = torch.where(any_zero, zero.double(), raw)
    total = raw.sum(0, keepdim=True)
    weights = torch.where(total > 0, raw / torch.where(total > 0, total, 1.0), 0.0)
    none = ~eligible.any(0)
    if bool(none.any()):
        nearest = torch.argmin(dist, 0)  # first minimum: lowest k on ties
        fallback = torch.zeros_like(weights)
        fallback[nearest, torch.arange(R)] = 1.0
        weights = torch.where(none[None, :], fallback, weights)
    return weights


def composite_blocks(
    colors: Tensor,
    camera_pos: Tensor,
    block_centers: Tensor,
    visibility: Tensor,
    power: float = 4.0,
    visibility_threshold: float = 0.05,
    radius: Optional[float] = None,
) -> Tensor:
    """out[r] = Σ_k w_kr · colors[k, r] with the weights of composite_blocks_weights; colors [K, R, 3]."""
    w = composite_blocks_weights(camera_pos, block_centers, visibility, power, visibility_threshold, radius)
    return (w.to(colors.dtype)[:, :, None] * colors).sum(0)

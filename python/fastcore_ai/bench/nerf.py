"""Benchmark cases of the nerf family for fastcore_ai.bench (`python -m fastcore_ai bench --family nerf`).

nerf-render    (fastcore-cpu-train-fwd: NeRFRenderer.forward with autograd enabled, all rays at once, as the
               forward of a training step — rounds to find each ray's early stop, then the field with its
               autograd graph on the samples before it; fastcore-cpu-inference: render_inference, rounds with
               resumable marching, compaction and early termination) R rays through a 128³ grid with ~10% of
               the cells occupied (four balls), step √3/1024 of the box, a small MLP field whose density is
               zero outside the balls: march + field + render (fastcore) against the pure-torch dense path
               (uniform samples along the whole box chord, cumprod transmittance, rendered in ray chunks,
               no grad) — the peer — in the same run. The error column is ‖fastcore − dense‖ / ‖dense‖ of
               the image; the PSNR and the number of field evaluations per ray are printed.
nerf-render-bwd  volume_render forward + backward on packed samples: fastcore (O(R) saved, recomputing
               backward) against autograd through the torch composition (cumsum/exp/index_add, the peer):
               the peak column compares their extra memory.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import List, Optional

import torch

BALLS = [((0.3, 0.2, -0.1), 0.44), ((-0.35, -0.25, 0.2), 0.38), ((0.1, -0.4, -0.4), 0.28), ((-0.2, 0.45, 0.35), 0.25)]


class _BallsMLP(torch.nn.Module):
    """Small MLP radiance field; density = 200·softplus(MLP) · ball mask, zero outside the balls (so the grid is
    exact). The mask is a smoothstep of the depth below a ball's surface: over the whole radius by default
    (`shell=None`: density ramps up towards the centre, rays need ~129 samples to reach T < 1e-4 — the scene of
    the first benchmarks), or over a shell of `shell` box units (full strength that far inside the surface, as
    a trained field's thin surfaces; ~54 samples a ray with a 4-step shell)."""

    def __init__(self, hidden: int = 32, shell: Optional[float] = None):
        super().__init__()
        self.shell = shell
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(6, hidden)
        self.l2 = torch.nn.Linear(hidden, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.register_buffer("centres", torch.tensor([b[0] for b in BALLS]))
        self.register_buffer("radii", torch.tensor([b[1] for b in BALLS]))

    def mask(self, x):
        distance, radii = torch.cdist(x, self.centres.to(x.dtype)), self.radii.to(x.dtype)
        u = (1.0 - distance / radii) if self.shell is None else (radii - distance) / self.shell
        u = u.clamp(0, 1)
        return (u * u * (3 - 2 * u)).amax(-1)

    def forward(self, x, d):
        h = self.l2(torch.relu(self.l1(torch.cat([x, d], -1))))
        sigma = torch.nn.functional.softplus(h[:, 0]) * 200.0 * self.mask(x)
        return sigma, torch.sigmoid(h[:, 1:])


def _rays(R: int, generator: torch.Generator):
    """Rays from points on a sphere of radius 3 towards random points in the central half of the box."""
    o = torch.nn.functional.normalize(torch.randn(R, 3, generator=generator), dim=-1) * 3.0
    target = torch.rand(R, 3, generator=generator) - 0.5
    return o, torch.nn.functional.normalize(target - o, dim=-1)


def dense_render(field, rays_o, rays_d, step: float, chunk: int = 1024):
    """The peer: uniform samples t_k = t0 + k·step over each ray's box chord, σ and rgb from the field,
    T by torch.cumprod of (1 − α), C = Σ T α c — in ray chunks (a padded [chunk, N] batch)."""
    lo, hi = -1.0, 1.0
    inv = 1.0 / rays_d
    t_a, t_b = (lo - rays_o) * inv, (hi - rays_o) * inv
    t0 = torch.minimum(t_a, t_b).amax(-1).clamp_min(0)
    t1 = torch.maximum(t_a, t_b).amin(-1)
    n_max = int(math.ceil(float((t1 - t0).clamp_min(0).max()) / step))
    out = torch.zeros(rays_o.shape[0], 3, device=rays_o.device)
    k = torch.arange(n_max, dtype=torch.float32, device=rays_o.device)
    for begin in range(0, rays_o.shape[0], chunk):
        o, d = rays_o[begin : begin + chunk], rays_d[begin : begin + chunk]
        a, b = t0[begin : begin + chunk, None], t1[begin : begin + chunk, None]
        ts = a + k * step
        te = torch.minimum(ts + step, b)
        valid = ts < b
        x = o[:, None, :] + (0.5 * (ts + te))[..., None] * d[:, None, :]
        sigma, rgb = field(x.reshape(-1, 3), d[:, None, :].expand_as(x).reshape(-1, 3))
        sigma = sigma.reshape(ts.shape) * valid
        alpha = 1 - torch.exp(-sigma * (te - ts).clamp_min(0))
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
        out[begin : begin + chunk] = ((trans * alpha)[..., None] * rgb.reshape(*ts.shape, 3)).sum(1)
    return out


def _psnr(a, b) -> float:
    mse = float((a.double() - b.double()).square().mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def render_cases(device: str, quick: bool = False, family: str = "nerf") -> List:
    if device != "cpu":
        return []  # nerfacc / CUDA peers run under make gpu-check (benchmarks/test_bench_nerf.py)
    R = 4096 if quick else 65536
    res = 32 if quick else 128
    step = math.sqrt(3) * 2 / 1024  # √3/1024 of the box (side 2)
    # (scene name, shell): the balls with density ramping over their whole radius, and with thin 4-step shells
    scenes = [("smooth balls", None)] if quick else [("smooth balls", None), ("4-step-shell balls", 4 * step)]
    return [_render_case(family, R, res, step, name, shell) for name, shell in scenes]


def _render_case(family: str, R: int, res: int, step: float, scene: str, shell: Optional[float]):
    from .. import nn as fnn
    from .harness import Case

    def setup():
        torch.manual_seed(0)
        field = _BallsMLP(shell=shell).eval()
        renderer = fnn.NeRFRenderer(
            field, aabb=[-1, -1, -1, 1, 1, 1], resolution=res, step_size=step, early_stop_eps=1e-4
        ).eval()
        with torch.no_grad():  # occupancy: the cells any point of which lies in a ball (conservative)
            grid = renderer.grid
            ijk = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
            centres = (ijk.float() + 0.5) / res * 2 - 1
            half_diag = math.sqrt(3) / res
            dist = torch.cdist(centres, field.centres) - field.radii
            occupied = (dist < half_diag).any(-1)
            grid.set_occupied(occupied)
        rays_o, rays_d = _rays(R, torch.Generator().manual_seed(1))
        evaluated = []  # samples per field call
        hook = field.register_forward_pre_hook(lambda module, args: evaluated.append(args[0].shape[0]))
        with torch.no_grad():
            dense = dense_render(field, rays_o, rays_d, step)
        counts = {"dense": sum(evaluated)}
        evaluated.clear()
        renderer.render_inference(rays_o, rays_d)
        counts["inference"] = sum(evaluated)
        evaluated.clear()
        with torch.enable_grad():
            renderer(rays_o, rays_d)
        counts["train-fwd (autograd, every marched sample)"] = sum(evaluated)
        hook.remove()
        print(f"  [nerf-render] {scene}: grid {res}^3, {occupied.float().mean().item():.1%} cells occupied, R={R}")
        per_ray = ", ".join(f"{k} {v / R:.1f}" for k, v in counts.items())
        print(f"  [nerf-render] {scene}: field evaluations per ray: {per_ray}")
        return renderer, rays_o, rays_d, dense

    def fastcore_train_forward(renderer, rays_o, rays_d, dense):
        with torch.enable_grad():  # the field's parameters require grad: forward builds the autograd graph
            return renderer(rays_o, rays_d).rgb

    def fastcore_inference(renderer, rays_o, rays_d, dense):
        return renderer.render_inference(rays_o, rays_d).rgb

    def dense_peer(renderer, rays_o, rays_d, dense):
        with torch.no_grad():
            return dense_render(renderer.field, rays_o, rays_d, step)

    def error(output, inputs):
        dense = inputs[3]
        output = output.detach()
        print(f"  [nerf-render] {scene}: PSNR against the dense render: {_psnr(output, dense):.1f} dB")
        return float((output.double() - dense.double()).norm() / dense.double().norm())

    shape = f"render R={R} grid={res}^3 ~10% occupied step=sqrt3/1024 MLP32 {scene} (march+field+render)"
    providers = {
        "fastcore-cpu-train-fwd": fastcore_train_forward,
        "fastcore-cpu-inference": fastcore_inference,
        "dense-torch": dense_peer,
    }
    return Case(family, shape, setup, providers, error, peer="dense-torch")


def torch_composition_render(sigmas, rgbs, t_starts, t_ends, packed_info):
    """volume_render as plain torch ops (what autograd would store per sample): segmented exclusive sum
    of σδ by a global cumsum minus each ray's base, exp, index_add."""
    R = packed_info.shape[0]
    counts = packed_info[:, 1]
    ray_of = torch.repeat_interleave(torch.arange(R), counts)
    tau = sigmas * (t_ends - t_starts)
    inclusive = torch.cumsum(tau, 0)
    base = (inclusive - tau)[packed_info[:, 0].clamp_max(max(sigmas.shape[0] - 1, 0))]
    trans = torch.exp(-(inclusive - tau - base[ray_of]))
    w = trans * -torch.expm1(-tau)
    color = torch.zeros(R, 3, dtype=sigmas.dtype).index_add(0, ray_of, w[:, None] * rgbs)
    opacity = torch.zeros(R, dtype=sigmas.dtype).index_add(0, ray_of, w)
    return color, opacity


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold after the first large free (up to 32 MiB), after which big tensors
    live in the heap and the peak-RSS column misses them; a fixed 64 KiB threshold makes every tensor an
    mmap, so the peak column sees each op's real extra memory. It stays for the rest of the process (glibc
    cannot return to its dynamic threshold), so bench.DEFAULT_FAMILIES runs nerf last."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def saved_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for the backward of fn(*inputs), leaving out the inputs themselves."""
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        fn(*inputs)
    own = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in seen if t.data_ptr() not in own}
    return sum(unique.values())


def render_backward_cases(device: str, quick: bool = False, family: str = "nerf") -> List:
    from .. import ops
    from .harness import Case

    if device != "cpu":
        return []
    R, n = (4096, 64) if quick else (65536, 64)

    def setup():
        _fixed_mmap_threshold()
        g = torch.Generator().manual_seed(0)
        counts = torch.randint(n // 2, 3 * n // 2, (R,), generator=g)
        starts = torch.cumsum(counts, 0) - counts
        S = int(counts.sum())
        ranks = torch.arange(S) - torch.repeat_interleave(starts, counts)
        t_starts = 0.1 + ranks.float() * 0.01
        sigmas = torch.rand(S, generator=g) * 5
        rgbs = torch.rand(S, 3, generator=g)
        inputs = (sigmas, rgbs, t_starts, t_starts + 0.01, torch.stack([starts, counts], 1))
        for name, fn in (("fastcore-cpu", ours("cpu")), ("torch-composition", torch_composition_render)):
            s, c = sigmas.detach().requires_grad_(), rgbs.detach().requires_grad_()
            mb = saved_bytes(lambda s, c, *rest: fn(s, c, *rest), s, c, *inputs[2:]) / 2**20
            print(f"  [nerf-render-bwd] {name}: {mb:.1f} MiB saved for backward besides the inputs (S={S})")
        return inputs

    def run(fn):
        def provider(sigmas, rgbs, ts, te, packed):
            s, c = sigmas.detach().requires_grad_(), rgbs.detach().requires_grad_()
            color, opacity = fn(s, c, ts, te, packed)
            (color.sum() + opacity.sum()).backward()
            # the gradients as they are: concatenating them here would add a copy (63.6 MiB at S = 4.2 M) to
            # the measured peak of whichever provider peaks last (ours), not to the op's own memory
            return s.grad, c.grad

        return provider

    def ours(backend):
        def fn(s, c, ts, te, packed):
            out = ops.volume_render(s, c, ts, te, packed, early_stop_eps=0.0, backend=backend)
            return out.rgb, out.opacity

        return fn

    def error(output, inputs):
        output = torch.cat([output[0], output[1].reshape(-1)])
        sigmas, rgbs, ts, te, packed = inputs
        s, c = sigmas.double().requires_grad_(), rgbs.double().requires_grad_()
        out = ops.volume_render(s, c, ts.double(), te.double(), packed, early_stop_eps=0.0, backend="cpu")
        (out.rgb.sum() + out.opacity.sum()).backward()
        expected = torch.cat([s.grad, c.grad.reshape(-1)])
        return float((output.double() - expected).norm() / expected.norm())

    shape = f"volume_render fwd+bwd R={R} ~{n} samples/ray float32"
    return [
        Case(
            family,
            shape,
            setup,
            {"fastcore-cpu": run(ours("cpu")), "torch-composition": run(torch_composition_render)},
            error,
            peer="torch-composition",
        )
    ]


def nerf_cases(device: str, quick: bool = False) -> List:
    return render_cases(device, quick) + render_backward_cases(device, quick)


FAMILIES: dict = {
    "nerf": nerf_cases,
    "nerf_render": lambda device, quick=False: render_cases(device, quick, "nerf_render"),
    "nerf_backward": lambda device, quick=False: render_backward_cases(device, quick, "nerf_backward"),
}


# ---- the shape sweep (python -m fastcore_ai bench --sweep; bench/sweep.py) ------------------------------------


def torch_ray_aabb(rays_o, rays_d, aabbs):
    """The slab test as one torch broadcast over [R, A, 3] (rays with non-zero direction components)."""
    inv = 1.0 / rays_d
    t_lo = (aabbs[None, :, :3] - rays_o[:, None]) * inv[:, None]
    t_hi = (aabbs[None, :, 3:] - rays_o[:, None]) * inv[:, None]
    near = torch.minimum(t_lo, t_hi).amax(-1).clamp_min(0)
    far = torch.maximum(t_lo, t_hi).amin(-1)
    hit = far >= near
    inf = torch.full_like(near, math.inf)
    return torch.where(hit, near, inf), torch.where(hit, far, inf), hit


def torch_pack_bits(occupied):
    """[N] bool (N a multiple of 8) -> [N / 8] uint8, bit b of byte i = occupied[8i + b]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=occupied.device)
    return (occupied.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def torch_grid_update(density, cell_indices, values, decay: float = 0.95, threshold: float = 0.01):
    """instant-ngp's grid update as torch calls: scatter-max of the new values, decayed max, mean threshold,
    packed bitfield."""
    sampled = torch.full_like(density, -math.inf).scatter_reduce_(0, cell_indices, values, "amax")
    update = (sampled > -math.inf) & (density >= 0)
    new = torch.where(update, torch.maximum(density * decay, sampled), density)
    live = new >= 0
    mean = (new * live).sum() / live.sum().clamp_min(1)
    return new, torch_pack_bits(new > torch.clamp(mean, max=threshold))


def torch_ray_march(rays_o, rays_d, bitfield, res: int, step: float, max_samples: int, chunk: int = 1024):
    """Dense marching in torch over the unit box [-1, 1]³ with one grid level: every lattice sample
    t_k = t0 + k·step of a ray's chord in ray chunks ([chunk, n_max] tensors), the occupancy bit of each
    midpoint's cell, the kept samples packed by a boolean mask (at most max_samples a ray)."""
    inv = 1.0 / rays_d
    t_a, t_b = (-1.0 - rays_o) * inv, (1.0 - rays_o) * inv
    t0 = torch.minimum(t_a, t_b).amax(-1).clamp_min(0)
    t1 = torch.maximum(t_a, t_b).amin(-1)
    n_max = max(1, int(math.ceil(float((t1 - t0).clamp_min(0).max()) / step)))
    k = torch.arange(n_max, dtype=rays_o.dtype, device=rays_o.device)
    starts, ends, counts = [], [], []
    for begin in range(0, rays_o.shape[0], chunk):
        o, d = rays_o[begin : begin + chunk], rays_d[begin : begin + chunk]
        a, b = t0[begin : begin + chunk, None], t1[begin : begin + chunk, None]
        ts = a + k * step
        te = torch.minimum(ts + step, b)
        x = o[:, None, :] + (0.5 * (ts + te))[..., None] * d[:, None, :]
        ijk = ((x + 1.0) * (0.5 * res)).floor().long().clamp_(0, res - 1)
        index = (ijk[..., 0] * res + ijk[..., 1]) * res + ijk[..., 2]
        occupied = ((bitfield[index >> 3] >> (index & 7).to(torch.uint8)) & 1).bool()
        keep = (ts < b) & occupied
        keep &= keep.cumsum(1) <= max_samples
        starts.append(ts[keep])
        ends.append(te[keep])
        counts.append(keep.sum(1))
    counts = torch.cat(counts)
    ray_indices = torch.repeat_interleave(torch.arange(rays_o.shape[0], device=rays_o.device), counts)
    packed_info = torch.stack([counts.cumsum(0) - counts, counts], 1)
    return ray_indices, torch.cat(starts), torch.cat(ends), packed_info


def dense_volume_render(sigmas, rgbs, t_starts, t_ends):
    """volume_render of regular samples [R, n] as dense torch: α = 1 − exp(−σδ), T by an exclusive cumprod,
    w = Tα; color, opacity and depth sums over the samples."""
    alpha = -torch.expm1(-sigmas * (t_ends - t_starts))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    weights = trans * alpha
    color = (weights[..., None] * rgbs).sum(1)
    return color, weights.sum(1), (weights * 0.5 * (t_starts + t_ends)).sum(1)


def torch_composite(colors, camera_pos, block_centers, visibility, power: float = 4.0, threshold: float = 0.05):
    """Block-NeRF compositing in torch for one camera [3]: inverse-distance weights of the visible blocks,
    normalised per ray, the nearest block for a ray that sees none."""
    dist = torch.linalg.vector_norm(camera_pos[None] - block_centers, dim=-1)[:, None]  # [K, 1]
    eligible = visibility >= threshold
    w = torch.where(eligible, dist.pow(-power), torch.zeros((), dtype=colors.dtype))
    total = w.sum(0, keepdim=True)
    nearest = (torch.arange(w.shape[0], device=w.device) == torch.argmin(dist[:, 0]))[:, None].to(w.dtype)
    w = torch.where(total > 0, w / total.clamp_min(1e-30), nearest)
    return (w[..., None] * colors).sum(0)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _sweep_aabb(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    R, A = p["R"], p["A"]

    def setup():
        g = torch.Generator().manual_seed(R + A)
        rays_o, rays_d = _rays(R, g)
        lo = torch.rand(A, 3, generator=g) * 1.6 - 1.0
        boxes = torch.cat([lo, lo + 0.1 + 0.3 * torch.rand(A, 3, generator=g)], 1)
        return rays_o.to(device), rays_d.to(device), boxes.to(device)

    return SweepCell(
        setup,
        lambda o, d, b: ops.ray_aabb_intersect(o, d, b),
        {"torch-broadcast": torch_ray_aabb},
        lambda ours, peer, inputs: float((ours.hit != peer[2]).float().mean()),
    )


def _sweep_grid_update(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    res = p["res"]
    N = res**3
    M = int(N * Fraction(p["M/N"]))  # "1/16" -> N/16

    def setup():
        g = torch.Generator().manual_seed(res)
        density = torch.rand(N, generator=g) * 0.02
        density[torch.randperm(N, generator=g)[: N // 100]] = -1.0  # 1% culled cells
        idx = torch.randint(0, N, (M,), generator=g)
        return density.to(device), idx.to(device), (torch.rand(M, generator=g) * 0.02).to(device)

    return SweepCell(
        setup,
        lambda den, idx, val: ops.occupancy_grid_update(den, idx, val, 0.95, 0.01),
        {"torch-scatter_reduce": torch_grid_update},
        lambda ours, peer, inputs: _rel(ours[0], peer[0]),
    )


def _random_grid(res: int, fraction: float, seed: int):
    from .. import nn as fnn

    grid = fnn.OccupancyGrid([-1.0, -1, -1, 1, 1, 1], resolution=res, levels=1)
    occupied = torch.rand(res**3, generator=torch.Generator().manual_seed(seed)) < fraction
    grid.bitfield.copy_(torch_pack_bits(occupied))
    return grid


def _sweep_march(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    R, res = p["R"], p["res"]
    fraction = float(p["occupied"].rstrip("%")) / 100
    step, cap = math.sqrt(3) / 1024, 1024

    def setup():
        rays_o, rays_d = _rays(R, torch.Generator().manual_seed(R))
        return rays_o.to(device), rays_d.to(device), _random_grid(res, fraction, res).to(device)

    def ours(o, d, grid):
        return ops.ray_march(o, d, grid, step_size=step, max_samples_per_ray=cap)

    def peer(o, d, grid):
        return torch_ray_march(o, d, grid.bitfield, res, step, cap)

    def compare(ours_out, peer_out, inputs):  # relative difference of the sample counts
        return abs(ours_out.t_starts.numel() - peer_out[1].numel()) / max(1, peer_out[1].numel())

    return SweepCell(setup, ours, {"dense-torch": peer}, compare)


def _sweep_render(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    R, n, mode = p["R"], p["samples/ray"], p["mode"]

    def setup():
        g = torch.Generator().manual_seed(R + n)
        delta = 0.01
        sigmas = torch.rand(R, n, generator=g) * (6.0 / (n * delta))  # optical depth ~3 a ray: no early stop
        rgbs = torch.rand(R, n, 3, generator=g)
        t_starts = 0.5 + torch.arange(n).float() * delta
        t_starts = t_starts.expand(R, n).contiguous()
        counts = torch.full((R,), n, dtype=torch.int64)
        packed = torch.stack([torch.arange(R) * n, counts], 1)
        return tuple(t.to(device) for t in (sigmas, rgbs, t_starts, t_starts + delta, packed))

    def run(fn, dense: bool):
        def provider(sigmas, rgbs, ts, te, packed):
            if not dense:
                sigmas, rgbs, ts, te = sigmas.reshape(-1), rgbs.reshape(-1, 3), ts.reshape(-1), te.reshape(-1)
            if mode == "forward":
                with torch.no_grad():
                    return fn(sigmas, rgbs, ts, te, packed)[0]
            s, c = sigmas.detach().requires_grad_(), rgbs.detach().requires_grad_()
            color, opacity = fn(s, c, ts, te, packed)[:2]
            (color.sum() + opacity.sum()).backward()
            return s.grad.reshape(-1)

        return provider

    ours = run(lambda *a: ops.volume_render(*a), dense=False)
    peers = {
        "dense-torch": run(lambda s, c, ts, te, packed: dense_volume_render(s, c, ts, te), dense=True),
        "packed-torch": run(torch_composition_render, dense=False),
    }
    return SweepCell(setup, ours, peers, lambda ours, peer, inputs: _rel(ours, peer))


def _sweep_composite(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    K, R = p["K"], p["R"]

    def setup():
        g = torch.Generator().manual_seed(K + R)
        colors = torch.rand(K, R, 3, generator=g)
        camera = torch.randn(3, generator=g)
        centers = torch.randn(K, 3, generator=g) * 2
        visibility = torch.rand(K, R, generator=g)
        return tuple(t.to(device) for t in (colors, camera, centers, visibility))

    return SweepCell(
        setup,
        lambda c, cam, x, vis: ops.composite_blocks(c, cam, x, vis),
        {"torch-composition": torch_composite},
        lambda ours, peer, inputs: _rel(ours, peer),
    )


def _sweep_specs():
    from .harness import SweepOp

    cpu = ("cpu",)
    return [
        SweepOp(
            "ray_aabb_intersect",
            "nerf",
            {"R": [1024, 16384, 131072], "A": [1, 8, 64]},
            {"R": [64, 256], "A": [2]},
            _sweep_aabb,
            "the slab test as one torch broadcast over [R, A, 3]",
            fixed="rays from a sphere of radius 3 towards the box centre, random boxes in [-1, 1]^3",
            devices=cpu,
        ),
        SweepOp(
            "occupancy_grid_update",
            "nerf",
            {"res": [32, 64, 128], "M/N": ["1/16", "1/4", "1"]},
            {"res": [8, 16], "M/N": ["1/4"]},
            _sweep_grid_update,
            "torch scatter_reduce(amax) + decayed max + mean threshold + packed bits",
            fixed="N = res^3 cells (1% culled), M random cell updates (duplicates included)",
            devices=cpu,
        ),
        SweepOp(
            "ray_march",
            "nerf",
            {"R": [1024, 8192, 32768], "res": [32, 64, 128], "occupied": ["1%", "10%", "50%"]},
            {"R": [32], "res": [8], "occupied": ["10%", "50%"]},
            _sweep_march,
            "dense torch marching: every lattice sample of each chord, occupancy bit lookup, boolean-mask "
            "packing (ray chunks of 1024)",
            fixed="one grid level over [-1, 1]^3 with random occupied cells, step sqrt(3)/1024, at most 1024 "
            "samples a ray",
            devices=cpu,
        ),
        SweepOp(
            "volume_render",
            "nerf",
            {"R": [1024, 8192, 32768], "samples/ray": [16, 64, 256], "mode": ["forward", "forward+backward"]},
            {"R": [16], "samples/ray": [8], "mode": ["forward", "forward+backward"]},
            _sweep_render,
            "the faster of dense torch on [R, n] (cumprod transmittance) and packed torch (cumsum, "
            "index_add), autograd for the backward",
            fixed="regular samples (n a ray), optical depth ~3 a ray (no early stop), default early_stop_eps",
            devices=cpu,
        ),
        SweepOp(
            "composite_blocks",
            "nerf",
            {"K": [2, 8, 32], "R": [4096, 65536, 262144]},
            {"K": [2, 4], "R": [64]},
            _sweep_composite,
            "torch inverse-distance weights of the visible blocks, normalised, nearest-block fallback",
            fixed="one camera position [3], random visibility, power 4, threshold 0.05",
            devices=cpu,
        ),
    ]


SWEEP = _sweep_specs()

"""nerf family: ray/AABB, occupancy-grid update, ray marching, volume rendering (+ its O(R) backward),
Block-NeRF compositing — parity of every backend against the float64 reference, analytic checks, marching
properties, gradients, registration (opcheck, torch.compile), error paths and empty batches."""

import math

import pytest
import torch

import fastcore_ai
from fastcore_ai import nn as fnn
from fastcore_ai import ops
from fastcore_ai.reference import nerf as ref

from _helpers import BACKEND_DEVICES, backend_dtype_cases, relative_error, require_backend


class Grid:
    """A minimal grid object for ops.ray_march (what nn.OccupancyGrid provides)."""

    def __init__(self, aabb, occupied, levels=1):
        self.levels = levels
        self.resolution = occupied.shape[-1]
        self.aabb = torch.as_tensor(aabb, dtype=torch.float64)
        self.occupied = occupied
        self.bitfield = ref.pack_bitfield(occupied.reshape(-1))


def random_rays(R, dtype=torch.float64, zero_components=True, generator=None):
    o = torch.rand(R, 3, dtype=dtype, generator=generator) * 3 - 1.5
    d = torch.randn(R, 3, dtype=dtype, generator=generator)
    if zero_components and R >= 4:
        d[0, 0] = 0.0
        d[1, 1:] = 0.0
        d[2, 2] = 0.0
        o[3] = 0.1  # starts inside the unit box
    return o, d


def packed_samples(R, max_count=9, dtype=torch.float64, empty_rays=True):
    counts = torch.randint(0 if empty_rays else 1, max_count + 1, (R,))
    if empty_rays and R > 2:
        counts[1] = 0
    S = int(counts.sum())
    starts = torch.cumsum(counts, 0) - counts
    packed = torch.stack([starts, counts], 1)
    deltas = torch.rand(S, dtype=dtype) * 0.3 + 0.01
    t_starts = torch.zeros(S, dtype=dtype)
    for r in range(R):
        s, c = int(starts[r]), int(counts[r])
        if c:
            t_starts[s : s + c] = 0.5 + torch.cumsum(deltas[s : s + c], 0) - deltas[s : s + c]
    sigmas = torch.rand(S, dtype=dtype) * 3
    rgbs = torch.rand(S, 3, dtype=dtype)
    return sigmas, rgbs, t_starts, t_starts + deltas, packed


# ---- 1. ray_aabb_intersect ---------------------------------------------------------------------------


def test_ray_aabb_reference_edge_cases():
    box = torch.tensor([[-1.0, -1, -1, 1, 1, 1], [2.0, 2, 2, 1, 3, 3], [0.5, -1, -1, 0.5, 1, 1]], dtype=torch.float64)
    o = torch.tensor([[-3.0, 0, 0], [0.0, 0, 0], [-3.0, 2, 0], [3.0, 0, 0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0, 0], [0.0, 0, 2], [1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    near, far, hit = ref.ray_aabb_intersect(o, d, box)
    # axis-aligned ray with two zero direction components through the unit box
    assert hit[0, 0] and near[0, 0] == 2.0 and far[0, 0] == 4.0
    # starts inside: t_near = 0, exits at z = 1 with |d| = 2 -> t = 0.5
    assert hit[1, 0] and near[1, 0] == 0.0 and far[1, 0] == 0.5
    # zero component outside the slab (y = 2 > 1): miss, inf, no NaN
    assert not hit[2, 0] and math.isinf(near[2, 0]) and math.isinf(far[2, 0])
    # box behind the origin: miss
    assert not hit[3, 0]
    # degenerate box (x1 < x0) never hit
    assert not hit[:, 1].any()
    # zero-thickness box hit at x = 0.5
    assert hit[4, 2] and near[4, 2] == 0.5 and far[4, 2] == 0.5
    assert not torch.isnan(near).any() and not torch.isnan(far).any()


@pytest.mark.parametrize(
    "backend,device,dtype", backend_dtype_cases("ray_aabb_intersect", [torch.float32, torch.float64])
)
def test_ray_aabb_parity(backend, device, dtype, poisoned_outputs):
    require_backend("ray_aabb_intersect", backend, device, dtype)
    o, d = random_rays(33)
    boxes = torch.tensor(
        [
            [-1.0, -1, -1, 1, 1, 1],
            [0, 0, 0, 0.5, 2, 0.7],
            [1.0, 1, 1, 0, 0, 0],
            [-0.2, -3, -0.2, 0.2, 3, 0.2],
            [0.1, 0.1, 0.1, 0.1, 0.4, 0.4],
        ],
        dtype=torch.float64,
    )
    want = ref.ray_aabb_intersect(o, d, boxes)
    got = ops.ray_aabb_intersect(o.to(device, dtype), d.to(device, dtype), boxes.to(device, dtype), backend=backend)
    assert torch.equal(got.hit.cpu(), want[2])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    h = want[2]
    assert relative_error(got.t_near.cpu()[h], want[0][h]) < tol
    assert relative_error(got.t_far.cpu()[h], want[1][h]) < tol
    assert torch.isinf(got.t_near.cpu()[~h]).all() and torch.isinf(got.t_far.cpu()[~h]).all()


# ---- 2. occupancy_grid_update ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,device,dtype", backend_dtype_cases("occupancy_grid_update", [torch.float32, torch.float64])
)
def test_occupancy_grid_update_parity(backend, device, dtype, poisoned_outputs):
    require_backend("occupancy_grid_update", backend, device, dtype)
    N = 1001  # not a multiple of 8: the last byte is partial
    density = torch.rand(N, dtype=torch.float64) * 0.02
    density[:10] = -1.0  # culled cells never change
    idx = torch.cat([torch.randint(0, N, (700,)), torch.arange(5), torch.tensor([500, 500, 500])])
    values = torch.rand(idx.numel(), dtype=torch.float64) * 0.03
    want_density, want_bits = ref.occupancy_grid_update(density, idx, values, 0.95, 0.01)
    got_density, got_bits = ops.occupancy_grid_update(
        density.to(device, dtype), idx.to(device), values.to(device, dtype), 0.95, 0.01, backend=backend
    )
    assert relative_error(got_density.cpu(), want_density) < (1e-15 if dtype == torch.float64 else 1e-6)
    assert torch.equal(got_density.cpu()[:10], density[:10].to(dtype))
    assert torch.equal(got_bits.cpu(), want_bits)
    # the rule itself: a sampled cell holds max(decay·old, max of its values)
    cell = 500
    expected = max(0.95 * float(density[cell]), float(values[-3:].max()))
    assert abs(float(want_density[cell]) - expected) < 1e-15


def test_occupancy_grid_update_threshold_uses_mean():
    density = torch.zeros(16, dtype=torch.float64)
    idx = torch.arange(16)
    values = torch.full((16,), 1e-3, dtype=torch.float64)
    values[3] = 5e-3
    _, bits = ops.occupancy_grid_update(density, idx, values, 0.95, 0.01, backend="cpu")
    occupied = (bits[:, None].long() >> torch.arange(8)) & 1
    # mean = (15e-3 + 5e-3) / 16 = 1.25e-3 < 0.01: only cell 3 is above it
    assert occupied.reshape(-1).nonzero().reshape(-1).tolist() == [3]


# ---- 3. ray_march ------------------------------------------------------------------------------------


def random_grid(res=8, levels=1, fraction=0.3, generator=None):
    occupied = torch.rand(levels, res, res, res, generator=generator) < fraction
    return Grid([-1.0, -1, -1, 1, 1, 1], occupied, levels)


def march_args(**overrides):
    args = dict(near=0.0, far=math.inf, step_size=0.05, cone_angle=0.0, max_samples_per_ray=1024)
    args.update(overrides)
    return args


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if "triton" not in p.id])
@pytest.mark.parametrize("case", ["uniform", "cone", "levels2", "jitter_near_far", "max_samples"])
def test_ray_march_parity_float64(backend, device, case, poisoned_outputs):
    require_backend("ray_march", backend, device, torch.float64)
    if device == "cuda":
        pytest.skip("float64 exact lattice parity is a CPU property (CUDA contracts to FMA); see the float32 test")
    g = torch.Generator().manual_seed(1)
    levels = 2 if case == "levels2" else 1
    grid = random_grid(levels=levels, generator=g)
    o, d = random_rays(40, generator=g)
    o = o * (2.5 if levels == 2 else 1.0)
    kwargs = march_args()
    if case == "cone":
        kwargs.update(cone_angle=0.2)
    if case == "jitter_near_far":
        kwargs.update(near=0.3, far=2.0)
    if case == "max_samples":
        kwargs.update(max_samples_per_ray=3)
    u = torch.rand(40, dtype=torch.float64, generator=g) if case == "jitter_near_far" else None
    want = ref.ray_march(
        o,
        d,
        grid.aabb,
        grid.bitfield,
        grid.resolution,
        levels,
        kwargs["near"],
        kwargs["far"],
        kwargs["step_size"],
        kwargs["cone_angle"],
        kwargs["max_samples_per_ray"],
        u,
    )
    got = torch.ops.fastcore_ai.nerf_ray_march(
        o.to(device),
        d.to(device),
        grid.aabb.to(device),
        grid.bitfield.to(device),
        grid.resolution,
        levels,
        kwargs["near"],
        kwargs["far"],
        kwargs["step_size"],
        kwargs["cone_angle"],
        kwargs["max_samples_per_ray"],
        None if u is None else u.to(device),
        backend,
    )
    assert want[0].numel() > 20, "the case must produce samples"
    for a, e in zip(got, want):
        assert torch.equal(a.cpu(), e)


@pytest.mark.parametrize("backend,device", [p for p in BACKEND_DEVICES if "triton" not in p.id])
def test_ray_march_parity_float32(backend, device):
    """float32 lattices agree with the float64 oracle to rounding; a midpoint within rounding of a cell
    face may flip its cell, so require equal runs on >= 95% of the rays and t within 1e-5 there."""
    require_backend("ray_march", backend, device, torch.float32)
    g = torch.Generator().manual_seed(2)
    grid = random_grid(generator=g)
    o, d = random_rays(64, generator=g)
    want = ref.ray_march(o, d, grid.aabb, grid.bitfield, grid.resolution, 1, 0.0, math.inf, 0.05, 0.0, 1024, None)
    got = ops.ray_march(o.float().to(device), d.float().to(device), grid, step_size=0.05, backend=backend)
    same = got.packed_info[:, 1].cpu() == want[3][:, 1]
    assert same.float().mean() >= 0.95
    for r in same.nonzero().reshape(-1).tolist():
        gs, gc = got.packed_info[r].tolist()
        ws, wc = want[3][r].tolist()
        if wc:
            assert (got.t_starts.cpu()[gs : gs + gc].double() - want[1][ws : ws + wc]).abs().max() < 1e-5
    assert got.ray_indices.dtype == torch.int64 and got.packed_info.dtype == torch.int64


def test_ray_march_full_grid_is_uniform_sampling():
    """With every cell occupied the marcher emits exactly t0 + k·step (clipped to the exit)."""
    grid = Grid([-1.0, -1, -1, 1, 1, 1], torch.ones(1, 4, 4, 4, dtype=torch.bool))
    o, d = random_rays(24)
    step = 0.037
    got = ops.ray_march(o, d, grid, step_size=step, backend="cpu")
    near, far, hit = ref.ray_aabb_intersect(o, d, grid.aabb[None])
    for r in range(24):
        start, count = got.packed_info[r].tolist()
        if not bool(hit[r, 0]) or not float(far[r, 0]) > float(near[r, 0]):
            assert count == 0
            continue
        t0, t1 = float(near[r, 0]), float(far[r, 0])
        k = torch.arange(count, dtype=torch.float64)
        expected_starts = t0 + k * step
        expected_ends = torch.clamp(t0 + (k + 1) * step, max=t1)
        assert count == math.ceil((t1 - t0) / step) or t0 + count * step >= t1 > t0 + (count - 1) * step
        assert torch.equal(got.t_starts[start : start + count], expected_starts)
        assert torch.equal(got.t_ends[start : start + count], expected_ends)
        assert (got.ray_indices[start : start + count] == r).all()


@pytest.mark.parametrize("cone_angle", [0.0, 0.1])
def test_ray_march_no_sample_in_empty_cell(cone_angle):
    g = torch.Generator().manual_seed(3)
    grid = random_grid(res=16, fraction=0.15, generator=g)
    o, d = random_rays(200, generator=g)
    got = ops.ray_march(o, d, grid, step_size=0.01, cone_angle=cone_angle, backend="cpu")
    assert got.t_starts.numel() > 100
    mid = 0.5 * (got.t_starts + got.t_ends)
    x = o[got.ray_indices] + mid[:, None] * d[got.ray_indices]
    cell = ((x + 1) / 2 * 16).floor().long().clamp(0, 15)
    assert grid.occupied[0, cell[:, 0], cell[:, 1], cell[:, 2]].all()
    # lattice: every sample of a ray starts on t0 + k·step (skips move by whole steps)
    if cone_angle == 0.0:
        near, _, _ = ref.ray_aabb_intersect(o, d, grid.aabb[None])
        k = (got.t_starts - near[got.ray_indices, 0]) / 0.01
        assert (k - k.round()).abs().max() < 1e-6
    # and nothing was lost: marching a full grid and filtering by occupancy gives the same samples
    full = Grid(grid.aabb.tolist(), torch.ones_like(grid.occupied))
    dense = ops.ray_march(o, d, full, step_size=0.01, cone_angle=cone_angle, backend="cpu")
    mid = 0.5 * (dense.t_starts + dense.t_ends)
    x = o[dense.ray_indices] + mid[:, None] * d[dense.ray_indices]
    cell = ((x + 1) / 2 * 16).floor().long().clamp(0, 15)
    keep = grid.occupied[0, cell[:, 0], cell[:, 1], cell[:, 2]]
    assert keep.sum() == got.t_starts.numel()
    assert torch.allclose(dense.t_starts[keep], got.t_starts, rtol=0, atol=1e-12)


def test_ray_march_jitter_generator_reproducible():
    grid = random_grid()
    o, d = random_rays(16)
    a = ops.ray_march(
        o, d, grid, step_size=0.05, jitter=True, generator=torch.Generator().manual_seed(7), backend="cpu"
    )
    b = ops.ray_march(
        o, d, grid, step_size=0.05, jitter=True, generator=torch.Generator().manual_seed(7), backend="cpu"
    )
    c = ops.ray_march(o, d, grid, step_size=0.05, backend="cpu")
    assert torch.equal(a.t_starts, b.t_starts)
    assert not torch.equal(a.t_starts, c.t_starts[: a.t_starts.numel()]) or a.t_starts.numel() != c.t_starts.numel()


# ---- 4. volume_render ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_cases("volume_render", [torch.float32, torch.float64]))
def test_volume_render_forward_parity(backend, device, dtype, poisoned_outputs):
    require_backend("volume_render", backend, device, dtype)
    sigmas, rgbs, ts, te, packed = packed_samples(37, max_count=12 if "triton" not in backend else 6)
    sigmas[:5] *= 20  # some rays terminate early
    want = ref.volume_render(sigmas, rgbs, ts, te, packed, 1e-3)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    bg = torch.tensor([0.2, 0.5, 0.9], dtype=dtype, device=device)
    got = ops.volume_render(
        cast(sigmas),
        cast(rgbs),
        cast(ts),
        cast(te),
        packed.to(device),
        background=bg,
        early_stop_eps=1e-3,
        return_weights=True,
        backend=backend,
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32: the reference backend scans globally
    expected_rgb = want[0] + (1 - want[1])[:, None] * bg.double().cpu()
    assert relative_error(got.rgb, expected_rgb) < tol
    assert relative_error(got.opacity, want[1]) < tol
    assert relative_error(got.depth, want[2]) < tol
    assert relative_error(got.weights, want[3]) < tol


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("with_weights", [False, True])
def test_volume_render_backward_parity(backend, device, with_weights):
    dtype = torch.float32 if backend == "triton" else torch.float64
    require_backend("volume_render", backend, device, dtype)
    sigmas, rgbs, ts, te, packed = packed_samples(29, max_count=10 if backend != "triton" else 5)
    sigmas[:4] *= 30
    grads = (
        torch.randn(29, 3, dtype=torch.float64),
        torch.randn(29, dtype=torch.float64),
        torch.randn(29, dtype=torch.float64),
        torch.randn(sigmas.shape[0], dtype=torch.float64),
    )

    def run(which, dev, dt):
        s = sigmas.to(dev, dt).requires_grad_(True)
        c = rgbs.to(dev, dt).requires_grad_(True)
        out = ops.volume_render(
            s,
            c,
            ts.to(dev, dt),
            te.to(dev, dt),
            packed.to(dev),
            early_stop_eps=1e-3,
            return_weights=with_weights,
            backend=which,
        )
        loss = (
            (out.rgb * grads[0].to(dev, dt)).sum()
            + (out.opacity * grads[1].to(dev, dt)).sum()
            + (out.depth * grads[2].to(dev, dt)).sum()
        )
        if with_weights:
            loss = loss + (out.weights * grads[3].to(dev, dt)).sum()
        return torch.autograd.grad(loss, (s, c))

    want = run("reference", "cpu", torch.float64)
    got = run(backend, device, dtype)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, e in zip(got, want):
        assert relative_error(a, e) < tol


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_volume_render_gradcheck(backend):
    sigmas, rgbs, ts, te, packed = packed_samples(6, max_count=5)
    s = sigmas.requires_grad_(True)
    c = rgbs.requires_grad_(True)
    bg = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def fn(s, c, bg):
        out = ops.volume_render(
            s, c, ts, te, packed, background=bg, early_stop_eps=0.0, return_weights=True, backend=backend
        )
        return out.rgb, out.opacity, out.depth, out.weights

    assert torch.autograd.gradcheck(fn, (s, c, bg))


def test_volume_render_early_stop_is_exact_zero():
    """Samples after T < eps contribute exactly 0 in the forward and get exactly 0 gradient; the image is
    not black (the samples before the stop are kept)."""
    S = 8
    sigmas = torch.tensor([0.5, 40.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    rgbs = torch.rand(S, 3, dtype=torch.float64, requires_grad=True)
    ts = torch.arange(S, dtype=torch.float64) * 0.25
    te = ts + 0.25
    packed = torch.tensor([[0, S]])
    out = ops.volume_render(sigmas, rgbs, ts, te, packed, early_stop_eps=1e-4, return_weights=True, backend="cpu")
    # T after sample 1: exp(-(0.125 + 10)) ~ 4e-5 < 1e-4: samples 2.. are dropped
    assert (out.weights[2:] == 0).all() and (out.weights[:2] > 0).all()
    assert out.rgb.abs().sum() > 0 and out.opacity.item() > 0.99
    (out.rgb.sum() + out.opacity.sum() + out.depth.sum()).backward()
    assert (sigmas.grad[2:] == 0).all() and (rgbs.grad[2:] == 0).all()
    assert (sigmas.grad[:2] != 0).all()


def test_volume_render_sphere_opacity_is_analytic():
    """A constant-density sphere: opacity = 1 − exp(−σ·chord) for any partition of the chord into samples."""
    sigma, radius = 1.7, 0.8
    R = 50
    o = torch.zeros(R, 3, dtype=torch.float64)
    o[:, 0] = -3.0
    o[:, 1] = torch.linspace(-0.95, 0.95, R, dtype=torch.float64) * radius
    b = o[:, 1]
    half = torch.sqrt(torch.clamp(radius**2 - b**2, min=0))
    t_in, t_out = 3.0 - half, 3.0 + half
    starts, ends, info = [], [], []
    for r in range(R):
        n = int(torch.randint(1, 40, ()))
        cuts = torch.sort(torch.rand(n - 1, dtype=torch.float64)).values
        edges = torch.cat([t_in[r : r + 1], t_in[r] + cuts * (t_out[r] - t_in[r]), t_out[r : r + 1]])
        info.append([len(starts), n])
        starts += edges[:-1].tolist()
        ends += edges[1:].tolist()
    ts, te = torch.tensor(starts, dtype=torch.float64), torch.tensor(ends, dtype=torch.float64)
    sig = torch.full_like(ts, sigma)
    out = ops.volume_render(
        sig,
        torch.rand(ts.numel(), 3, dtype=torch.float64),
        ts,
        te,
        torch.tensor(info),
        early_stop_eps=0.0,
        backend="cpu",
    )
    expected = 1 - torch.exp(-sigma * 2 * half)
    assert (out.opacity - expected).abs().max() < 1e-12


def test_volume_render_saves_O_R():
    """The autograd graph holds the inputs plus per-ray tensors only: no per-sample T / w / α."""
    sigmas, rgbs, ts, te, packed = packed_samples(40, max_count=50, empty_rays=False)
    R, S = 40, sigmas.numel()
    assert S > 10 * R
    s, c = sigmas.requires_grad_(True), rgbs.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ops.volume_render(s, c, ts, te, packed, backend="cpu")
        loss = out.rgb.sum() + out.opacity.sum()
    inputs = {t.data_ptr() for t in (s, c, ts, te, packed)}
    extra = [t for t in saved if t.data_ptr() not in inputs]
    extra_elements = sum(t.numel() for t in extra)
    assert extra_elements <= 8 * R, [tuple(t.shape) for t in extra]
    loss.backward()
    assert s.grad is not None and c.grad is not None


def test_volume_render_renderer_sphere_opacity():
    """Through the whole pipeline (grid march + field + render): a constant-density sphere's opacity is
    1 − exp(−σ·chord) up to the step discretisation at the sphere's surface (2 partial steps)."""
    sigma, radius, step = 2.0, 0.6, 4e-3  # 500 steps per chord: under max_samples_per_ray

    class Sphere(torch.nn.Module):
        def forward(self, x, d):
            inside = (x.norm(dim=-1) < radius).to(x.dtype)
            return sigma * inside, torch.ones_like(x) * 0.5

    renderer = fnn.NeRFRenderer(
        Sphere(), aabb=[-1, -1, -1, 1, 1, 1], resolution=8, step_size=step, early_stop_eps=0.0
    ).double()
    R = 20
    o = torch.zeros(R, 3, dtype=torch.float64)
    o[:, 2] = -2.0
    o[:, 0] = torch.linspace(0, 0.9, R, dtype=torch.float64) * radius
    d = torch.tensor([0, 0, 1.0], dtype=torch.float64).expand(R, 3).contiguous()
    out = renderer.eval()(o, d)
    chord = 2 * torch.sqrt(radius**2 - o[:, 0] ** 2)
    expected = 1 - torch.exp(-sigma * chord)
    assert (out.opacity - expected).abs().max() < 2 * sigma * step


# ---- 5. composite_blocks ---------------------------------------------------------------------------


def composite_inputs(K=4, R=23, per_ray=True, dtype=torch.float64):
    colors = torch.rand(K, R, 3, dtype=dtype)
    camera = torch.randn(R, 3, dtype=dtype) if per_ray else torch.randn(3, dtype=dtype)
    centers = torch.randn(K, 3, dtype=dtype) * 2
    vis = torch.rand(K, R, dtype=dtype)
    vis[:, 0] = 0.0  # ray 0: no eligible block -> nearest-block fallback
    if per_ray:
        camera[1] = centers[2]  # ray 1: camera at a block centre
        vis[2, 1] = 1.0
    return colors, camera, centers, vis


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("per_ray", [True, False])
@pytest.mark.parametrize("radius", [None, 2.5])
def test_composite_blocks_parity(backend, device, per_ray, radius, poisoned_outputs):
    dtype = torch.float32 if backend == "triton" else torch.float64
    require_backend("composite_blocks", backend, device, dtype)
    colors, camera, centers, vis = composite_inputs(per_ray=per_ray)
    want_w = ref.composite_blocks_weights(camera, centers, vis, 4.0, 0.05, radius)
    want = ref.composite_blocks(colors, camera, centers, vis, 4.0, 0.05, radius)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    out, w = ops.composite_blocks(
        cast(colors), cast(camera), cast(centers), cast(vis), radius=radius, return_weights=True, backend=backend
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(out, want) < tol
    assert relative_error(w, want_w) < tol
    assert torch.allclose(w.sum(0).double().cpu(), torch.ones(colors.shape[1], dtype=torch.float64), atol=1e-6)
    if per_ray:
        nearest = torch.linalg.vector_norm(camera[0][None] - centers, dim=-1).argmin()
        assert torch.allclose(out[0].double().cpu(), colors[nearest, 0], atol=1e-6)
        assert torch.allclose(out[1].double().cpu(), colors[2, 1], atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_composite_blocks_gradcheck(backend):
    colors, camera, centers, vis = composite_inputs(K=3, R=5)
    colors.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: ops.composite_blocks(c, camera, centers, vis, backend=backend), (colors,))


def test_composite_blocks_idw_formula():
    colors = torch.rand(2, 1, 3, dtype=torch.float64)
    centers = torch.tensor([[1.0, 0, 0], [0, 3.0, 0]], dtype=torch.float64)
    out = ops.composite_blocks(
        colors,
        torch.zeros(3, dtype=torch.float64),
        centers,
        torch.ones(2, 1, dtype=torch.float64),
        power=2.0,
        backend="cpu",
    )
    w = torch.tensor([1.0, 1 / 9], dtype=torch.float64)
    w = w / w.sum()
    assert torch.allclose(out[0], (w[:, None] * colors[:, 0]).sum(0), atol=1e-14)


# ---- registration: opcheck and torch.compile --------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    o, d = random_rays(9)
    boxes = torch.tensor([[-1.0, -1, -1, 1, 1, 1]], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastcore_ai.nerf_ray_aabb_intersect.default, (o, d, boxes, backend))
    density = torch.rand(64, dtype=torch.float64) * 0.02
    idx = torch.randint(0, 64, (30,))
    torch.library.opcheck(
        torch.ops.fastcore_ai.nerf_occupancy_grid_update.default,
        (density, idx, torch.rand(30, dtype=torch.float64) * 0.02, 0.95, 0.01, backend),
    )
    grid = random_grid(res=4)
    torch.library.opcheck(
        torch.ops.fastcore_ai.nerf_ray_march.default,
        (o, d, grid.aabb, grid.bitfield, 4, 1, 0.0, math.inf, 0.1, 0.0, 64, None, backend),
        test_utils=("test_schema", "test_faketensor"),
    )
    sigmas, rgbs, ts, te, packed = packed_samples(7, max_count=4)
    for need_weights in (False, True):
        torch.library.opcheck(
            torch.ops.fastcore_ai.nerf_volume_render.default,
            (sigmas.requires_grad_(True), rgbs.requires_grad_(True), ts, te, packed, 1e-4, need_weights, backend),
        )
    R = 7
    color, opacity, depth, _ = torch.ops.fastcore_ai.nerf_volume_render(
        sigmas.detach(), rgbs.detach(), ts, te, packed, 1e-4, False, backend
    )
    torch.library.opcheck(
        torch.ops.fastcore_ai.nerf_volume_render_backward.default,
        (
            torch.randn(R, 3, dtype=torch.float64),
            torch.randn(R, dtype=torch.float64),
            torch.randn(R, dtype=torch.float64),
            None,
            sigmas.detach(),
            rgbs.detach(),
            ts,
            te,
            packed,
            color,
            opacity,
            depth,
            1e-4,
            backend,
        ),
    )
    colors, camera, centers, vis = composite_inputs(K=3, R=6)
    torch.library.opcheck(
        torch.ops.fastcore_ai.nerf_composite_blocks.default,
        (colors.requires_grad_(True), camera, centers, vis, 4.0, 0.05, math.inf, backend),
    )


def test_torch_compile_fullgraph_render_cpu():
    sigmas, rgbs, ts, te, packed = packed_samples(16, max_count=6)

    def step(s, c):
        out = ops.volume_render(torch.relu(s), torch.sigmoid(c), ts, te, packed, backend="cpu")
        return out.rgb.square().sum() + out.depth.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s, c = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
    loss = compiled(s, c)
    loss.backward()
    s2, c2 = sigmas.clone().requires_grad_(), rgbs.clone().requires_grad_()
    eager = step(s2, c2)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(s.grad, s2.grad)
    torch.testing.assert_close(c.grad, c2.grad)


def test_torch_compile_fullgraph_march_and_composite_cpu():
    grid = random_grid(res=4)
    o, d = random_rays(12)

    def march(o, d):
        samples = ops.ray_march(o, d, grid, step_size=0.1, backend="cpu")
        return samples.t_ends - samples.t_starts, samples.packed_info

    compiled = torch.compile(march, fullgraph=True, backend="aot_eager")
    got, want = compiled(o, d), march(o, d)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    colors, camera, centers, vis = composite_inputs(K=3, R=6)

    def comp(c):
        return ops.composite_blocks(c * 2, camera, centers, vis, backend="cpu").sum()

    c1 = colors.clone().requires_grad_()
    torch.compile(comp, fullgraph=True, backend="aot_eager")(c1).backward()
    c2 = colors.clone().requires_grad_()
    comp(c2).backward()
    torch.testing.assert_close(c1.grad, c2.grad)


# ---- error paths and empty batches ------------------------------------------------------------------


def test_errors_name_op_and_argument():
    sigmas, rgbs, ts, te, packed = packed_samples(5, max_count=4, empty_rays=False)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.volume_render: rgbs must have shape"):
        ops.volume_render(sigmas, rgbs[:-1], ts, te, packed)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.volume_render: t_ends must have S"):
        ops.volume_render(sigmas, rgbs, ts, te[:-1], packed)
    bad = packed.clone()
    bad[[0, 1]] = bad[[1, 0]]  # runs out of order
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.volume_render: packed_info must be monotonic"):
        ops.volume_render(sigmas, rgbs, ts, te, bad, backend="cpu")
    bad = packed.clone()
    bad[-1, 1] += 5
    with pytest.raises(ValueError, match=r"volume_render: packed_info rows .* start \+ count <= S"):
        ops.volume_render(sigmas, rgbs, ts, te, bad, backend="cpu")
    with pytest.raises(TypeError, match=r"volume_render: packed_info must be int64"):
        ops.volume_render(sigmas, rgbs, ts, te, packed.int())
    o, d = random_rays(6)
    grid = random_grid(res=4)
    d_nan = d.clone()
    d_nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.ray_march: rays_o and rays_d must be finite"):
        ops.ray_march(o, d_nan, grid, backend="cpu")
    d_zero = d.clone()
    d_zero[3] = 0.0
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.ray_march: rays_d must have no zero-length direction"):
        ops.ray_march(o, d_zero, grid, backend="cpu")
    with pytest.raises(ValueError, match=r"ray_aabb_intersect: rays_d must have no zero-length"):
        ops.ray_aabb_intersect(o, d_zero, grid.aabb[None])
    with pytest.raises(ValueError, match=r"ray_aabb_intersect: rays_d must have rays_o's shape"):
        ops.ray_aabb_intersect(o, d[:-1], grid.aabb[None])
    with pytest.raises(ValueError, match=r"ray_march: near and far must satisfy"):
        ops.ray_march(o, d, grid, near=2.0, far=1.0)
    with pytest.raises(TypeError, match=r"ray_march: grid must be an OccupancyGrid"):
        ops.ray_march(o, d, object())
    with pytest.raises(ValueError, match=r"occupancy_grid_update: cell_indices must lie in"):
        ops.occupancy_grid_update(torch.zeros(8), torch.tensor([9]), torch.ones(1), backend="cpu")
    colors, camera, centers, vis = composite_inputs()
    with pytest.raises(ValueError, match=r"composite_blocks: visibility must have shape \[K, R\]"):
        ops.composite_blocks(colors, camera, centers, vis[:, :-1])
    with pytest.raises(RuntimeError, match=r"ray_march: backend 'triton'"):
        ops.ray_march(o, d, grid, backend="triton")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_batches(backend):
    e3 = torch.zeros(0, 3, dtype=torch.float64)
    near, far, hit = ops.ray_aabb_intersect(e3, e3, torch.zeros(2, 6, dtype=torch.float64), backend=backend)
    assert near.shape == (0, 2) and hit.shape == (0, 2)
    samples = ops.ray_march(e3, e3, random_grid(res=4), backend=backend)
    assert samples.t_starts.shape == (0,) and samples.packed_info.shape == (0, 2)
    s = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    out = ops.volume_render(s, c, s.detach(), s.detach(), torch.zeros(0, 2, dtype=torch.int64), backend=backend)
    assert out.rgb.shape == (0, 3)
    (out.rgb.sum() + out.opacity.sum()).backward()
    assert s.grad.shape == (0,)
    # rays with no samples at all: transparent, zero
    out = ops.volume_render(
        s.detach(), c.detach(), s.detach(), s.detach(), torch.zeros(3, 2, dtype=torch.int64), backend=backend
    )
    assert torch.equal(out.opacity, torch.zeros(3, dtype=torch.float64))
    out = ops.composite_blocks(
        torch.zeros(2, 0, 3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.float64),
        torch.zeros(2, 0, dtype=torch.float64),
        backend=backend,
    )
    assert out.shape == (0, 3)
    new, bits = ops.occupancy_grid_update(
        torch.zeros(16, dtype=torch.float64),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, dtype=torch.float64),
        backend=backend,
    )
    assert torch.equal(new, torch.zeros(16, dtype=torch.float64)) and bits.shape == (2,)


# ---- rendering in rounds (the helpers of NeRFRenderer.render_inference) ------------------------------

ROUND_BACKENDS = [p for p in BACKEND_DEVICES if "triton" not in p.id]


def march_in_rounds(o, d, grid, max_steps, u=None, **kwargs):
    """Every ray marched in rounds of max_steps through ops.nerf.march_round -> per ray (t_starts, t_ends,
    positions, directions), and the number of rounds."""
    R = o.shape[0]
    rows = torch.arange(R, device=o.device)
    k = torch.zeros(R, dtype=torch.int64, device=o.device)
    t = o.new_zeros(R)
    per_ray = [[] for _ in range(R)]
    rounds = 0
    while rows.numel():
        m = ops.nerf.march_round(
            o,
            d,
            grid,
            rows,
            k,
            t,
            torch.full_like(k, max_steps),
            kwargs["near"],
            kwargs["far"],
            kwargs["step_size"],
            kwargs["cone_angle"],
            u,
        )
        assert (m.packed_info[:, 1] <= max_steps).all()
        for i, r in enumerate(rows.tolist()):
            start, count = m.packed_info[i].tolist()
            assert (m.row[start : start + count] == i).all()
            per_ray[r].append(
                (
                    m.t_starts[start : start + count],
                    m.t_ends[start : start + count],
                    m.positions[start : start + count],
                    m.directions[start : start + count],
                )
            )
        going = torch.isfinite(m.next_t)
        rows, k, t = rows[going], m.next_k[going], m.next_t[going]
        rounds += 1
    return [[torch.cat(parts) for parts in zip(*pieces)] if pieces else None for pieces in per_ray], rounds


@pytest.mark.parametrize("backend,device", ROUND_BACKENDS)
@pytest.mark.parametrize("case", ["uniform", "cone", "levels2", "jitter_near_far", "float32"])
def test_march_rounds_emit_ray_march_samples(backend, device, case):
    """Rounds of 3 steps, resumed from (next_k, next_t), give exactly one-shot ray_march's samples (same
    bits), their midpoints as positions and the ray's direction."""
    require_backend("ray_march", backend, device, torch.float64)
    g = torch.Generator().manual_seed(4)
    levels = 2 if case == "levels2" else 1
    grid = random_grid(levels=levels, generator=g)
    dtype = torch.float32 if case == "float32" else torch.float64
    o, d = random_rays(30, generator=g)
    o = (o * (2.5 if levels == 2 else 1.0)).to(device, dtype)
    d = d.to(device, dtype)
    grid.bitfield = grid.bitfield.to(device)
    kwargs = march_args(cone_angle=0.2 if case == "cone" else 0.0)
    if case == "jitter_near_far":
        kwargs.update(near=0.3, far=2.0)
    u = torch.rand(30, dtype=dtype, generator=g).to(device) if case == "jitter_near_far" else None
    with fastcore_ai.use_backend(backend):
        want = (
            ops.ray_march(
                o,
                d,
                grid,
                near=kwargs["near"],
                far=kwargs["far"],
                step_size=kwargs["step_size"],
                cone_angle=kwargs["cone_angle"],
            )
            if u is None
            else None
        )
        if u is not None:  # ray_march draws u itself: compare with the op under the same u
            want = ops.PackedSamples(
                *torch.ops.fastcore_ai.nerf_ray_march(
                    o,
                    d,
                    grid.aabb.to(device, dtype),
                    grid.bitfield,
                    grid.resolution,
                    levels,
                    kwargs["near"],
                    kwargs["far"],
                    kwargs["step_size"],
                    kwargs["cone_angle"],
                    1024,
                    u,
                    backend,
                )
            )
        got, rounds = march_in_rounds(o, d, grid, 3, u, **kwargs)
    assert want.t_starts.numel() > 25 and rounds > 3, "the case must need several rounds"
    for r in range(30):
        start, count = want.packed_info[r].tolist()
        if got[r] is None:
            assert count == 0
            continue
        t_starts, t_ends, positions, directions = got[r]
        assert torch.equal(t_starts, want.t_starts[start : start + count])
        assert torch.equal(t_ends, want.t_ends[start : start + count])
        mid = (0.5 * (t_starts.double() + t_ends.double()))[:, None]
        expected = o[r].double() + mid * d[r].double()
        assert torch.allclose(positions.double(), expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert torch.equal(directions, d[r].expand_as(directions))


@pytest.mark.parametrize("backend,device", ROUND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_render_rounds_equal_volume_render(backend, device, dtype):
    """Each ray's samples cut into segments and rendered round by round behind the optical depth τ they hold
    (added to the rows out_rows) equal one volume_render of the whole ray, early stop included."""
    require_backend("volume_render", backend, device, dtype)
    torch.manual_seed(5)
    R = 12
    sigmas, rgbs, t_starts, t_ends, packed = packed_samples(R, max_count=12, dtype=torch.float64)
    sigmas[: sigmas.numel() // 3] *= 8  # some rays reach the early stop
    sigmas, rgbs, t_starts, t_ends, packed = (
        x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in (sigmas, rgbs, t_starts, t_ends, packed)
    )
    eps = 1e-3
    want = ops.volume_render(sigmas, rgbs, t_starts, t_ends, packed, early_stop_eps=eps, backend=backend)
    assert (want.opacity > 1 - eps).any(), "some ray must stop early"
    color, opacity, depth = (
        torch.full_like(want.rgb, 0.0),
        torch.zeros_like(want.opacity),
        torch.zeros_like(want.depth),
    )
    order = torch.randperm(R)  # the rows land in a shuffled output order
    tau = torch.zeros(R, dtype=dtype, device=device)
    taken = torch.zeros(R, dtype=torch.int64)
    with fastcore_ai.use_backend(backend):
        for piece in (2, 3, 100):
            counts = torch.minimum(packed[:, 1].cpu() - taken, torch.tensor(piece))
            starts = packed[:, 0].cpu() + taken
            index = torch.cat([torch.arange(s, s + c) for s, c in zip(starts.tolist(), counts.tolist())])
            seg_starts = torch.cumsum(counts, 0) - counts
            seg = torch.stack([seg_starts, counts], 1).to(device)
            index = index.to(device)
            ops.nerf.render_round(
                sigmas[index],
                rgbs[index],
                t_starts[index],
                t_ends[index],
                seg,
                eps,
                tau,
                order.to(device),
                color,
                opacity,
                depth,
            )
            taken += counts
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(color[order.to(device)], want.rgb) < tol
    assert relative_error(opacity[order.to(device)], want.opacity) < tol
    assert relative_error(depth[order.to(device)], want.depth) < tol
    stopped = want.opacity > 1 - eps
    assert (torch.exp(-tau)[stopped] < eps).all()


# ---- layers ---------------------------------------------------------------------------------------


class TinyField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, x, d):
        h = self.net(torch.cat([x, d], -1))
        return torch.nn.functional.softplus(h[:, 0]) * 5, torch.sigmoid(h[:, 1:])


def test_occupancy_grid_update_warns_once_when_it_empties_the_grid():
    """A density too small for the threshold empties every cell, after which ray_march returns nothing:
    the update says so (once, not again while the grid stays empty), instead of a silent black render."""
    import warnings

    grid = fnn.OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, levels=1, warmup_steps=10)
    with pytest.warns(RuntimeWarning, match=r"left every cell empty .*largest sampled sigma\*step_size was 0"):
        grid.update(lambda x: torch.zeros(x.shape[0]), step=0)
    assert not grid.bitfield.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grid.update(lambda x: torch.zeros(x.shape[0]), step=1)  # still empty: no repeat
        grid.update(lambda x: torch.full((x.shape[0],), 100.0), step=2)  # occupied again: nothing to say
    assert grid.bitfield.any()


def test_occupancy_grid_update_and_state_dict():
    grid = fnn.OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, levels=2)
    assert grid.occupied.all()

    def ball(x):
        return (x.norm(dim=-1) < 0.5).float() * 100.0

    grid.update(ball, step=0)
    occ = grid.occupied
    assert occ[0].any() and not occ[0].all()
    centres = (torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1) + 0.5) / 8 * 2 - 1
    assert not occ[0][centres.norm(dim=-1) > 0.5 + 0.25 * math.sqrt(3)].any()  # far outside the ball: empty
    assert occ[0][centres.norm(dim=-1) < 0.5 - 0.25 * math.sqrt(3)].all()
    grid.update(ball, step=1000)  # the quarter + occupied rule after warm-up
    state = grid.state_dict()
    other = fnn.OccupancyGrid([-1, -1, -1, 1, 1, 1], resolution=8, levels=2)
    other.load_state_dict(state)
    assert torch.equal(other.bitfield, grid.bitfield) and torch.equal(other.density, grid.density)


def test_renderer_training_forward_and_inference():
    torch.manual_seed(0)
    field = TinyField().double()
    renderer = fnn.NeRFRenderer(field, aabb=[-1, -1, -1, 1, 1, 1], resolution=8, step_size=0.02).double()
    o, d = random_rays(32)
    out = renderer.train()(o, d)
    out.rgb.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())
    renderer.eval()
    full = renderer(o, d)
    inf = renderer.render_inference(o, d, chunk=7, samples_per_round=40, max_steps_per_round=5)
    # rounds of at most 5 samples resume the same lattice and continue each ray's optical depth, so the
    # image is forward's up to summation order
    assert (inf.rgb - full.rgb).abs().max() < 1e-12
    assert (inf.opacity - full.opacity).abs().max() < 1e-12
    assert (inf.depth - full.depth).abs().max() < 1e-12


@pytest.mark.parametrize("training", [False, True])
def test_renderer_forward_equals_one_shot_composition(training):
    """forward (rounds without grad to find each ray's early stop, then the field with autograd on the samples
    before it) gives the value and gradients of the plain composition ray_march -> field on every sample ->
    volume_render, and the no-grad forward gives the same image; in training mode with the same jitter."""
    torch.manual_seed(1)
    field = TinyField().double()
    with torch.no_grad():
        field.net[2].bias[0] = 3.0  # dense enough that rays stop early
    renderer = (
        fnn.NeRFRenderer(field, aabb=[-1, -1, -1, 1, 1, 1], resolution=8, step_size=0.02, early_stop_eps=1e-3)
        .double()
        .train(training)
    )
    g = torch.Generator().manual_seed(2)
    o, d = random_rays(40, generator=g)
    torch.manual_seed(3)
    out = renderer(o, d)
    torch.manual_seed(3)
    u = torch.rand(40, dtype=torch.float64) if training else None
    samples = ops.PackedSamples(
        *torch.ops.fastcore_ai.nerf_ray_march(
            o, d, renderer.grid.aabb.double(), renderer.grid.bitfield, 8, 1, 0.0, math.inf, 0.02, 0.0, 1024, u, "cpu"
        )
    )
    sigma, rgb = renderer._field(o, d, samples.ray_indices, samples.t_starts, samples.t_ends)
    want = ops.volume_render(sigma, rgb, samples.t_starts, samples.t_ends, samples.packed_info, early_stop_eps=1e-3)
    assert (want.opacity > 1 - 1e-3).sum() > 5, "rays must stop early"
    for a, b in zip(out[:3], want[:3]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    (out.rgb.sum() + out.depth.sum()).backward()
    got_grads = [p.grad.clone() for p in field.parameters()]
    field.zero_grad()
    (want.rgb.sum() + want.depth.sum()).backward()
    for a, b in zip(got_grads, field.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.manual_seed(3)
        image = renderer(o, d)
    assert image.rgb.grad_fn is None and torch.allclose(image.rgb, out.rgb, rtol=0, atol=1e-12)


def test_renderer_field_batches():
    """The field runs on batches of field_batch samples: the same image and gradients as one batch."""
    torch.manual_seed(0)
    field = TinyField().double()
    o, d = random_rays(24)
    outs = []
    for batch in (None, 7, 1 << 30):
        renderer = (
            fnn.NeRFRenderer(field, aabb=[-1, -1, -1, 1, 1, 1], resolution=8, step_size=0.02, field_batch=batch)
            .double()
            .eval()
        )
        field.zero_grad()
        out = renderer(o, d)
        out.rgb.sum().backward()
        outs.append((renderer.render_inference(o, d).rgb, out.rgb.detach(), field.net[0].weight.grad.clone()))
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="field_batch"):
        fnn.NeRFRenderer(field, aabb=[-1, -1, -1, 1, 1, 1], field_batch=0)


def test_block_nerf_composites_eligible_blocks():
    torch.manual_seed(0)
    blocks = [
        fnn.NeRFRenderer(TinyField().double(), aabb=[-1, -1, -1, 1, 1, 1], resolution=4, step_size=0.05).double()
        for _ in range(3)
    ]
    centers = torch.tensor([[0.0, 0, 0], [5.0, 0, 0], [50.0, 0, 0]])
    model = fnn.BlockNeRF(blocks, centers, radius=10.0).double()
    o, d = random_rays(8)
    out = model(o, d)
    colors = torch.stack([b.render_inference(o, d).rgb for b in blocks])
    want = ref.composite_blocks(colors, o, centers.double(), torch.ones(3, 8, dtype=torch.float64), 4.0, 0.05, 10.0)
    assert torch.allclose(out, want, atol=1e-12)

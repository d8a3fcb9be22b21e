"""The nerf CUDA kernels (csrc/kernels/nerf/nerf.cu), source unchanged, run on the CPU CUDA emulator of
tests/test_cuda_build.py: every launcher against the CPU backend on the same float32 inputs. Both run the
same FC_HOST_DEVICE bodies compiled by the host compiler, so the outputs must agree bit for bit (volume
rendering: to float rounding, see _same_render); this checks
the launch geometry, the grid-stride loops, the two-pass march with the scan between the passes, the
float atomic max of the grid update and the empty-size guards, without a GPU."""

import ctypes
import math

import pytest
import torch

from fastcore_ai import ops
from test_cuda_build import build_emulated_kernels


def _same_render(got, want):
    """The CUDA kernels run nerf.h's scalar per-ray body (expf / expm1f); the float32 CPU kernel walks 8 rays
    per vector lane group with its own exp polynomials (nerf_cpu.cpp), so the two agree to float rounding, not
    bitwise — and exactly on which samples the early stop zeroes."""
    assert got.shape == want.shape
    assert torch.equal(got == 0, want == 0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


EXTRA_RUNTIME = r"""
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline double __longlong_as_double(long long v) { double f; std::memcpy(&f, &v, 8); return f; }
inline long long __double_as_longlong(double f) { long long v; std::memcpy(&v, &f, 8); return v; }
inline int atomicCAS(int* p, int compare, int value) { int old = *p; if (old == compare) *p = value; return old; }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long value) {
  unsigned long long old = *p; if (old == compare) *p = value; return old;
}
"""

DRIVER = r"""
#include "nerf_emulated.inc"
using namespace fastcore::nerf;
extern "C" {
int emu_aabb(const float* o, const float* d, const float* boxes, int64_t R, int64_t A, float* near, float* far,
             bool* hit) {
  AabbParams<float> p;
  p.rays_o = o; p.rays_d = d; p.aabbs = boxes; p.num_rays = R; p.num_boxes = A; p.t_near = near; p.t_far = far;
  p.hit = hit;
  return ray_aabb_cuda<float>(p, nullptr);
}
int emu_grid(const float* density, const int64_t* idx, const float* values, int64_t N, int64_t M, float decay,
             float threshold, float* sampled, float* out, uint8_t* bits) {
  GridUpdateParams<float> p;
  p.density = density; p.cell_indices = idx; p.values = values; p.num_cells = N; p.num_samples = M; p.decay = decay;
  p.sampled_max = sampled; p.out = out; p.threshold = threshold; p.bitfield = bits;
  int e = grid_update_cuda<float>(p, nullptr);
  return e ? e : grid_pack_cuda<float>(p, nullptr);
}
int emu_march(const float* o, const float* d, const float* u, int64_t R, const uint8_t* bits, int64_t res, int levels,
              const float* boxes, float step, float cone, int64_t max_samples, int64_t* counts, int64_t* offsets,
              int pass, int64_t* ray_indices, float* ts, float* te) {
  MarchParams<float> p;
  p.rays_o = o; p.rays_d = d; p.jitter_u = u; p.num_rays = R; p.bitfield = bits; p.resolution = res;
  p.levels = levels;
  for (int l = 0; l < levels; ++l) for (int a = 0; a < 6; ++a) p.boxes[l][a] = boxes[6 * l + a];
  p.near_plane = 0.0f; p.far_plane = INFINITY; p.step_size = step; p.cone_angle = cone; p.max_samples = max_samples;
  p.counts = counts; p.offsets = offsets; p.ray_indices = ray_indices; p.t_starts = ts; p.t_ends = te;
  return pass == 0 ? march_count_cuda<float>(p, nullptr) : march_fill_cuda<float>(p, nullptr);
}
int emu_march_round(const float* o, const float* d, int64_t n, const uint8_t* bits, int64_t res, const float* boxes,
                    float step, float cone, const int64_t* rows, const int64_t* start_k, const float* start_t,
                    const int64_t* max_samples, int64_t* counts, int64_t* next_k, float* next_t, int64_t* offsets,
                    int pass, int64_t* row_of, float* ts, float* te, float* positions, float* directions) {
  MarchParams<float> p;
  p.rays_o = o; p.rays_d = d; p.num_rays = n; p.bitfield = bits; p.resolution = res; p.levels = 1;
  for (int a = 0; a < 6; ++a) p.boxes[0][a] = boxes[a];
  p.near_plane = 0.0f; p.far_plane = INFINITY; p.step_size = step; p.cone_angle = cone;
  p.rows = rows; p.start_k = start_k; p.start_t = start_t; p.row_max_samples = max_samples; p.counts = counts;
  if (pass == 0) {
    p.next_k = next_k; p.next_t = next_t;
    return march_count_cuda<float>(p, nullptr);
  }
  p.offsets = offsets; p.ray_indices = row_of; p.t_starts = ts; p.t_ends = te; p.positions = positions;
  p.directions = directions;
  return march_fill_cuda<float>(p, nullptr);
}
int emu_render_round(const float* sig, const float* rgb, const float* ts, const float* te, const int64_t* info,
                     int64_t R, int64_t S, float eps, float* tau, const int64_t* out_rows, float* color, float* opacity,
                     float* depth) {
  RenderParams<float> p;
  p.sigmas = sig; p.rgbs = rgb; p.t_starts = ts; p.t_ends = te; p.packed_info = info; p.num_rays = R;
  p.num_samples = S; p.early_stop_eps = eps; p.color = color; p.opacity = opacity; p.depth = depth;
  p.tau = tau; p.out_rows = out_rows;
  return render_forward_cuda<float>(p, nullptr);
}
int emu_render(const float* sig, const float* rgb, const float* ts, const float* te, const int64_t* info, int64_t R,
               int64_t S, float eps, float* color, float* opacity, float* depth, float* weights, const float* gc,
               const float* ga, const float* gd, const float* gw, float* gs, float* grgb) {
  RenderParams<float> p;
  p.sigmas = sig; p.rgbs = rgb; p.t_starts = ts; p.t_ends = te; p.packed_info = info; p.num_rays = R;
  p.num_samples = S; p.early_stop_eps = eps; p.color = color; p.opacity = opacity; p.depth = depth;
  p.weights = weights;
  if (gc == nullptr) return render_forward_cuda<float>(p, nullptr);
  p.grad_color = gc; p.grad_opacity = ga; p.grad_depth = gd; p.grad_weights = gw; p.grad_sigmas = gs;
  p.grad_rgbs = grgb;
  return render_backward_cuda<float>(p, nullptr);
}
int emu_composite(const float* colors, const float* camera, int per_ray, const float* centers, const float* vis,
                  int64_t K, int64_t R, float power, float threshold, float radius, float* out, float* w) {
  CompositeParams<float> p;
  p.colors = colors; p.camera = camera; p.camera_per_ray = per_ray != 0; p.centers = centers; p.visibility = vis;
  p.num_blocks = K; p.num_rays = R; p.power = power; p.threshold = threshold; p.radius = radius; p.out = out;
  p.weights = w;
  return composite_cuda<float>(p, nullptr);
}
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_emulated_kernels(
        tmp_path_factory.mktemp("nerf_cuda_emulator"), "nerf/nerf.cu", DRIVER, "nerf", EXTRA_RUNTIME
    )


def P(t):  # noqa: N802
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


I64, F32 = ctypes.c_int64, ctypes.c_float


def rays(R, seed):
    g = torch.Generator().manual_seed(seed)
    o = (torch.rand(R, 3, generator=g) * 3 - 1.5).contiguous()
    d = torch.randn(R, 3, generator=g)
    d[0, 0] = 0.0
    return o, d.contiguous()


def test_aabb_on_emulator(lib):
    o, d = rays(300, 1)  # 300 × 3 pairs: several blocks of 128 threads
    boxes = torch.tensor([[-1.0, -1, -1, 1, 1, 1], [0, 0, 0, 0.5, 2, 0.7], [1.0, 1, 1, 0, 0, 0]])
    near, far = torch.full((300, 3), float("nan")), torch.full((300, 3), float("nan"))
    hit = torch.zeros(300, 3, dtype=torch.bool)
    assert lib.emu_aabb(P(o), P(d), P(boxes), I64(300), I64(3), P(near), P(far), P(hit)) == 0
    want = ops.ray_aabb_intersect(o, d, boxes, backend="cpu")
    assert torch.equal(hit, want.hit) and torch.equal(near, want.t_near) and torch.equal(far, want.t_far)


def test_grid_update_on_emulator(lib):
    N = 1001
    g = torch.Generator().manual_seed(2)
    density = torch.rand(N, generator=g) * 0.02
    density[:7] = -1
    idx = torch.cat([torch.randint(0, N, (900,), generator=g), torch.tensor([3, 500, 500])])
    values = torch.rand(idx.numel(), generator=g) * 0.03
    want_density, want_bits = ops.occupancy_grid_update(density, idx, values, 0.95, 0.01, backend="cpu")
    live = want_density[want_density >= 0]
    threshold = min(0.01, float(live.double().mean()))
    sampled, out = torch.full((N,), -math.inf), torch.full((N,), float("nan"))
    bits = torch.full(((N + 7) // 8,), 0xEE, dtype=torch.uint8)
    assert (
        lib.emu_grid(
            P(density),
            P(idx),
            P(values),
            I64(N),
            I64(idx.numel()),
            F32(0.95),
            F32(threshold),
            P(sampled),
            P(out),
            P(bits),
        )
        == 0
    )
    assert torch.equal(out, want_density) and torch.equal(bits, want_bits)


@pytest.mark.parametrize("cone,jitter", [(0.0, False), (0.15, True)])
def test_march_on_emulator(lib, cone, jitter):
    from fastcore_ai.reference.nerf import pack_bitfield

    R, res = 200, 8
    o, d = rays(R, 3)
    g = torch.Generator().manual_seed(4)
    occupied = torch.rand(2 * res**3, generator=g) < 0.3
    bits = pack_bitfield(occupied)
    aabb = torch.tensor([-1.0, -1, -1, 1, 1, 1])
    boxes = torch.tensor([[-1.0, -1, -1, 1, 1, 1], [-2.0, -2, -2, 2, 2, 2]])
    u = torch.rand(R, generator=g) if jitter else None

    class Grid:
        pass

    grid = Grid()
    grid.aabb, grid.bitfield, grid.resolution, grid.levels = aabb, bits, res, 2
    want = torch.ops.fastcore_ai.nerf_ray_march(o, d, aabb, bits, res, 2, 0.0, math.inf, 0.02, cone, 1024, u, "cpu")
    counts = torch.full((R,), -1, dtype=torch.int64)
    assert (
        lib.emu_march(
            P(o),
            P(d),
            P(u),
            I64(R),
            P(bits),
            I64(res),
            2,
            P(boxes),
            F32(0.02),
            F32(cone),
            I64(1024),
            P(counts),
            None,
            0,
            None,
            None,
            None,
        )
        == 0
    )
    assert torch.equal(counts, want[3][:, 1])
    offsets = (torch.cumsum(counts, 0) - counts).contiguous()
    S = int(counts.sum())
    ray_indices = torch.full((S,), -5, dtype=torch.int64)
    ts, te = torch.full((S,), float("nan")), torch.full((S,), float("nan"))
    assert (
        lib.emu_march(
            P(o),
            P(d),
            P(u),
            I64(R),
            P(bits),
            I64(res),
            2,
            P(boxes),
            F32(0.02),
            F32(cone),
            I64(1024),
            P(counts),
            P(offsets),
            1,
            P(ray_indices),
            P(ts),
            P(te),
        )
        == 0
    )
    assert S > 100
    assert torch.equal(ray_indices, want[0]) and torch.equal(ts, want[1]) and torch.equal(te, want[2])


@pytest.mark.parametrize("with_weights", [False, True])
def test_render_on_emulator(lib, with_weights):
    g = torch.Generator().manual_seed(5)
    R = 150
    counts = torch.randint(0, 12, (R,), generator=g)
    S = int(counts.sum())
    info = torch.stack([torch.cumsum(counts, 0) - counts, counts], 1).contiguous()
    sig = torch.rand(S, generator=g) * 8
    rgb = torch.rand(S, 3, generator=g)
    ts = torch.rand(S, generator=g)
    te = ts + torch.rand(S, generator=g) * 0.3
    want = ops.volume_render(sig, rgb, ts, te, info, early_stop_eps=1e-3, return_weights=True, backend="cpu")
    color, opacity, depth = (
        torch.full((R, 3), float("nan")),
        torch.full((R,), float("nan")),
        torch.full((R,), float("nan")),
    )
    weights = torch.full((S,), float("nan"))
    assert (
        lib.emu_render(
            P(sig),
            P(rgb),
            P(ts),
            P(te),
            P(info),
            I64(R),
            I64(S),
            F32(1e-3),
            P(color),
            P(opacity),
            P(depth),
            P(weights),
            None,
            None,
            None,
            None,
            None,
            None,
        )
        == 0
    )
    for got, expected in ((color, want.rgb), (opacity, want.opacity), (depth, want.depth), (weights, want.weights)):
        _same_render(got, expected)
    gc, ga, gd, gw = (
        torch.randn(R, 3, generator=g),
        torch.randn(R, generator=g),
        torch.randn(R, generator=g),
        torch.randn(S, generator=g),
    )
    want_s, want_c = torch.ops.fastcore_ai.nerf_volume_render_backward(
        gc, ga, gd, gw if with_weights else None, sig, rgb, ts, te, info, color, opacity, depth, 1e-3, "cpu"
    )
    gs, grgb = torch.full((S,), float("nan")), torch.full((S, 3), float("nan"))
    assert (
        lib.emu_render(
            P(sig),
            P(rgb),
            P(ts),
            P(te),
            P(info),
            I64(R),
            I64(S),
            F32(1e-3),
            P(color),
            P(opacity),
            P(depth),
            None,
            P(gc),
            P(ga),
            P(gd),
            P(gw) if with_weights else None,
            P(gs),
            P(grgb),
        )
        == 0
    )
    _same_render(gs, want_s)
    _same_render(grgb, want_c)


def test_composite_on_emulator(lib):
    g = torch.Generator().manual_seed(6)
    K, R = 4, 140
    colors = torch.rand(K, R, 3, generator=g)
    camera = torch.randn(R, 3, generator=g)
    centers = torch.randn(K, 3, generator=g) * 2
    vis = torch.rand(K, R, generator=g)
    vis[:, 0] = 0
    want_out, want_w = ops.composite_blocks(
        colors, camera, centers, vis, radius=3.0, return_weights=True, backend="cpu"
    )
    out, w = torch.full((R, 3), float("nan")), torch.full((K, R), float("nan"))
    assert (
        lib.emu_composite(
            P(colors), P(camera), 1, P(centers), P(vis), I64(K), I64(R), F32(4.0), F32(0.05), F32(3.0), P(out), P(w)
        )
        == 0
    )
    assert torch.equal(out, want_out) and torch.equal(w, want_w)


@pytest.mark.parametrize("cone", [0.0, 0.15])
def test_march_round_on_emulator(lib, cone):
    """A resumable round (rows, start lattice step, per-row caps; saved stops, positions, directions)."""
    from fastcore_ai.reference.nerf import pack_bitfield

    R, res = 160, 8
    o, d = rays(R, 7)
    g = torch.Generator().manual_seed(8)
    bits = pack_bitfield(torch.rand(res**3, generator=g) < 0.3)
    aabb = torch.tensor([-1.0, -1, -1, 1, 1, 1])
    rows = torch.randperm(R, generator=g)[:130].contiguous()
    n = rows.numel()
    first = torch.ops.fastcore_ai.nerf_ray_march(o, d, aabb, bits, res, 1, 0.0, math.inf, 0.02, cone, 2, None, "cpu")
    # resume every row where a first round of 2 samples left it
    start = _native_round(
        o,
        d,
        aabb,
        bits,
        res,
        cone,
        torch.arange(R),
        torch.zeros(R, dtype=torch.int64),
        torch.zeros(R),
        torch.full((R,), 2, dtype=torch.int64),
    )
    assert torch.equal(start[3][:, 1], first[3][:, 1])
    start_k, start_t = start[4][rows].contiguous(), start[5][rows].contiguous()
    start_t = torch.where(torch.isfinite(start_t), start_t, torch.zeros_like(start_t)).contiguous()
    caps = torch.randint(0, 6, (n,), generator=g)
    want = _native_round(o, d, aabb, bits, res, cone, rows, start_k, start_t, caps)
    counts, next_k, next_t = (
        torch.full((n,), -1, dtype=torch.int64),
        torch.full((n,), -1, dtype=torch.int64),
        torch.full((n,), float("nan")),
    )
    assert (
        lib.emu_march_round(
            P(o),
            P(d),
            I64(n),
            P(bits),
            I64(res),
            P(aabb),
            F32(0.02),
            F32(cone),
            P(rows),
            P(start_k),
            P(start_t),
            P(caps),
            P(counts),
            P(next_k),
            P(next_t),
            None,
            0,
            None,
            None,
            None,
            None,
            None,
        )
        == 0
    )
    assert torch.equal(counts, want[3][:, 1]) and torch.equal(next_k, want[4]) and torch.equal(next_t, want[5])
    S = int(counts.sum())
    assert S > 50
    offsets = (torch.cumsum(counts, 0) - counts).contiguous()
    row_of = torch.full((S,), -5, dtype=torch.int64)
    ts, te = torch.full((S,), float("nan")), torch.full((S,), float("nan"))
    positions, directions = torch.full((S, 3), float("nan")), torch.full((S, 3), float("nan"))
    assert (
        lib.emu_march_round(
            P(o),
            P(d),
            I64(n),
            P(bits),
            I64(res),
            P(aabb),
            F32(0.02),
            F32(cone),
            P(rows),
            P(start_k),
            P(start_t),
            P(caps),
            P(counts),
            None,
            None,
            P(offsets),
            1,
            P(row_of),
            P(ts),
            P(te),
            P(positions),
            P(directions),
        )
        == 0
    )
    for got, expected in zip((row_of, ts, te, positions, directions), (want[0], want[1], want[2], want[6], want[7])):
        assert torch.equal(got, expected)


def _native_round(o, d, aabb, bits, res, cone, rows, start_k, start_t, caps):
    from fastcore_ai import _native

    return _native.native().nerf_ray_march_round(
        o, d, aabb, bits, res, 1, 0.0, math.inf, 0.02, cone, None, rows, start_k, start_t, caps
    )


def test_render_round_on_emulator(lib):
    """Rendering a round's segments behind the optical depth tau, accumulated into shuffled rows."""
    from fastcore_ai import _native

    g = torch.Generator().manual_seed(9)
    R = 150
    counts = torch.randint(0, 12, (R,), generator=g)
    S = int(counts.sum())
    info = torch.stack([torch.cumsum(counts, 0) - counts, counts], 1).contiguous()
    sig, rgb = torch.rand(S, generator=g) * 8, torch.rand(S, 3, generator=g)
    ts = torch.rand(S, generator=g)
    te = ts + torch.rand(S, generator=g) * 0.3
    tau0 = torch.rand(R, generator=g) * 4
    out_rows = torch.randperm(R + 20, generator=g)[:R].contiguous()
    acc0 = [torch.rand(R + 20, 3, generator=g), torch.rand(R + 20, generator=g), torch.rand(R + 20, generator=g)]
    want_tau, want_acc = tau0.clone(), [a.clone() for a in acc0]
    _native.native().nerf_volume_render_round(sig, rgb, ts, te, info, 1e-3, want_tau, out_rows, *want_acc)
    assert (torch.exp(-want_tau) < 1e-3).any() and (torch.exp(-want_tau) >= 1e-3).any()
    tau, acc = tau0.clone(), [a.clone() for a in acc0]
    assert (
        lib.emu_render_round(
            P(sig),
            P(rgb),
            P(ts),
            P(te),
            P(info),
            I64(R),
            I64(S),
            F32(1e-3),
            P(tau),
            P(out_rows),
            P(acc[0]),
            P(acc[1]),
            P(acc[2]),
        )
        == 0
    )
    _same_render(tau, want_tau)
    for a, b in zip(acc, want_acc):
        _same_render(a, b)

"""nerf benchmarks (pytest-benchmark), the cases of `python -m fastcore_ai bench --family nerf` as one
provider per parametrisation: compare rows of one run (`--benchmark-group-by=group`). On a GPU the same
shapes run the cuda/triton backends and, when installed, nerfacc (the issue's GPU peer)."""

import math

import pytest
import torch

from fastcore_ai import nn as fnn
from fastcore_ai import ops
from fastcore_ai.bench.nerf import _BallsMLP, _rays, dense_render, torch_composition_render

R_RENDER = 8192  # the full R = 65536 case lives in `python -m fastcore_ai bench --family nerf`
STEP = math.sqrt(3) * 2 / 1024


def scene(res, device):
    field = _BallsMLP().eval().to(device)
    renderer = fnn.NeRFRenderer(field, aabb=[-1, -1, -1, 1, 1, 1], resolution=res, step_size=STEP).eval().to(device)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(res, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = (ijk.float() + 0.5) / res * 2 - 1
    renderer.grid.set_occupied(((torch.cdist(centres, field.centres) - field.radii) < math.sqrt(3) / res).any(-1))
    o, d = _rays(R_RENDER, torch.Generator().manual_seed(1))
    return renderer, o.to(device), d.to(device)


def packed(R, n, device):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(n // 2, 3 * n // 2, (R,), generator=g)
    starts = torch.cumsum(counts, 0) - counts
    S = int(counts.sum())
    ts = 0.1 + (torch.arange(S) - torch.repeat_interleave(starts, counts)).float() * 0.01
    return [
        t.to(device)
        for t in (
            torch.rand(S, generator=g) * 5,
            torch.rand(S, 3, generator=g),
            ts,
            ts + 0.01,
            torch.stack([starts, counts], 1),
        )
    ]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


RENDER_PROVIDERS = ["fastcore", "fastcore-train-fwd", "dense-torch"]


@pytest.mark.parametrize("provider", RENDER_PROVIDERS)
def test_render_pipeline_cpu(benchmark, provider):
    """fastcore: the image without grad (rounds with early termination); fastcore-train-fwd: forward with the
    field's autograd graph, as in a training step; dense-torch: the dense peer."""
    renderer, o, d = scene(128, "cpu")
    benchmark.group = f"nerf render R={R_RENDER} 128^3 ~10% cpu"
    if provider == "fastcore-train-fwd":
        out = benchmark(lambda: renderer(o, d).rgb).detach()
    else:
        with torch.no_grad():
            if provider == "fastcore":
                out = benchmark(lambda: renderer(o, d).rgb)
            else:
                out = benchmark(lambda: dense_render(renderer.field, o, d, STEP))
    assert out.shape == (R_RENDER, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("provider", ["fastcore-cpu", "torch-composition"])
def test_render_backward_cpu(benchmark, provider):
    sigmas, rgbs, ts, te, info = packed(16384, 64, "cpu")
    benchmark.group = "nerf volume_render fwd+bwd R=16384 ~64 samples/ray cpu"

    def run():
        s, c = sigmas.detach().requires_grad_(), rgbs.detach().requires_grad_()
        if provider == "fastcore-cpu":
            out = ops.volume_render(s, c, ts, te, info, early_stop_eps=0.0, backend="cpu")
            color, opacity = out.rgb, out.opacity
        else:
            color, opacity = torch_composition_render(s, c, ts, te, info)
        (color.sum() + opacity.sum()).backward()
        return s.grad

    assert torch.isfinite(benchmark(run)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["cuda", "triton", "nerfacc", "torch-composition"])
def test_render_backward_cuda(benchmark, provider):
    sigmas, rgbs, ts, te, info = packed(65536, 64, "cuda")
    benchmark.group = "nerf volume_render fwd+bwd R=65536 ~64 samples/ray cuda"
    if provider == "nerfacc":
        nerfacc = pytest.importorskip("nerfacc")
        ray_indices = torch.repeat_interleave(torch.arange(info.shape[0], device="cuda"), info[:, 1])

    def run():
        s, c = sigmas.detach().requires_grad_(), rgbs.detach().requires_grad_()
        if provider in ("cuda", "triton"):
            out = ops.volume_render(s, c, ts, te, info, early_stop_eps=0.0, backend=provider)
            loss = out.rgb.sum() + out.opacity.sum()
        elif provider == "nerfacc":
            w, _, _ = nerfacc.render_weight_from_density(ts, te, s, ray_indices=ray_indices, n_rays=info.shape[0])
            loss = nerfacc.accumulate_along_rays(w, c, ray_indices, info.shape[0]).sum() + w.sum()
        else:
            color, opacity = torch_composition_render(s, c, ts, te, info)
            loss = color.sum() + opacity.sum()
        loss.backward()
        sync("cuda")
        return s.grad

    assert torch.isfinite(benchmark(run)).all()


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["fastcore", "dense-torch"])
def test_render_pipeline_cuda(benchmark, provider):
    renderer, o, d = scene(128, "cuda")
    benchmark.group = f"nerf render R={R_RENDER} 128^3 ~10% cuda"

    def run():
        with torch.no_grad():
            out = renderer(o, d).rgb if provider == "fastcore" else dense_render(renderer.field, o, d, STEP)
        sync("cuda")
        return out

    assert torch.isfinite(benchmark(run)).all()


def test_bench_field_shell_scene_density_profile():
    """The bench's two scenes: the smooth balls' mask ramps from 0 at a ball's surface to 1 at its centre; with
    shell=w it reaches 1 at depth w below the surface; both are 0 outside every ball (the grid stays exact)."""
    smooth, shell = _BallsMLP(), _BallsMLP(shell=4 * STEP)
    centre, radius = smooth.centres[0], float(smooth.radii[0])
    direction = torch.tensor([1.0, 0.0, 0.0])
    at = lambda depth: (centre + (radius - depth) * direction)[None]  # noqa: E731  (depth below the surface)
    assert float(smooth.mask(at(-0.01))) == 0.0 and float(shell.mask(at(-0.01))) == 0.0
    assert float(shell.mask(at(4 * STEP))) == pytest.approx(1.0) and float(shell.mask(at(0.1))) == 1.0
    assert 0.0 < float(shell.mask(at(2 * STEP))) < 1.0
    assert float(smooth.mask(at(4 * STEP))) < 0.01 and float(smooth.mask(at(radius))) == pytest.approx(1.0)

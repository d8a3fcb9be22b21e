"""What users call: the ops reworked for issue 16 with the default backend="auto" on CPU tensors, at a small
shape (the inline, no-thread-pool paths and the router's direct path) and a larger one (the parallel
paths). The default must give the cpu backend's bits and the float64 reference's values."""

import pytest
import torch

from fastcore_ai import ops
from _helpers import relative_error


@pytest.mark.parametrize("T,E,k", [(4, 8, 2), (512, 16, 4), (5000, 128, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_default_backend(T, E, k, dtype):
    logits = torch.randn(T, E).to(dtype)
    got = ops.moe_topk_route(logits, k)  # the direct path with the dropless mask from the same native call
    cpu = ops.moe_topk_route(logits, k, backend="cpu")
    for a, b in zip(got, cpu):
        assert torch.equal(a, b)
    assert got.kept.dtype == torch.bool and bool(got.kept.all()) and got.kept.shape == (T, k)
    assert got.kept.data_ptr() != cpu.kept.data_ptr()  # a fresh mask per call
    want = ops.moe_topk_route(logits.double(), k, backend="reference")
    assert torch.equal(got.expert_ids, want.expert_ids)
    assert relative_error(got.weights, want.weights) < 1e-5
    assert torch.equal(got.tokens_per_expert, want.tokens_per_expert)


@pytest.mark.parametrize("B,H,L", [(1, 4, 64), (1, 16, 1000), (4, 32, 4096)])
def test_fft_conv_default_backend(B, H, L):
    u, k, D = torch.randn(B, H, L), torch.randn(H, L) / L, torch.randn(H)
    got = ops.fft_conv(u, k, D)
    assert torch.equal(got, ops.fft_conv(u, k, D, backend="cpu"))
    want = ops.fft_conv(u.double(), k.double(), D.double(), backend="reference")
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("R,n", [(5, 3), (1024, 16), (9000, 64)])
def test_volume_render_default_backend(R, n):
    sigmas = torch.rand(R * n) * 20
    rgbs, t_starts = torch.rand(R * n, 3), (torch.arange(n).float() * 0.01).repeat(R)
    t_ends = t_starts + 0.01
    packed = torch.stack([torch.arange(R) * n, torch.full((R,), n)], 1)
    got = ops.volume_render(sigmas, rgbs, t_starts, t_ends, packed, return_weights=True)
    cpu = ops.volume_render(sigmas, rgbs, t_starts, t_ends, packed, return_weights=True, backend="cpu")
    for a, b in zip(got, cpu):
        assert torch.equal(a, b)
    want = ops.volume_render(
        sigmas.double(),
        rgbs.double(),
        t_starts.double(),
        t_ends.double(),
        packed,
        return_weights=True,
        backend="reference",
    )
    for a, b in zip(got, want):
        assert relative_error(a, b) < 2e-6


@pytest.mark.parametrize("Lq,Lk,heads", [(1, 16, (16, 16)), (1, 300, (16, 1)), (16, 256, (16, 4)), (70, 70, (8, 2))])
def test_attention_default_backend(Lq, Lk, heads):
    Hq, Hkv = heads
    q, k, v = torch.randn(2, Hq, Lq, 64), torch.randn(2, Hkv, Lk, 64), torch.randn(2, Hkv, Lk, 64)
    got = ops.attention(q, k, v)
    assert torch.equal(got, ops.attention(q, k, v, backend="cpu"))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=Hq != Hkv)
    assert relative_error(got, want) < 1e-5

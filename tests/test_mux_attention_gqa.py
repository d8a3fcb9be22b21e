"""fastcore_ai.ops.attention with grouped kv heads (grouped-query / multi-query attention, SDPA's
enable_gqa: k, v [B, H_kv, Lk, D], H % H_kv == 0, query head h reads kv head h // (H / H_kv)) and the
CPU kernels' few-query-rows path (decode and short steps: at most 16 stacked query rows per kv head).

Everything is checked against the float64 reference (forward, lse, q/k/v gradients, the additive mask's
gradient), at the AVX-512 and the portable CPU level, plus thread-count independence, SDPA agreement,
gradcheck and the error paths."""

import importlib
import math

import pytest
import torch

from fastcore_ai import backends, ops
from _helpers import BACKEND_DEVICES, relative_error, require_backend

ref = importlib.import_module("fastcore_ai.reference.mux")

OP = "attention"
FP32_BOUND = 2e-5


def make_qkv(B, H, Hk, Lq, Lk, D, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(B, Hk, Lk, D, generator=generator, dtype=torch.float64) for _ in range(2))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def oracle(q, k, v, grad_out, **masks):
    """Float64 reference output, lse and q/k/v gradients on the upcast inputs."""
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    masks = {
        name: (m.cpu() if m.dtype == torch.bool else m.double().cpu()) if isinstance(m, torch.Tensor) else m
        for name, m in masks.items()
    }
    out, lse = ref.attention_with_lse(q64, k64, v64, **masks)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double().cpu())
    return out.detach(), lse.detach(), grads


def run(backend, q, k, v, grad_out, **masks):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = ops.attention_with_lse(q, k, v, backend=backend, **masks)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, lse, grads


def check(backend, q, k, v, bound=FP32_BOUND, **masks):
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q)
    out, lse, grads = run(backend, q, k, v, grad_out, **masks)
    expected, expected_lse, expected_grads = oracle(q, k, v, grad_out, **masks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    assert relative_error(out, expected) < bound
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert relative_error(lse.cpu()[finite], expected_lse[finite]) < bound
    for name, g, e in zip("qkv", grads, expected_grads):
        assert relative_error(g, e) < 5 * bound, name


GQA_SHAPES = [  # (B, H, H_kv, Lq, Lk, D): odd head sizes, Lq ≠ Lk, several key blocks (Lk > 512), MQA
    (2, 4, 2, 7, 11, 13),
    (1, 6, 1, 1, 37, 64),
    (2, 8, 2, 16, 300, 64),
    (1, 4, 4, 5, 600, 24),
    (1, 6, 3, 33, 20, 1),
    (2, 16, 1, 1, 1000, 64),
    (1, 3, 1, 70, 200, 48),
    (1, 2, 1, 9, 9, 256),
]

# Triton on CPU tensors runs in the interpreter: small shapes only.
GQA_CASES = [
    pytest.param(*param.values, *shape, marks=param.marks, id=f"{param.id}-" + "-".join(map(str, shape)))
    for param in BACKEND_DEVICES
    for shape in GQA_SHAPES
    if not (param.values == ("triton", "cpu") and shape[1] * shape[3] * shape[4] * shape[5] > 4 * 33 * 64 * 20)
]


@pytest.mark.parametrize("backend,device,B,H,Hk,Lq,Lk,D", GQA_CASES)
def test_gqa_matches_reference(backend, device, B, H, Hk, Lq, Lk, D, poisoned_outputs):
    require_backend(OP, backend, device)
    check(backend, *make_qkv(B, H, Hk, Lq, Lk, D, device=device))


def _masks(case, B, H, Lq, Lk, device):
    generator = torch.Generator().manual_seed(1)
    masks = {}
    if case in ("bool", "all"):
        masks["attn_mask"] = (torch.rand(Lq, Lk, generator=generator) > 0.3).to(device)
    if case == "bool_per_head":
        masks["attn_mask"] = (torch.rand(B, H, Lq, Lk, generator=generator) > 0.3).to(device)
    if case == "additive":
        masks["attn_mask"] = torch.randn(B, H, Lq, Lk, generator=generator).to(device)
    if case in ("key_padding", "all"):
        pad = torch.rand(B, Lk, generator=generator) > 0.7
        pad[:, 0] = False
        masks["key_padding_mask"] = pad.to(device)
    if case in ("causal", "causal_cross", "all"):
        masks["causal"] = True
    return masks


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", ["bool", "bool_per_head", "additive", "key_padding", "causal", "causal_cross", "all"])
@pytest.mark.parametrize("Lq", [1, 6, 37])  # few-rows path (G·Lq ≤ 16) and the packed one
def test_gqa_masks(backend, device, case, Lq, poisoned_outputs):
    require_backend(OP, backend, device)
    B, H, Hk, Lk, D = (2, 4, 2, 53, 24) if case != "causal_cross" else (1, 4, 1, max(Lq - 5, 1), 16)
    q, k, v = make_qkv(B, H, Hk, Lq, Lk, D, device=device)
    check(backend, q, k, v, **_masks(case, B, H, Lq, Lk, device))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gqa_additive_mask_gradient(backend):
    B, H, Hk, Lq, Lk, D = 2, 6, 2, 5, 19, 16
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, Hk, Lq, Lk, D))
    mask = torch.randn(1, H, Lq, Lk, requires_grad=True)  # broadcast over the batch
    grad_out = torch.randn(B, H, Lq, D)
    out = ops.attention(q, k, v, attn_mask=mask, causal=True, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v, mask), grad_out)
    q64, k64, v64, m64 = (t.detach().double().requires_grad_(True) for t in (q, k, v, mask))
    expected = torch.autograd.grad(
        ref.attention(q64, k64, v64, attn_mask=m64, causal=True), (q64, k64, v64, m64), grad_out.double()
    )
    for name, g, e in zip(("q", "k", "v", "mask"), grads, expected):
        assert relative_error(g, e) < 5 * FP32_BOUND, name


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_gradcheck_float64(backend, causal):
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 4, 2, 5, 7, 3, dtype=torch.float64))
    pad = torch.zeros(1, 7, dtype=torch.bool)
    pad[0, 5] = True
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.attention(a, b, c, key_padding_mask=pad, causal=causal, backend=backend),
        (q, k, v),
        eps=1e-6,
        atol=1e-8,
    )


def test_gqa_reference_backward_matches_autograd():
    q, k, v = make_qkv(2, 6, 3, 4, 9, 5, dtype=torch.float64)
    grad_out = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    written = ref.attention_backward(grad_out, q, k, v, None, None, True, 0.4)[:3]
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    auto = torch.autograd.grad(ref.attention(q, k, v, causal=True, scale=0.4), (q, k, v), grad_out)
    for a, b in zip(written, auto):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("H,Hk", [(16, 4), (16, 1), (8, 8)])
def test_gqa_matches_sdpa(H, Hk):
    q, k, v = make_qkv(2, H, Hk, 3, 70, 64)
    torch.testing.assert_close(
        ops.attention(q, k, v, causal=True, backend="cpu"),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hk),
        rtol=1e-4,
        atol=1e-5,
    )


def test_gqa_cpu_does_not_depend_on_thread_count():
    q, k, v = make_qkv(2, 8, 2, 9, 700, 24)
    grad_out = torch.randn(2, 8, 9, 24)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, _, grads = run("cpu", q, k, v, grad_out)
            results.append((out, grads))
    finally:
        torch.set_num_threads(previous)
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


# ---- few stacked rows per kv head (Lq·G ≤ 16: decode and short steps), K read in place -------------------

FEW_SHAPES = [  # (B, H, H_kv, Lq, Lk, D): 16-key groups with tails, key-block boundaries, padding lanes
    (1, 1, 1, 1, 1, 1),
    (2, 8, 8, 1, 256, 64),
    (1, 8, 2, 2, 15, 8),
    (1, 4, 1, 4, 17, 13),
    (3, 2, 2, 16, 513, 96),
    (1, 16, 1, 1, 1100, 64),
    (1, 2, 1, 3, 33, 256),
    (2, 1, 1, 7, 16, 200),
    (1, 4, 1, 3, 33, 20),  # 9..16 unmasked rows: the rows-in-lanes path (one zmm = one key's scores)
    (2, 6, 2, 3, 600, 64),
    (1, 12, 1, 1, 7, 1),
]


@pytest.mark.parametrize("isa", ["auto", "portable"])
@pytest.mark.parametrize("B,H,Hk,Lq,Lk,D", FEW_SHAPES)
def test_few_rows_path(isa, B, H, Hk, Lq, Lk, D, poisoned_outputs):
    previous = backends.cpu_isa()
    try:
        backends.cpu_isa(isa)
        check("cpu", *make_qkv(B, H, Hk, Lq, Lk, D))
    finally:
        backends.cpu_isa("auto" if previous != "portable" else "portable")


@pytest.mark.parametrize("isa", ["auto", "portable"])
def test_gqa_masks_portable_and_avx512_agree(isa):
    """The portable loops and the AVX-512 path against the reference on the grouped/masked/causal shapes."""
    previous = backends.cpu_isa()
    try:
        backends.cpu_isa(isa)
        for Lq, case in ((1, "key_padding"), (3, "all"), (40, "additive"), (40, "causal")):
            B, H, Hk, Lk, D = 2, 4, 2, 45, 20
            check("cpu", *make_qkv(B, H, Hk, Lq, Lk, D), **_masks(case, B, H, Lq, Lk, "cpu"))
    finally:
        backends.cpu_isa("auto" if previous != "portable" else "portable")


def _strided(t, how):
    if how == "rows":  # row stride ≠ D (a slice of a wider buffer, as a KV cache's unused tail)
        return torch.cat([t, torch.zeros_like(t)], dim=2)[:, :, : t.shape[2]]
    if how == "heads_last":  # [B, L, H, D] storage, transposed (HF layouts)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.transpose(2, 3).contiguous().transpose(2, 3)  # feature stride ≠ 1


@pytest.mark.parametrize("how", ["rows", "heads_last", "features"])
@pytest.mark.parametrize("Lq", [1, 5, 40])
def test_strided_grouped_kv(how, Lq):
    q, k, v = make_qkv(2, 6, 2, Lq, 77, 32)
    check("cpu", _strided(q, how), _strided(k, how), _strided(v, how))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,H,Hk,Lq,Lk,D", [(2, 8, 2, 1, 300, 64), (2, 8, 2, 3, 700, 64), (1, 4, 1, 16, 40, 24), (1, 2, 2, 30, 600, 19)]
)
def test_low_precision_grouped(dtype, B, H, Hk, Lq, Lk, D):
    """16-bit inputs (float32 math): within 2× the error of torch's SDPA math in that dtype (+ a floor)."""
    q, k, v = make_qkv(B, H, Hk, Lq, Lk, D, dtype=dtype)
    out = ops.attention(q, k, v, backend="cpu")
    expected = ref.attention(q.double(), k.double(), v.double())
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hk)
    assert relative_error(out, expected) <= 2 * relative_error(torch_out, expected) + 1e-3


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes,words",
    [
        (((1, 4, 5, 8), (1, 3, 6, 8), (1, 3, 6, 8)), "must divide q's H = 4"),
        (((1, 4, 5, 8), (1, 2, 6, 8), (1, 4, 6, 8)), "v must have k's head count H_kv = 2"),
        (((1, 4, 5, 8), (1, 8, 6, 8), (1, 8, 6, 8)), "must divide q's H = 4"),
        (((1, 4, 5, 8), (1, 0, 6, 8), (1, 0, 6, 8)), "must divide q's H = 4"),
    ],
)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gqa_errors(shapes, words, backend):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=words) as info:
        ops.attention(q, k, v, backend=backend)
    assert str(info.value).startswith("fastcore_ai.ops.attention: ")


def test_gqa_native_entry_point_checks_heads():
    from fastcore_ai import _native

    q, k, v = torch.zeros(1, 4, 2, 8), torch.zeros(1, 3, 2, 8), torch.zeros(1, 3, 2, 8)
    with pytest.raises(RuntimeError, match="H_kv dividing H"):
        _native.native().mux_attention(q, k, v, None, None, False, 1.0)


def test_gqa_empty():
    q, k, v = make_qkv(2, 4, 2, 3, 0, 8)
    out = ops.attention(q, k, v, backend="cpu")
    assert out.shape == (2, 4, 3, 8) and torch.all(out == 0)
    q, k, v = make_qkv(2, 4, 1, 0, 5, 8)
    assert ops.attention(q, k, v, backend="cpu").shape == (2, 4, 0, 8)


def test_default_scale_uses_head_size():
    q, k, v = make_qkv(1, 4, 2, 2, 9, 17)
    torch.testing.assert_close(
        ops.attention(q, k, v),
        ops.attention(q, k, v, scale=1 / math.sqrt(17), backend="reference"),
        rtol=1e-5,
        atol=1e-6,
    )

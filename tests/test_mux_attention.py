"""fastcore_ai.ops.attention: parity forward and backward with the float64 reference on every backend
that runs here (head sizes 1..256, odd lengths, Lq ≠ Lk, masks, causal), fully masked rows, low
precision, non-contiguous inputs, gradcheck, registration (opcheck, torch.compile) and error paths."""

import math

import pytest
import torch

from fastcore_ai import ops
import importlib

ref = importlib.import_module("fastcore_ai.reference.mux")  # the module (the package exports a function `mux`)
from _helpers import BACKEND_DEVICES, backend_dtype_cases, relative_error, require_backend

OP = "attention"
FP32_BOUND = 2e-5  # float32 accumulation over ≤ 1000 keys and ≤ 256 features


def make_qkv(B, H, Lq, Lk, D, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=generator, dtype=torch.float64) for L in (Lq, Lk, Lk))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def oracle(q, k, v, grad_out=None, **masks):
    """Float64 reference output (and q, k, v gradients when grad_out is given) on the upcast inputs."""
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_(grad_out is not None) for t in (q, k, v))
    masks = {
        name: (m.cpu() if m is not None and m.dtype == torch.bool else (m.double().cpu() if m is not None else None))
        if isinstance(m, torch.Tensor)
        else m
        for name, m in masks.items()
    }
    out = ref.attention(q64, k64, v64, **masks)
    if grad_out is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double().cpu())
    return out.detach(), grads


def run(backend, q, k, v, grad_out=None, **masks):
    q, k, v = (t.detach().requires_grad_(grad_out is not None) for t in (q, k, v))
    out = ops.attention(q, k, v, backend=backend, **masks)
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


SHAPES = [  # (B, H, Lq, Lk, D): the head sizes {1, 13, 48, 64, 96, 200, 256} and lengths {1, 7, 128, 169, 1000}
    (1, 1, 1, 1, 1),
    (2, 3, 7, 7, 13),
    (1, 2, 128, 128, 48),
    (2, 2, 169, 169, 64),
    (1, 1, 7, 1000, 96),
    (1, 2, 128, 169, 200),
    (1, 1, 169, 7, 256),
    (1, 1, 1000, 1000, 64),
]


# Triton on CPU tensors is the interpreter: only interpreter-sized shapes are generated for it (the
# large ones run for Triton on CUDA tensors, and for every other backend).
PARITY_CASES = [
    pytest.param(*param.values, *shape, marks=param.marks, id=f"{param.id}-" + "-".join(map(str, shape)))
    for param in BACKEND_DEVICES
    for shape in SHAPES
    if not (param.values == ("triton", "cpu") and shape[2] * shape[3] * shape[4] > 169 * 169 * 64)
]


@pytest.mark.parametrize("backend,device,B,H,Lq,Lk,D", PARITY_CASES)
def test_parity_forward_backward(backend, device, B, H, Lq, Lk, D, poisoned_outputs):
    require_backend(OP, backend, device)
    q, k, v = make_qkv(B, H, Lq, Lk, D, device=device)
    grad_out = torch.randn(B, H, Lq, D, dtype=torch.float32, device=device)
    out, grads = run(backend, q, k, v, grad_out)
    expected, expected_grads = oracle(q, k, v, grad_out)
    assert out.dtype == torch.float32 and out.shape == (B, H, Lq, D)
    assert relative_error(out, expected) < FP32_BOUND
    for name, g, e in zip("qkv", grads, expected_grads):
        assert relative_error(g, e) < 5 * FP32_BOUND, name


MASK_CASES = ["bool", "additive", "key_padding", "causal", "causal_cross", "all"]


def make_masks(case, B, H, Lq, Lk, device, generator):
    masks = {}
    if case in ("bool", "all"):
        masks["attn_mask"] = (torch.rand(Lq, Lk, generator=generator) > 0.3).to(device)  # broadcast over B, H
    if case == "additive":
        masks["attn_mask"] = torch.randn(B, 1, Lq, Lk, generator=generator).to(device)
    if case in ("key_padding", "all"):
        pad = torch.rand(B, Lk, generator=generator) > 0.7
        pad[:, 0] = False
        masks["key_padding_mask"] = pad.to(device)
    if case in ("causal", "causal_cross", "all"):
        masks["causal"] = True
    return masks


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", MASK_CASES)
def test_masks(backend, device, case, poisoned_outputs):
    require_backend(OP, backend, device)
    B, H, Lq, Lk, D = (2, 2, 37, 53, 24) if case != "causal_cross" else (1, 2, 53, 37, 16)
    generator = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(B, H, Lq, Lk, D, device=device)
    masks = make_masks(case, B, H, Lq, Lk, device, generator)
    grad_out = torch.randn(B, H, Lq, D, device=device)
    out, grads = run(backend, q, k, v, grad_out, **masks)
    expected, expected_grads = oracle(q, k, v, grad_out, **masks)
    assert not torch.isnan(out).any()
    assert relative_error(out, expected) < FP32_BOUND
    for name, g, e in zip("qkv", grads, expected_grads):
        assert relative_error(g, e) < 5 * FP32_BOUND, name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_fully_masked_rows_are_zero_with_zero_gradients(backend, device):
    require_backend(OP, backend, device)
    B, H, Lq, Lk, D = 1, 2, 9, 11, 8
    q, k, v = make_qkv(B, H, Lq, Lk, D, device=device)
    mask = torch.ones(Lq, Lk, dtype=torch.bool)
    mask[3] = False  # row 3 sees no key
    mask = mask.to(device)
    grad_out = torch.randn(B, H, Lq, D, device=device)
    out, grads = run(backend, q, k, v, grad_out, attn_mask=mask)
    _, lse = ops.attention_with_lse(q, k, v, attn_mask=mask, backend=backend)
    assert torch.all(out[:, :, 3] == 0)
    assert torch.all(torch.isneginf(lse[:, :, 3])) and torch.isfinite(lse[:, :, :3]).all()
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.all(grads[0][:, :, 3] == 0)
    expected, expected_grads = oracle(q, k, v, grad_out, attn_mask=mask)
    assert relative_error(out, expected) < FP32_BOUND
    # every key padded: the whole output is zero
    pad = torch.ones(B, Lk, dtype=torch.bool, device=device)
    out_all, grads_all = run(backend, q, k, v, grad_out, key_padding_mask=pad)
    assert torch.all(out_all == 0) and all(torch.all(g == 0) for g in grads_all)


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_cases(OP, [torch.bfloat16, torch.float16]))
def test_low_precision_within_twice_torch(backend, device, dtype):
    """Error no worse than 2× torch doing the same math (SDPA's math path) in that dtype."""
    require_backend(OP, backend, device, dtype)
    B, H, Lq, Lk, D = 2, 2, 45, 67, 40
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype=dtype, device=device)
    grad_out = torch.randn(B, H, Lq, D, device=device).to(dtype)
    out, grads = run(backend, q, k, v, grad_out)
    expected, expected_grads = oracle(q, k, v, grad_out)
    torch_out, torch_grads = oracle_in_dtype(q, k, v, grad_out)
    assert out.dtype == dtype
    assert relative_error(out, expected) <= 2 * relative_error(torch_out, expected) + 1e-3
    for name, g, e, t in zip("qkv", grads, expected_grads, torch_grads):
        assert relative_error(g, e) <= 2 * relative_error(t, e) + 1e-3, name


def oracle_in_dtype(q, k, v, grad_out):
    qd, kd, vd = (t.detach().cpu().requires_grad_(True) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qd.float(), kd.float(), vd.float()).to(q.dtype)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.cpu())
    return out.detach(), grads


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_non_contiguous_and_custom_scale(backend, device):
    require_backend(OP, backend, device)
    B, L, H, D = 2, 19, 3, 20
    q, k, v = (torch.randn(B, L, H, D, device=device).transpose(1, 2) for _ in range(3))  # [B, H, L, D] views
    assert not q.is_contiguous()
    out = ops.attention(q, k, v, scale=0.3, backend=backend)
    expected, _ = oracle(q, k, v, scale=0.3)
    assert relative_error(out, expected) < FP32_BOUND


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("Lq,Lk", [(0, 5), (5, 0), (0, 0)])
def test_empty(backend, device, Lq, Lk):
    require_backend(OP, backend, device)
    q, k, v = make_qkv(1, 2, Lq, Lk, 8, device=device)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = ops.attention(q, k, v, backend=backend)
    assert out.shape == (1, 2, Lq, 8) and torch.all(out == 0)
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in (q, k, v))


def test_matches_sdpa():
    q, k, v = make_qkv(2, 3, 33, 33, 64)
    mask = torch.rand(33, 33) > 0.2
    torch.testing.assert_close(
        ops.attention(q, k, v, attn_mask=mask, backend="cpu"),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        ops.attention(q, k, v, causal=True, backend="cpu"),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        rtol=1e-4,
        atol=1e-5,
    )


def test_cpu_does_not_depend_on_thread_count():
    q, k, v = make_qkv(2, 3, 70, 90, 24)
    grad_out = torch.randn(2, 3, 70, 24)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run("cpu", q, k, v, grad_out))
    finally:
        torch.set_num_threads(previous)
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", ["none", "bool", "additive", "key_padding", "causal", "causal_cross"])
def test_gradcheck_float64(backend, case):
    generator = torch.Generator().manual_seed(3)
    B, H, Lq, Lk, D = (1, 2, 5, 7, 3) if case != "causal_cross" else (1, 1, 7, 4, 5)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, Lq, Lk, D, dtype=torch.float64))
    masks = make_masks(case, B, H, Lq, Lk, "cpu", generator) if case != "none" else {}
    if "attn_mask" in masks and masks["attn_mask"].dtype != torch.bool:
        masks["attn_mask"] = masks["attn_mask"].double()
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.attention(a, b, c, backend=backend, **masks), (q, k, v), eps=1e-6, atol=1e-8
    )


def test_opcheck():
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 9, 11, 12))
    mask = torch.rand(9, 11) > 0.3
    pad = torch.zeros(1, 11, dtype=torch.bool)
    scale = 1 / math.sqrt(12)
    torch.library.opcheck(torch.ops.fastcore_ai.mux_attention.default, (q, k, v, None, None, False, scale, "cpu"))
    torch.library.opcheck(
        torch.ops.fastcore_ai.mux_attention.default, (q, k, v, mask[None, None], pad, True, scale, "cpu")
    )
    out, lse = torch.ops.fastcore_ai.mux_attention(q.detach(), k.detach(), v.detach(), None, None, False, scale, "cpu")
    torch.library.opcheck(
        torch.ops.fastcore_ai.mux_attention_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, None, False, scale, False, "cpu"),
    )
    additive = torch.randn(1, 1, 9, 11)
    out, lse = torch.ops.fastcore_ai.mux_attention(
        q.detach(), k.detach(), v.detach(), additive, pad, True, scale, "cpu"
    )
    torch.library.opcheck(
        torch.ops.fastcore_ai.mux_attention_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, additive, pad, True, scale, True, "cpu"),
    )


# ---- the additive mask's gradient (cpu and reference backends)

MASK_GRAD_SHAPES = {  # attn_mask shapes broadcast to [B, H, Lq, Lk] = [2, 3, 6, 9] (ALiBi-like biases are [H, Lq, Lk])
    "full": (2, 3, 6, 9),
    "per_head": (3, 6, 9),
    "shared": (6, 9),
    "per_batch": (2, 1, 6, 9),
    "per_key": (9,),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shape", list(MASK_GRAD_SHAPES), ids=list(MASK_GRAD_SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_additive_mask_gradcheck_float64(backend, shape, causal):
    """gradcheck w.r.t. q, k, v and the additive mask together (float64), with a partly padded batch
    (key_padding_mask), causal or dense, and the mask broadcast along any of its dimensions."""
    generator = torch.Generator().manual_seed(len(MASK_GRAD_SHAPES[shape]))
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 3, 6, 9, 4, dtype=torch.float64, seed=2))
    mask = torch.randn(MASK_GRAD_SHAPES[shape], generator=generator, dtype=torch.float64).requires_grad_(True)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, -3:] = True
    assert torch.autograd.gradcheck(
        lambda a, b, c, m: ops.attention(a, b, c, attn_mask=m, key_padding_mask=pad, causal=causal, backend=backend),
        (q, k, v, mask),
        eps=1e-6,
        atol=1e-8,
    )


@pytest.mark.parametrize("shape", ["full", "per_head", "shared"])
def test_additive_mask_gradient_float32_matches_reference(shape):
    """The cpu backend's float32 mask gradient (ds from the fused backward, summed over broadcast dims)
    against the float64 reference, with a fully masked query row (its gradient is 0, not NaN)."""
    generator = torch.Generator().manual_seed(5)
    B, H, Lq, Lk, D = 2, 3, 37, 53, 24
    q, k, v = make_qkv(B, H, Lq, Lk, D, seed=4)
    mask_shape = {"full": (B, H, Lq, Lk), "per_head": (H, Lq, Lk), "shared": (Lq, Lk)}[shape]
    mask = torch.randn(mask_shape, generator=generator)
    mask[..., 4, :] = float("-inf")  # query row 4 sees no key
    grad_out = torch.randn(B, H, Lq, D, generator=generator)
    leaf = mask.clone().requires_grad_(True)
    out = ops.attention(q, k, v, attn_mask=leaf, backend="cpu")
    (grad_mask,) = torch.autograd.grad(out, leaf, grad_out)
    leaf64 = mask.double().requires_grad_(True)
    expected_out = ref.attention(q.double(), k.double(), v.double(), attn_mask=leaf64)
    (expected,) = torch.autograd.grad(expected_out, leaf64, grad_out.double())
    assert grad_mask.shape == mask.shape and grad_mask.dtype == torch.float32
    assert torch.isfinite(grad_mask).all() and torch.all(grad_mask[..., 4, :] == 0)
    assert relative_error(grad_mask, expected) < 1e-4


def test_mask_gradient_leaves_the_other_gradients_unchanged():
    """Asking for the mask's gradient does not change dq, dk, dv (bitwise), and a mask that does not
    require grad gets none."""
    q, k, v = make_qkv(1, 2, 19, 23, 16, seed=6)
    mask = torch.randn(19, 23)
    grad_out = torch.randn(1, 2, 19, 16)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with_mask_grad = torch.autograd.grad(
        ops.attention(*leaves, attn_mask=mask.requires_grad_(True), backend="cpu"), leaves, grad_out
    )
    leaves2 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    without = torch.autograd.grad(ops.attention(*leaves2, attn_mask=mask.detach(), backend="cpu"), leaves2, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(with_mask_grad, without))


@pytest.mark.triton
def test_mask_gradient_on_other_backends_raises():
    """Backends without the mask gradient raise a clear error for a mask that requires grad (and run
    when the mask is detached or under no_grad)."""
    require_backend(OP, "triton", "cpu")
    q, k, v = make_qkv(1, 1, 5, 6, 8)
    mask = torch.randn(5, 6, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad") as info:
        ops.attention(q, k, v, attn_mask=mask, backend="triton")
    assert str(info.value).startswith("fastcore_ai.ops.attention: ")
    with torch.no_grad():
        ops.attention(q, k, v, attn_mask=mask, backend="triton")
    ops.attention(q, k, v, attn_mask=mask.detach(), backend="triton")


def test_torch_compile_fullgraph_cpu():
    q, k, v = make_qkv(2, 2, 17, 17, 16)

    def step(q, k, v):
        return ops.attention(q, k, v, causal=True, backend="cpu").sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    qs = q.clone().requires_grad_(True)
    loss = compiled(qs, k, v)
    loss.backward()
    qe = q.clone().requires_grad_(True)
    step(qe, k, v).backward()
    torch.testing.assert_close(loss, step(q, k, v))
    torch.testing.assert_close(qs.grad, qe.grad)


def test_torch_compile_inductor_cpu():
    q, k, v = make_qkv(1, 2, 9, 9, 8)
    compiled = torch.compile(lambda a, b, c: ops.attention(a, b, c, backend="cpu") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), ops.attention(q, k, v, backend="cpu") * 2)


# ---- errors ---------------------------------------------------------------------------------------


def _qkv():
    return make_qkv(1, 2, 5, 6, 8)


@pytest.mark.parametrize(
    "change,error,words",
    [
        (
            lambda q, k, v: (q.new_zeros(1, 2, 5, 257), k.new_zeros(1, 2, 6, 257), v.new_zeros(1, 2, 6, 257), {}),
            ValueError,
            "head size D",
        ),
        (lambda q, k, v: (q, k[..., :4], v, {}), ValueError, "k must have shape"),
        (lambda q, k, v: (q[:, :1].expand(1, 3, 5, 8), k, v, {}), ValueError, "must divide q's H = 3"),
        (lambda q, k, v: (q, k, v[:, :, :3], {}), ValueError, "v must have"),
        (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must be a 4-D"),
        (lambda q, k, v: (q, k.double(), v, {}), TypeError, "k must have q's dtype"),
        (lambda q, k, v: (q.int(), k, v, {}), TypeError, "q must be"),
        (lambda q, k, v: (q, k, v, {"attn_mask": torch.ones(4, 6, dtype=torch.bool)}), ValueError, "attn_mask must be"),
        (lambda q, k, v: (q, k, v, {"attn_mask": torch.ones(5, 6, dtype=torch.int32)}), TypeError, "attn_mask must be"),
        (
            lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}),
            ValueError,
            "key_padding_mask must be",
        ),
        (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(1, 6)}), TypeError, "key_padding_mask must be"),
        (lambda q, k, v: (q, k, v, {"causal": 1}), TypeError, "causal must be a bool"),
        (lambda q, k, v: (q, k, v, {"scale": float("nan")}), TypeError, "scale must be"),
    ],
)
def test_errors(change, error, words):
    q, k, v, kwargs = change(*_qkv())
    with pytest.raises(error, match=words) as info:
        ops.attention(q, k, v, backend="cpu", **kwargs)
    assert str(info.value).startswith("fastcore_ai.ops.attention: ")


def test_error_backend_cannot_run():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ops.attention(q, k, v, backend="cuda")


def test_native_entry_point_checks_its_input():
    from fastcore_ai import _native

    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="head size"):
        _native.native().mux_attention(
            q.new_zeros(1, 1, 2, 300), k.new_zeros(1, 1, 2, 300), v.new_zeros(1, 1, 2, 300), None, None, False, 1.0
        )
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        _native.native().mux_attention(q, k, v, None, torch.zeros(2, 6, dtype=torch.bool), False, 1.0)


# ---- the CUDA tensor-core (WMMA) forward: bf16/fp16 on sm_80+ (csrc/kernels/mux/attention.cu)

TC_SHAPES = [  # (B, H, Lq, Lk, D): head sizes padded to 16 in shared memory, masked row/key tails, Lq ≠ Lk
    (1, 1, 1, 1, 1),
    (2, 3, 7, 23, 13),
    (1, 2, 33, 19, 64),
    (1, 1, 130, 257, 96),
    (1, 2, 45, 67, 200),
    (1, 1, 17, 300, 256),
]


def _tensor_cores_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the tensor-core attention path needs sm_80+")
    require_backend(OP, "cuda", "cuda", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Lq,Lk,D", TC_SHAPES, ids=["-".join(map(str, s)) for s in TC_SHAPES])
@pytest.mark.parametrize("case", ["none", "causal", "additive", "all", "masked_row"])
def test_cuda_tensor_core_forward(dtype, B, H, Lq, Lk, D, case):
    """Output within 2× torch's SDPA math path in that dtype (+1e-3) of the float64 reference, lse float32
    within 1e-2; a fully masked row gives out = 0, lse = −inf; the SIMT backward still runs on the result."""
    _tensor_cores_or_skip()
    generator = torch.Generator().manual_seed(D * 7 + Lq)
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype=dtype, device="cuda", seed=D + Lk)
    masks = {} if case in ("none", "masked_row") else make_masks(case, B, H, Lq, Lk, "cuda", generator)
    if case == "masked_row":
        mask = torch.ones(Lq, Lk, dtype=torch.bool)
        mask[Lq // 2] = False
        masks["attn_mask"] = mask.cuda()
    out, lse = ops.attention_with_lse(q, k, v, backend="cuda", **masks)
    expected, expected_lse = ref.attention_with_lse(
        *(t.double().cpu() for t in (q, k, v)),
        **{n: (m.cpu() if isinstance(m, torch.Tensor) else m) for n, m in masks.items()},
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    dead = torch.isneginf(expected_lse)
    assert torch.equal(torch.isneginf(lse), dead)
    assert torch.all(out[dead] == 0)
    live = ~dead
    torch_bias = (
        ref.attention_bias(
            B,
            H,
            Lq,
            Lk,
            masks.get("attn_mask"),
            masks.get("key_padding_mask"),
            masks.get("causal", False),
            torch.float64,
            "cpu",
        )
        if masks
        else None
    )
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_out = torch.nn.functional.scaled_dot_product_attention(
            *(t.cpu() for t in (q, k, v)), attn_mask=torch_bias.to(dtype) if torch_bias is not None else None
        )
    if live.any():
        bound = 2 * relative_error(torch_out[live], expected[live]) + 1e-3
        assert relative_error(out[live], expected[live]) <= bound
        assert torch.allclose(lse[live].double(), expected_lse[live], atol=1e-2, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_tensor_core_forward_matches_simt_within_bound(dtype):
    """The tensor-core forward (bf16/fp16) and the SIMT forward on float32 copies agree to the 16-bit bound."""
    _tensor_cores_or_skip()
    q, k, v = make_qkv(2, 2, 77, 91, 40, dtype=dtype, device="cuda")
    out = ops.attention(q, k, v, backend="cuda", causal=True)
    out32 = ops.attention(q.float(), k.float(), v.float(), backend="cuda", causal=True)
    assert relative_error(out.float(), out32) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Lq,Lk,D", TC_SHAPES, ids=["-".join(map(str, s)) for s in TC_SHAPES])
@pytest.mark.parametrize("case", ["none", "causal", "all"])
def test_cuda_tensor_core_backward(dtype, B, H, Lq, Lk, D, case):
    """dQ, dK, dV of the tensor-core backward (bf16/fp16 on sm_80+) within 2× torch's SDPA math path in
    that dtype (+1e-3) of the float64 reference."""
    _tensor_cores_or_skip()
    generator = torch.Generator().manual_seed(D * 5 + Lk)
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype=dtype, device="cuda", seed=D + Lq)
    grad_out = torch.randn(B, H, Lq, D, generator=generator).to(device="cuda", dtype=dtype)
    masks = {} if case == "none" else make_masks(case, B, H, Lq, Lk, "cuda", generator)
    _, grads = run("cuda", q, k, v, grad_out, **masks)
    _, expected = oracle(q, k, v, grad_out, **masks)
    bias = (
        ref.attention_bias(
            B,
            H,
            Lq,
            Lk,
            masks.get("attn_mask"),
            masks.get("key_padding_mask"),
            masks.get("causal", False),
            torch.float64,
            "cpu",
        )
        if masks
        else None
    )
    live = torch.isfinite(bias).any(-1) if bias is not None else torch.ones(B, H, Lq, dtype=torch.bool)
    # torch gives NaN for fully masked rows: for torch's own error, unmask them and give them dO = 0, so
    # they add nothing to dK, dV and get dQ = 0, as the reference's (and ours) do
    torch_bias = bias.masked_fill(~live[..., None], 0).to(dtype) if bias is not None else None
    leaves = [t.detach().cpu().requires_grad_(True) for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch_out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=torch_bias)
    torch_grads = torch.autograd.grad(torch_out, leaves, grad_out.cpu() * live[..., None])
    for name, g, e, t in zip("qkv", grads, expected, torch_grads):
        assert g.dtype == dtype and not torch.isnan(g).any(), name
        assert relative_error(g.cpu(), e) <= 2 * relative_error(t, e) + 1e-3, name


_GENERIC_PATH_SCRIPT = r"""
import torch
from fastcore_ai import ops
import importlib
ref = importlib.import_module("fastcore_ai.reference.mux")
worst = 0.0
for B, H, Lq, Lk, D, masks in [(2, 3, 7, 7, 13, {}), (1, 2, 128, 169, 200, {}), (2, 2, 169, 169, 64, {}),
                               (2, 2, 37, 53, 24, {"causal": True}), (1, 2, 53, 37, 16, {"causal": True})]:
    g = torch.Generator().manual_seed(Lq * 1000 + D)
    q, k, v, go = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk, Lq))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = ops.attention(*leaves, backend="cpu", **masks)
    grads = torch.autograd.grad(out, leaves, go)
    r = [t.double().requires_grad_(True) for t in (q, k, v)]
    expected = ref.attention(*r, **masks)
    expected_grads = torch.autograd.grad(expected, r, go.double())
    for a, e in zip((out,) + grads, (expected,) + expected_grads):
        worst = max(worst, float((a.double() - e).norm() / e.norm()))
print("isa", ops.pq4_kernel())  # the level the CPU kernels ran at (the one cap of every family)
print("worst", worst)
"""


def test_cpu_generic_path_without_avx512():
    """The float32 CPU kernels take an AVX-512 path where the CPU has it; the generic vector path (other
    CPUs) is forced here through FASTCORE_AI_CPU_ISA=portable (read once per process) in a fresh process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTCORE_AI_CPU_ISA="portable")
    result = subprocess.run(
        [sys.executable, "-c", _GENERIC_PATH_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("isa")[-1].split()[0] == "portable", result.stdout
    worst = float(result.stdout.split("worst")[-1])
    assert worst < 5 * FP32_BOUND

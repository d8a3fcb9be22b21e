"""fastcore_ai.ops.mux / demux: parity with straightforward torch implementations of the DataMUX
formulas (written out per instance here) and with the float64 reference, gradients, registration and
error paths."""

import math

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.nn.mux import hadamard_keys, ortho_keys
import importlib

ref = importlib.import_module("fastcore_ai.reference.mux")  # the module (the package exports a function `mux`)
from _helpers import BACKEND_DEVICES, backend_dtype_cases, relative_error, require_backend

FP32_BOUND = 1e-5


def loop_mux(x, keys, mode):
    """The DataMUX formulas instance by instance: (1/N) Σ_i x_i ⊙ v_i, or (1/√N) Σ_i x_i Φ_iᵀ."""
    N = x.shape[1]
    out = torch.zeros_like(x[:, 0])
    for i in range(N):
        out = out + (x[:, i] * keys[i] if mode == "hadamard" else x[:, i] @ keys[i].t())
    return out / (N if mode == "hadamard" else math.sqrt(N))


def loop_demux(h, p, weight, bias, gamma, beta, eps=1e-5):
    """out[b·N + i, t] = LN(GELU(W [p_i ; h_t] + b)), one (b, i, t) at a time (small shapes only)."""
    B, L, d = h.shape
    p = p if p.dim() == 3 else p.expand(B, *p.shape)
    N = p.shape[1]
    rows = []
    for b in range(B):
        for i in range(N):
            z = torch.stack([weight @ torch.cat([p[b, i], h[b, t]]) + bias for t in range(L)])
            rows.append(
                torch.nn.functional.layer_norm(torch.nn.functional.gelu(z), (weight.shape[0],), gamma, beta, eps)
            )
    return torch.stack(rows)


def mux_inputs(B, N, L, d, mode, dtype=torch.float32, device="cpu"):
    x = torch.randn(B, N, L, d, dtype=torch.float64)
    keys = hadamard_keys(N, d, norm=3.0).double() if mode == "hadamard" else ortho_keys(N, d).double()
    return x.to(device, dtype), keys.to(device, dtype)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", ["hadamard", "ortho"])
@pytest.mark.parametrize("B,N,L,d", [(2, 1, 3, 8), (3, 5, 7, 13), (2, 10, 33, 48), (1, 40, 9, 24)])
def test_mux_parity(backend, device, mode, B, N, L, d, poisoned_outputs):
    require_backend("mux", backend, device)
    x, keys = mux_inputs(B, N, L, d, mode, device=device)
    x.requires_grad_(True)
    keys.requires_grad_(True)
    out = ops.mux(x, keys, mode, backend=backend)
    x64, k64 = x.detach().double().cpu().requires_grad_(True), keys.detach().double().cpu().requires_grad_(True)
    expected = loop_mux(x64, k64, mode)
    assert relative_error(out, expected) < FP32_BOUND
    assert relative_error(ref.mux(x64, k64, mode), expected) < 1e-13
    grad = torch.randn(B, L, d, device=device)
    gx, gk = torch.autograd.grad(out, (x, keys), grad)
    ex, ek = torch.autograd.grad(expected, (x64, k64), grad.double().cpu())
    assert relative_error(gx, ex) < FP32_BOUND and relative_error(gk, ek) < FP32_BOUND


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_cases("mux", [torch.bfloat16, torch.float16]))
def test_mux_low_precision(backend, device, dtype):
    require_backend("mux", backend, device, dtype)
    x, keys = mux_inputs(2, 5, 6, 16, "hadamard", dtype=dtype, device=device)
    out = ops.mux(x, keys, "hadamard", backend=backend)
    expected = loop_mux(x.double().cpu(), keys.double().cpu(), "hadamard")
    torch_err = relative_error(loop_mux(x.cpu(), keys.cpu(), "hadamard"), expected)
    assert out.dtype == dtype and relative_error(out, expected) <= 2 * torch_err + 1e-3


def test_mux_flat_batch_and_errors():
    x, keys = mux_inputs(2, 3, 4, 8, "hadamard")
    flat = x.reshape(6, 4, 8)
    torch.testing.assert_close(ops.mux(flat, keys, num_instances=3, backend="cpu"), ops.mux(x, keys, backend="cpu"))
    with pytest.raises(ValueError, match="must be a multiple of num_instances"):
        ops.mux(flat[:5], keys, num_instances=3)
    with pytest.raises(ValueError, match="needs num_instances"):
        ops.mux(flat, keys)
    with pytest.raises(ValueError, match="keys must have shape"):
        ops.mux(x, keys[:2])
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.mux(x, keys, "binary")
    with pytest.raises(TypeError, match="keys must have x's dtype"):
        ops.mux(x, keys.double())
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.mux: x must be a 4-D"):
        ops.mux(x[0, 0], keys)


def demux_inputs(B, N, L, d, e, shared, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(B * 100 + N)
    h = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    p = torch.randn(*((N, d) if shared else (B, N, d)), generator=g, dtype=torch.float64)
    w = torch.randn(e, 2 * d, generator=g, dtype=torch.float64) / math.sqrt(2 * d)
    b = torch.randn(e, generator=g, dtype=torch.float64) * 0.1
    gamma = 1 + 0.1 * torch.randn(e, generator=g, dtype=torch.float64)
    beta = 0.1 * torch.randn(e, generator=g, dtype=torch.float64)
    return tuple(t.to(device, dtype) for t in (h, p, w, b, gamma, beta))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize(
    "B,N,L,d,e,shared",
    [(1, 1, 1, 4, 4, False), (2, 3, 5, 8, 8, False), (2, 5, 7, 12, 12, True), (1, 2, 6, 16, 9, False)],
)
def test_demux_parity(backend, device, B, N, L, d, e, shared, poisoned_outputs):
    require_backend("demux", backend, device)
    inputs = [t.requires_grad_(True) for t in demux_inputs(B, N, L, d, e, shared, device=device)]
    out = ops.demux(*inputs, backend=backend)
    inputs64 = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    expected = loop_demux(*inputs64)
    assert out.shape == (B * N, L, e)
    assert relative_error(out, expected) < FP32_BOUND
    assert relative_error(ref.demux(*inputs64), expected) < 1e-12
    grad = torch.randn(B * N, L, e, device=device)
    grads = torch.autograd.grad(out, inputs, grad)
    expected_grads = torch.autograd.grad(expected, inputs64, grad.double().cpu())
    for name, g, eg in zip(("h", "index_keys", "weight", "bias", "norm_weight", "norm_bias"), grads, expected_grads):
        assert relative_error(g, eg) < 5 * FP32_BOUND, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize(
    "B,N,L,d,e,shared", [(3, 2, 300, 24, 13, False), (2, 3, 129, 16, 40, True), (1, 4, 128, 8, 8, False)]
)
def test_demux_cpu_token_chunks(dtype, B, N, L, d, e, shared, poisoned_outputs):
    """The cpu forward works in chunks of ≤ 128 tokens per sequence (L = 300 -> 3 chunks of 100, 129 -> 2
    uneven ones), with e not a multiple of the 8-lane width (scalar tails), shared or per-sequence keys,
    and float32 / bfloat16 / float64 outputs, against the float64 reference; every row is written."""
    inputs = demux_inputs(B, N, L, d, e, shared, dtype=dtype)
    out = ops.demux(*inputs, backend="cpu")
    inputs64 = [t.double() for t in inputs]
    expected = ref.demux(*inputs64)
    assert out.shape == (B * N, L, e) and out.dtype == dtype and not torch.isnan(out).any()
    if dtype == torch.bfloat16:
        torch_err = relative_error(ref.demux(*inputs), expected)  # torch doing the same math in bfloat16
        assert relative_error(out, expected) <= 2 * torch_err + 1e-3
    else:
        assert relative_error(out, expected) < (FP32_BOUND if dtype == torch.float32 else 1e-12)


def test_demux_cpu_forward_independent_of_thread_count():
    """Each output row is computed by one task in a fixed order: bitwise equal with 1 and 2 threads."""
    inputs = demux_inputs(5, 3, 200, 32, 24, False)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.demux(*inputs, backend="cpu"))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shared", [False, True])
def test_demux_gradcheck_float64(backend, shared):
    inputs = [t.requires_grad_(True) for t in demux_inputs(2, 3, 4, 5, 6, shared, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: ops.demux(*a, backend=backend), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode", ["hadamard", "ortho"])
def test_mux_gradcheck_float64(backend, mode):
    x, keys = mux_inputs(2, 3, 4, 5, mode, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, k: ops.mux(a, k, mode, backend=backend),
        (x.requires_grad_(True), keys.requires_grad_(True)),
        eps=1e-6,
        atol=1e-8,
    )


def test_demux_empty_and_errors():
    h, p, w, b, gamma, beta = demux_inputs(2, 3, 4, 8, 8, False)
    out = ops.demux(h[:, :0], p, w, b, gamma, beta, backend="cpu")
    assert out.shape == (6, 0, 8)
    with pytest.raises(ValueError, match="fastcore_ai.ops.demux: weight must be"):
        ops.demux(h, p, w[:, :8], b, gamma, beta)
    with pytest.raises(ValueError, match="index_keys must be"):
        ops.demux(h, p[:1], w, b, gamma, beta)
    with pytest.raises(ValueError, match="norm_bias must be"):
        ops.demux(h, p, w, b, gamma, beta[:3])
    with pytest.raises(TypeError, match="bias must have h's dtype"):
        ops.demux(h, p, w, b.double(), gamma, beta)


def test_opcheck_mux_demux():
    x, keys = mux_inputs(2, 3, 4, 8, "hadamard")
    for mode, k in ((0, keys), (1, ortho_keys(3, 8))):
        torch.library.opcheck(
            torch.ops.fastcore_ai.mux_mux.default, (x.requires_grad_(True), k.requires_grad_(True), mode, "cpu")
        )
    h, p, w, b, gamma, beta = (t.requires_grad_(True) for t in demux_inputs(2, 3, 4, 8, 8, False))
    torch.library.opcheck(torch.ops.fastcore_ai.mux_demux.default, (h, p, w, b, gamma, beta, 1e-5, "cpu"))


def test_torch_compile_fullgraph_mux_demux_cpu():
    x, keys = mux_inputs(2, 3, 4, 8, "hadamard")
    _, p, w, b, gamma, beta = demux_inputs(2, 3, 4, 8, 8, False)

    def step(x):
        h = ops.mux(x, keys, backend="cpu")
        return ops.demux(h, p, w, b, gamma, beta, backend="cpu").square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_(True)
    compiled(xc).backward()
    xe = x.clone().requires_grad_(True)
    step(xe).backward()
    torch.testing.assert_close(xc.grad, xe.grad)

"""ops.ssm_step's per-step fast path (python/fastcore_ai/ops/s4.py, ssm_step): bitwise the registered
op's result, the same errors for bad inputs, and the registered op whenever something could observe it
(autograd, torch.compile, dispatch modes, tensor subclasses)."""

from __future__ import annotations

import pytest
import torch

from fastcore_ai import _native, nn as fnn, ops
from fastcore_ai.ops import s4 as s4_ops


def inputs(B=4, H=8, N=6, dtype=torch.complex64, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64
    dA = torch.exp(
        torch.complex(-0.1 * torch.rand(H, N, dtype=real, generator=g), torch.randn(H, N, dtype=real, generator=g))
    ).to(dtype)
    dB = torch.randn(H, N, dtype=torch.complex128, generator=g).to(dtype)
    C = torch.randn(H, N, dtype=torch.complex128, generator=g).to(dtype)
    state = torch.randn(B, H, N, dtype=torch.complex128, generator=g).to(dtype)
    u = torch.randn(B, H, generator=g, dtype=torch.float64).to(torch.float32 if dtype == torch.complex64 else real)
    return state, u, dA, dB, C, torch.randn(H, generator=g)


def registered(state, u, dA, dB, C, D, backend="cpu"):
    return torch.ops.fastcore_ai.s4_ssm_step(state, u, dA, dB, C, D, backend)


@pytest.fixture(autouse=True)
def fresh_cache():
    s4_ops.step_fast_path_cache_clear()
    yield
    s4_ops.step_fast_path_cache_clear()


def registered_calls(monkeypatch):
    """Record the calls that went through the registered ops (the slow path) while the test runs: the
    argument tuples, the backend last."""
    calls = []
    for name in ("_step_op", "_step_inplace_op"):
        defined = getattr(s4_ops, name)
        monkeypatch.setattr(defined, "op", lambda *a, op=defined.op: calls.append(a) or op(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("with_D", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (16, 32, 32), (2, 3, 13)])
def test_fast_path_bitwise_equals_registered_op(dtype, with_D, shape):
    state, u, dA, dB, C, D = inputs(*shape, dtype=dtype)
    D = D if with_D else None
    y_ref, s_ref = registered(state, u, dA, dB, C, D)
    for _ in range(2):  # the first call fills the validation cache, the second hits it
        y, s = ops.ssm_step(state, u, dA, dB, C, D)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        work = state.clone()
        y2, returned = ops.ssm_step(work, u, dA, dB, C, D, inplace=True)
        assert returned is work and torch.equal(y2, y_ref) and torch.equal(work, s_ref)


def test_fast_path_is_taken_and_cached(monkeypatch):
    slow = registered_calls(monkeypatch)
    state, u, dA, dB, C, D = inputs()
    validations = []
    real_validate = s4_ops._step_validate
    monkeypatch.setattr(s4_ops, "_step_validate", lambda *a: validations.append(1) or real_validate(*a))
    for _ in range(3):
        ops.ssm_step(state, u, dA, dB, C, D)
    assert slow == [] and validations == []  # the checks run in C++, the selection is backends.select's
    # other shapes, no D, another u dtype: the tensor checks run in C++ on every call, the cached backend
    # selection (per device and state dtype) still holds, and the result is the registered op's
    s2, u2, dA2, dB2, C2, _ = inputs(3, 5, 7)
    for args in [(state, u, dA, dB, C, None), (s2, u2, dA2, dB2, C2, None), (state, u.bfloat16(), dA, dB, C, D)]:
        y, s = ops.ssm_step(*args)
        y_ref, s_ref = registered(*args)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    assert slow == [] and validations == []
    ops.ssm_step(*inputs(dtype=torch.complex128))  # another state dtype: selected once more, still fast
    assert slow == [] and validations == []


def test_fast_path_views_and_dtypes_bitwise():
    # non-contiguous / conjugated / bf16 inputs: the native call resolves them, the same as the registered op
    state, u, dA, dB, C, D = inputs(3, 5, 7)
    cases = [
        (state.transpose(0, 1).contiguous().transpose(0, 1), u, dA, dB, C, D),
        (state.conj(), u, dA.conj(), dB, C.conj(), D),
        (state, u.bfloat16(), dA, dB, C, D.bfloat16()),
        (state, u.t().contiguous().t(), dA, dB, C, D[::1]),
        (state[:, :, ::2], u, dA[:, ::2], dB[:, ::2], C[:, ::2], D),
    ]
    for args in cases:
        y_ref, s_ref = registered(*args)
        for _ in range(2):
            y, s = ops.ssm_step(*args)
            assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


BAD = [
    (lambda s, u, a, b, c, d: (s.real, u, a, b, c, d), TypeError, "state must be"),
    (lambda s, u, a, b, c, d: (s, u[:1], a, b, c, d), ValueError, "u must have shape"),
    (lambda s, u, a, b, c, d: (s, u, a, b[:, :2], c, d), ValueError, "dB must be"),
    (lambda s, u, a, b, c, d: (s, u, a.to(torch.complex128), b, c, d), ValueError, "dA must be"),
    (lambda s, u, a, b, c, d: (s, u, a, b, c, d[:2]), ValueError, "D must have H"),
    (lambda s, u, a, b, c, d: (s, u.int(), a, b, c, d), TypeError, "u must be"),
    (lambda s, u, a, b, c, d: (s, u, a, b, c.real, d), TypeError, "C must be"),
    (lambda s, u, a, b, c, d: (s[..., :0], u, a[:, :0], b[:, :0], c[:, :0], d), ValueError, "N"),
    (lambda s, u, a, b, c, d: (s, u, a, b, c, d.view(2, -1)), ValueError, "D must be a 1-D"),
    (lambda s, u, a, b, c, d: (s, u, a, b, "C", d), TypeError, "C must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,error,match", BAD)
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_inputs_raise_the_same_errors_after_good_calls(make, error, match, inplace):
    state, u, dA, dB, C, D = inputs(2, 4, 6)
    ops.ssm_step(state.clone(), u, dA, dB, C, D, inplace=inplace)  # warm the cache with the good signature
    bad = make(state.clone(), u, dA, dB, C, D)
    with pytest.raises(error, match=match):
        ops.ssm_step(*bad, inplace=inplace)
    with pytest.raises(error, match=match):  # and again: a failing signature is never cached
        ops.ssm_step(*bad, inplace=inplace)


@pytest.mark.parametrize("make,error,match", BAD[:-1])  # the last one is not a tensor: refused before C++
@pytest.mark.parametrize("inplace", [False, True])
def test_native_checks_refuse_every_bad_input(make, error, match, inplace):
    """The C++ half of the fast path's validation computes nothing for an input the Python checks reject."""
    state, u, dA, dB, C, D = inputs(2, 4, 6)
    native = _native.native()
    assert len(native.s4_ssm_step_if_valid(state, u, dA, dB, C, D, inplace, s4_ops.MAX_STATES)) == 2
    assert native.s4_ssm_step_if_valid(*make(state, u, dA, dB, C, D), inplace, s4_ops.MAX_STATES) == []
    too_many = inputs(1, 2, s4_ops.MAX_STATES + 1)
    assert native.s4_ssm_step_if_valid(*too_many, inplace, s4_ops.MAX_STATES) == []
    if inplace:
        strided = state.transpose(0, 1).contiguous().transpose(0, 1)
        assert native.s4_ssm_step_if_valid(strided, u, dA, dB, C, D, True, s4_ops.MAX_STATES) == []
        assert native.s4_ssm_step_if_valid(state.conj(), u, dA, dB, C, D, True, s4_ops.MAX_STATES) == []


def test_inplace_errors_through_fast_path():
    state, u, dA, dB, C, D = inputs(2, 3, 4)
    ops.ssm_step(state.clone(), u, dA, dB, C, D, inplace=True)  # cache the contiguous signature
    strided = state.transpose(0, 1).contiguous().transpose(0, 1)
    for _ in range(2):
        with pytest.raises(ValueError, match="contiguous"):
            ops.ssm_step(strided, u, dA, dB, C, D, inplace=True)
        with pytest.raises(ValueError, match="contiguous, non-conjugated"):
            ops.ssm_step(state.clone().conj(), u, dA, dB, C, D, inplace=True)
        with pytest.raises(ValueError, match="inplace=True has no autograd"):
            ops.ssm_step(state.clone(), u.clone().requires_grad_(), dA, dB, C, D, inplace=True)
        with pytest.raises(TypeError, match="inplace must be a bool"):
            ops.ssm_step(state.clone(), u, dA, dB, C, D, inplace=1)
    with torch.no_grad():  # under no_grad a requires-grad input is fine, and fast
        y, s = ops.ssm_step(state.clone(), u.clone().requires_grad_(), dA, dB, C, D, inplace=True)
        assert torch.equal(y, registered(state, u, dA, dB, C, D)[0])


def test_backend_selection_is_part_of_the_cache_key(monkeypatch):
    state, u, dA, dB, C, D = inputs()
    ops.ssm_step(state, u, dA, dB, C, D)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        if torch.cuda.is_available():
            pytest.skip("cuda is available here")
        ops.ssm_step(state, u, dA, dB, C, D, backend="cuda")
    slow = registered_calls(monkeypatch)
    ops.ssm_step(state, u, dA, dB, C, D, backend="reference")  # not native: the registered op
    assert len(slow) == 1 and slow[-1][-1] == "reference"
    import fastcore_ai

    with fastcore_ai.use_backend("reference"):
        ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 2 and slow[-1][-1] == "reference"
    monkeypatch.setenv("FASTCORE_AI_BACKEND", "reference")
    ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 3 and slow[-1][-1] == "reference"
    monkeypatch.delenv("FASTCORE_AI_BACKEND")
    ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 3


def test_autograd_takes_the_registered_op(monkeypatch):
    slow = registered_calls(monkeypatch)
    state, u, dA, dB, C, D = inputs()
    D = D.clone().requires_grad_()
    y, s = ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 1 and y.requires_grad
    y.sum().backward()
    assert D.grad is not None
    with torch.no_grad():
        y2, _ = ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 1 and torch.equal(y2, y.detach())
    with torch.inference_mode():
        y3, _ = ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 1 and torch.equal(y3, y.detach())


def test_inplace_fast_path_bumps_the_version_counter():
    state, u, dA, dB, C, D = inputs()
    x = torch.randn(state.shape, dtype=state.dtype, requires_grad=True)
    z = (x * state).sum()  # autograd saved `state`
    version = state._version
    ops.ssm_step(state, u, dA, dB, C, D, inplace=True)
    assert state._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.abs().backward()


def test_modes_and_subclasses_take_the_registered_op(monkeypatch):
    slow = registered_calls(monkeypatch)
    state, u, dA, dB, C, D = inputs()
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log():
        ops.ssm_step(state, u, dA, dB, C, D)
    assert len(slow) == 1 and any("s4_ssm_step" in name for name in seen)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (state, u, dA, dB, C, D)]
        y, s = ops.ssm_step(*fake)
        assert y.shape == u.shape and s.shape == state.shape
    assert len(slow) == 2


def test_compile_takes_the_registered_op(monkeypatch):
    pytest.importorskip("torch._dynamo")
    state, u, dA, dB, C, D = inputs()
    y_ref, s_ref = registered(state, u, dA, dB, C, D)
    compiled = torch.compile(lambda *a: ops.ssm_step(*a), backend="eager")
    y, s = compiled(state, u, dA, dB, C, D)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def test_s4conv_step_uses_fast_path_under_no_grad(monkeypatch):
    layer = fnn.S4Conv(8, d_state=8)
    layer.setup_step()
    u = torch.randn(3, 8)
    state = layer.default_state(3)
    y_grad, s_grad = layer.step(u, state)  # D is a parameter: the registered op, differentiable
    assert y_grad.requires_grad
    slow = registered_calls(monkeypatch)
    with torch.no_grad():
        y, s = layer.step(u, state)
        work = state.clone()
        y2, returned = layer.step(u, work, inplace=True)
    assert slow == [] and returned is work
    assert torch.equal(y, y_grad.detach()) and torch.equal(s, s_grad) and torch.equal(y2, y) and torch.equal(work, s)


def test_s4block_inplace_step_matches_functional_and_forward():
    torch.manual_seed(2)
    B, H, L = 2, 8, 24
    block = fnn.S4Block(H, d_state=16, l_max=L).eval()
    x = torch.randn(B, L, H)
    with torch.no_grad():
        y_full = block(x)
        block.setup_step()
        state = block.default_state(B)
        work = block.default_state(B)
        ys = []
        for t in range(L):
            y, state = block.step(x[:, t], state)
            y2, returned = block.step(x[:, t], work, inplace=True)
            assert returned is work and torch.equal(y2, y) and torch.equal(work, state)
            ys.append(y2)
    assert (torch.stack(ys, 1) - y_full).norm() / y_full.norm() < 1e-4

"""Tests generated from the op registry (fastcore_ai.ops._define.REGISTRY) and the public op list, so a
new op is covered without writing them: opcheck of every registered op on every backend that runs here,
the direct native path bitwise equal to the registered op, torch.compile(fullgraph=True) of every public
op with the default backend, and coverage (no op without sample calls)."""

import pytest
import torch

import fastcore_ai
from fastcore_ai import backends, ops
from fastcore_ai.ops._define import REGISTRY

from _examples import NOT_COMPILABLE, PUBLIC, REGISTERED

# opcheck backends that run on this machine's CPU tensors (triton under the interpreter is covered by the
# family tests; opcheck's fake-tensor checks need no GPU for cpu/reference).
_HERE = ("cpu", "reference")


def _public_ops():
    return sorted(
        name
        for name in ops.__all__
        if callable(getattr(ops, name))
        and not isinstance(getattr(ops, name), type)
        and not name.isupper()
        and name not in _NOT_OPS
    )


# public names that are helpers, not ops (no kernel, no backend)
_NOT_OPS = {"switch_load_balancing_loss", "fft_conv_size", "RouterOutput", "DispatchPlan"}


def test_every_registered_op_has_sample_calls():
    missing = sorted(set(REGISTRY) - set(REGISTERED))
    assert not missing, f"registered ops without sample calls in tests/_examples_<family>.py: {missing}"
    unknown = sorted(set(REGISTERED) - set(REGISTRY))
    assert not unknown, f"sample calls for ops that are not registered: {unknown}"


def test_every_public_op_has_a_compile_case():
    missing = sorted(set(_public_ops()) - set(PUBLIC) - set(NOT_COMPILABLE))
    assert not missing, f"public ops without a compile case in tests/_examples_<family>.py: {missing}"


# The naming rule (README, "Op names"): a registered op is `fastcore_ai::<family>_<public name>`, or the
# public name itself where that already starts with the family's tag (moe_*, and pq's pq*/ivfpq* index
# kinds); its backward, in-place and training companions add `_backward`, `_` and `_train`.
_FAMILY_TAGS = {"s4": ("s4_",), "moe": ("moe_",), "nerf": ("nerf_",), "pq": ("pq", "ivfpq"), "mux": ("mux_",)}
_COMPANION_SUFFIXES = ("_backward", "_train", "_")


def _family_of(module_name):
    family = module_name.rsplit(".", 1)[-1].split("_")[0]
    assert family in _FAMILY_TAGS, f"op defined outside a family module: {module_name}"
    return family


def test_op_names_follow_the_naming_rule():
    public = set(ops.__all__)
    assert len(public) == len(ops.__all__), "a public name is exported twice from fastcore_ai.ops"
    for name, defined in REGISTRY.items():
        family = _family_of(defined.module)
        assert name.startswith(_FAMILY_TAGS[family]), (
            f"{name}: registered ops of {family} start with {_FAMILY_TAGS[family]}"
        )
        base = name
        for suffix in _COMPANION_SUFFIXES:
            if base.endswith(suffix) and base[: -len(suffix)] in REGISTRY:
                base = base[: -len(suffix)]
                break
        candidates = {base, base[len(family) + 1 :] if base.startswith(family + "_") else base}
        assert candidates & public, f"{name}: no public op named {sorted(candidates)} in fastcore_ai.ops"


def test_every_registered_op_is_a_torch_op():
    for name, op in REGISTRY.items():
        assert getattr(torch.ops.fastcore_ai, name).default is not None
        assert op.qualname == f"fastcore_ai::{name}"
        assert "reference" in op.impls, f"{name} has no reference implementation"


def _cases(backends_wanted):
    cases = []
    for name in sorted(REGISTRY):
        for backend in backends_wanted:
            if backend in REGISTRY[name].impls:
                cases.append(pytest.param(name, backend, id=f"{name}-{backend}"))
    return cases


@pytest.mark.parametrize("name, backend", _cases(_HERE))
def test_opcheck(name, backend):
    torch.manual_seed(0)
    op = getattr(torch.ops.fastcore_ai, name).default
    for args in REGISTERED[name]():
        torch.library.opcheck(op, (*args, backend))


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _assert_bitwise(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if a.is_complex():
            a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
        same_nan = a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a, b) or (same_nan and torch.equal(a.nan_to_num(), b.nan_to_num())), where
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{where}[{i}]")
        return
    assert a == b, where


@pytest.mark.parametrize("name", [n for n in sorted(REGISTRY) if "cpu" in REGISTRY[n].impls])
def test_direct_path_matches_the_registered_op(name):
    """Called through DefinedOp with a native backend and no autograd, the op skips torch.library's
    dispatch; the results (and in-place effects) must be bitwise the registered op's."""
    op = REGISTRY[name]
    for args in REGISTERED[name]():
        with torch.no_grad():
            direct_args, registered_args = _detached(args), _detached(args)
            assert op.direct_call_allowed(direct_args)
            direct = op(*direct_args, backend="cpu")
            registered = op.op(*registered_args, "cpu")
        _assert_bitwise(direct, registered, name)
        _assert_bitwise(direct_args, registered_args, f"{name} arguments after the call")


def test_direct_path_is_not_taken_when_something_intercepts():
    op = REGISTRY["moe_topk_route"]
    logits = torch.randn(5, 4, requires_grad=True)
    assert not op.direct_call_allowed((logits, 2, True))  # autograd needed
    with torch.no_grad():
        assert op.direct_call_allowed((logits, 2, True))

        class Subclass(torch.Tensor):
            pass

        assert not op.direct_call_allowed((logits.detach().as_subclass(Subclass), 2, True))
        attention = REGISTRY["mux_attention"]  # an Optional[Tensor] position counts too
        q = torch.randn(1, 1, 2, 4)
        assert attention.direct_call_allowed((q, q, q, None, None, False, 0.5))
        assert not attention.direct_call_allowed((q, q, q, q.new_zeros(2, 2).as_subclass(Subclass), None, False, 0.5))
    from torch.utils._python_dispatch import TorchDispatchMode

    class Spy(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Spy.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        ops.moe_topk_route(logits.detach(), 2, backend="cpu")
    assert any("moe_topk_route" in name for name in Spy.seen)  # the mode saw the registered op


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_torch_compile_fullgraph_default_backend(name):
    """What users write: the public op, backend left at "auto", under torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    fn, args = PUBLIC[name]()
    expected = fn(*_detached(args))
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*_detached(args))
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("name", sorted(NOT_COMPILABLE))
def test_documented_compile_limits_still_hold(name):
    """The ops listed as not compilable under fullgraph really are not (so the list cannot go stale)."""
    reason, case = NOT_COMPILABLE[name]
    torch._dynamo.reset()
    fn, args = case()
    with pytest.raises(Exception) as info:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    assert (
        "Unsupported" in type(info.value).__name__
        or "graph break" in str(info.value).lower()
        or "data-dependent" in str(info.value).lower()
    ), f"{name} ({reason}) failed for another reason: {info.value}"


def test_selection_is_cached_and_respects_overrides(monkeypatch):
    x = torch.randn(4, 8)
    backends.clear_selection_cache()
    assert backends.select("moe_topk_route", "auto", x.device, x.dtype, "logits", k=2, num_experts=8) == "cpu"
    with fastcore_ai.use_backend("reference"):
        assert backends.select("moe_topk_route", "auto", x.device, x.dtype, "logits", k=2, num_experts=8) == "reference"
    monkeypatch.setenv("FASTCORE_AI_BACKEND", "reference")
    assert backends.select("moe_topk_route", "auto", x.device, x.dtype, "logits", k=2, num_experts=8) == "reference"
    monkeypatch.delenv("FASTCORE_AI_BACKEND")
    assert backends.select("moe_topk_route", "auto", x.device, x.dtype, "logits", k=2, num_experts=8) == "cpu"
    with pytest.raises(RuntimeError, match="cannot run"):  # failures are raised every time
        backends.select("moe_topk_route", "cuda", x.device, x.dtype, "logits", k=2, num_experts=8)
    with pytest.raises(RuntimeError, match="cannot run"):
        backends.select("moe_topk_route", "cuda", x.device, x.dtype, "logits", k=2, num_experts=8)

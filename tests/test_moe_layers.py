"""moe_grouped_mlp (reference and cpu backends; the triton backend has tests/test_triton_grouped_mlp.py)
and the MoE layers: parity with a float64 per-expert loop, gradients, capacity, compile, errors."""

import pytest
import torch

import fastcore_ai
from fastcore_ai import ops
from fastcore_ai.reference import moe_grouped_mlp as reference_mlp
from _helpers import BACKEND_DEVICES, relative_error, require_backend

OP = "moe_grouped_mlp"


def random_problem(S, H, I, E, gated, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, S + 1, (E - 1,), generator=generator)).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([S])])
    x = torch.randn(S, H, generator=generator).to(dtype)
    w1 = (torch.randn(E, (2 if gated else 1) * I, H, generator=generator) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=generator) / I**0.5).to(dtype)
    return x, offsets, w1, w2


def loop_oracle(x, offsets, w1, w2, act, gated):
    """Independent float64 oracle: one token at a time."""
    y = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    I = w2.shape[2]
    for e in range(w2.shape[0]):
        for s in range(int(offsets[e]), int(offsets[e + 1])):
            gu = w1[e].double() @ x[s].double()
            h = reference_mlp.activation(act, gu[:I]) * gu[I:] if gated else reference_mlp.activation(act, gu)
            y[s] = w2[e].double() @ h
    return y


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("S,H,I,E", [(0, 8, 4, 3), (1, 1, 1, 1), (37, 33, 17, 3), (200, 64, 48, 8)])
def test_grouped_mlp_parity(backend, activation, gated, S, H, I, E, poisoned_outputs):
    x, offsets, w1, w2 = random_problem(S, H, I, E, gated)
    y = ops.moe_grouped_mlp(x, offsets, w1, w2, activation=activation, gated=gated, backend=backend)
    assert y.shape == (S, H) and y.dtype == x.dtype
    assert relative_error(y, loop_oracle(x, offsets, w1, w2, activation, gated)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_mlp_low_precision(dtype):
    x, offsets, w1, w2 = random_problem(120, 64, 32, 4, True, dtype)
    y = ops.moe_grouped_mlp(x, offsets, w1, w2, backend="cpu")
    oracle = loop_oracle(x, offsets, w1, w2, "silu", True)
    # No worse than 2x PyTorch doing the same per-expert math in that dtype (DESIGN's low-precision rule).
    torch_same_dtype = torch.empty_like(x)
    for e in range(4):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        gate, up = (x[rows] @ w1[e].t()).chunk(2, dim=1)
        torch_same_dtype[rows] = (torch.nn.functional.silu(gate) * up) @ w2[e].t()
    baseline = relative_error(torch_same_dtype, oracle)
    assert relative_error(y, oracle) <= 2 * baseline + 1e-6


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", False)])
def test_grouped_mlp_gradcheck(backend, activation, gated):
    x, offsets, w1, w2 = random_problem(11, 5, 3, 3, gated, torch.float64, seed=3)
    args = tuple(t.requires_grad_() for t in (x, w1, w2))
    fn = lambda a, b, c: ops.moe_grouped_mlp(a, offsets, b, c, activation=activation, gated=gated, backend=backend)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_grouped_mlp_backward_cpu_matches_reference_float32():
    x, offsets, w1, w2 = random_problem(90, 24, 16, 5, True)
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
        y = ops.moe_grouped_mlp(leaves[0], offsets, leaves[1], leaves[2], backend=backend)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert relative_error(a, b) < 1e-5


def test_grouped_mlp_opcheck():
    x, offsets, w1, w2 = random_problem(20, 6, 4, 3, True)
    torch.library.opcheck(
        torch.ops.fastcore_ai.moe_grouped_mlp.default,
        (x.requires_grad_(), offsets, w1.requires_grad_(), w2, "silu", True, "cpu"),
    )


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda x, o, w1, w2: (x[0], o, w1, w2), ValueError, ["x_sorted", "2-D"]),
        (lambda x, o, w1, w2: (x, o.int(), w1, w2), TypeError, ["expert_offsets", "int32"]),
        (lambda x, o, w1, w2: (x, o[:-1], w1, w2), ValueError, ["expert_offsets", "E + 1"]),
        (lambda x, o, w1, w2: (x, o, w1[:, :5], w2), ValueError, ["w_gate_up"]),
        (lambda x, o, w1, w2: (x, o, w1, w2[:, :3]), ValueError, ["w_down"]),
        (lambda x, o, w1, w2: (x.double(), o, w1, w2), TypeError, ["share one dtype"]),
    ],
)
def test_grouped_mlp_errors(make, error, words):
    x, offsets, w1, w2 = random_problem(10, 6, 4, 3, True)
    with pytest.raises(error) as info:
        ops.moe_grouped_mlp(*make(x, offsets, w1, w2))
    assert str(info.value).startswith("fastcore_ai.ops.moe_grouped_mlp: ")
    for word in words:
        assert word in str(info.value)


def test_grouped_mlp_rejects_bad_offsets_on_cpu():
    x, offsets, w1, w2 = random_problem(10, 6, 4, 3, True)
    bad = offsets.clone()
    bad[-1] = 11
    with pytest.raises(RuntimeError, match="moe_grouped_mlp: expert_offsets must start at 0 and end at S"):
        ops.moe_grouped_mlp(x, bad, w1, w2, backend="cpu")


@pytest.mark.parametrize(
    "change",
    [
        lambda o: o.copy_(torch.tensor([0, 7, 3, 10])),  # not monotone
        lambda o: o.copy_(torch.tensor([-2, 3, 6, 10])),  # negative first entry
        lambda o: o.copy_(torch.tensor([0, 3, 6, 12])),  # past the end (S = 10)
        lambda o: o.copy_(torch.tensor([0, 3, 6, 9])),  # short of the end
    ],
)
def test_grouped_mlp_reference_rejects_bad_offsets(change):
    """The reference backend checks the offset values (it reads them on the host anyway), with the named
    ValueError, instead of silently computing on a malformed grouping."""
    x, offsets, w1, w2 = random_problem(10, 6, 4, 3, True)
    bad = offsets.clone()
    change(bad)
    for call in (
        lambda: ops.moe_grouped_mlp(x, bad, w1, w2, backend="reference"),
        lambda: torch.ops.fastcore_ai.moe_grouped_mlp(x, bad, w1, w2, "silu", True, "reference"),
    ):
        with pytest.raises(ValueError, match=r"^fastcore_ai\.ops\.moe_grouped_mlp: expert_offsets must start at 0"):
            call()


# ---- layers -------------------------------------------------------------------------------------


def dense_moe_oracle(layer: fastcore_ai.nn.MoE, x: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ_j w_tj · expert_{e_tj}(x_t) over kept assignments, one token at a time, float64."""
    routed = layer.last_router
    experts = layer.experts
    tokens = x.reshape(-1, layer.d_model).double()
    out = torch.zeros_like(tokens)
    I = experts.intermediate_size
    for t in range(tokens.shape[0]):
        for j in range(routed.expert_ids.shape[1]):
            if not bool(routed.kept[t, j]):
                continue
            e = int(routed.expert_ids[t, j])
            gu = experts.gate_up_proj[e].detach().double() @ tokens[t].detach()
            h = torch.nn.functional.silu(gu[:I]) * gu[I:]
            out[t] += float(routed.weights[t, j].detach()) * (experts.down_proj[e].detach().double() @ h)
    return out.reshape(x.shape)


@pytest.mark.parametrize("training", [True, False])
def test_moe_layer_matches_token_loop(training):
    torch.manual_seed(1)
    layer = fastcore_ai.nn.MoE(
        16, 24, num_experts=4, k=2, capacity_factor=0.5, eval_capacity_factor=None, backend="cpu"
    )
    layer.train(training)
    x = torch.randn(3, 20, 16)
    y = layer(x)
    assert y.shape == x.shape
    if training:
        assert not bool(layer.last_router.kept.all()), "capacity 0.5 must drop some assignments"
    else:
        assert bool(layer.last_router.kept.all()), "eval_capacity_factor=None is dropless"
    assert relative_error(y, dense_moe_oracle(layer, x)) < 1e-5
    (y.square().mean() + layer.aux_loss).backward()
    for p in layer.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all())
    assert float(layer.router.weight.grad.abs().sum()) > 0


def test_moe_layer_backward_matches_reference_backend():
    torch.manual_seed(2)
    grads = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(2)
        layer = fastcore_ai.nn.MoE(12, 20, num_experts=3, k=2, backend=backend)
        x = torch.randn(30, 12)
        layer(x).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert relative_error(a, b) < 1e-5


def test_moe_experts_hf_layout_and_repr():
    experts = fastcore_ai.nn.MoEExperts(4, 16, 8)
    assert experts.gate_up_proj.shape == (4, 16, 16) and experts.down_proj.shape == (4, 16, 8)
    assert "num_experts=4" in repr(experts)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "relu")])
def test_grouped_mlp_op_all_backends_forward_backward(backend, device, gated, activation):
    """Through the registered op and its autograd (the triton launchers have their own kernel tests)."""
    require_backend(OP, backend, device)
    x, offsets, w1, w2 = (t.to(device) for t in random_problem(70, 24, 16, 4, gated))
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = ops.moe_grouped_mlp(
        leaves[0], offsets, leaves[1], leaves[2], activation=activation, gated=gated, backend=backend
    )
    grad_out = torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape)
    (y * grad_out).sum().backward()
    x64 = [t.detach().double().cpu().requires_grad_() for t in (x, w1, w2)]
    y64 = ops.moe_grouped_mlp(
        x64[0], offsets.cpu(), x64[1], x64[2], activation=activation, gated=gated, backend="reference"
    )
    (y64 * grad_out.double().cpu()).sum().backward()
    assert relative_error(y, y64) < 1e-5
    for ours, oracle in zip(leaves, x64):
        assert relative_error(ours.grad, oracle.grad) < 1e-5


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_moe_layer_under_torch_compile(compile_backend):
    """The whole block (route with capacity -> dispatch with its data-dependent row count -> grouped
    MLP -> combine) traces as one graph; outputs and gradients equal eager."""
    torch.manual_seed(0)
    layer = fastcore_ai.nn.MoE(16, 24, num_experts=4, k=2, capacity_factor=0.75, backend="cpu")
    x = torch.randn(40, 16)
    eager = layer(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    out = compiled(x)
    out.square().sum().backward()
    assert torch.equal(out, eager) or relative_error(out, eager) < 1e-6
    for p, expected in zip(layer.parameters(), eager_grads):
        assert relative_error(p.grad, expected) < 1e-6


def test_moe_experts_op_matches_token_loop():
    torch.manual_seed(4)
    T, H, I, E, k = 45, 12, 10, 5, 2
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    weights = torch.rand(T, k)
    kept = torch.rand(T, k) > 0.3
    w1, w2 = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 4
    out = ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend="cpu")
    expected = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if kept[t, j]:
                e = int(ids[t, j])
                gu = w1[e].double() @ x[t].double()
                expected[t] += float(weights[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(gu[:I]) * gu[I:]))
    assert relative_error(out, expected) < 1e-5

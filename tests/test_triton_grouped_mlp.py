"""Direct tests of the Triton grouped expert MLP (triton_kernels/moe_grouped_mlp.py) against an
independent float64 per-expert torch loop written here.

Without a GPU the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py before
triton is imported); with a GPU they run natively on CUDA tensors. Bounds: relative Frobenius error
< 1e-5 for float32 (oracle on the same values in float64), < 2e-2 for bfloat16 / float16.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastcore_ai import backends  # noqa: E402
from fastcore_ai.triton_kernels import moe_grouped_mlp as gm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# triton is a dependency and conftest.py sets TRITON_INTERPRET=1 before it is imported, so these tests always
# run: a machine where they cannot is a broken setup, reported as an error rather than skipped.
assert DEVICE.type == "cuda" or backends.triton_interpreted(), (
    "triton cannot run here: no GPU and triton was imported without TRITON_INTERPRET=1"
)

pytestmark = pytest.mark.triton
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


# ---- oracle ------------------------------------------------------------------------------------


def _act64(g, activation):
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu":
        return 0.5 * g * (1.0 + torch.erf(g / 2.0**0.5))
    return torch.clamp(g, min=0.0)


def _act_grad64(g, activation):
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1.0 + g * (1.0 - s))
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(g / 2.0**0.5)) + g * torch.exp(-0.5 * g * g) / (2.0 * torch.pi) ** 0.5
    return (g > 0).double()


def oracle(x, offsets, w_gate_up, w_down, grad_y, activation, gated):
    """Float64 loop over experts: (y, gate_up, grad_x, grad_w_gate_up, grad_w_down)."""
    x, w1, w2, gy = (t.detach().double().cpu() for t in (x, w_gate_up, w_down, grad_y))
    offsets = offsets.cpu().tolist()
    S, H = x.shape
    E, n1, _ = w1.shape
    I = n1 // 2 if gated else n1
    y = torch.zeros(S, H, dtype=torch.float64)
    gate_up = torch.zeros(S, n1, dtype=torch.float64)
    grad_x = torch.zeros(S, H, dtype=torch.float64)
    grad_w1 = torch.zeros_like(w1)
    grad_w2 = torch.zeros_like(w2)
    for e in range(E):
        lo, hi = offsets[e], offsets[e + 1]
        xe, ge = x[lo:hi], gy[lo:hi]
        gu = xe @ w1[e].T
        if gated:
            gate, up = gu[:, :I], gu[:, I:]
            h = _act64(gate, activation) * up
        else:
            h = _act64(gu, activation)
        y[lo:hi] = h @ w2[e].T
        gate_up[lo:hi] = gu
        grad_h = ge @ w2[e]
        grad_w2[e] = ge.T @ h
        if gated:
            grad_gu = torch.cat((grad_h * up * _act_grad64(gate, activation), grad_h * _act64(gate, activation)), 1)
        else:
            grad_gu = grad_h * _act_grad64(gu, activation)
        grad_x[lo:hi] = grad_gu @ w1[e]
        grad_w1[e] = grad_gu.T @ xe
    return y, gate_up, grad_x, grad_w1, grad_w2


def rel(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite output (unwritten element?)"
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


# ---- inputs ------------------------------------------------------------------------------------


def random_offsets(S, E, gen):
    """Uneven [E + 1] int64 offsets; with E > 1 at least one expert (the first or a middle one) is empty."""
    if E == 1:
        return torch.tensor([0, S], dtype=torch.int64)
    weights = torch.rand(E, generator=gen) ** 2 + 0.05
    weights[int(torch.randint(E, (1,), generator=gen))] = 0.0  # an empty expert
    if E > 3:
        weights[0] = 0.0  # and the first one
    ids = torch.multinomial(weights, S, replacement=True, generator=gen) if S else torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(ids, minlength=E)
    return torch.cat((torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)))


def make_inputs(S, E, H, I, gated, dtype, gen, noncontiguous=False):
    n1 = 2 * I if gated else I
    x = torch.randn(S, H, generator=gen)
    w1 = torch.randn(E, n1, H, generator=gen) / max(H, 1) ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / max(I, 1) ** 0.5
    gy = torch.randn(S, H, generator=gen)
    if noncontiguous:
        # x_sorted as a column slice of a wider tensor, w_gate_up / w_down as transposed views, grad_y transposed.
        x = torch.cat((x, torch.randn(S, 3, generator=gen)), 1)[:, :H]
        w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)
        w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
        gy = gy.T.contiguous().T
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (x, w1, w2, gy))


def run_and_check(S, E, H, I, gated, activation, dtype=torch.float32, noncontiguous=False, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * S + 100 * E + 10 * H + I)
    offsets = random_offsets(S, E, gen).to(DEVICE)
    x, w1, w2, gy = make_inputs(S, E, H, I, gated, dtype, gen, noncontiguous)
    if noncontiguous and S > 1 and H > 1:
        assert not x.is_contiguous() and not w1.is_contiguous() and not gy.is_contiguous()
    y, gate_up = gm.grouped_mlp_forward(x, offsets, w1, w2, activation, gated)
    grad_x, grad_w1, grad_w2 = gm.grouped_mlp_backward(gy, x, offsets, w1, w2, gate_up, activation, gated)
    want = oracle(x, offsets, w1, w2, gy, activation, gated)
    n1 = 2 * I if gated else I
    assert (y.dtype, gate_up.dtype, grad_x.dtype, grad_w1.dtype, grad_w2.dtype) == (
        dtype,
        torch.float32,
        dtype,
        dtype,
        dtype,
    )
    assert y.shape == (S, H) and gate_up.shape == (S, n1) and grad_x.shape == (S, H)
    assert grad_w1.shape == (E, n1, H) and grad_w2.shape == (E, H, I)
    errors = {
        name: rel(got, ref)
        for name, got, ref in zip(
            ("y", "gate_up", "grad_x", "grad_w_gate_up", "grad_w_down"), (y, gate_up, grad_x, grad_w1, grad_w2), want
        )
    }
    for name, err in errors.items():
        assert err < TOL[dtype], f"{name}: relative error {err:.3g} >= {TOL[dtype]} ({errors})"
    # experts with no rows: exactly zero weight gradients
    counts = (offsets[1:] - offsets[:-1]).cpu()
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert not grad_w1[e].any() and not grad_w2[e].any()
    return errors, (y, gate_up, grad_x, grad_w1, grad_w2)


# ---- parity ------------------------------------------------------------------------------------

# (S, E, H, I, gated, activation): every S, E, H, I value, both gated settings and all activations.
FP32_CASES = [
    (0, 3, 33, 17, True, "silu"),
    (0, 1, 64, 48, False, "relu"),
    (1, 1, 1, 1, True, "gelu"),
    (1, 8, 33, 48, False, "silu"),
    (37, 1, 64, 17, True, "relu"),
    (37, 3, 1, 48, True, "silu"),
    (37, 8, 33, 1, False, "gelu"),
    (37, 3, 64, 48, False, "relu"),
    (200, 8, 64, 48, True, "silu"),
    (200, 3, 33, 17, True, "gelu"),
    (200, 8, 1, 17, False, "relu"),
    (200, 1, 33, 1, True, "relu"),
]


@pytest.mark.parametrize(
    "S,E,H,I,gated,activation",
    FP32_CASES,
    ids=[f"S{c[0]}-E{c[1]}-H{c[2]}-I{c[3]}-{'gated' if c[4] else 'plain'}-{c[5]}" for c in FP32_CASES],
)
def test_float32_parity(S, E, H, I, gated, activation, poisoned_outputs):
    run_and_check(S, E, H, I, gated, activation)


# Sweep: every (S, E) pair with S > 0 against every (H, I) pair below; gating and activation cycle.
SWEEP = [
    (S, E, H, I, (i % 2) == 0, ("silu", "gelu", "relu")[i % 3])
    for i, (S, E, (H, I)) in enumerate(
        (S, E, HI) for S in (1, 37, 200) for E in (1, 3, 8) for HI in ((1, 48), (33, 17), (64, 1))
    )
]


@pytest.mark.parametrize(
    "S,E,H,I,gated,activation",
    SWEEP,
    ids=[f"S{c[0]}-E{c[1]}-H{c[2]}-I{c[3]}-{'gated' if c[4] else 'plain'}-{c[5]}" for c in SWEEP],
)
def test_float32_sweep(S, E, H, I, gated, activation):
    run_and_check(S, E, H, I, gated, activation, seed=1)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_noncontiguous_inputs(activation, poisoned_outputs):
    run_and_check(37, 3, 33, 17, True, activation, noncontiguous=True)
    run_and_check(37, 8, 64, 48, False, activation, noncontiguous=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "S,E,H,I,gated,activation",
    [(200, 8, 64, 48, True, "silu"), (37, 3, 33, 17, False, "gelu"), (37, 1, 64, 1, True, "relu")],
)
def test_half_precision_parity(dtype, S, E, H, I, gated, activation, poisoned_outputs):
    run_and_check(S, E, H, I, gated, activation, dtype=dtype)


def torch_same_dtype(x, offsets, w_gate_up, w_down, grad_y, activation, gated):
    """The same MLP done by torch (autograd) in the inputs' dtype: (y, grad_x, grad_w_gate_up, grad_w_down)."""
    x, w1, w2 = (t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down))
    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu}[activation]
    I = w2.shape[2]
    bounds = offsets.cpu().tolist()
    ys = []
    for e in range(len(bounds) - 1):
        gu = x[bounds[e] : bounds[e + 1]] @ w1[e].T
        ys.append((act(gu[:, :I]) * gu[:, I:] if gated else act(gu)) @ w2[e].T)
    y = torch.cat(ys)
    y.backward(grad_y)
    return y, x.grad, w1.grad, w2.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S,E,H,I,gated,activation", [(200, 8, 64, 48, True, "silu"), (37, 3, 33, 17, False, "gelu")])
def test_half_precision_within_twice_torch(dtype, S, E, H, I, gated, activation):
    """DESIGN: 16-bit results no worse than 2x the error of PyTorch doing the same math in that dtype.
    Triton's interpreter casts float32 -> bf16 by truncation (not round-to-nearest-even), which puts its
    bf16 error at ~1.6-2.1x torch's on these shapes, so under the interpreter bf16 is held to 2.5x;
    natively (and for fp16 everywhere) the DESIGN's 2x applies."""
    factor = 2.5 if (dtype == torch.bfloat16 and DEVICE.type == "cpu") else 2.0
    seed = 7
    errors, _ = run_and_check(S, E, H, I, gated, activation, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000 * S + 100 * E + 10 * H + I)  # same inputs as run_and_check
    offsets = random_offsets(S, E, gen).to(DEVICE)
    x, w1, w2, gy = make_inputs(S, E, H, I, gated, dtype, gen)
    want = oracle(x, offsets, w1, w2, gy, activation, gated)
    theirs = torch_same_dtype(x, offsets, w1, w2, gy, activation, gated)
    for name, got, ref in zip(
        ("y", "grad_x", "grad_w_gate_up", "grad_w_down"), theirs, (want[0], want[2], want[3], want[4])
    ):
        assert errors[name] <= factor * rel(got, ref), (name, errors[name], rel(got, ref))


def test_deterministic():
    _, first = run_and_check(200, 8, 33, 17, True, "gelu", seed=5)
    _, second = run_and_check(200, 8, 33, 17, True, "gelu", seed=5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_all_rows_in_one_expert_of_many():
    """E = 8 with every row in expert 5: seven empty experts, tiles from one segment only."""
    x = torch.randn(70, 33, device=DEVICE)
    w1 = torch.randn(8, 34, 33, device=DEVICE) / 33**0.5
    w2 = torch.randn(8, 33, 17, device=DEVICE) / 17**0.5
    gy = torch.randn(70, 33, device=DEVICE)
    offsets = torch.tensor([0, 0, 0, 0, 0, 0, 70, 70, 70], dtype=torch.int64, device=DEVICE)
    y, gate_up = gm.grouped_mlp_forward(x, offsets, w1, w2, "silu", True)
    grads = gm.grouped_mlp_backward(gy, x, offsets, w1, w2, gate_up, "silu", True)
    want = oracle(x, offsets, w1, w2, gy, "silu", True)
    for got, ref in zip((y, gate_up) + tuple(grads), want):
        assert rel(got, ref) < 1e-5
    assert not grads[1][:5].any() and not grads[2][6:].any()


# ---- errors ------------------------------------------------------------------------------------


def _good(gated=True):
    x = torch.randn(5, 4, device=DEVICE)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int64, device=DEVICE)
    w1 = torch.randn(2, 6 if gated else 3, 4, device=DEVICE)
    w2 = torch.randn(2, 4, 3, device=DEVICE)
    return x, offsets, w1, w2


@pytest.mark.parametrize(
    "change,error,name",
    [
        (lambda a: a.update(x=a["x"][None]), ValueError, "x_sorted"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "x_sorted"),
        (lambda a: a.update(offsets=a["offsets"].int()), TypeError, "expert_offsets"),
        (lambda a: a.update(offsets=a["offsets"][:1]), ValueError, "expert_offsets"),
        (lambda a: a.update(offsets=torch.tensor([0, 6, 5], device=DEVICE)), ValueError, "expert_offsets"),
        (lambda a: a.update(offsets=torch.tensor([0, 2, 4], device=DEVICE)), ValueError, "expert_offsets"),
        (lambda a: a.update(w1=a["w1"][:, :5]), ValueError, "w_gate_up"),
        (lambda a: a.update(w1=a["w1"][:, :, :3]), ValueError, "w_gate_up"),
        (lambda a: a.update(w1=a["w1"].half()), TypeError, "w_gate_up"),
        (lambda a: a.update(w2=a["w2"][:, :, :2]), ValueError, "w_down"),
        (lambda a: a.update(w2=a["w2"][:1]), ValueError, "w_down"),
        (lambda a: a.update(activation="tanh"), ValueError, "activation"),
    ],
)
def test_forward_errors(change, error, name):
    x, offsets, w1, w2 = _good()
    args = dict(x=x, offsets=offsets, w1=w1, w2=w2, activation="silu")
    change(args)
    with pytest.raises(error, match=f"^fastcore_ai.ops.moe_grouped_mlp: {name}"):
        gm.grouped_mlp_forward(args["x"], args["offsets"], args["w1"], args["w2"], args["activation"], True)


def test_backward_errors():
    x, offsets, w1, w2 = _good()
    y, gate_up = gm.grouped_mlp_forward(x, offsets, w1, w2, "relu", True)
    with pytest.raises(ValueError, match="^fastcore_ai.ops.moe_grouped_mlp: grad_y"):
        gm.grouped_mlp_backward(y[:4], x, offsets, w1, w2, gate_up, "relu", True)
    with pytest.raises(ValueError, match="^fastcore_ai.ops.moe_grouped_mlp: gate_up"):
        gm.grouped_mlp_backward(y, x, offsets, w1, w2, gate_up[:, :3], "relu", True)
    with pytest.raises(TypeError, match="^fastcore_ai.ops.moe_grouped_mlp: gate_up"):
        gm.grouped_mlp_backward(y, x, offsets, w1, w2, gate_up.double(), "relu", True)
    with pytest.raises(TypeError, match="^fastcore_ai.ops.moe_grouped_mlp: grad_y"):
        gm.grouped_mlp_backward(y.half(), x, offsets, w1, w2, gate_up, "relu", True)
    with pytest.raises(ValueError, match="^fastcore_ai.ops.moe_grouped_mlp: w_gate_up"):
        gm.grouped_mlp_backward(y, x, offsets, w1[:, :, :3], w2, gate_up, "relu", True)
    # not gated: w_gate_up [E, I, H] = [2, 3, 4] is consistent with w_down [2, 4, 3] and gate_up [5, 3]
    grads = gm.grouped_mlp_backward(y, x, offsets, w1[:, :3], w2, gate_up[:, :3], "relu", False)
    assert grads[1].shape == (2, 3, 4)


def test_unchecked_bad_offsets_stay_in_bounds(poisoned_outputs):
    """check_offsets=False with malformed offsets: no out-of-bounds access and every output written
    (the kernels read a clamped, monotone copy)."""
    x, _, w1, w2 = _good()
    offsets = torch.tensor([-3, 9, 1], dtype=torch.int64, device=DEVICE)
    y, gate_up = gm.grouped_mlp_forward(x, offsets, w1, w2, "silu", True, check_offsets=False)
    grads = gm.grouped_mlp_backward(torch.ones_like(y), x, offsets, w1, w2, gate_up, "silu", True, check_offsets=False)
    for t in (y, gate_up) + tuple(grads):
        assert torch.isfinite(t).all()
    # sanitised offsets are [0, 5, 5]: every row belongs to expert 0
    want = oracle(x, torch.tensor([0, 5, 5]), w1, w2, torch.ones_like(y), "silu", True)
    assert rel(y, want[0]) < 1e-5 and rel(grads[1], want[3]) < 1e-5

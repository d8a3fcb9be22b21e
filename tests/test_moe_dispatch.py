"""fastcore_ai.ops.moe_dispatch / moe_combine: exact plans and parity of every backend with the float64
reference, round trips, dropped slots, determinism, gradients, registration (opcheck, torch.compile),
error paths, and the CUDA kernels on the CPU emulator of tests/test_cuda_build.py."""

import ctypes

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.reference import moe_dispatch as reference_moe_dispatch
from fastcore_ai.reference.moe_permute import moe_combine as reference_combine
from fastcore_ai.reference.moe_permute import moe_combine_backward as reference_combine_backward
from _helpers import BACKEND_DEVICES, relative_error, require_backend

DISPATCH, COMBINE = "moe_dispatch", "moe_combine"
FP32_BOUND = 1e-6  # combine is ≤ k products and sums per element: float32 rounding only
# Output rounding of the low-precision dtypes (the sum itself is float32): 2^-8 and 2^-11 relative.
BOUNDS = {torch.float32: FP32_BOUND, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def random_routing(T, k, E, device, drop=0.3, generator=None):
    """Distinct expert ids per token (as a top-k router gives) and a kept mask dropping ~`drop` of the slots."""
    ids = torch.rand(T, E, generator=generator).argsort(dim=1)[:, :k].contiguous()
    kept = torch.rand(T, k, generator=generator) >= drop
    return ids.to(device), kept.to(device)


def oracle(x, ids, kept, E, weights):
    """Float64 reference of dispatch + combine on the upcast inputs."""
    x_sorted, offsets, slot_to_token, token_slot = reference_moe_dispatch(
        x.detach().double().cpu(), ids.cpu(), None if kept is None else kept.cpu(), E
    )
    out = reference_combine(x_sorted, token_slot, weights.detach().double().cpu())
    return x_sorted, (offsets, slot_to_token, token_slot), out


def assert_plan_equal(plan, expected):
    for name, actual, wanted in zip(("expert_offsets", "slot_to_token", "token_slot"), plan, expected):
        assert actual.dtype == torch.int64, name
        assert torch.equal(actual.cpu(), wanted), f"{name} differs from the reference"


def shape_cases():
    cases = []
    hiddens = (1, 33, 256)
    n = 0
    for T in (0, 1, 7, 1000):
        for E in (1, 3, 8, 64):
            for k in sorted({1, min(E, 2), min(E, 8)}):
                H = hiddens[n % 3]
                masked = n % 2 == 0
                n += 1
                cases.append(pytest.param(T, H, E, k, masked, id=f"T{T}-H{H}-E{E}-k{k}-{'kept' if masked else 'all'}"))
    return cases


def backend_shape_cases():
    """Every backend × every shape, except the shapes too slow for the Triton interpreter (T·H·k > 1e5),
    which are not generated for it (test_parity_large_triton covers a large shape there)."""
    cases = []
    for backend_device in BACKEND_DEVICES:
        backend, device = backend_device.values
        for shape in shape_cases():
            T, H, E, k, masked = shape.values
            if backend == "triton" and device == "cpu" and T * H * k > 100_000:
                continue
            cases.append(
                pytest.param(
                    backend,
                    device,
                    T,
                    H,
                    E,
                    k,
                    masked,
                    marks=backend_device.marks,
                    id=f"{backend_device.id}-{shape.id}",
                )
            )
    return cases


@pytest.mark.parametrize("backend,device,T,H,E,k,masked", backend_shape_cases())
def test_parity_random(backend, device, T, H, E, k, masked, poisoned_outputs):
    require_backend(DISPATCH, backend, device)
    x = torch.randn(T, H, device=device)
    ids, kept = random_routing(T, k, E, device)
    kept = kept if masked else None
    weights = torch.rand(T, k, device=device)
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    ref_sorted, ref_plan, ref_out = oracle(x, ids, kept, E, weights)
    S = int(ref_plan[0][-1])
    assert x_sorted.shape == (S, H) and x_sorted.dtype == x.dtype and x_sorted.is_contiguous()
    assert_plan_equal(plan, ref_plan)
    assert torch.equal(x_sorted.cpu().double(), ref_sorted), "x_sorted must be an exact row copy"
    out = ops.moe_combine(x_sorted, plan, weights, backend=backend)
    assert out.shape == (T, H) and out.dtype == x.dtype and out.device.type == device
    assert relative_error(out, ref_out) < FP32_BOUND


def test_parity_large_triton(poisoned_outputs):
    """One large-ish case for the Triton interpreter (T = 1000, H = 256, k = 8)."""
    require_backend(DISPATCH, "triton", "cpu")
    T, H, E, k = 1000, 256, 64, 8
    x = torch.randn(T, H)
    ids, kept = random_routing(T, k, E, "cpu")
    weights = torch.rand(T, k)
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend="triton")
    ref_sorted, ref_plan, ref_out = oracle(x, ids, kept, E, weights)
    assert_plan_equal(plan, ref_plan)
    assert torch.equal(x_sorted.double(), ref_sorted)
    assert relative_error(ops.moe_combine(x_sorted, plan, weights, backend="triton"), ref_out) < FP32_BOUND


def test_plan_semantics_by_hand():
    """A small case worked out by hand: grouped by expert, slot order (t, then j) within an expert."""
    ids = torch.tensor([[2, 0], [0, 1], [2, 0]])
    kept = torch.tensor([[True, True], [True, False], [True, True]])
    x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    for backend in ("cpu", "reference"):
        x_sorted, plan = ops.moe_dispatch(x, ids, kept, 4, backend=backend)
        assert plan.expert_offsets.tolist() == [0, 3, 3, 5, 5]
        assert plan.slot_to_token.tolist() == [0, 1, 2, 0, 2]
        assert plan.token_slot.tolist() == [[3, 0], [1, -1], [4, 2]]
        assert plan.tokens_per_expert().tolist() == [3, 0, 2, 0]
        assert torch.equal(x_sorted, x[[0, 1, 2, 0, 2]])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_dtypes_non_contiguous(backend, device, dtype, poisoned_outputs):
    require_backend(DISPATCH, backend, device, dtype)
    T, H, E, k = 77, 40, 8, 3
    x = torch.randn(H + 5, T, device=device).to(dtype).t()[:, 2 : 2 + H]  # transposed and sliced
    assert not x.is_contiguous()
    ids, kept = random_routing(T, k, E, device)
    weights = torch.rand(T, k, device=device)
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    ref_sorted, ref_plan, ref_out = oracle(x, ids, kept, E, weights)
    assert x_sorted.dtype == dtype and x_sorted.is_contiguous()
    assert_plan_equal(plan, ref_plan)
    assert torch.equal(x_sorted.cpu().double(), ref_sorted)
    out = ops.moe_combine(x_sorted, plan, weights, backend=backend)
    assert out.dtype == dtype
    # The sum is float32; only the output rounding to `dtype` remains.
    assert relative_error(out, ref_out) < BOUNDS[dtype]
    same_dtype_weights = weights.to(dtype)
    out2 = ops.moe_combine(x_sorted, plan, same_dtype_weights, backend=backend)
    ref_out2 = reference_combine(ref_sorted, ref_plan[2], same_dtype_weights.double().cpu())
    assert relative_error(out2, ref_out2) < BOUNDS[dtype]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64(backend):
    T, H, E, k = 50, 9, 5, 2
    x = torch.randn(T, H, dtype=torch.float64)
    ids, kept = random_routing(T, k, E, "cpu")
    weights = torch.rand(T, k, dtype=torch.float64)
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    out = ops.moe_combine(x_sorted, plan, weights, backend=backend)
    assert out.dtype == torch.float64
    assert relative_error(out, oracle(x, ids, kept, E, weights)[2]) < 1e-15


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_round_trip_is_k_times_x(backend, device):
    require_backend(DISPATCH, backend, device)
    T, H, E, k = 301, 33, 8, 2
    x = torch.randn(T, H, device=device)
    ids, _ = random_routing(T, k, E, device)
    x_sorted, plan = ops.moe_dispatch(x, ids, None, E, backend=backend)
    assert x_sorted.shape[0] == T * k
    out = ops.moe_combine(x_sorted, plan, torch.ones(T, k, device=device), backend=backend)
    assert torch.equal(out, k * x)  # x + x is exact
    ids3, _ = random_routing(T, 3, E, device)
    xs3, plan3 = ops.moe_dispatch(x, ids3, None, E, backend=backend)
    torch.testing.assert_close(ops.moe_combine(xs3, plan3, torch.ones(T, 3, device=device), backend=backend), 3 * x)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_dropped_slots_contribute_exactly_zero(backend, device):
    require_backend(DISPATCH, backend, device)
    T, H, E, k = 20, 16, 4, 2
    x = torch.randn(T, H, device=device)
    ids, kept = random_routing(T, k, E, device)
    kept[3] = False  # a token with every slot dropped
    kept[4] = torch.tensor([True, False])
    weights = torch.rand(T, k, device=device)
    weights[~kept] = float("nan")  # weights of dropped slots must never be read into the sum
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    assert bool((plan.token_slot[~kept] == -1).all()) and bool((plan.token_slot[kept] >= 0).all())
    out = ops.moe_combine(x_sorted, plan, weights, backend=backend)
    assert torch.equal(out[3].cpu(), torch.zeros(H)), "a fully dropped token must give exactly 0"
    assert torch.equal(out[4], weights[4, 0] * x[4])
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_every_slot_dropped(backend, device, poisoned_outputs):
    require_backend(DISPATCH, backend, device)
    T, H, E, k = 9, 5, 4, 2
    ids, _ = random_routing(T, k, E, device)
    x_sorted, plan = ops.moe_dispatch(
        torch.randn(T, H, device=device), ids, torch.zeros(T, k, dtype=torch.bool, device=device), E, backend=backend
    )
    assert x_sorted.shape == (0, H) and plan.slot_to_token.shape == (0,)
    assert plan.expert_offsets.tolist() == [0] * (E + 1) and plan.token_slot.tolist() == [[-1] * k] * T
    out = ops.moe_combine(x_sorted, plan, torch.rand(T, k, device=device), backend=backend)
    assert torch.equal(out.cpu(), torch.zeros(T, H))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_deterministic(backend, device):
    require_backend(DISPATCH, backend, device)
    T, H, E, k = 500, 64, 16, 4
    x = torch.randn(T, H, device=device)
    ids, kept = random_routing(T, k, E, device)
    weights = torch.rand(T, k, device=device)
    first = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    second = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
    y = first[0] * 1.7 + 0.1
    assert torch.equal(
        ops.moe_combine(y, first[1], weights, backend=backend), ops.moe_combine(y, first[1], weights, backend=backend)
    )


def test_cpu_does_not_depend_on_thread_count():
    T, H, E, k = 20000, 24, 64, 4  # several counting chunks and many row blocks
    x = torch.randn(T, H)
    ids, kept = random_routing(T, k, E, "cpu")
    weights = torch.randn(T, k, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            x_sorted, plan = ops.moe_dispatch(xr, ids, kept, E, backend="cpu")
            out = ops.moe_combine(x_sorted * 3, plan, weights, backend="cpu")
            weights.grad = None
            out.backward(torch.randn(T, H, generator=torch.Generator().manual_seed(5)))
            results.append((x_sorted, *plan, out, xr.grad, weights.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("T,H,E,k", [(1, 1, 1, 1), (6, 5, 4, 3), (9, 3, 2, 2)])
def test_gradcheck_float64(backend, T, H, E, k):
    ids, kept = random_routing(T, k, E, "cpu")
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)

    def dispatch_only(x):
        return ops.moe_dispatch(x, ids, kept, E, backend=backend)[0]

    def round_trip(x, weights):
        x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend=backend)
        return ops.moe_combine(x_sorted.sin(), plan, weights, backend=backend)

    assert torch.autograd.gradcheck(dispatch_only, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(round_trip, (x, weights), eps=1e-6, atol=1e-8)
    _, plan = ops.moe_dispatch(x.detach(), ids, kept, E, backend=backend)
    y = torch.randn(plan.slot_to_token.shape[0], H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, w: ops.moe_combine(y, plan, w, backend=backend), (y, weights), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_parity(backend, device, dtype):
    require_backend(DISPATCH, backend, device, dtype)
    T, H, E, k = 257, 48, 8, 3
    ids, kept = random_routing(T, k, E, device)
    x = torch.randn(T, H, device=device).to(dtype).requires_grad_()
    weights = torch.rand(T, k, device=device, requires_grad=True)
    grad_out = torch.randn(T, H, device=device)
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend=backend)
    y = x_sorted * 2 + 1
    ops.moe_combine(y, plan, weights, backend=backend).float().mul(grad_out).sum().backward()
    assert x.grad.dtype == dtype and weights.grad.dtype == torch.float32
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = weights.detach().double().cpu().requires_grad_()
    xs64, plan64 = ops.moe_dispatch(x64, ids.cpu(), kept.cpu(), E, backend="reference")
    ops.moe_combine(xs64 * 2 + 1, plan64, w64, backend="reference").mul(grad_out.double().cpu()).sum().backward()
    bound = 1e-5 if dtype == torch.float32 else 8e-3
    assert relative_error(x.grad, x64.grad) < bound
    assert relative_error(weights.grad, w64.grad) < bound


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_backward_only_what_is_needed(backend, device):
    """weights without requires_grad: the weight gradient is skipped, grad_y unchanged."""
    require_backend(COMBINE, backend, device)
    T, H, E, k = 30, 8, 4, 2
    ids, kept = random_routing(T, k, E, device)
    x_sorted, plan = ops.moe_dispatch(torch.randn(T, H, device=device), ids, kept, E, backend=backend)
    weights = torch.rand(T, k, device=device)
    grads = []
    for with_weights in (False, True):
        y = x_sorted.clone().requires_grad_()
        w = weights.clone().requires_grad_(with_weights)
        ops.moe_combine(y, plan, w, backend=backend).sum().backward()
        assert (w.grad is not None) == with_weights
        grads.append(y.grad)
    assert torch.equal(grads[0], grads[1])


def test_reference_backward_matches_torch_autograd():
    """The reference's closed-form combine backward against autograd through plain indexing."""
    T, H, E, k = 40, 7, 5, 3
    ids, kept = random_routing(T, k, E, "cpu")
    _, plan = ops.moe_dispatch(torch.zeros(T, H, dtype=torch.float64), ids, kept, E, backend="reference")
    S = plan.slot_to_token.shape[0]
    y = torch.randn(S, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    padded = torch.cat([y, torch.zeros(1, H, dtype=torch.float64)])
    slots = torch.where(plan.token_slot >= 0, plan.token_slot, S)
    expected_out = (w.unsqueeze(-1) * padded[slots]).sum(1)
    grad_out = torch.randn(T, H, dtype=torch.float64)
    expected = torch.autograd.grad((expected_out * grad_out).sum(), (y, w))
    actual = torch.autograd.grad((ops.moe_combine(y, plan, w, backend="reference") * grad_out).sum(), (y, w))
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-12


# ---- registration: opcheck and torch.compile ------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    T, H, E, k = 17, 6, 5, 2
    ids, kept = random_routing(T, k, E, "cpu")
    x = torch.randn(T, H, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcore_ai.moe_dispatch.default, (x, ids, kept, E, backend))
    torch.library.opcheck(torch.ops.fastcore_ai.moe_dispatch.default, (x.detach()[:, 1:5], ids, None, E, backend))
    x_sorted, offsets, slot_to_token, token_slot = torch.ops.fastcore_ai.moe_dispatch(x.detach(), ids, kept, E, backend)
    y = torch.randn_like(x_sorted, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcore_ai.moe_combine.default, (y, slot_to_token, token_slot, w, backend))
    for need_weights in (True, False):
        torch.library.opcheck(
            torch.ops.fastcore_ai.moe_combine_backward.default,
            (torch.randn(T, H), y.detach(), slot_to_token, token_slot, w.detach(), need_weights, backend),
        )
    torch.library.opcheck(
        torch.ops.fastcore_ai.moe_dispatch_backward.default, (torch.randn_like(x_sorted), token_slot, backend)
    )


def test_torch_compile_fullgraph_combine_cpu():
    T, H, E, k = 64, 16, 8, 2
    ids, kept = random_routing(T, k, E, "cpu")
    x_sorted, plan = ops.moe_dispatch(torch.randn(T, H), ids, kept, E, backend="cpu")

    def step(y, w):
        return ops.moe_combine(torch.relu(y), plan, w, backend="cpu").square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    y = x_sorted.clone().requires_grad_()
    w = torch.rand(T, k, requires_grad=True)
    loss = compiled(y, w)
    loss.backward()
    y2, w2 = y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    eager = step(y2, w2)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_torch_compile_fullgraph_dispatch_cpu():
    """Dispatch's S is data-dependent: the fake impl returns an unbacked size, which dynamo carries."""
    T, H, E, k = 64, 16, 8, 2
    ids, kept = random_routing(T, k, E, "cpu")
    w = torch.rand(T, k)

    def layer(x):
        x_sorted, plan = ops.moe_dispatch(x, ids, kept, E, backend="cpu")
        return ops.moe_combine(x_sorted * 2, plan, w, backend="cpu")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(T, H, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    eager = layer(x2)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, x2.grad)


def test_torch_compile_inductor_combine_cpu():
    T, H, E, k = 33, 12, 4, 2
    ids, _ = random_routing(T, k, E, "cpu")
    x = torch.randn(T, H)
    x_sorted, plan = ops.moe_dispatch(x, ids, None, E, backend="cpu")
    compiled = torch.compile(lambda y: ops.moe_combine(y, plan, torch.ones(T, k), backend="cpu"), fullgraph=True)
    torch.testing.assert_close(compiled(x_sorted), 2 * x)


# ---- error paths: every message names the op and the argument -------------------------------------


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad_id", [-1, 8, 1 << 40, -(1 << 62)])
def test_error_expert_ids_out_of_range(backend, device, bad_id):
    require_backend(DISPATCH, backend, device)
    ids = torch.randint(0, 8, (10, 2), device=device)
    ids[6, 1] = bad_id
    kept = torch.ones(10, 2, dtype=torch.bool, device=device)
    kept[6, 1] = False  # dropped slots are checked too
    with pytest.raises(ValueError) as info:
        ops.moe_dispatch(torch.randn(10, 4, device=device), ids, kept, 8, backend=backend)
    message = str(info.value)
    assert message.startswith("fastcore_ai.ops.moe_dispatch: ")
    assert "expert_ids" in message and str(bad_id) in message and "(6, 1)" in message


def _dispatch_args(**change):
    args = dict(x=torch.randn(6, 4), expert_ids=torch.randint(0, 4, (6, 2)), kept=None, num_experts=4)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(x=torch.randn(6, 4, 2)), ValueError, ["x", "2-D", "3-D"]),
        (dict(x=torch.randint(0, 3, (6, 4))), TypeError, ["x", "int64"]),
        (dict(expert_ids=torch.randint(0, 4, (6, 2), dtype=torch.int32)), TypeError, ["expert_ids", "int32"]),
        (dict(expert_ids=torch.randint(0, 4, (5, 2))), ValueError, ["expert_ids", "T = x.shape[0] = 6"]),
        (dict(expert_ids=torch.randint(0, 4, (6, 0))), ValueError, ["k", "got 0"]),
        (dict(expert_ids=torch.randint(0, 4, (6,))), ValueError, ["expert_ids", "2-D"]),
        (dict(kept=torch.ones(6, 3, dtype=torch.bool)), ValueError, ["kept", "(6, 2)", "(6, 3)"]),
        (dict(kept=torch.ones(6, 2)), TypeError, ["kept", "bool", "float32"]),
        (dict(num_experts=0), ValueError, ["num_experts", "got 0"]),
        (dict(num_experts=5000), ValueError, ["num_experts", "4096"]),
        (dict(num_experts=4.0), TypeError, ["num_experts", "int"]),
        (dict(num_experts=None), TypeError, ["num_experts", "required"]),
        (dict(x=[[1.0]]), TypeError, ["x", "list"]),
    ],
)
def test_dispatch_errors(change, error, words):
    with pytest.raises(error) as info:
        ops.moe_dispatch(**_dispatch_args(**change))
    message = str(info.value)
    assert message.startswith("fastcore_ai.ops.moe_dispatch: "), message
    for word in words:
        assert word in message, message


def _combine_args(**change):
    T, H, E, k = 6, 4, 3, 2
    ids, kept = random_routing(T, k, E, "cpu")
    x_sorted, plan = ops.moe_dispatch(torch.randn(T, H), ids, kept, E, backend="cpu")
    args = dict(y_sorted=x_sorted, plan=plan, weights=torch.rand(T, k))
    for key, value in change.items():
        args[key] = value(args) if callable(value) else value
    return args


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(weights=torch.rand(6, 3)), ValueError, ["weights", "[T, k]", "(6, 2)", "(6, 3)"]),
        (dict(weights=torch.rand(5, 2)), ValueError, ["weights", "(5, 2)"]),
        (dict(weights=torch.rand(6, 2, dtype=torch.float64)), TypeError, ["weights", "float32", "float64"]),
        (dict(weights=torch.ones(6, 2, dtype=torch.int64)), TypeError, ["weights", "int64"]),
        (dict(y_sorted=lambda a: a["y_sorted"][:-1]), ValueError, ["y_sorted", "S = plan.slot_to_token.shape[0]"]),
        (dict(y_sorted=lambda a: a["y_sorted"].long()), TypeError, ["y_sorted", "int64"]),
        (
            dict(plan=lambda a: (a["plan"][0], a["plan"][1], a["plan"][2].int())),
            TypeError,
            ["plan.token_slot", "int32"],
        ),
        (dict(plan=lambda a: (a["plan"][0], a["plan"][1])), TypeError, ["plan", "DispatchPlan"]),
        (dict(plan="plan"), TypeError, ["plan", "str"]),
    ],
)
def test_combine_errors(change, error, words):
    with pytest.raises(error) as info:
        ops.moe_combine(**_combine_args(**change))
    message = str(info.value)
    assert message.startswith("fastcore_ai.ops.moe_combine: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_combine_malformed_plan_raises(backend):
    """A hand-made plan with a slot past S is refused, never read out of bounds."""
    args = _combine_args()
    plan = args["plan"]
    token_slot = plan.token_slot.clone()
    token_slot[0, 0] = plan.slot_to_token.shape[0] + 5
    with pytest.raises(ValueError, match="^fastcore_ai.ops.moe_combine: plan is malformed"):
        ops.moe_combine(
            args["y_sorted"],
            ops.DispatchPlan(plan.expert_offsets, plan.slot_to_token, token_slot),
            args["weights"],
            backend=backend,
        )
    token_slot[0, 0] = -2
    with pytest.raises(ValueError, match="plan is malformed"):
        ops.moe_combine(
            args["y_sorted"],
            ops.DispatchPlan(plan.expert_offsets, plan.slot_to_token, token_slot),
            args["weights"],
            backend=backend,
        )


def test_combine_malformed_plan_triton_gives_nan_rows():
    require_backend(COMBINE, "triton", "cpu")
    args = _combine_args()
    plan = args["plan"]
    token_slot = plan.token_slot.clone()
    token_slot[1, 0] = 10**12
    out = ops.moe_combine(
        args["y_sorted"],
        ops.DispatchPlan(plan.expert_offsets, plan.slot_to_token, token_slot),
        args["weights"],
        backend="triton",
    )
    assert bool(torch.isnan(out[1]).all()) and bool(torch.isfinite(out[[0, 2, 3, 4, 5]]).all())


def test_error_backend_dtype_and_device():
    with pytest.raises(RuntimeError, match="moe_dispatch: backend 'triton'.*x dtype float64"):
        ops.moe_dispatch(
            torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.int64), None, 2, backend="triton"
        )
    with pytest.raises(RuntimeError, match="moe_dispatch: backend 'cuda'.*x is on cpu"):
        ops.moe_dispatch(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64), None, 2, backend="cuda")


def test_native_entry_points_check_their_input():
    from fastcore_ai._native import native

    with pytest.raises(RuntimeError, match="moe_dispatch: num_experts must satisfy"):
        native().moe_dispatch(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64), None, 0)
    with pytest.raises(RuntimeError, match="moe_dispatch: expert_ids must be int64"):
        native().moe_dispatch(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int32), None, 2)
    with pytest.raises(ValueError, match="moe_dispatch: expert_ids must lie in"):
        native().moe_dispatch(torch.randn(4, 3), torch.full((4, 1), 7, dtype=torch.int64), None, 2)
    with pytest.raises(RuntimeError, match="moe_combine: weights must have"):
        native().moe_combine(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 3))


# ---- the CUDA kernels, source unchanged, on the CPU emulator of tests/test_cuda_build.py ----------

_EXTRA_RUNTIME = r"""
// What dispatch.cu uses beyond the router's features.
inline unsigned __popc(unsigned v) { return static_cast<unsigned>(__builtin_popcount(v)); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::block->warp_barriers[emu::thread_idx.x / 32]); }
inline unsigned __match_any_sync(unsigned, int value) {
  unsigned peers = 0;
  for (int lane = 0; lane < 32; ++lane)
    if (emu::shuffle(value, lane) == value) peers |= 1u << lane;
  return peers;
}
"""

_EMULATOR_DRIVER = r"""
#include "dispatch_emulated.inc"
#include <vector>
using namespace fastcore;
using namespace fastcore::moe;
extern "C" {
// Phase 1 + 2 as the torch layer runs them on CUDA; returns -1 when bad ids were found.
int emu_plan(const int64_t* ids, const bool* kept, int64_t T, int64_t k, int64_t E, int64_t* offsets,
             int64_t* slot_to_token, int64_t* token_slot, int64_t* num_bad) {
  DispatchParams p;
  p.expert_ids = ids; p.kept = kept; p.num_tokens = T; p.k = k; p.num_experts = E;
  p.slots_per_chunk = dispatch_slots_per_chunk(T * k, E, 64, 512);  // small chunks: many per test
  p.num_chunks = (T * k + p.slots_per_chunk - 1) / p.slots_per_chunk;
  std::vector<int64_t> chunk_counts((p.num_chunks > 0 ? p.num_chunks : 1) * E, 0);
  p.chunk_counts = chunk_counts.data(); p.num_bad_ids = num_bad; p.expert_offsets = offsets;
  p.token_slot = token_slot; p.slot_to_token = slot_to_token;
  int status = dispatch_plan_count_cuda(p, nullptr);
  if (status != 0 || *num_bad != 0) return status;
  return dispatch_plan_scatter_cuda(p, nullptr);
}
int emu_gather(const void* in, int64_t rows_in, int64_t row_stride, int64_t col_stride, const int64_t* src,
               void* out, int64_t rows, int64_t cols, int element_size) {
  GatherRowsParams g;
  g.in = in; g.in_rows = rows_in; g.in_row_stride = row_stride; g.in_col_stride = col_stride; g.src_row = src;
  g.out = out; g.rows = rows; g.cols = cols; g.element_size = element_size;
  return gather_rows_cuda(g, nullptr);
}
int emu_combine(const void* y, int y_kind, const void* w, int w_kind, const int64_t* token_slot,
                const int64_t* slot_to_token, int64_t T, int64_t k, int64_t S, int64_t H, const void* grad_out,
                float* out, float* grad_y, float* grad_w) {
  CombineParams p;
  p.y = y; p.y_kind = ScalarKind(y_kind); p.weights = w; p.weights_kind = ScalarKind(w_kind);
  p.token_slot = token_slot; p.slot_to_token = slot_to_token; p.num_tokens = T; p.k = k; p.num_rows = S;
  p.hidden = H; p.out = out; p.grad_out = grad_out; p.grad_kind = ScalarKind::kFloat32;
  p.grad_y = grad_y; p.grad_weights = grad_w;
  int status = combine_cuda(p, nullptr);
  if (status != 0 || grad_out == nullptr) return status;
  return combine_backward_cuda(p, nullptr);
}
}
"""


@pytest.fixture(scope="module")
def emulated_dispatch(tmp_path_factory):
    from test_cuda_build import build_emulated_kernels

    return build_emulated_kernels(
        tmp_path_factory.mktemp("dispatch_emulator"),
        "moe/dispatch.cu",
        _EMULATOR_DRIVER,
        "dispatch",
        extra_runtime=_EXTRA_RUNTIME,
    )


def _ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


_I64 = ctypes.c_int64
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.mark.parametrize(
    "T,E,k,masked",
    [
        (0, 3, 2, True),
        (1, 1, 1, False),
        (37, 5, 3, True),
        (300, 64, 8, True),
        (500, 3, 2, False),
        (40, 4, 2, "none kept"),
    ],
)
def test_cuda_kernels_on_emulator(emulated_dispatch, T, E, k, masked):
    lib = emulated_dispatch
    H = 19
    ids, kept = random_routing(T, k, E, "cpu")
    kept = torch.zeros_like(kept) if masked == "none kept" else kept if masked else None
    ref_offsets, ref_slot_to_token, ref_token_slot = reference_moe_dispatch(torch.zeros(T, 1), ids, kept, E)[1:]
    S = int(ref_offsets[-1])
    offsets = torch.full((E + 1,), -7, dtype=torch.int64)
    slot_to_token = torch.full((S,), -7, dtype=torch.int64)
    token_slot = torch.full((T, k), -7, dtype=torch.int64)
    bad = torch.zeros(1, dtype=torch.int64)
    status = lib.emu_plan(
        _ptr(ids),
        _ptr(kept),
        _I64(T),
        _I64(k),
        _I64(E),
        _ptr(offsets),
        _ptr(slot_to_token),
        _ptr(token_slot),
        _ptr(bad),
    )
    assert status == 0, f"emulated plan returned cudaError {status} (719: divergent barrier or shuffle)"
    assert int(bad) == 0
    assert torch.equal(offsets, ref_offsets) and torch.equal(slot_to_token, ref_slot_to_token)
    assert torch.equal(token_slot, ref_token_slot)

    x = torch.randn(H + 3, T).t()[:, 1 : 1 + H].to(torch.bfloat16)  # strided, 2-byte elements
    x_sorted = torch.full((S, H), float("nan"), dtype=torch.bfloat16)
    assert (
        lib.emu_gather(
            _ptr(x),
            _I64(T),
            _I64(x.stride(0)),
            _I64(x.stride(1)),
            _ptr(slot_to_token),
            _ptr(x_sorted),
            _I64(S),
            _I64(H),
            2,
        )
        == 0
    )
    assert torch.equal(x_sorted, x[ref_slot_to_token])
    for width, dtype in ((16, torch.float32), (24, torch.float16)):  # contiguous rows: the 16-byte vector path
        x = torch.randn(T, width).to(dtype)
        x_sorted = torch.full((S, width), float("nan"), dtype=dtype)
        assert (
            lib.emu_gather(
                _ptr(x),
                _I64(T),
                _I64(width),
                _I64(1),
                _ptr(slot_to_token),
                _ptr(x_sorted),
                _I64(S),
                _I64(width),
                x.element_size(),
            )
            == 0
        )
        assert torch.equal(x_sorted, x[ref_slot_to_token])

    y = torch.randn(S, H)
    w = torch.rand(T, k)
    grad_out = torch.randn(T, H)
    out = torch.full((T, H), float("nan"))
    grad_y = torch.full((S, H), float("nan"))
    grad_w = torch.full((T, k), float("nan"))
    status = lib.emu_combine(
        _ptr(y),
        0,
        _ptr(w),
        0,
        _ptr(token_slot),
        _ptr(slot_to_token),
        _I64(T),
        _I64(k),
        _I64(S),
        _I64(H),
        _ptr(grad_out),
        _ptr(out),
        _ptr(grad_y),
        _ptr(grad_w),
    )
    assert status == 0, f"emulated combine returned cudaError {status}"
    ref_out = reference_combine(y.double(), token_slot, w.double())
    ref_grad_y, ref_grad_w = reference_combine_backward(
        grad_out.double(), y.double(), slot_to_token, token_slot, w.double(), True
    )
    assert relative_error(out, ref_out) < FP32_BOUND
    if S > 0:
        assert relative_error(grad_y, ref_grad_y) < FP32_BOUND
    assert relative_error(grad_w, ref_grad_w) < 1e-5


def test_cuda_plan_on_emulator_counts_bad_ids(emulated_dispatch):
    ids = torch.randint(0, 4, (50, 2))
    ids[7, 0], ids[30, 1] = -1, 4
    offsets = torch.empty(5, dtype=torch.int64)
    bad = torch.zeros(1, dtype=torch.int64)
    scratch = torch.full((100,), -7, dtype=torch.int64)
    status = emulated_dispatch.emu_plan(
        _ptr(ids), None, _I64(50), _I64(2), _I64(4), _ptr(offsets), _ptr(scratch), _ptr(scratch), _ptr(bad)
    )
    assert status == 0 and int(bad) == 2
    assert bool((scratch == -7).all()), "the scatter must not run when ids are out of range"

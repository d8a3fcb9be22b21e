"""fastcore_ai.ops.moe_topk_route: parity of every backend with the float64 reference, edge cases,
gradients, registration (opcheck, torch.compile) and error paths."""

import math

import pytest
import torch

import fastcore_ai
from fastcore_ai import ops, reference
from fastcore_ai.reference import moe as reference_moe
from _helpers import BACKEND_DEVICES, relative_error, require_backend

OP = "moe_topk_route"
FP32_BOUND = 1e-5  # relative Frobenius error of float32 math against the float64 oracle


def oracle(logits, k, renormalize):
    """The float64 reference on the exact (upcast) input values."""
    return reference.moe_topk_route(logits.detach().double().cpu(), k, renormalize)


def assert_matches_oracle(out, logits, k, renormalize, bound=FP32_BOUND):
    weights, ids, z_loss, counts, mean_prob, _ = oracle(logits, k, renormalize)
    assert out.expert_ids.dtype == torch.int64 and out.tokens_per_expert.dtype == torch.int64
    assert out.weights.dtype == torch.float32 or logits.dtype == torch.float64
    assert torch.equal(out.expert_ids.cpu(), ids), "expert ids differ from the reference"
    assert torch.equal(out.tokens_per_expert.cpu(), counts)
    assert relative_error(out.weights, weights) < bound
    assert relative_error(out.mean_prob, mean_prob) < bound
    assert relative_error(out.z_loss.reshape(1), z_loss.reshape(1)) < bound


def shape_cases():
    cases = []
    for T in (0, 1, 7, 1000, 4099):
        for E in (1, 3, 8, 61, 128, 1024):
            for k in sorted({1, min(E, 8), min(E, 16)}):
                for renormalize in (True, False):
                    cases.append(
                        pytest.param(T, E, k, renormalize, id=f"T{T}-E{E}-k{k}-{'renorm' if renormalize else 'raw'}")
                    )
    return cases


# Triton's CPU interpreter runs every program in Python: it takes the shapes up to T·E = 65536 (E = 1024 at
# small T, T = 4099 at small E), which cover the same code paths as the large ones in seconds instead of
# minutes (the large ones run natively on a GPU and on every other backend).
INTERPRETER_MAX_ELEMENTS = 65536


def backend_shape_cases():
    cases = []
    for backend_device in BACKEND_DEVICES:
        backend, device = backend_device.values
        interpreted = backend == "triton" and device == "cpu"
        for shape in shape_cases():
            T, E, k, renormalize = shape.values
            if interpreted and T * E > INTERPRETER_MAX_ELEMENTS:
                continue
            cases.append(
                pytest.param(
                    backend,
                    device,
                    T,
                    E,
                    k,
                    renormalize,
                    marks=backend_device.marks,
                    id=f"{shape.id}-{backend_device.id}",
                )
            )
    return cases


@pytest.mark.parametrize("backend,device,T,E,k,renormalize", backend_shape_cases())
def test_parity_random(backend, device, T, E, k, renormalize, poisoned_outputs):
    require_backend(OP, backend, device)
    logits = torch.randn(T, E, device=device) * 3
    out = ops.moe_topk_route(logits, k, renormalize=renormalize, backend=backend)
    assert out.weights.shape == (T, k) and out.expert_ids.shape == (T, k)
    assert out.tokens_per_expert.shape == (E,) and out.mean_prob.shape == (E,) and out.z_loss.shape == ()
    assert out.weights.device.type == device
    assert_matches_oracle(out, logits, k, renormalize)
    if T > 0:
        assert int(out.tokens_per_expert.sum()) == T * k


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_dtypes(backend, device, dtype, poisoned_outputs):
    require_backend(OP, backend, device, dtype)
    logits = (torch.randn(333, 61, device=device) * 4).to(dtype)
    out = ops.moe_topk_route(logits, 6, backend=backend)
    # Math is float32 on the upcast input, so the bound does not depend on the input dtype.
    assert_matches_oracle(out, logits, 6, True)


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # the others refuse float64: test_error_float64_*
def test_float64_where_supported(backend):
    logits = torch.randn(50, 9, dtype=torch.float64)
    out = ops.moe_topk_route(logits, 3, backend=backend)
    assert out.weights.dtype == torch.float64
    assert_matches_oracle(out, logits, 3, True, bound=1e-12)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "column-slice", "row-step"])
def test_non_contiguous(backend, device, layout):
    require_backend(OP, backend, device)
    if layout == "transposed":
        logits = torch.randn(61, 300, device=device).t()
    elif layout == "column-slice":
        logits = torch.randn(300, 100, device=device)[:, 13:74]
    else:
        logits = torch.randn(600, 61, device=device)[::2]
    assert not logits.is_contiguous()
    out = ops.moe_topk_route(logits, 5, renormalize=False, backend=backend)
    assert_matches_oracle(out, logits, 5, False)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_exact_ties_pick_lower_index(backend, device):
    require_backend(OP, backend, device)
    T, E, k = 5, 37, 7
    logits = torch.zeros(T, E, device=device)
    logits[1] = 1.0
    logits[2, 30:] = 2.0  # 7 tied winners at the end
    logits[3, ::3] = -1.0  # ties interleaved with lower values
    logits[4] = torch.arange(E, device=device).remainder(4).float()  # many 4-way ties
    out = ops.moe_topk_route(logits, k, backend=backend)
    assert torch.equal(out.expert_ids[0].cpu(), torch.arange(k))
    assert torch.equal(out.expert_ids[1].cpu(), torch.arange(k))
    assert torch.equal(out.expert_ids[2].cpu(), torch.arange(30, 37))
    assert torch.equal(out.expert_ids[4].cpu(), torch.tensor([3, 7, 11, 15, 19, 23, 27]))
    assert_matches_oracle(out, logits, k, True)
    torch.testing.assert_close(out.weights[0].cpu(), torch.full((k,), 1.0 / k))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_negative_infinity_logits(backend, device):
    require_backend(OP, backend, device)
    T, E, k = 4, 10, 4
    logits = torch.randn(T, E, device=device)
    logits[0, :] = -torch.inf
    logits[0, 7] = 0.5  # one finite expert: the other picks are -inf, lowest index first
    logits[1, ::2] = -torch.inf
    logits[2, 3] = torch.inf  # +inf: probability NaN (inf − inf); ids still valid
    out = ops.moe_topk_route(logits, k, renormalize=False, backend=backend)
    assert torch.equal(out.expert_ids[0].cpu(), torch.tensor([7, 0, 1, 2]))
    torch.testing.assert_close(out.weights[0].cpu(), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert set(out.expert_ids[1].tolist()) <= {1, 3, 5, 7, 9}
    assert int(out.expert_ids[2, 0]) == 3
    ref = oracle(logits, k, False)
    assert torch.equal(out.expert_ids.cpu(), ref[1])
    assert relative_error(out.weights[[0, 1, 3]], ref[0][[0, 1, 3]]) < FP32_BOUND
    ids = out.expert_ids.cpu()
    assert bool(((ids >= 0) & (ids < E)).all())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_nan_rows_give_nan_weights_and_valid_ids(backend, device):
    require_backend(OP, backend, device)
    T, E, k = 6, 33, 5
    logits = torch.randn(T, E, device=device)
    logits[1, 4] = torch.nan
    logits[3, :] = torch.nan
    logits[4, :] = -torch.inf  # no distribution at all
    out = ops.moe_topk_route(logits, k, backend=backend)
    ids = out.expert_ids.cpu()
    assert bool(((ids >= 0) & (ids < E)).all()), "an out-of-range id would make dispatch read out of bounds"
    for row in range(T):
        assert len(set(ids[row].tolist())) == k, "ids within a row must be distinct"
    for row in (1, 3, 4):
        assert bool(torch.isnan(out.weights[row]).all())
    for row in (0, 2, 5):
        assert bool(torch.isfinite(out.weights[row]).all())
    assert torch.equal(ids, oracle(logits, k, True)[1])
    assert bool(torch.isnan(out.z_loss)) and bool(torch.isnan(out.mean_prob).all())
    assert torch.equal(ids[3], torch.arange(k)), "an all-NaN row ranks every expert equal: lowest indices"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_deterministic(backend, device):
    require_backend(OP, backend, device)
    logits = torch.randn(3000, 128, device=device)
    first = ops.moe_topk_route(logits, 8, backend=backend)
    second = ops.moe_topk_route(logits, 8, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def assert_thread_count_independent(logits):
    """Every output bitwise the same on one thread and on several."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe_topk_route(logits, 4, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = ops.moe_topk_route(logits, 4, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_cpu_statistics_do_not_depend_on_thread_count():
    assert_thread_count_independent(torch.randn(5000, 64))


# ---- gradients ----------------------------------------------------------------------------------


def _route_losses(backend, renormalize, k):
    """A scalar-free function of logits returning every differentiable output, for gradcheck."""

    def fn(logits):
        out = ops.moe_topk_route(logits, k, renormalize=renormalize, backend=backend)
        return out.weights, out.z_loss, out.mean_prob

    return fn


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (6, 7, 3), (9, 16, 16)])
def test_gradcheck_float64(backend, renormalize, T, E, k):
    logits = (torch.randn(T, E, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(_route_losses(backend, renormalize, k), (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_backward_matches_torch_autograd(renormalize):
    """The closed-form backward against autograd through a plain torch composition (independent check)."""
    T, E, k = 40, 12, 4
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, dim=1)
    ids = reference_moe.select_top_k(logits.detach(), k)
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(1, keepdim=True)
    z_loss = torch.logsumexp(logits, 1).pow(2).mean()
    mean_prob = probs.mean(0)
    gw, gz, gp = (
        torch.randn(T, k, dtype=torch.float64),
        torch.randn((), dtype=torch.float64),
        torch.randn(E, dtype=torch.float64),
    )
    (expected,) = torch.autograd.grad((weights * gw).sum() + z_loss * gz + (mean_prob * gp).sum(), logits)
    out = ops.moe_topk_route(logits, k, renormalize=renormalize, backend="reference")
    (actual,) = torch.autograd.grad((out.weights * gw).sum() + out.z_loss * gz + (out.mean_prob * gp).sum(), logits)
    assert relative_error(actual, expected) < 1e-12


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_parity(backend, device, renormalize, dtype):
    require_backend(OP, backend, device, dtype)
    T, E, k = 257, 61, 6
    logits = (torch.randn(T, E, device=device) * 2).to(dtype).requires_grad_()
    gw, gz, gp = torch.randn(T, k, device=device), torch.randn((), device=device), torch.randn(E, device=device)
    out = ops.moe_topk_route(logits, k, renormalize=renormalize, backend=backend)
    (out.weights * gw).sum().add(out.z_loss * gz).add((out.mean_prob * gp).sum()).backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    x = logits.detach().double().cpu().requires_grad_()
    ref = ops.moe_topk_route(x, k, renormalize=renormalize, backend="reference")
    (ref.weights * gw.double().cpu()).sum().add(ref.z_loss * gz.double().cpu()).add(
        (ref.mean_prob * gp.double().cpu()).sum()
    ).backward()
    # float32 gradients: 1e-5; bfloat16 gradients are rounded to bfloat16 (2^-8 relative).
    bound = FP32_BOUND if dtype == torch.float32 else 8e-3
    assert relative_error(logits.grad, x.grad) < bound


def test_gradient_of_unused_outputs_is_zero():
    logits = torch.randn(20, 8, requires_grad=True)
    out = ops.moe_topk_route(logits, 2, backend="cpu")
    out.z_loss.backward()
    lse = torch.logsumexp(logits.detach(), 1)
    expected = 2 * lse[:, None] * torch.softmax(logits.detach(), 1) / 20
    torch.testing.assert_close(logits.grad, expected)


# ---- registration: opcheck and torch.compile ----------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    logits = torch.randn(17, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcore_ai.moe_topk_route.default, (logits, 3, True, backend))
    torch.library.opcheck(torch.ops.fastcore_ai.moe_topk_route.default, (logits.detach()[:, 1:8], 2, False, backend))
    weights, ids, z, counts, mean_prob, lse = torch.ops.fastcore_ai.moe_topk_route(logits.detach(), 3, True, backend)
    torch.library.opcheck(
        torch.ops.fastcore_ai.moe_topk_route_backward.default,
        (logits.detach(), ids, weights, lse, torch.randn(17, 3), torch.randn(()), torch.randn(9), True, backend),
    )


def test_torch_compile_fullgraph_cpu():
    def step(logits):
        out = ops.moe_topk_route(logits, 2, backend="cpu")
        loss = (out.weights**2).sum() + 1e-3 * out.z_loss + 1e-2 * out.load_balancing_loss()
        return loss, out.expert_ids

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    logits = torch.randn(64, 8, requires_grad=True)
    loss, ids = compiled(logits)
    loss.backward()
    eager_logits = logits.detach().clone().requires_grad_()
    eager_loss, eager_ids = step(eager_logits)
    eager_loss.backward()
    assert torch.equal(ids, eager_ids)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(logits.grad, eager_logits.grad)


def test_torch_compile_inductor_cpu():
    compiled = torch.compile(lambda x: ops.moe_topk_route(x, 3, backend="cpu").weights.sum(1), fullgraph=True)
    x = torch.randn(33, 12)
    torch.testing.assert_close(compiled(x), torch.ones(33))


# ---- loss helper and layer ----------------------------------------------------------------------


def test_switch_load_balancing_loss_balanced_is_one():
    E = 8
    counts = torch.full((E,), 10, dtype=torch.int64)
    mean_prob = torch.full((E,), 1.0 / E)
    torch.testing.assert_close(ops.switch_load_balancing_loss(counts, mean_prob), torch.tensor(1.0))
    skewed = torch.tensor([80, 0, 0, 0, 0, 0, 0, 0])
    one_hot = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(ops.switch_load_balancing_loss(skewed, one_hot), torch.tensor(float(E)))


def test_load_balancing_loss_has_gradient():
    logits = torch.randn(100, 8, requires_grad=True)
    out = ops.moe_topk_route(logits, 2, backend="cpu")
    out.load_balancing_loss().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_top_k_router_layer():
    router = fastcore_ai.nn.TopKRouter(32, 8, k=2, backend="cpu")
    x = torch.randn(4, 5, 32, dtype=torch.bfloat16)
    out = router(x)
    assert out.weights.shape == (20, 2) and out.weights.dtype == torch.float32
    router.aux_loss(out).add(out.weights.sum()).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert "num_experts=8" in repr(router)


# ---- error paths: every message names the op and the argument -----------------------------------


@pytest.mark.parametrize(
    "make_args,error,words",
    [
        (lambda: (torch.randn(4, 5, 6), 2), ValueError, ["logits", "2-D", "3-D"]),
        (lambda: (torch.randn(8), 2), ValueError, ["logits", "2-D"]),
        (lambda: (torch.randint(0, 5, (4, 8)), 2), TypeError, ["logits", "int64"]),
        (lambda: (torch.randn(4, 8, dtype=torch.complex64), 2), TypeError, ["logits", "complex64"]),
        (lambda: ([[1.0, 2.0]], 1), TypeError, ["logits", "list"]),
        (lambda: (torch.randn(4, 8), 0), ValueError, ["k", "got 0"]),
        (lambda: (torch.randn(4, 8), 9), ValueError, ["k", "E=8"]),
        (lambda: (torch.randn(4, 64), 17), ValueError, ["k", "16"]),
        (lambda: (torch.randn(4, 8), 2.0), TypeError, ["k", "int"]),
        (lambda: (torch.randn(4, 1025), 2), ValueError, ["E", "1024", "1025"]),
        (lambda: (torch.randn(4, 0), 1), ValueError, ["E", "got 0"]),
    ],
)
def test_errors(make_args, error, words):
    with pytest.raises(error) as info:
        ops.moe_topk_route(*make_args())
    message = str(info.value)
    assert message.startswith("fastcore_ai.ops.moe_topk_route: ")
    for word in words:
        assert word in message


def test_error_renormalize_type():
    with pytest.raises(TypeError, match="moe_topk_route: renormalize must be a bool"):
        ops.moe_topk_route(torch.randn(3, 4), 1, renormalize="yes")


def test_error_mismatched_device():
    with pytest.raises(RuntimeError) as info:
        ops.moe_topk_route(torch.randn(4, 8), 2, backend="cuda")
    assert "fastcore_ai.ops.moe_topk_route" in str(info.value) and "logits is on cpu" in str(info.value)


def test_error_float64_on_a_float32_backend():
    with pytest.raises(RuntimeError, match="moe_topk_route: backend 'triton'.*logits dtype float64"):
        ops.moe_topk_route(torch.randn(4, 8, dtype=torch.float64), 2, backend="triton")


@pytest.mark.cuda
def test_error_cpu_backend_with_cuda_tensor():
    with pytest.raises(RuntimeError, match="moe_topk_route: backend 'cpu'.*logits is on cuda"):
        ops.moe_topk_route(torch.randn(4, 8, device="cuda"), 2, backend="cpu")


def test_native_entry_point_checks_its_input():
    """_C is reachable directly; it must refuse bad input with a message, not crash."""
    from fastcore_ai._native import native

    with pytest.raises(RuntimeError, match="moe_topk_route: k must satisfy"):
        native().moe_topk_route(torch.randn(4, 8), 9, True)
    with pytest.raises(RuntimeError, match="moe_topk_route: logits must be float32"):
        native().moe_topk_route(torch.randint(0, 3, (4, 8)), 2, True)


# ---- capacity -----------------------------------------------------------------------------------


def sequential_capacity(expert_ids, top1, E, capacity, priority):
    """Independent oracle: fill expert slots one assignment at a time in priority order."""
    T, k = expert_ids.shape
    order = sorted(range(T), key=lambda t: (-float(top1[t]), t)) if priority == "batch" else list(range(T))
    used = [0] * E
    kept = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in order:
            e = int(expert_ids[t, j])
            if used[e] < capacity:
                used[e] += 1
                kept[t, j] = True
    return kept


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("priority", ["token", "batch"])
@pytest.mark.parametrize(
    "T,E,k,factor,min_capacity",
    [(1, 1, 1, 1.0, 0), (37, 5, 2, 0.5, 1), (300, 8, 2, 1.25, 4), (513, 61, 6, 0.3, 0), (64, 16, 16, 1.0, 2)],
)
def test_capacity_matches_sequential_filling(backend, device, priority, T, E, k, factor, min_capacity):
    require_backend(OP, backend, device)
    logits = torch.randn(T, E, device=device) * 2
    logits[:, 0] += 1.5  # skew the load so experts overflow
    out = ops.moe_topk_route(
        logits, k, capacity_factor=factor, min_capacity=min_capacity, priority=priority, backend=backend
    )
    capacity = max(min_capacity, math.ceil(factor * T * k / E))
    x = logits.double().cpu()
    top1 = torch.softmax(x, 1).max(1).values
    expected = sequential_capacity(out.expert_ids.cpu(), top1, E, capacity, priority)
    assert torch.equal(out.kept.cpu(), expected)
    kept_per_expert = torch.bincount(out.expert_ids.cpu()[out.kept.cpu()], minlength=E)
    assert int(kept_per_expert.max()) <= capacity
    dropped = ~out.kept
    assert bool((out.weights[dropped] == 0).all()), "a dropped assignment must weigh exactly 0"
    reference_out = ops.moe_topk_route(logits, k, backend=backend)
    torch.testing.assert_close(out.weights[out.kept], reference_out.weights[out.kept], rtol=0, atol=0)
    assert torch.equal(out.tokens_per_expert, reference_out.tokens_per_expert), "routing counts are pre-capacity"


def test_capacity_hand_built_first_choices_win():
    # 4 tokens all choose expert 0 first and expert 1 second; capacity 2. Level 0: tokens 0 and 1 fill
    # expert 0. Level 1: expert 1's two slots go, in token order, to tokens 0 and 1 again.
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 4)
    out = ops.moe_topk_route(logits, 2, capacity_factor=0.75, min_capacity=0, backend="cpu")  # C = ceil(.75·8/3) = 2
    assert torch.equal(out.kept, torch.tensor([[True, True], [True, True], [False, False], [False, False]]))
    # Batch priority: the most confident tokens win.
    logits = torch.tensor([[1.0, 0.0], [5.0, 0.0], [3.0, 0.0]])
    out = ops.moe_topk_route(logits, 1, capacity_factor=1 / 3, min_capacity=1, priority="batch", backend="cpu")
    assert torch.equal(out.kept.squeeze(1), torch.tensor([False, True, False]))
    out = ops.moe_topk_route(logits, 1, capacity_factor=1 / 3, min_capacity=1, priority="token", backend="cpu")
    assert torch.equal(out.kept.squeeze(1), torch.tensor([True, False, False]))


def test_dropless_keeps_everything():
    out = ops.moe_topk_route(torch.randn(50, 4), 2, backend="cpu")
    assert out.kept.dtype == torch.bool and bool(out.kept.all())


def test_capacity_gradient_is_zero_for_dropped_assignments():
    logits = torch.randn(40, 4, dtype=torch.float64)
    logits[:, 0] += 3
    logits.requires_grad_()
    out = ops.moe_topk_route(logits, 1, capacity_factor=0.5, min_capacity=0, backend="cpu")
    assert not bool(out.kept.all())
    out.weights.sum().backward()
    dropped_rows = ~out.kept.squeeze(1)
    assert bool((logits.grad[dropped_rows] == 0).all())


def test_capacity_under_torch_compile():
    fn = lambda x: ops.moe_topk_route(x, 2, capacity_factor=1.0, backend="cpu")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(64, 8)
    x[:, 3] += 2
    for a, b in zip(compiled(x), fn(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(capacity_factor=0.0), ValueError, ["capacity_factor", "> 0"]),
        (dict(capacity_factor=-1.0), ValueError, ["capacity_factor"]),
        (dict(capacity_factor="1.25"), TypeError, ["capacity_factor"]),
        (dict(capacity_factor=1.0, min_capacity=-1), ValueError, ["min_capacity"]),
        (dict(priority="random"), ValueError, ["priority", "'token'", "'batch'"]),
    ],
)
def test_capacity_errors(kwargs, error, words):
    with pytest.raises(error) as info:
        ops.moe_topk_route(torch.randn(4, 8), 2, **kwargs)
    assert str(info.value).startswith("fastcore_ai.ops.moe_topk_route: ")
    for word in words:
        assert word in str(info.value)


# ---- the cpu kernel's two row paths (AVX-512 and portable), the direct path, small calls -------------


@pytest.fixture(params=["portable", "auto"])
def cpu_isa_level(request):
    """Runs a test on the portable rows and on the best this CPU has (AVX-512 here: the intrinsic rows)."""
    from fastcore_ai import backends

    previous = backends.cpu_isa()
    backends.cpu_isa(request.param)
    yield request.param
    backends.cpu_isa("auto")
    backends.cpu_isa(previous)


def isa_shape_cases():
    # E ≤ 16 (one vector, no bound), E = 17 / 33 / 61 (a partial last vector), multiples of 16, the maximum;
    # k from 1 to 16 (k = 16 with E > 16 takes the many-candidates fallback).
    cases = []
    for E in (1, 2, 5, 15, 16, 17, 33, 61, 64, 128, 200, 1024):
        for k in sorted({1, min(E, 2), min(E, 3), min(E, 8), min(E, 16)}):
            cases.append(pytest.param(E, k, id=f"E{E}-k{k}"))
    return cases


@pytest.mark.parametrize("E,k", isa_shape_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_rows_match_oracle(cpu_isa_level, E, k, dtype, poisoned_outputs):
    T = 301
    logits = (torch.randn(T, E, generator=torch.Generator().manual_seed(E * 31 + k)) * 3).to(dtype)
    for renormalize in (True, False):
        out = ops.moe_topk_route(logits, k, renormalize=renormalize, backend="cpu")
        assert_matches_oracle(out, logits, k, renormalize)
        assert out.kept.dtype == torch.bool and out.kept.shape == (T, k) and bool(out.kept.all())


@pytest.mark.parametrize("E,k", [(16, 4), (37, 7), (128, 8), (128, 16), (1024, 16)])
def test_cpu_rows_with_many_ties(cpu_isa_level, E, k):
    """Quantised logits: equal keys at and above the bound (the tie-aware ranks, and more than 16
    candidates: the fallback), -inf columns, a constant row; ids must follow the lower-index rule."""
    T = 257
    g = torch.Generator().manual_seed(E + k)
    logits = torch.randint(-3, 3, (T, E), generator=g).float()
    logits[::5, 1::3] = -torch.inf
    logits[7] = 0.25
    logits[9, : E // 2] = -torch.inf
    out = ops.moe_topk_route(logits, k, renormalize=False, backend="cpu")
    assert_matches_oracle(out, logits, k, False)
    assert torch.equal(out.expert_ids[7], torch.arange(k))


def test_cpu_rows_special_values(cpu_isa_level):
    """NaN, ±inf and logits far below the row max (exp underflow: exactly 0 for -inf, tiny but
    finite differences within the float32 range) on both row paths."""
    T, E, k = 12, 40, 5
    logits = torch.randn(T, E) * 2
    logits[0, 3] = torch.nan
    logits[1, :] = -torch.inf
    logits[2, 17] = torch.inf
    logits[3, :20] = -95.0  # differences between -87 and -106: denormal or zero probabilities
    logits[4, :20] = -120.0
    logits[5, ::2] = -torch.inf
    logits[6, :] = torch.nan
    logits[:, 39] = -torch.inf  # a masked expert: probability exactly 0 in every row
    out = ops.moe_topk_route(logits, k, renormalize=False, backend="cpu")
    ref = oracle(logits, k, False)
    assert torch.equal(out.expert_ids, ref[1])
    finite_rows = [3, 4, 5, 7, 8, 9, 10, 11]
    assert relative_error(out.weights[finite_rows], ref[0][finite_rows]) < FP32_BOUND
    for row in (0, 1, 2, 6):
        assert bool(torch.isnan(out.weights[row]).all())
    clean = logits[finite_rows]
    stats = ops.moe_topk_route(clean, k, renormalize=False, backend="cpu")
    assert float(stats.mean_prob[39]) == 0.0
    assert_matches_oracle(stats, clean, k, False)


def test_cpu_row_paths_agree_on_ids_and_closely_on_weights():
    from fastcore_ai import backends

    logits = torch.randn(2000, 96) * 4
    previous = backends.cpu_isa()
    try:
        backends.cpu_isa("portable")
        portable = ops.moe_topk_route(logits, 6, backend="cpu")
        backends.cpu_isa("auto")
        best = ops.moe_topk_route(logits, 6, backend="cpu")
    finally:
        backends.cpu_isa("auto")
        backends.cpu_isa(previous)
    assert torch.equal(portable.expert_ids, best.expert_ids)
    assert torch.equal(portable.tokens_per_expert, best.tokens_per_expert)
    assert relative_error(best.weights, portable.weights.double()) < 1e-6


@pytest.mark.parametrize("T", [1, 255, 256, 257, 2047, 2048, 2049, 6000])
@pytest.mark.parametrize("E", [16, 100])
def test_cpu_thread_count_independence_across_the_grain(cpu_isa_level, T, E):
    """Small calls run on the calling thread, large ones on the pool: the block partition (and so every
    bit of the statistics) must not depend on which."""
    assert_thread_count_independent(torch.randn(T, E, dtype=torch.bfloat16))


def test_direct_path_matches_the_registered_op():
    """The public function's direct cpu path (one native call that also makes `kept`) gives bitwise the
    registered op's outputs, and a fresh, writable kept mask per call."""
    logits = torch.randn(77, 24)
    out = ops.moe_topk_route(logits, 3, backend="cpu")
    registered = torch.ops.fastcore_ai.moe_topk_route(logits, 3, True, "cpu")
    for a, b in zip(out[:5], registered[:5]):
        assert torch.equal(a, b)
    again = ops.moe_topk_route(logits, 3, backend="cpu")
    assert out.kept.data_ptr() != again.kept.data_ptr() and out.kept.is_contiguous()
    out.kept[0, 0] = False
    assert bool(again.kept.all())
    empty = ops.moe_topk_route(torch.randn(0, 5), 2, backend="cpu")
    assert empty.kept.shape == (0, 2) and float(empty.z_loss) == 0.0 and bool((empty.tokens_per_expert == 0).all())
    assert bool((empty.mean_prob == 0).all())


def test_native_with_kept_checks_its_input():
    from fastcore_ai._native import native

    with pytest.raises(RuntimeError, match="moe_topk_route: k must satisfy"):
        native().moe_topk_route_with_kept(torch.randn(4, 8), 9, True)
    with pytest.raises(RuntimeError, match="moe_topk_route: logits must have shape"):
        native().moe_topk_route_with_kept(torch.randn(4, 8, 2), 1, True)


def test_errors_for_odd_argument_types():
    with pytest.raises(TypeError, match="moe_topk_route: k must be an int, got bool"):
        ops.moe_topk_route(torch.randn(4, 8), True)
    with pytest.raises(ValueError, match="moe_topk_route: priority must be one of"):
        ops.moe_topk_route(torch.randn(4, 8), 2, priority=None)
    with pytest.raises(TypeError, match="moe_topk_route: renormalize must be a bool, got int"):
        ops.moe_topk_route(torch.randn(4, 8), 2, renormalize=1)

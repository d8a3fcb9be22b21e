"""fastcore_ai.ops.moe_experts: the fused expert computation (inference path, `fastcore_ai::moe_experts`)
and the training path (dispatch -> grouped MLP -> combine) of every backend against the float64 reference
(reference/moe_experts.py, itself checked against a per-token loop here); the block alignment of the Triton
fused kernel; determinism; gradients (gradcheck, the fused op's recomputing backward); registration
(opcheck, torch.compile); error paths.

Bounds (relative Frobenius error vs the float64 oracle): float32 < 1e-5; bfloat16 / float16 < 2e-2
(a bf16 MLP rounds h and y to 8 bits; PyTorch's own bf16 composition lands at ~4e-3 on these shapes).
"""

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.reference import moe_experts as reference

from _helpers import BACKEND_DEVICES, relative_error, require_backend

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def make_inputs(T, H, I, E, k, device="cpu", dtype=torch.float32, gated=True, drop=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=generator)
    ids = (
        torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)])
        if T
        else torch.zeros(0, k, dtype=torch.int64)
    )
    weights = torch.rand(T, k, generator=generator)
    kept = torch.rand(T, k, generator=generator) > drop
    w1 = torch.randn(E, 2 * I if gated else I, H, generator=generator) / H**0.5
    w2 = torch.randn(E, H, I, generator=generator) / I**0.5
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), ids.to(device), weights.to(device), kept.to(device), cast(w1), cast(w2)


def _host(t):
    if t is None:
        return None
    return t.detach().double().cpu() if t.is_floating_point() else t.cpu()


def oracle(x, ids, weights, kept, w1, w2, act="silu", gated=True):
    return reference.moe_experts(*(_host(t) for t in (x, ids, weights, kept, w1, w2)), act, gated)


def test_reference_matches_token_loop():
    T, H, I, E, k = 23, 7, 5, 4, 2
    x, ids, weights, kept, w1, w2 = (
        t.double() if t.is_floating_point() else t for t in make_inputs(T, H, I, E, k, drop=0.4)
    )
    out = reference.moe_experts(x, ids, weights, kept, w1, w2, "gelu", True)
    expected = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if kept[t, j]:
                e = int(ids[t, j])
                gu = w1[e] @ x[t]
                hidden = torch.nn.functional.gelu(gu[:I]) * gu[I:]
                expected[t] += weights[t, j] * (w2[e] @ hidden)
    assert relative_error(out, expected) < 1e-13


# ---- parity: the fused (inference) path ----------------------------------------------------------

SHAPES = [(37, 24, 20, 5, 2), (19, 33, 16, 7, 3), (1, 8, 8, 1, 1)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}_I{}_E{}_k{}".format(*s))
def test_fused_forward_parity(backend, device, dtype, shape, poisoned_outputs):
    require_backend("moe_experts", backend, device, dtype)
    x, ids, weights, kept, w1, w2 = make_inputs(*shape, device=device, dtype=dtype)
    with torch.no_grad():
        out = ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, oracle(x, ids, weights, kept, w1, w2)) < TOL[dtype]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("activation,gated", [("gelu", True), ("relu", False), ("silu", False)])
def test_fused_forward_activations(backend, device, activation, gated):
    require_backend("moe_experts", backend, device)
    x, ids, weights, kept, w1, w2 = make_inputs(29, 16, 12, 4, 2, device=device, gated=gated, seed=3)
    out = ops.moe_experts(x, ids, weights, w1, w2, kept=None, activation=activation, gated=gated, backend=backend)
    assert relative_error(out, oracle(x, ids, weights, None, w1, w2, activation, gated)) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_fused_noncontiguous_empty_and_all_dropped(backend, device):
    require_backend("moe_experts", backend, device)
    x, ids, weights, kept, w1, w2 = make_inputs(21, 16, 10, 3, 2, device=device, seed=5)
    x_t = torch.randn(16, 21, device=device).t()  # non-contiguous x
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous weights, same values
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    out = ops.moe_experts(x_t, ids, weights, w1_t, w2_t, kept=kept, backend=backend)
    assert relative_error(out, oracle(x_t, ids, weights, kept, w1, w2)) < 1e-5
    none_kept = torch.zeros_like(kept)
    assert torch.equal(ops.moe_experts(x, ids, weights, w1, w2, kept=none_kept, backend=backend), torch.zeros_like(x))
    empty = ops.moe_experts(x[:0], ids[:0], weights[:0], w1, w2, backend=backend)
    assert empty.shape == (0, 16)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_fused_deterministic(backend, device):
    require_backend("moe_experts", backend, device)
    x, ids, weights, kept, w1, w2 = make_inputs(40, 16, 12, 6, 3, device=device, seed=7)
    first = ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend=backend)
    for _ in range(2):
        assert torch.equal(ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend=backend), first)


def test_cpu_fused_bitwise_across_threads():
    x, ids, weights, kept, w1, w2 = make_inputs(130, 32, 24, 6, 2, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend="cpu")
        torch.set_num_threads(2)
        two = ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# ---- the Triton block alignment ------------------------------------------------------------------


@pytest.mark.triton
def test_triton_align_block_size():
    pytest.importorskip("triton")
    from fastcore_ai.triton_kernels.moe_experts import align_block_size

    T, k, E, block = 13, 2, 5, 4
    _, ids, _, kept, _, _ = make_inputs(T, 4, 4, E, k, seed=11)
    ids[0] = torch.tensor([4, 3])  # make sure some expert counts are not multiples of the block
    sorted_slots, block_expert = align_block_size(ids, kept, E, block)
    numel = T * k
    assert sorted_slots.dtype == torch.int64 and block_expert.dtype == torch.int64
    assert sorted_slots.shape[0] == block_expert.shape[0] * block
    assert sorted_slots.shape[0] >= numel + E * (block - 1)
    blocks = sorted_slots.view(-1, block)
    seen = []
    for b in range(blocks.shape[0]):
        e = int(block_expert[b])
        slots = [int(s) for s in blocks[b] if s < numel]
        if e == E:
            assert not slots  # surplus blocks are all padding
        for s in slots:
            assert int(ids.view(-1)[s]) == e and bool(kept.view(-1)[s])
        seen += slots
    expected = [s for e in range(E) for s in range(numel) if int(ids.view(-1)[s]) == e and kept.view(-1)[s]]
    assert seen == expected  # every kept slot once, by expert, slot order inside
    assert (block_expert[1:] >= block_expert[:-1]).all()


# ---- the training path and the fused op's autograd ------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_training_path_gradients(backend, device):
    require_backend("moe_experts", backend, device)
    x, ids, weights, kept, w1, w2 = make_inputs(26, 16, 12, 4, 2, device=device, seed=9)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2)]
    out = ops.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], kept=kept, backend=backend)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in (x, weights, w1, w2)]
    ref = reference.moe_experts(ref_leaves[0], ids.cpu(), ref_leaves[1], kept.cpu(), ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double().cpu())
    assert relative_error(out, ref) < 1e-5
    for got, expected in zip(grads, ref_grads):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_op_gradcheck(backend):
    x, ids, weights, kept, w1, w2 = (
        t.double() if t.is_floating_point() else t for t in make_inputs(9, 5, 4, 3, 2, seed=12)
    )
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2)]

    def fused(x, weights, w1, w2):
        return torch.ops.fastcore_ai.moe_experts(x, ids, weights, kept, w1, w2, "silu", True, backend)

    assert torch.autograd.gradcheck(fused, leaves)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    x, ids, weights, kept, w1, w2 = make_inputs(15, 8, 6, 3, 2, seed=13)
    args = (x.requires_grad_(), ids, weights.requires_grad_(), kept, w1.requires_grad_(), w2, "silu", True, backend)
    torch.library.opcheck(torch.ops.fastcore_ai.moe_experts.default, args)
    torch.library.opcheck(
        torch.ops.fastcore_ai.moe_experts.default,
        (x.detach(), ids, weights.detach(), None, w1.detach(), w2, "gelu", True, backend),
    )


def test_torch_compile_fullgraph_inference_cpu():
    x, ids, weights, kept, w1, w2 = make_inputs(33, 16, 12, 4, 2, seed=14)

    def run(x, ids, weights, kept):
        return ops.moe_experts(x, ids, weights, w1, w2, kept=kept, backend="cpu")

    with torch.no_grad():
        eager = run(x, ids, weights, kept)
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x, ids, weights, kept)
    assert torch.equal(compiled, eager)


# ---- the fused CPU training path (moe_experts_train / moe_experts_backward) ----------------------------


def _grads_of(run, leaves, grad_out):
    out = run(*leaves)
    needed = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad(out, needed, grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 24, 20, 5, 2), (70, 16, 12, 12, 3)], ids=["few-experts", "parallel-segments"])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", True), ("relu", False)])
def test_cpu_fused_training_gradients(dtype, shape, activation, gated):
    """Every gradient of the fused training path against the float64 reference; in bfloat16 no worse than
    2x the error of the unfused composition (moe_dispatch -> moe_grouped_mlp -> moe_combine) in bfloat16."""
    x, ids, weights, kept, w1, w2 = make_inputs(*shape, dtype=dtype, gated=gated, seed=21)
    weights = weights.to(dtype)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)

    def fused(x, weights, w1, w2):
        return ops.moe_experts(x, ids, weights, w1, w2, kept=kept, activation=activation, gated=gated, backend="cpu")

    def composition(x, weights, w1, w2):
        return ops.moe_experts(
            x, ids, weights, w1, w2, kept=kept, activation=activation, gated=gated, backend="cpu", mlp_backend="cpu"
        )

    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w2)]
    out, grads = _grads_of(fused, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weights, w1, w2)]
    ref = reference.moe_experts(
        ref_leaves[0], ids, ref_leaves[1], kept, ref_leaves[2], ref_leaves[3], activation, gated
    )
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    with torch.no_grad():
        assert torch.equal(out, fused(x, weights, w1, w2))  # the training forward is the inference forward, bitwise
    if dtype == torch.float32:
        bounds = [TOL[dtype]] * 5
    else:
        base_out, base_grads = _grads_of(composition, [t.detach().clone().requires_grad_() for t in leaves], grad_out)
        bounds = [
            max(2 * relative_error(got, want), 1e-3) for got, want in zip((base_out,) + base_grads, (ref,) + ref_grads)
        ]
    for name, got, want, bound in zip(
        ("out", "x", "weights", "w_gate_up", "w_down"), (out,) + grads, (ref,) + ref_grads, bounds
    ):
        assert relative_error(got, want) < bound, name
    assert [g.dtype for g in grads] == [dtype] * 4


@pytest.mark.parametrize(
    "needed",
    [(True, False, False, False), (False, True, False, False), (False, False, True, False), (True, False, True, True)],
    ids=["x", "weights", "w_gate_up", "x-and-params"],
)
def test_cpu_fused_training_partial_gradients(needed):
    """Only the gradients asked for are computed (the others are None), and those match the reference."""
    x, ids, weights, kept, w1, w2 = make_inputs(30, 12, 10, 9, 2, seed=22)
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, weights, w1, w2), needed)]
    out = ops.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], kept=kept, backend="cpu")
    out.square().sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, weights, w1, w2)]
    reference.moe_experts(
        ref_leaves[0], ids, ref_leaves[1], kept, ref_leaves[2], ref_leaves[3]
    ).square().sum().backward()
    for leaf, ref_leaf, need in zip(leaves, ref_leaves, needed):
        if need:
            assert relative_error(leaf.grad, ref_leaf.grad) < 1e-5
        else:
            assert leaf.grad is None


def test_cpu_fused_training_gradcheck():
    x, ids, weights, kept, w1, w2 = (
        t.double() if t.is_floating_point() else t for t in make_inputs(11, 5, 4, 9, 3, seed=23)
    )
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w2)]

    def fused(x, weights, w1, w2):
        return ops.moe_experts(x, ids, weights, w1, w2, kept=kept, activation="gelu", backend="cpu")

    assert torch.autograd.gradcheck(fused, leaves)


def test_cpu_fused_training_bitwise_across_threads_and_runs():
    x, ids, weights, kept, w1, w2 = make_inputs(90, 16, 12, 10, 2, seed=24)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w2)]
            out = ops.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], kept=kept, backend="cpu")
            results.append((out,) + torch.autograd.grad(out, leaves, torch.ones_like(out)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("T,drop", [(0, 0.0), (12, 1.1)], ids=["empty", "all-dropped"])
def test_cpu_fused_training_empty_and_all_dropped(T, drop):
    x, ids, weights, kept, w1, w2 = make_inputs(T, 8, 6, 4, 2, drop=drop, seed=25)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w1, w2)]
    out = ops.moe_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], kept=kept, backend="cpu")
    assert out.shape == (T, 8) and not out.any()
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in leaves]
    assert not any(g.any() for g in grads)


def test_cpu_fused_training_opcheck():
    x, ids, weights, kept, w1, w2 = make_inputs(15, 8, 6, 9, 2, seed=26)
    args = (x.requires_grad_(), ids, weights.requires_grad_(), kept, w1.requires_grad_(), w2, "silu", True, "cpu")
    torch.library.opcheck(torch.ops.fastcore_ai.moe_experts_train.default, args)
    out, gate_up, offsets, slot_to_token, token_slot = torch.ops.fastcore_ai.moe_experts_train(
        *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    )
    backward_args = (
        torch.randn_like(out),
        x.detach(),
        offsets,
        slot_to_token,
        token_slot,
        weights.detach(),
        gate_up,
        w1.detach(),
        w2,
        "silu",
        True,
        True,
        True,
        True,
        "cpu",
    )
    torch.library.opcheck(torch.ops.fastcore_ai.moe_experts_backward.default, backward_args)


def test_cpu_fused_training_backward_errors():
    x, ids, weights, kept, w1, w2 = make_inputs(10, 8, 6, 4, 2, seed=27)
    out, gate_up, offsets, slot_to_token, token_slot = torch.ops.fastcore_ai.moe_experts_train(
        x, ids, weights, kept, w1, w2, "silu", True, "cpu"
    )
    args = [
        torch.ones_like(out),
        x,
        offsets,
        slot_to_token,
        token_slot,
        weights,
        gate_up,
        w1,
        w2,
        "silu",
        True,
        True,
        True,
        True,
        "cpu",
    ]
    with pytest.raises(RuntimeError, match="moe_experts: gate_up must be the forward's"):
        torch.ops.fastcore_ai.moe_experts_backward(*args[:6], gate_up[:, :5], *args[7:])
    with pytest.raises(RuntimeError, match="moe_experts: grad_out must be"):
        torch.ops.fastcore_ai.moe_experts_backward(out[:3], *args[1:])
    bad_rows = slot_to_token.clone()
    bad_rows[0] = 10
    with pytest.raises(RuntimeError, match="moe_experts: slot_to_token must lie in"):
        torch.ops.fastcore_ai.moe_experts_backward(*args[:3], bad_rows, *args[4:])
    bad_offsets = offsets.clone()
    bad_offsets[1] = -1
    with pytest.raises(RuntimeError, match="moe_experts: expert_offsets must"):
        torch.ops.fastcore_ai.moe_experts_backward(*args[:2], bad_offsets, *args[3:])


# ---- error paths ----------------------------------------------------------------------------------


def test_errors():
    x, ids, weights, kept, w1, w2 = make_inputs(10, 8, 6, 4, 2)
    bad_ids = ids.clone()
    bad_ids[3, 1] = 4
    with pytest.raises(ValueError, match=r"moe_experts: expert_ids must lie in \[0, num_experts = 4\), got 4"):
        ops.moe_experts(x, bad_ids, weights, w1, w2, backend="cpu")
    bad_ids[3, 1] = -1
    with pytest.raises(ValueError, match="expert_ids must lie"):
        ops.moe_experts(x, bad_ids, weights, w1, w2, kept=kept, backend="reference")
    with pytest.raises(ValueError, match="moe_experts: w_down must have shape"):
        ops.moe_experts(x, ids, weights, w1, w2[:, :7], backend="cpu")
    with pytest.raises(ValueError, match="moe_experts: w_gate_up must have shape"):
        ops.moe_experts(x, ids, weights, w1[:, :7], w2, backend="cpu")
    with pytest.raises(TypeError, match="moe_experts: x, w_gate_up and w_down must share one dtype"):
        ops.moe_experts(x, ids, weights, w1.double(), w2.double(), backend="cpu")
    with pytest.raises(TypeError, match="moe_experts: expert_ids"):
        ops.moe_experts(x, ids.int(), weights, w1, w2, backend="cpu")
    with pytest.raises(ValueError, match="moe_experts: weights must have"):
        ops.moe_experts(x, ids, weights[:, :1], w1, w2, backend="cpu")
    with pytest.raises(ValueError, match="moe_experts: kept must have"):
        ops.moe_experts(x, ids, weights, w1, w2, kept=kept[:5], backend="cpu")


def test_cpu_parallel_items_with_parameters():
    """Many experts (the CPU paths then run expert work items in parallel worker threads) and weights that
    are nn.Parameters: the inference path under no_grad and the training path both work and match."""
    import fastcore_ai

    torch.manual_seed(15)
    T, H, I, E, k = 64, 16, 12, 16, 2
    layer = fastcore_ai.nn.MoEExperts(E, H, I, backend="cpu")
    x, ids, weights, kept, _, _ = make_inputs(T, H, I, E, k, seed=15)
    expected = oracle(x, ids, weights, kept, layer.gate_up_proj, layer.down_proj)
    with torch.no_grad():
        assert relative_error(layer(x, ids, weights, kept), expected) < 1e-5
    out = layer(x.requires_grad_(), ids, weights, kept)
    assert relative_error(out, expected) < 1e-5
    out.square().sum().backward()
    assert x.grad is not None and layer.down_proj.grad is not None

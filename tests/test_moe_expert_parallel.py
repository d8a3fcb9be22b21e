"""ExpertParallelMoE on torch.distributed: 2 CPU processes on the gloo backend, experts sharded 2 ways,
tokens exchanged with uneven all_to_all_single. Every rank's outputs and gradients are compared with the
single-process MoE built from the same full weights.

Dropless cases compare with one single-process run on the concatenation of the ranks' tokens
(loss = Σ_ranks Σ (out ⊙ g), so the gradients add up). Capacity is computed per rank on its own tokens,
so a dropping layer is not equal to one run on the concatenated batch (different capacity, different
priority order); the capacity case therefore compares with single-process runs on each rank's own
tokens, their losses summed into one backward (the sum of the per-rank gradients is what the
all-reduced router gradient and the sharded expert gradients must equal).

The workers run every case in one launch (module fixture) and write their tensors to tmp files; the
parent process asserts (tests/_gloo.py launches them: a hang or a crash fails, with the worker's report).
"""

import os

import pytest
import torch
import torch.distributed as dist

import fastcore_ai
from _gloo import run_gloo_workers
from fastcore_ai.nn import ExpertParallelMoE, MoE

WORLD = 2
TOKENS = (37, 50)  # uneven per rank
H = 16

# name: (layer arguments, router column-0 bias or None, compare with the concatenated batch?)
CASES = {
    # Expert 3 gets nothing from rank 0 (its tokens have x[:, 0] < 0 and router row 3 has +2 in column 0).
    "dropless": (dict(d_ff=24, num_experts=4, k=2), [0.0, 0.0, 0.0, 2.0], True),
    # Rank 0 only uses experts 0, 1 and rank 1 only 2, 3: both cross-rank splits are 0.
    "no_cross_traffic": (dict(d_ff=24, num_experts=4, k=2), [-2.0, -2.0, 2.0, 2.0], True),
    # 3 local experts, top-1, non-gated gelu.
    "e6_k1_gelu": (dict(d_ff=20, num_experts=6, k=1, gated=False, activation="gelu"), None, True),
    # Capacity 0.5: drops on both ranks; compared with per-rank single-process runs.
    "capacity": (dict(d_ff=24, num_experts=4, k=2, capacity_factor=0.5), [0.0, 0.0, 0.0, 2.0], False),
}


def _relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    denominator = expected.norm().item()
    return (actual - expected).norm().item() / (denominator if denominator > 0 else 1.0)


def _make_case(name):
    """The single-process layer (fixed seed), each rank's tokens and output-gradient weights."""
    kwargs, bias, _ = CASES[name]
    kwargs = dict(kwargs)
    capacity = kwargs.pop("capacity_factor", None)
    generator = torch.Generator().manual_seed(1234 + len(name))
    torch.manual_seed(4321 + len(name))
    moe = MoE(
        H,
        kwargs.pop("d_ff"),
        kwargs.pop("num_experts"),
        kwargs.pop("k"),
        capacity_factor=capacity,
        eval_capacity_factor=capacity,
        backend="cpu",
        **kwargs,
    )
    xs, gs = [], []
    for rank, T in enumerate(TOKENS):
        x = torch.randn(T, H, generator=generator)
        if bias is not None:  # rank 0's tokens have x[:, 0] < 0, rank 1's > 0
            x[:, 0] = (x[:, 0].abs() + 1.0) * (-1.0 if rank == 0 else 1.0)
        xs.append(x)
        gs.append(torch.randn(T, H, generator=generator))
    if bias is not None:
        with torch.no_grad():
            moe.router.weight[:, 0] = torch.tensor(bias)
    return moe, xs, gs


def _worker(rank, world, out_dir):
    for name in CASES:
        moe, xs, gs = _make_case(name)
        layer = ExpertParallelMoE.from_moe(moe)
        x = xs[rank].clone().requires_grad_(True)
        out = layer(x)
        (out * gs[rank]).sum().backward()
        layer.sync_router_grads()
        routed = layer.last_router
        ids = routed.expert_ids[routed.kept] if routed.kept is not None else routed.expert_ids.reshape(-1)
        torch.save(
            {
                "out": out.detach(),
                "grad_x": x.grad,
                "grad_router": layer.router.weight.grad,
                "grad_gate_up": layer.experts.gate_up_proj.grad,
                "grad_down": layer.experts.down_proj.grad,
                "expert_start": layer.expert_start,
                "num_local": layer.num_local_experts,
                "sent_per_expert": torch.bincount(ids, minlength=layer.num_experts),
                "dropped": 0 if routed.kept is None else int((~routed.kept).sum()),
            },
            os.path.join(out_dir, f"{name}_rank{rank}.pt"),
        )
    try:
        ExpertParallelMoE(H, 8, num_experts=3)
        message = "no error"
    except ValueError as error:
        message = str(error)
    torch.save({"message": message}, os.path.join(out_dir, f"divisibility_rank{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("expert_parallel"))
    run_gloo_workers(_worker, WORLD, out_dir)
    return out_dir


def _load(out_dir, name):
    return [torch.load(os.path.join(out_dir, f"{name}_rank{r}.pt")) for r in range(WORLD)]


def _reference(name):
    """Single-process outputs (per rank) and gradients of Σ_ranks Σ (out_r ⊙ g_r)."""
    moe, xs, gs = _make_case(name)
    concatenated = CASES[name][2]
    if concatenated:
        x = torch.cat(xs).requires_grad_(True)
        out = moe(x)
        (out * torch.cat(gs)).sum().backward()
        outs, grad_xs = out.detach().split(TOKENS), x.grad.split(TOKENS)
    else:
        leaves = [x.clone().requires_grad_(True) for x in xs]
        outs = [moe(x) for x in leaves]
        sum((o * g).sum() for o, g in zip(outs, gs)).backward()
        outs, grad_xs = [o.detach() for o in outs], [x.grad for x in leaves]
    return moe, outs, grad_xs


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_single_process(results, name):
    moe, outs, grad_xs = _reference(name)
    ranks = _load(results, name)
    for rank, got in enumerate(ranks):
        local = slice(got["expert_start"], got["expert_start"] + got["num_local"])
        assert got["num_local"] == moe.router.num_experts // WORLD and got["expert_start"] == rank * got["num_local"]
        checks = {
            "out": (got["out"], outs[rank]),
            "grad_x": (got["grad_x"], grad_xs[rank]),
            "grad_router": (got["grad_router"], moe.router.weight.grad),
            "grad_gate_up": (got["grad_gate_up"], moe.experts.gate_up_proj.grad[local]),
            "grad_down": (got["grad_down"], moe.experts.down_proj.grad[local]),
        }
        for what, (actual, expected) in checks.items():
            assert actual.shape == expected.shape, (rank, what)
            assert expected.abs().sum() > 0, (rank, what)  # the comparison is not vacuous
            assert _relative_error(actual, expected) < 1e-5, (rank, what, _relative_error(actual, expected))
    sent = torch.stack([got["sent_per_expert"] for got in ranks])  # [source rank, expert]
    if name in ("dropless", "capacity"):
        assert sent[0, 3] == 0 and sent[1, 3] > 0  # expert 3 receives no tokens from rank 0
    if name == "no_cross_traffic":
        assert sent[0, 2:].sum() == 0 and sent[1, :2].sum() == 0 and sent[0, :2].sum() > 0 and sent[1, 2:].sum() > 0
    if name == "capacity":
        assert all(got["dropped"] > 0 for got in ranks)
    else:
        assert all(got["dropped"] == 0 for got in ranks)


def test_divisibility_error(results):
    for got in _load(results, "divisibility"):
        assert "num_experts (3) must be divisible" in got["message"] and "(2)" in got["message"]


def test_needs_process_group():
    # the gloo tests run in spawned processes: no test initialises a group in the pytest process
    assert not (dist.is_available() and dist.is_initialized())
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(H, 8, num_experts=4)
    assert fastcore_ai.nn.ExpertParallelMoE is ExpertParallelMoE

"""Direct tests of the Triton MoE router launchers (triton_kernels/moe.py) against the float64 reference.

On a machine without a GPU the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before triton is imported unless the environment already chose); with a GPU they run natively.
The op-level parity suite (backend="triton" through fastcore_ai.ops) lives elsewhere.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fastcore_ai import reference  # noqa: E402
from fastcore_ai.triton_kernels import INTERPRETED  # noqa: E402
from fastcore_ai.triton_kernels import moe as triton_moe  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.triton
TOL = 1e-5  # relative Frobenius error of the float32 kernels against float64


def _rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    out, ref = torch.nan_to_num(out, nan=0.0), torch.nan_to_num(ref, nan=0.0)
    scale = ref.norm()
    return float((out - ref).norm() / scale) if scale > 0 else float((out - ref).norm())


def _check_forward(logits, k, renormalize):
    got = triton_moe.moe_topk_route(logits, k, renormalize)
    want = reference.moe_topk_route(logits.double().cpu(), k, renormalize)
    weights, ids, z_loss, counts, mean_prob, lse = got
    assert (weights.dtype, ids.dtype, z_loss.dtype, counts.dtype, mean_prob.dtype, lse.dtype) == (
        torch.float32,
        torch.int64,
        torch.float32,
        torch.int64,
        torch.float32,
        torch.float32,
    )
    assert z_loss.shape == () and weights.shape == want[0].shape and lse.shape == want[5].shape
    assert torch.equal(ids.cpu(), want[1])
    assert torch.equal(counts.cpu(), want[3])
    for name, a, b in (
        ("weights", weights, want[0]),
        ("z_loss", z_loss, want[2]),
        ("mean_prob", mean_prob, want[4]),
        ("lse", lse, want[5]),
    ):
        assert _rel(a, b) < TOL, name
    return got, want


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 1, 1), (7, 3, 3), (1000, 61, 4), (33, 128, 16), (9, 1024, 16)])
def test_forward_backward_random(T, E, k, renormalize):
    gen = torch.Generator().manual_seed(T * 131 + E * 7 + k)
    logits = (torch.randn(T, E, generator=gen) * 3).to(DEVICE)
    _, want = _check_forward(logits, k, renormalize)
    got = triton_moe.moe_topk_route(logits, k, renormalize)
    grad_weights = torch.randn(T, k, generator=gen, dtype=torch.float64)
    grad_z_loss = torch.randn((), generator=gen, dtype=torch.float64)
    grad_mean_prob = torch.randn(E, generator=gen, dtype=torch.float64)
    grad = triton_moe.moe_topk_route_backward(
        logits,
        got[1],
        got[0],
        got[5],
        grad_weights.float().to(DEVICE),
        grad_z_loss.float().to(DEVICE),
        grad_mean_prob.float().to(DEVICE),
        renormalize,
    )
    assert grad.dtype == torch.float32 and grad.shape == (T, E)
    ref = reference.moe_topk_route_backward(
        logits.double().cpu(), want[1], want[0], want[5], grad_weights, grad_z_loss, grad_mean_prob, renormalize
    )
    if T:
        assert _rel(grad, ref) < TOL


def test_ties_infinities_and_nans():
    zeros = torch.zeros(5, 61, device=DEVICE)
    ids = triton_moe.moe_topk_route(zeros, 16, True)[1]
    assert torch.equal(ids.cpu(), torch.arange(16).expand(5, 16))
    x = torch.randn(40, 61)
    x[x < 0.3] = float("-inf")
    x[3, :] = float("-inf")  # no distribution: NaN weights, ids 0..k-1
    x[4, :5] = float("nan")  # NaN row: NaN weights, ids still in [0, E) and distinct
    x[5, :] = float("nan")
    x[6, :-2] = float("-inf")  # fewer finite logits than k: -inf ties by lower index
    for renormalize in (True, False):
        for k in (1, 3, 16):
            got, _ = _check_forward(x.to(DEVICE), k, renormalize)
            ids = got[1].cpu()
            assert int(ids.min()) >= 0 and int(ids.max()) < 61
            assert all(len(set(row.tolist())) == k for row in ids)
    _check_forward(torch.randint(-2, 3, (300, 61)).float().to(DEVICE), 16, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_strided_and_low_precision(dtype):
    base = (torch.randn(61, 333) * 2).to(dtype).to(DEVICE)
    _check_forward(base.t(), 5, True)  # column-major
    _check_forward(base.t()[::3, 7:50:2], 4, False)  # row step and column step
    _check_forward(base[:1].expand(40, 333), 3, True)  # stride 0 over rows


def test_backward_expanded_grad_weights():
    logits = torch.randn(50, 12, device=DEVICE)
    out = triton_moe.moe_topk_route(logits, 3, False)
    grad_weights = torch.full((1, 1), 0.7, device=DEVICE).expand(50, 3)
    grad = triton_moe.moe_topk_route_backward(
        logits,
        out[1],
        out[0],
        out[5],
        grad_weights,
        torch.tensor(0.5, device=DEVICE),
        torch.zeros(12, device=DEVICE),
        False,
    )
    x = logits.double().cpu()
    ref = reference.moe_topk_route_backward(
        x,
        out[1].cpu(),
        out[0].double().cpu(),
        out[5].double().cpu(),
        grad_weights.double().cpu(),
        torch.tensor(0.5, dtype=torch.float64),
        torch.zeros(12, dtype=torch.float64),
        False,
    )
    assert _rel(grad, ref) < TOL


def test_statistics_over_several_tiles_per_program(monkeypatch):
    # Force the program loop over row tiles that very large T uses (scratch bound of 3 programs).
    monkeypatch.setattr(triton_moe, "_MAX_PARTIAL_ENTRIES", 61 * 3)
    logits = torch.randn(1000, 61, device=DEVICE)
    _check_forward(logits, 4, True)
    first = triton_moe.moe_topk_route(logits, 4, True)
    again = triton_moe.moe_topk_route(logits, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic statistics

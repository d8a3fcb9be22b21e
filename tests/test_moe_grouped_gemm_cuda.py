"""The CUDA grouped GEMM of the MoE expert MLP (csrc/kernels/moe/grouped_gemm.cu): every epilogue (plain
store with the routing weight, fused activation forward, activation backward), the in-kernel row
gather, the float32 SIMT path and the float16/bfloat16 tensor-core path, checked against float64 torch
math — on the CPU CUDA emulator of tests/test_cuda_build.py (kernel source unchanged; the tensor-core
code runs on a functional WMMA stand-in where each emulated thread holds whole 16×16 fragments, so the
tile/fragment indexing, the staging and the epilogue are checked, not the hardware fragment layout),
and, on a GPU, through the cuda backends of moe_grouped_mlp and moe_experts.

Bounds (relative Frobenius error vs float64): float32 < 1e-6 (exact float32 FMAs); float16 / bfloat16
< 1e-2 (16-bit outputs: one rounding of each stored element, ~2^-9 relative for bf16).
"""

import ctypes

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.reference import moe_experts as reference_experts

from _helpers import relative_error, require_backend


DRIVER = r"""
#include "grouped_gemm_emulated.inc"
using namespace fastcore;
using namespace fastcore::moe;
extern "C" int emu_grouped_gemm(int kind, const void* a, int64_t a_row_stride, int64_t a_col_stride,
                                const int64_t* a_rows, int64_t a_num_rows, const void* b, int64_t b_expert_stride,
                                int64_t b_k_stride, int64_t b_n_stride, const int64_t* offsets, int64_t E, int64_t S,
                                int64_t N, int64_t K, int64_t* scratch, int epilogue, int gated, int activation,
                                void* c, int64_t c_row_stride, const float* row_scale, float* gate_up_out,
                                const float* gate_up_in, void* h) {
  GroupedGemmParams p;
  p.kind = ScalarKind(kind); p.a = a; p.a_row_stride = a_row_stride; p.a_col_stride = a_col_stride;
  p.a_rows = a_rows; p.a_num_rows = a_num_rows; p.b = b; p.b_expert_stride = b_expert_stride;
  p.b_k_stride = b_k_stride; p.b_n_stride = b_n_stride; p.expert_offsets = offsets; p.num_experts = E;
  p.rows = S; p.n = N; p.k = K; p.scratch = scratch; p.epilogue = GemmEpilogue(epilogue); p.gated = gated != 0;
  p.activation = Activation(activation); p.c = c; p.c_row_stride = c_row_stride; p.row_scale = row_scale;
  p.gate_up_out = gate_up_out; p.gate_up_in = gate_up_in; p.h = h;
  return grouped_gemm_cuda(p, nullptr);
}
"""

KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def emulated_gemm(tmp_path_factory):
    from test_cuda_build import WMMA_EMULATION, build_emulated_kernels

    return build_emulated_kernels(
        tmp_path_factory.mktemp("grouped_gemm_emulator"),
        "moe/grouped_gemm.cu",
        DRIVER,
        "grouped_gemm",
        extra_runtime=WMMA_EMULATION,
    )


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _i64(v):
    return ctypes.c_int64(v)


def run_gemm(
    lib,
    a,
    a_rows,
    b,
    b_strides,
    offsets,
    N,
    K,
    epilogue,
    c=None,
    row_scale=None,
    gate_up_out=None,
    gate_up_in=None,
    h=None,
    gated=True,
    activation=0,
):
    E = offsets.shape[0] - 1
    S = offsets[-1].item()
    scratch = torch.full((2 * (E + 1),), -7, dtype=torch.int64)
    status = lib.emu_grouped_gemm(
        KIND[a.dtype],
        _ptr(a),
        _i64(a.stride(0)),
        _i64(a.stride(1)),
        _ptr(a_rows),
        _i64(a.shape[0]),
        _ptr(b),
        _i64(b_strides[0]),
        _i64(b_strides[1]),
        _i64(b_strides[2]),
        _ptr(offsets),
        _i64(E),
        _i64(S),
        _i64(N),
        _i64(K),
        _ptr(scratch),
        epilogue,
        int(gated),
        activation,
        _ptr(c),
        _i64(c.stride(0) if c is not None else 0),
        _ptr(row_scale),
        _ptr(gate_up_out),
        _ptr(gate_up_in),
        _ptr(h),
    )
    assert status == 0, f"emulated grouped_gemm_cuda returned cudaError {status}"


def _problem(dtype, S_per_expert=(37, 0, 70, 5), H=24, I=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(S_per_expert)
    S = sum(S_per_expert)
    T = 50
    x = torch.randn(T, H, generator=g).to(dtype)
    rows = torch.randint(0, T, (S,), generator=g)  # the gather: token of each sorted row
    offsets = torch.tensor([0] + list(torch.tensor(S_per_expert).cumsum(0)), dtype=torch.int64)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    return x, rows, offsets, w1, w2


def _per_expert(offsets):
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
def test_emulated_act_forward_with_gather(emulated_gemm, dtype, gated):
    x, rows, offsets, w1, w2 = _problem(dtype)
    I = w2.shape[2]
    if not gated:
        w1 = w1[:, :I].contiguous()
    S, H = rows.shape[0], x.shape[1]
    n1 = 2 * I if gated else I
    gate_up = torch.full((S, n1), float("nan"))
    h = torch.full((S, I), float("nan")).to(dtype)
    # B[e] (κ = h, n = j) = W_gate_up[e, j, h]
    run_gemm(
        emulated_gemm,
        x,
        rows,
        w1,
        (w1.stride(0), w1.stride(2), w1.stride(1)),
        offsets,
        I,
        H,
        1,
        gate_up_out=gate_up,
        h=h,
        gated=gated,
        activation=0,
    )
    expected_gu = torch.zeros(S, n1, dtype=torch.float64)
    for e, lo, hi in _per_expert(offsets):
        expected_gu[lo:hi] = x[rows[lo:hi]].double() @ w1[e].double().t()
    g = expected_gu[:, :I]
    expected_h = torch.nn.functional.silu(g) * (expected_gu[:, I:] if gated else 1.0)
    assert relative_error(gate_up, expected_gu) < 1e-6
    assert relative_error(h, expected_h) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_store_with_routing_weight(emulated_gemm, dtype):
    _, _, offsets, _, w2 = _problem(dtype, seed=1)
    S, H, I = offsets[-1].item(), w2.shape[1], w2.shape[2]
    hidden = torch.randn(S, I).to(dtype)
    scale = torch.rand(S)
    y = torch.full((S, H + 3), float("nan")).to(dtype)[:, :H]  # a row stride != H
    run_gemm(
        emulated_gemm,
        hidden,
        None,
        w2,
        (w2.stride(0), w2.stride(2), w2.stride(1)),
        offsets,
        H,
        I,
        0,
        c=y,
        row_scale=scale,
    )
    expected = torch.zeros(S, H, dtype=torch.float64)
    for e, lo, hi in _per_expert(offsets):
        expected[lo:hi] = scale[lo:hi, None].double() * (hidden[lo:hi].double() @ w2[e].double().t())
    assert relative_error(y, expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_act_backward(emulated_gemm, dtype):
    _, _, offsets, _, w2 = _problem(dtype, seed=2)
    S, H, I = offsets[-1].item(), w2.shape[1], w2.shape[2]
    grad_y = torch.randn(S, H).to(dtype)
    gate_up = torch.randn(S, 2 * I)
    grad_gu = torch.full((S, 2 * I), float("nan")).to(dtype)
    h = torch.full((S, I), float("nan")).to(dtype)
    # grad_h = grad_y @ W_down[e]: B[e] (κ = h, n = i) = W_down[e, h, i]
    run_gemm(
        emulated_gemm,
        grad_y,
        None,
        w2,
        (w2.stride(0), w2.stride(1), w2.stride(2)),
        offsets,
        I,
        H,
        2,
        c=grad_gu,
        gate_up_in=gate_up,
        h=h,
        activation=1,
    )
    grad_h = torch.zeros(S, I, dtype=torch.float64)
    for e, lo, hi in _per_expert(offsets):
        grad_h[lo:hi] = grad_y[lo:hi].double() @ w2[e].double()
    gate, up = gate_up[:, :I].double(), gate_up[:, I:].double()
    cdf = 0.5 * (1 + torch.erf(gate / 2**0.5))
    slope = cdf + gate * torch.exp(-0.5 * gate * gate) / (2 * torch.pi) ** 0.5
    expected = torch.cat([grad_h * up * slope, grad_h * gate * cdf], dim=1)
    assert relative_error(grad_gu, expected) < TOL[dtype]
    assert relative_error(h, gate * cdf * up) < TOL[dtype]


def test_emulated_malformed_offsets_stay_in_bounds(emulated_gemm):
    x, rows, _, w1, w2 = _problem(torch.float32, seed=3)
    S, H, I = rows.shape[0], x.shape[1], w2.shape[2]
    bad = torch.tensor([5, 200, -3, 90, 1], dtype=torch.int64)  # clamped to [0, S], made non-decreasing
    bad[-1] = S
    gate_up = torch.zeros(S, 2 * I)
    h = torch.full((S, I), float("nan"))
    rows = rows.clone()
    rows[3] = 10**9  # a gather index outside x reads zeros
    run_gemm(
        emulated_gemm, x, rows, w1, (w1.stride(0), w1.stride(2), w1.stride(1)), bad, I, H, 1, gate_up_out=gate_up, h=h
    )
    assert not torch.isnan(h).any()  # every row written exactly once
    assert torch.equal(gate_up[3], torch.zeros(2 * I))


# ---- on a GPU: the cuda backends against the float64 reference ------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_grouped_mlp_and_experts_parity(dtype):
    require_backend("moe_grouped_mlp", "cuda", "cuda", dtype)
    require_backend("moe_experts", "cuda", "cuda", dtype)
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 300, 96, 80, 6, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    kept = torch.rand(T, k, generator=g) > 0.2
    w1 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}[dtype]
    cuda = [t.cuda() for t in (x.to(dtype), ids, weights, kept, w1.to(dtype), w2.to(dtype))]
    expected = reference_experts.moe_experts(
        x.to(dtype).double(), ids, weights.double(), kept, w1.to(dtype).double(), w2.to(dtype).double()
    )
    with torch.no_grad():
        out = ops.moe_experts(cuda[0], cuda[1], cuda[2], cuda[4], cuda[5], kept=cuda[3], backend="cuda")
    assert relative_error(out, expected) < tol
    leaves = [t.clone().requires_grad_() for t in (cuda[0], cuda[2], cuda[4], cuda[5])]
    out = ops.moe_experts(leaves[0], cuda[1], leaves[1], leaves[2], leaves[3], kept=cuda[3], backend="cuda")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref = reference_experts.moe_experts(ref_leaves[0], ids, ref_leaves[1], kept, ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double().cpu())
    assert relative_error(out, ref) < tol
    for got, want in zip(grads, ref_grads):
        assert relative_error(got, want) < 2 * tol

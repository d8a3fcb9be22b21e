"""Triton kernels for the grouped MoE expert MLP (fastcore_ai.ops.moe_grouped_mlp, backend="triton").

Rows arrive grouped by expert (moe_dispatch's x_sorted): the rows of expert e are
expert_offsets[e] : expert_offsets[e + 1]. Weights use Hugging Face MixtralExperts' layout:
w_gate_up [E, 2I, H] (rows 0..I−1 gate, I..2I−1 up) when gated, [E, I, H] when not; w_down [E, H, I].
Per row x of expert e (N1 = 2I gated, I otherwise):

  forward    gu = W_gate_up[e] x                           (gate_up, [S, N1], saved in float32)
             h  = act(gu[:I]) ⊙ gu[I:]      (gated)        h = act(gu)      (not gated)
             y  = W_down[e] h
  backward   grad_h      = W_down[e]ᵀ grad_y
             grad_gate   = grad_h ⊙ up ⊙ act'(gate),  grad_up = grad_h ⊙ act(gate)   (gated)
             grad_gu     = grad_h ⊙ act'(gu)                                         (not gated)
             grad_x      = W_gate_up[e]ᵀ grad_gu
             grad_W_down[e]    = Σ_{rows of e} grad_y ⊗ h
             grad_W_gate_up[e] = Σ_{rows of e} grad_gu ⊗ x
  act ∈ {silu: g σ(g),  gelu: ½ g (1 + erf(g/√2)) (exact),  relu: max(g, 0) (act'(0) = 0, as torch)}.

Two kernels do all the work:

* `_grouped_gemm_kernel`:  C[r, n] = Σ_k A[r, k] B[e(r), k, n] over row tiles of the concatenated S rows.
  B is addressed through strides only, so W and Wᵀ are the same kernel (no copies, no transposes).
  Row tiles never straddle two experts: tiles are built per expert (ceil(rows_e / BLOCK_M) each) by a
  small tile table computed with torch on the device (cumsum + searchsorted, no host sync). The grid
  takes an upper bound on the tile count; surplus tiles are empty and do no work. An epilogue
  (constexpr) fuses the activation:
    EPI_NONE      store C                                        (y, grad_x)
    EPI_ACT_FWD   gated: two accumulators (gate columns n, up columns I + n) share every x tile;
                  store gate_up (float32) and h = act(gate) ⊙ up (operand dtype)   (gate_up GEMM)
    EPI_ACT_BWD   acc = grad_h; load gate/up from gate_up; store grad_gu (both halves) and the
                  recomputed h (for grad_W_down)                                   (grad_h GEMM)
* `_expert_weight_grad_kernel`:  dW[e, m, n] = Σ_{r in e} G[r, m] A[r, n]. One program owns one
  (BLOCK_M × BLOCK_N) tile of one expert and loops over that expert's rows in BLOCK_R chunks in order,
  so results are deterministic without atomics (DESIGN rule 8); an expert with no rows stores zeros.

Precision: every tl.dot accumulates in float32; float32 operands use input_precision="ieee" (never
TF32: float32 results then agree with float64 to ~1e-7; on a GPU that dot runs on FMA units, not
tensor cores). For bf16/fp16 inputs the dot operands are in that dtype: h and grad_gu are rounded to
it before the next GEMM (as a bf16 PyTorch MLP does), while gate_up is kept in float32 and the
activation math is float32. Interpreter notes: bf16 dot operands are widened to float32 there (its
tl.dot multiplies bf16 tiles as raw uint16; see _upcast), and its float32 -> bf16 casts truncate
instead of rounding to nearest even, so bf16 errors under TRITON_INTERPRET=1 are ~1.6-2x those of
a native run (still < 1e-2 relative on the tests' shapes).

Strides: x_sorted, grad_y, gate_up and both weights may have any strides (they are passed to the
kernels; nothing is copied). Outputs are new contiguous tensors.

Offsets: expert_offsets is [E + 1] int64. Its values are checked (one host sync) unless
check_offsets=False; either way the kernels read a sanitised copy (clamped to [0, S], first 0, last S,
made non-decreasing), so malformed offsets can never cause an out-of-bounds access or unwritten rows.
Offsets arithmetic in the kernels is int64.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import INTERPRETED

_OP = "moe_grouped_mlp"
_PREFIX = f"fastcore_ai.ops.{_OP}: "
ACTIVATIONS = ("silu", "gelu", "relu")
_ACT_CODE = {"silu": 0, "gelu": 1, "relu": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Epilogues of the grouped GEMM (constexpr codes).
_EPI_NONE = 0
_EPI_ACT_FWD = 1
_EPI_ACT_BWD = 2

# Tile configuration. Every dot dimension is ≥ 16 (tl.dot's minimum on a GPU); tails are masked.
_BLOCK_M = 32  # rows of a grouped-GEMM tile (a tile never spans two experts)
_MAX_BLOCK_N = 64
_MAX_BLOCK_K = 32
_BLOCK_R = 32  # rows per step of the weight-gradient reduction
_NUM_WARPS = 4


def _num_warps(block_m: int, block_n: int) -> int:
    # A 64 × 64 float32 accumulator needs 8 warps to stay clear of the 255-register limit (sm_90).
    return 8 if block_m * block_n >= 4096 else _NUM_WARPS


def _pow2_block(size: int, largest: int) -> int:
    return max(16, min(largest, triton.next_power_of_2(max(size, 1))))


# ------------------------------------------------------------------------------------------------
# activation helpers (float32 in, float32 out)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g): 0 silu, 1 exact gelu, 2 relu."""
    if ACT == 0:
        out = g * tl.sigmoid(g)
    elif ACT == 1:
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)):  silu' = σ(g)(1 + g(1 − σ(g))),  gelu' = Φ(g) + g φ(g),  relu' = [g > 0]."""
    if ACT == 0:
        s = tl.sigmoid(g)
        value = g * s
        slope = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        value = g * cdf
        slope = cdf + g * (0.3989422804014327 * tl.exp(-0.5 * g * g))
    else:
        value = tl.maximum(g, 0.0)
        slope = tl.where(g > 0.0, 1.0, 0.0)
    return value, slope


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_gemm_kernel(
    # ---- pointers ----
    a_ptr,  # [S, K] operand A, element (r, k) at r * stride_am + k * stride_ak
    b_ptr,  # [E, K, N(+N)] operand B, element (e, k, n) at e * stride_be + k * stride_bk + n * stride_bn
    c_ptr,  # [S, N] (EPI_NONE) or gate_up / grad_gu [S, N1] out,
    #   element (r, n) at r * stride_cm + n * stride_cn
    h_ptr,  # [S, N] h out (EPI_ACT_FWD / EPI_ACT_BWD), contiguous; unused with EPI_NONE
    gu_ptr,  # [S, N1] float32 gate_up in (EPI_ACT_BWD), element (r, n) at r * stride_gm + n * stride_gn
    tiles_ptr,  # [3, num_tiles] int64: expert, first row, end row of each row tile (empty: first = end)
    # ---- sizes ----
    num_tiles,
    N,  # output columns (I for the activation epilogues)
    K,  # reduction length
    # ---- strides (elements) ----
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_gm,
    stride_gn,
    # ---- meta-parameters ----
    EPILOGUE: tl.constexpr,  # 0 none, 1 activation forward, 2 activation backward
    GATED: tl.constexpr,
    ACT: tl.constexpr,  # 0 silu, 1 gelu, 2 relu
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands
    UPCAST: tl.constexpr,  # dot in float32 (the interpreter cannot multiply bf16 tiles)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N tile of C[rows of e, :] = A[rows of e, :] @ B[e] (float32 accumulation).

    With EPI_ACT_FWD and GATED, B's columns n (gate) and N + n (up) are both accumulated:
    gate_up[r, n] = gate, gate_up[r, N + n] = up, h[r, n] = act(gate) up.
    With EPI_ACT_BWD the accumulator is grad_h[r, n]; with gate = gate_up[r, n], up = gate_up[r, N + n]:
    grad_gu[r, n] = grad_h up act'(gate), grad_gu[r, N + n] = grad_h act(gate), h[r, n] = act(gate) up
    (not gated: grad_gu[r, n] = grad_h act'(gu), h = act(gu)).
    """
    tile = tl.program_id(0).to(tl.int64)
    expert = tl.load(tiles_ptr + tile)
    row_start = tl.load(tiles_ptr + num_tiles + tile)
    row_end = tl.load(tiles_ptr + 2 * num_tiles + tile)

    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows < row_end
    col_ok = cols < N
    k_stop = tl.where(row_start < row_end, K, 0)  # an empty (surplus) tile does no work

    cols_up = cols + N  # the "up" half's columns (int64 arithmetic)
    a_rows = a_ptr + rows[:, None] * stride_am
    b_base = b_ptr + expert * stride_be + cols[None, :] * stride_bn
    b_up_base = b_ptr + expert * stride_be + cols_up[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_base + ks[:, None] * stride_bk, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        a = a.to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 1:
            if GATED:
                b_up = tl.load(b_up_base + ks[:, None] * stride_bk, mask=b_mask, other=0.0)
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)

    mask = row_ok[:, None] & col_ok[None, :]
    c_off = rows[:, None] * stride_cm + cols[None, :] * stride_cn
    c_up_off = rows[:, None] * stride_cm + cols_up[None, :] * stride_cn
    h_off = rows[:, None] * N + cols[None, :]
    if EPILOGUE == 0:
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(c_ptr + c_up_off, acc_up.to(c_ptr.dtype.element_ty), mask=mask)
            h = _act(acc, ACT) * acc_up
        else:
            h = _act(acc, ACT)
        tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        g_off = rows[:, None] * stride_gm + cols[None, :] * stride_gn
        g_up_off = rows[:, None] * stride_gm + cols_up[None, :] * stride_gn
        gate = tl.load(gu_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        value, slope = _act_and_grad(gate, ACT)
        if GATED:
            up = tl.load(gu_ptr + g_up_off, mask=mask, other=0.0).to(tl.float32)
            tl.store(c_ptr + c_off, (acc * up * slope).to(c_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptr + c_up_off, (acc * value).to(c_ptr.dtype.element_ty), mask=mask)
            h = value * up
        else:
            tl.store(c_ptr + c_off, (acc * slope).to(c_ptr.dtype.element_ty), mask=mask)
            h = value
        tl.store(h_ptr + h_off, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_weight_grad_kernel(
    # ---- pointers ----
    g_ptr,  # [S, M] G (grad_y or grad_gu), element (r, m) at r * stride_gr + m * stride_gm
    a_ptr,  # [S, N] A (h or x), element (r, n) at r * stride_ar + n * stride_an
    dw_ptr,  # [E, M, N] out, contiguous
    offsets_ptr,  # [E + 1] int64 sanitised expert offsets
    # ---- sizes ----
    M,
    N,
    # ---- strides (elements) ----
    stride_gr,
    stride_gm,
    stride_ar,
    stride_an,
    # ---- meta-parameters ----
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in float32 (the interpreter cannot multiply bf16 tiles)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dW[e, m, n] = Σ_{r = off[e]}^{off[e+1]−1} G[r, m] A[r, n] for one BLOCK_M × BLOCK_N tile of expert
    e = program_id(1); rows are taken in BLOCK_R chunks in increasing order (float32 accumulation)."""
    expert = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    ms = (pid // tiles_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ns = (pid % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok = ms < M
    n_ok = ns < N
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rs = r0 + offs_r
        r_ok = rs < row_end
        g_t = tl.load(
            g_ptr + rs[None, :] * stride_gr + ms[:, None] * stride_gm, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )  # [BLOCK_M, BLOCK_R] = Gᵀ
        a = tl.load(
            a_ptr + rs[:, None] * stride_ar + ns[None, :] * stride_an, mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_N]
        if UPCAST:
            g_t = g_t.to(tl.float32)
        acc = tl.dot(g_t, a.to(g_t.dtype), acc, input_precision=DOT_PRECISION)
    dw_off = expert * M * N + ms[:, None] * N + ns[None, :]
    tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"


# Launcher-side input checks for direct callers (fastcore_ai.ops.moe_grouped_mlp validates before it calls
# in); the messages follow fastcore_ai._validation's, without importing it (kernels import nothing from
# fastcore_ai).


def _check_tensor(name: str, value, ndim: int, dtypes, layout: str) -> None:
    if isinstance(value, Tensor) and value.dtype in dtypes and value.dim() == ndim:
        return
    allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    if not isinstance(value, Tensor):
        raise TypeError(f"{_PREFIX}{name} must be a torch.Tensor {layout} of {allowed}, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{_PREFIX}{name} must be {allowed} with shape {layout}, got {_describe(value)}")
    raise ValueError(f"{_PREFIX}{name} must be a {ndim}-D tensor {layout}, got {value.dim()}-D {_describe(value)}")


def _check_inputs(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated) -> Tuple[int, int, int, int]:
    """Validates the forward inputs; returns (S, H, I, E)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{_PREFIX}activation must be one of {', '.join(repr(a) for a in ACTIVATIONS)}, got {activation!r}"
        )
    if not isinstance(gated, bool):
        raise TypeError(f"{_PREFIX}gated must be a bool, got {type(gated).__name__} {gated!r}")
    _check_tensor("x_sorted", x_sorted, 2, _DTYPES, "[S, H]")
    _check_tensor("expert_offsets", expert_offsets, 1, (torch.int64,), "[E + 1]")
    _check_tensor("w_gate_up", w_gate_up, 3, _DTYPES, "[E, 2I, H]" if gated else "[E, I, H]")
    _check_tensor("w_down", w_down, 3, _DTYPES, "[E, H, I]")
    S, H = x_sorted.shape
    E = expert_offsets.shape[0] - 1
    if E < 1:
        raise ValueError(
            f"{_PREFIX}expert_offsets must have E + 1 >= 2 entries [E + 1], got {_describe(expert_offsets)}"
        )
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x_sorted.dtype:
            raise TypeError(
                f"{_PREFIX}{name} must have x_sorted's dtype {str(x_sorted.dtype).replace('torch.', '')}, "
                f"got {_describe(t)}"
            )
    for name, t in (("expert_offsets", expert_offsets), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.device != x_sorted.device:
            raise ValueError(f"{_PREFIX}{name} must be on x_sorted's device {x_sorted.device}, got {_describe(t)}")
    if w_gate_up.shape[0] != E or w_gate_up.shape[2] != H or (gated and w_gate_up.shape[1] % 2):
        want = "[E, 2I, H] (even dim 1)" if gated else "[E, I, H]"
        raise ValueError(
            f"{_PREFIX}w_gate_up must have shape {want} with E = {E} (from expert_offsets) and "
            f"H = {H} (from x_sorted), got {_describe(w_gate_up)}"
        )
    I = w_gate_up.shape[1] // 2 if gated else w_gate_up.shape[1]
    if tuple(w_down.shape) != (E, H, I):
        raise ValueError(
            f"{_PREFIX}w_down must have shape [E, H, I] = {(E, H, I)} (from expert_offsets, x_sorted "
            f"and w_gate_up), got {_describe(w_down)}"
        )
    return S, H, I, E


def _check_offset_values(expert_offsets: Tensor, S: int) -> None:
    """First 0, last S, non-decreasing (one host sync)."""
    bad = (expert_offsets[0] != 0) | (expert_offsets[-1] != S) | (expert_offsets[1:] < expert_offsets[:-1]).any()
    if bool(bad):
        shown = expert_offsets.tolist() if expert_offsets.numel() <= 17 else "[...]"
        raise ValueError(
            f"{_PREFIX}expert_offsets must be non-decreasing with expert_offsets[0] = 0 and "
            f"expert_offsets[E] = S = {S}, got {shown}"
        )


def _sanitized_offsets(expert_offsets: Tensor, S: int) -> Tensor:
    """Offsets the kernels can trust without a host sync: within [0, S], first 0, last S, non-decreasing."""
    off = expert_offsets.clamp(0, S)
    off[0] = 0
    off[-1] = S
    return torch.cummax(off, dim=0).values.contiguous()


def _row_tiles(offsets: Tensor, S: int, block_m: int) -> Tensor:
    """[3, T] int64 (expert, first row, end row) of each row tile; expert e gets ceil(rows_e / block_m)
    tiles in order. T = ⌊(S + E (block_m − 1)) / block_m⌋ bounds Σ_e ceil(rows_e / block_m) whatever the
    split (no host sync); surplus tiles are empty (first row = end row)."""
    E = offsets.shape[0] - 1
    num_tiles = (S + E * (block_m - 1)) // block_m
    counts = offsets[1:] - offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles_per_expert, 0)  # inclusive
    t = torch.arange(num_tiles, device=offsets.device, dtype=torch.int64)
    expert = torch.searchsorted(cum, t, right=True)
    valid = expert < E
    expert = expert.clamp(max=E - 1)
    local = t - (cum[expert] - tiles_per_expert[expert])
    start = offsets[expert] + local * block_m
    end = offsets[expert + 1]
    start = torch.where(valid, start, end)
    return torch.stack((expert, start, end)).contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _upcast(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter keeps bfloat16 tiles as raw uint16 and tl.dot multiplies those integers,
    so under TRITON_INTERPRET=1 bf16 dot operands are widened to float32 first (same products: a bf16 ×
    bf16 product is exact in float32). Natively the dot runs on the bf16 tiles."""
    return INTERPRETED and dtype == torch.bfloat16


def _grouped_gemm(
    a: Tensor,
    b: Tensor,
    b_strides: Tuple[int, int, int],
    c: Tensor,
    tiles: Tensor,
    N: int,
    K: int,
    epilogue: int = _EPI_NONE,
    h: Tensor = None,
    gate_up: Tensor = None,
    gated: bool = False,
    act: int = 0,
) -> None:
    """C[rows of e] = A[rows of e] @ B[e] with B[e] (k, n) at b_strides = (e, k, n) element strides."""
    num_tiles = tiles.shape[1]
    if num_tiles == 0 or N == 0:
        return
    block_n = _pow2_block(N, _MAX_BLOCK_N)
    block_k = _pow2_block(K, _MAX_BLOCK_K)
    h_arg = h if h is not None else c
    gu_arg = gate_up if gate_up is not None else c
    _grouped_gemm_kernel[(num_tiles, triton.cdiv(N, block_n))](
        a,
        b,
        c,
        h_arg,
        gu_arg,
        tiles,
        num_tiles,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b_strides[0],
        b_strides[1],
        b_strides[2],
        c.stride(0),
        c.stride(1),
        gu_arg.stride(0),
        gu_arg.stride(1),
        EPILOGUE=epilogue,
        GATED=bool(gated),
        ACT=act,
        DOT_PRECISION=_dot_precision(b.dtype),
        UPCAST=_upcast(b.dtype),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )


def _expert_weight_grad(g: Tensor, a: Tensor, offsets: Tensor, dw: Tensor) -> None:
    """dw[e] = Σ_{rows of e} g[r]ᵀ ⊗ a[r]; dw is a contiguous [E, M, N] tensor, fully written."""
    E, M, N = dw.shape
    if dw.numel() == 0:
        return
    block_m = _pow2_block(M, _MAX_BLOCK_N)
    block_n = _pow2_block(N, _MAX_BLOCK_N)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), E)
    _expert_weight_grad_kernel[grid](
        g,
        a,
        dw,
        offsets,
        M,
        N,
        g.stride(0),
        g.stride(1),
        a.stride(0),
        a.stride(1),
        DOT_PRECISION=_dot_precision(g.dtype),
        UPCAST=_upcast(g.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=_BLOCK_R,
        num_warps=_num_warps(block_m, block_n),
    )


def grouped_mlp_forward(
    x_sorted: Tensor,
    expert_offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str = "silu",
    gated: bool = True,
    check_offsets: bool = True,
) -> Tuple[Tensor, Tensor]:
    """(y_sorted [S, H] in x_sorted's dtype, gate_up [S, 2I] (or [S, I]) float32, the pre-activation
    saved for the backward). See the module docstring for the math, layouts and precision.
    check_offsets=False skips the (host-syncing) check of expert_offsets' values."""
    S, H, I, E = _check_inputs(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated)
    if check_offsets:
        _check_offset_values(expert_offsets, S)
    device, dtype = x_sorted.device, x_sorted.dtype
    n1 = 2 * I if gated else I
    if S == 0 or H == 0 or I == 0:
        return (
            torch.zeros((S, H), dtype=dtype, device=device),
            torch.zeros((S, n1), dtype=torch.float32, device=device),
        )
    offsets = _sanitized_offsets(expert_offsets, S)
    tiles = _row_tiles(offsets, S, _BLOCK_M)
    gate_up = torch.empty((S, n1), dtype=torch.float32, device=device)
    h = torch.empty((S, I), dtype=dtype, device=device)
    y = torch.empty((S, H), dtype=dtype, device=device)
    act = _ACT_CODE[activation]
    # gate_up = x @ W_gate_up[e]ᵀ: B[e] (k = h, n = j) = W_gate_up[e, j, h]; epilogue writes h.
    _grouped_gemm(
        x_sorted,
        w_gate_up,
        (w_gate_up.stride(0), w_gate_up.stride(2), w_gate_up.stride(1)),
        gate_up,
        tiles,
        N=I,
        K=H,
        epilogue=_EPI_ACT_FWD,
        h=h,
        gated=gated,
        act=act,
    )
    # y = h @ W_down[e]ᵀ: B[e] (k = i, n = h) = W_down[e, h, i].
    _grouped_gemm(h, w_down, (w_down.stride(0), w_down.stride(2), w_down.stride(1)), y, tiles, N=H, K=I)
    return y, gate_up


def grouped_mlp_backward(
    grad_y: Tensor,
    x_sorted: Tensor,
    expert_offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    gate_up: Tensor,
    activation: str = "silu",
    gated: bool = True,
    check_offsets: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x [S, H] in x_sorted's dtype, grad_w_gate_up like w_gate_up, grad_w_down like w_down).
    gate_up is the forward's float32 pre-activation. Deterministic (no atomics); experts without rows
    get zero weight gradients."""
    S, H, I, E = _check_inputs(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated)
    n1 = 2 * I if gated else I
    _check_tensor("grad_y", grad_y, 2, _DTYPES, "[S, H]")
    _check_tensor("gate_up", gate_up, 2, (torch.float32,), "[S, 2I]" if gated else "[S, I]")
    if grad_y.dtype != x_sorted.dtype:
        raise TypeError(
            f"{_PREFIX}grad_y must have x_sorted's dtype {str(x_sorted.dtype).replace('torch.', '')}, "
            f"got {_describe(grad_y)}"
        )
    if tuple(grad_y.shape) != (S, H) or grad_y.device != x_sorted.device:
        raise ValueError(
            f"{_PREFIX}grad_y must have shape [S, H] = {(S, H)} on {x_sorted.device}, got {_describe(grad_y)}"
        )
    if tuple(gate_up.shape) != (S, n1) or gate_up.device != x_sorted.device:
        raise ValueError(
            f"{_PREFIX}gate_up must have shape {'[S, 2I]' if gated else '[S, I]'} = {(S, n1)} on "
            f"{x_sorted.device}, got {_describe(gate_up)}"
        )
    if check_offsets:
        _check_offset_values(expert_offsets, S)
    device, dtype = x_sorted.device, x_sorted.dtype
    if S == 0 or H == 0 or I == 0:
        return (
            torch.zeros((S, H), dtype=dtype, device=device),
            torch.zeros(w_gate_up.shape, dtype=w_gate_up.dtype, device=device),
            torch.zeros(w_down.shape, dtype=w_down.dtype, device=device),
        )
    # Every element of these is written by the kernels (experts without rows store zeros).
    grad_w_gate_up = torch.empty(w_gate_up.shape, dtype=w_gate_up.dtype, device=device)
    grad_w_down = torch.empty(w_down.shape, dtype=w_down.dtype, device=device)
    offsets = _sanitized_offsets(expert_offsets, S)
    tiles = _row_tiles(offsets, S, _BLOCK_M)
    act = _ACT_CODE[activation]
    grad_gu = torch.empty((S, n1), dtype=dtype, device=device)
    h = torch.empty((S, I), dtype=dtype, device=device)
    grad_x = torch.empty((S, H), dtype=dtype, device=device)
    # grad_h = grad_y @ W_down[e]: B[e] (k = h, n = i) = W_down[e, h, i]; epilogue → grad_gu and h.
    _grouped_gemm(
        grad_y,
        w_down,
        (w_down.stride(0), w_down.stride(1), w_down.stride(2)),
        grad_gu,
        tiles,
        N=I,
        K=H,
        epilogue=_EPI_ACT_BWD,
        h=h,
        gate_up=gate_up,
        gated=gated,
        act=act,
    )
    # grad_x = grad_gu @ W_gate_up[e]: B[e] (k = j, n = h) = W_gate_up[e, j, h].
    _grouped_gemm(
        grad_gu, w_gate_up, (w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2)), grad_x, tiles, N=H, K=n1
    )
    _expert_weight_grad(grad_y, h, offsets, grad_w_down)  # [E, H, I]
    _expert_weight_grad(grad_gu, x_sorted, offsets, grad_w_gate_up)  # [E, N1, H]
    return grad_x, grad_w_gate_up, grad_w_down

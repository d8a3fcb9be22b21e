"""Fused MoE expert computation in Triton (fastcore_ai.ops.moe_experts, backend="triton"), forward only.

    out[t] = Σ_{j kept} w[t, j] · W_down[e] (act(W_gate[e] x[t]) ⊙ W_up[e] x[t]),   e = expert_ids[t, j]

The pipeline the fast implementations converge on (vLLM fused_moe, ScatterMoE), written for this
library's conventions (int64 indices, deterministic combine, capacity drops):

1. `align_block_size` (torch ops on the device, no host sync): slots are numbered i = t·k + j. The kept
   slots are stably sorted by expert (slot order within an expert) and every expert's segment is padded
   up to a multiple of BLOCK_M, so a row block never straddles two experts:
       counts[e]   = #kept slots of e,     padded[e] = ceil(counts[e] / BLOCK_M) · BLOCK_M
       start[e]    = Σ_{e' < e} padded[e']  (exclusive scan)
       sorted_slots[start[e] + r] = the r-th kept slot of e;  padding entries hold the sentinel T·k
       block_expert[b] = the expert owning rows b·BLOCK_M .. (b+1)·BLOCK_M − 1 (E for surplus blocks)
   The buffer has the upper bound P = T·k + E·(BLOCK_M − 1) rows, so its size is known without reading
   the counts on the host (like vLLM's moe_align_block_size); surplus blocks do no work.
2. `_gate_up_kernel`: for one block of rows and a BLOCK_N slice of I, gathers x rows by token index
   (t = slot // k) inside the K-loop (no x_sorted copy), accumulates gate and up in float32 and stores
   h = act(gate) ⊙ up (operand dtype) at the block's padded rows; padding rows store zeros.
3. `_down_kernel`: y = h W_down[e]ᵀ over the same blocks; the epilogue multiplies the routing weight
   w[t, j] (float32) and stores the row at its slot: y_slots [T·k, H] float32, each row written once.
4. `_combine_kernel`: out[t] = Σ_{j = 0..k−1, kept} y_slots[t·k + j] in that fixed order (float32), cast
   to x's dtype. No atomics anywhere: results are bitwise reproducible (DESIGN rule 8).

Precision: float32 accumulation; float32 operands use input_precision="ieee" (no TF32). bf16/fp16: x and
the weights feed tl.dot in their dtype, h is rounded to it before the down GEMM (as PyTorch's bf16 MLP
does), the routing weight and the combine are float32. Interpreter: bf16 tiles are widened to float32
(see moe_grouped_mlp._upcast).

Backward: not here. `ops.moe_experts` routes calls that need gradients through the composition of
registered ops (moe_dispatch -> moe_grouped_mlp -> moe_combine, each with its Triton backward).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .moe_grouped_mlp import _act, _dot_precision, _pow2_block, _upcast

BLOCK_M = 32  # rows per block (every expert segment is padded to a multiple of this)
_MAX_BLOCK_N = 64
_MAX_BLOCK_K = 32
_NUM_WARPS = 4


def align_block_size(
    expert_ids: Tensor, kept: Optional[Tensor], num_experts: int, block_m: int = BLOCK_M
) -> Tuple[Tensor, Tensor]:
    """(sorted_slots [P] int64 with sentinel T·k on padding rows, block_expert [P / block_m] int64 with E
    on surplus blocks); P = T·k + E·(block_m − 1) rounded up to a multiple of block_m. See step 1 above."""
    T, k = expert_ids.shape
    E = num_experts
    numel = T * k
    device = expert_ids.device
    flat = expert_ids.reshape(-1)
    if kept is not None:
        flat = torch.where(kept.reshape(-1), flat, torch.full_like(flat, E))  # dropped slots sort last
    order = torch.sort(flat, stable=True).indices  # kept slots by expert, slot order
    counts = torch.bincount(flat, minlength=E + 1)[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts, 0) - counts  # unpadded start of each expert
    num_rows = (numel + E * (block_m - 1) + block_m - 1) // block_m * block_m
    expert_of_sorted = flat[order]
    is_kept = expert_of_sorted < E
    e_clamped = expert_of_sorted.clamp(max=E - 1)
    rank = torch.arange(numel, device=device, dtype=torch.int64) - first[e_clamped]
    dest = torch.where(is_kept, starts[e_clamped] + rank, torch.full_like(rank, num_rows))  # dropped: off the end
    # torch.nonzero-free scatter: dropped slots go to a scratch row past the end, which is sliced off.
    buffer = torch.full((num_rows + 1,), numel, dtype=torch.int64, device=device)
    buffer.scatter_(0, dest, order)
    sorted_slots = buffer[:num_rows]
    block_starts = torch.arange(0, num_rows, block_m, device=device, dtype=torch.int64)
    block_expert = torch.searchsorted(ends, block_starts, right=True)  # E past the last segment
    return sorted_slots, block_expert


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H], element (t, h) at t * stride_xt + h * stride_xh
    w_ptr,  # [E, N1, H] w_gate_up, element (e, n, h) at e * stride_we + n * stride_wn + h * stride_wh
    h_ptr,  # [P, I] out, contiguous, operand dtype
    slots_ptr,  # [P] int64 sorted_slots (sentinel numel on padding rows)
    block_expert_ptr,  # [P / BLOCK_M] int64
    numel,
    TOP_K,
    I,
    H,
    E,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    GATED: tl.constexpr,
    ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[r, n] = act(Σ_h x[t_r, h] W[e, n, h]) · Σ_h x[t_r, h] W[e, I + n, h] for the BLOCK_M rows r of
    one block (t_r = sorted_slots[r] // k; padding rows give 0)."""
    block = tl.program_id(0).to(tl.int64)
    expert = tl.load(block_expert_ptr + block)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < I
    store_mask = col_ok[None, :] & (rows[:, None] >= 0)
    k_stop = tl.where(expert < E, H, 0)  # surplus block past the last segment: no work, stores zeros
    expert = tl.minimum(expert, E - 1)
    slots = tl.load(slots_ptr + rows)  # surplus and padding rows hold the sentinel numel
    row_ok = slots < numel
    tokens = tl.where(row_ok, slots // TOP_K, 0)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    x_rows = x_ptr + tokens[:, None] * stride_xt  # the gather: row t of x, never copied
    w_gate = w_ptr + expert * stride_we + cols[None, :] * stride_wn
    w_up = w_ptr + expert * stride_we + (cols + I)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < H
        a = tl.load(x_rows + ks[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(w_gate + ks[:, None] * stride_wh, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(w_up + ks[:, None] * stride_wh, mask=b_mask, other=0.0)
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
    if GATED:
        h = _act(acc, ACT) * acc_up
    else:
        h = _act(acc, ACT)
    h = tl.where(row_ok[:, None], h, 0.0)
    tl.store(h_ptr + rows[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _down_kernel(
    h_ptr,  # [P, I] contiguous
    w_ptr,  # [E, H, I] w_down, element (e, h, i) at e * stride_we + h * stride_wh + i * stride_wi
    weights_ptr,  # [T·k] float32 routing weights, contiguous
    y_ptr,  # [T·k, H] float32 out, contiguous: row = slot
    slots_ptr,
    block_expert_ptr,
    numel,
    I,
    H,
    E,
    stride_we,
    stride_wh,
    stride_wi,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """y_slots[s_r, n] = w[s_r] · Σ_i h[r, i] W_down[e, n, i] for the kept rows r of one block (s_r its slot)."""
    block = tl.program_id(0).to(tl.int64)
    expert = tl.load(block_expert_ptr + block)
    k_stop = tl.where(expert < E, I, 0)  # surplus block: every row is padding, nothing is stored
    expert = tl.minimum(expert, E - 1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < H
    slots = tl.load(slots_ptr + rows)
    row_ok = slots < numel
    safe_slots = tl.where(row_ok, slots, 0)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    h_rows = h_ptr + rows[:, None] * I
    w_base = w_ptr + expert * stride_we + cols[None, :] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < I
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + ks[:, None] * stride_wi, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    route = tl.load(weights_ptr + safe_slots, mask=row_ok, other=0.0)  # routing weight in the epilogue
    acc = acc * route[:, None]
    tl.store(y_ptr + safe_slots[:, None] * H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    y_ptr,  # [T·k, H] float32, contiguous
    keep_ptr,  # [T·k] int8 (1 kept)
    out_ptr,  # [T, H] contiguous, x's dtype
    H,
    TOP_K,
    BLOCK_H: tl.constexpr,
):
    """out[t, h] = Σ_{j = 0..k−1, kept} y_slots[t·k + j, h], in that order (float32)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    col_ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(0, TOP_K):
        slot = t * TOP_K + j
        keep = tl.load(keep_ptr + slot) != 0
        row = tl.load(y_ptr + slot * H + cols, mask=col_ok & keep, other=0.0)
        acc += row
    tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def moe_experts_forward(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    kept: Optional[Tensor],
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str = "silu",
    gated: bool = True,
) -> Tensor:
    """out [T, H] in x's dtype. Inputs are validated by ops.moe_experts (ids in range, shapes, dtypes);
    x and the weights may have any strides (nothing is copied)."""
    from .moe_grouped_mlp import _ACT_CODE

    T, H = x.shape
    k = expert_ids.shape[1]
    E, _, I = w_down.shape
    device, dtype = x.device, x.dtype
    out = torch.empty((T, H), dtype=dtype, device=device)
    if T == 0 or H == 0:
        return out
    if I == 0 or k == 0:
        return out.zero_()
    numel = T * k
    sorted_slots, block_expert = align_block_size(expert_ids, kept, E, BLOCK_M)
    num_blocks = block_expert.shape[0]
    h = torch.empty((sorted_slots.shape[0], I), dtype=dtype, device=device)
    precision, upcast = _dot_precision(dtype), _upcast(dtype)
    block_n = _pow2_block(I, _MAX_BLOCK_N)
    _gate_up_kernel[(num_blocks, triton.cdiv(I, block_n))](
        x,
        w_gate_up,
        h,
        sorted_slots,
        block_expert,
        numel,
        k,
        I,
        H,
        E,
        x.stride(0),
        x.stride(1),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        w_gate_up.stride(2),
        GATED=bool(gated),
        ACT=_ACT_CODE[activation],
        DOT_PRECISION=precision,
        UPCAST=upcast,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=_pow2_block(H, _MAX_BLOCK_K),
        num_warps=_NUM_WARPS,
    )
    y_slots = torch.empty((numel, H), dtype=torch.float32, device=device)
    route = weights.to(torch.float32).contiguous().reshape(-1)
    block_h = _pow2_block(H, _MAX_BLOCK_N)
    _down_kernel[(num_blocks, triton.cdiv(H, block_h))](
        h,
        w_down,
        route,
        y_slots,
        sorted_slots,
        block_expert,
        numel,
        I,
        H,
        E,
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        DOT_PRECISION=precision,
        UPCAST=upcast,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_h,
        BLOCK_K=_pow2_block(I, _MAX_BLOCK_K),
        num_warps=_NUM_WARPS,
    )
    keep = (
        torch.ones(numel, dtype=torch.int8, device=device)
        if kept is None
        else kept.reshape(-1).to(torch.int8).contiguous()
    )
    combine_block = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, combine_block))](y_slots, keep, out, H, k, BLOCK_H=combine_block)
    return out

"""Triton kernels for MoE dispatch / combine (fastcore_ai.ops.moe_dispatch / moe_combine, backend="triton").

Same plan and math as fastcore_ai.reference.moe_permute (and csrc/kernels/moe/dispatch.h):
  x_sorted[s, :]  = x[slot_to_token[s], :]
  out[t, :]       = Σ_{j = 0..k−1, token_slot[t, j] ≥ 0} w[t, j] · y[token_slot[t, j], :]   (fixed j order, float32)
  grad_y[s, :]    = (Σ_{j : token_slot[t, j] = s} w[t, j]) · grad_out[t, :],   t = slot_to_token[s]
  grad_w[t, j]    = Σ_h grad_out[t, h] · y[token_slot[t, j], h]                 (0 when dropped)

The plan itself (offsets, slot_to_token, token_slot) is not computed here: the ops layer builds it with
the reference's torch ops (`dispatch_plan`: a stable sort, bincount and cumsum), so it is identical to
every other backend's by construction, and passes slot_to_token to `gather_rows`; the row traffic (the
gather of x rows, combine and its backward) runs in Triton. This module imports nothing from fastcore_ai.

Determinism: each output element is written by one program, sums run over j in order and over the
hidden dimension in fixed BLOCK_H tiles then one tl.sum, with BLOCK_H a function of H only, so results
are bitwise reproducible. A token_slot outside [−1, S) or a slot_to_token outside [0, T) is never
dereferenced: the affected output row is NaN (no host sync to raise).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_BLOCK_H = 1024
_MAX_TILE_ELEMENTS = 4096  # rows × columns of one program's tile (registers on a GPU)


def _block_h(hidden: int) -> int:
    return max(16, min(_MAX_BLOCK_H, triton.next_power_of_2(max(hidden, 1))))


def _block_rows(block_h: int) -> int:
    return max(1, min(64, _MAX_TILE_ELEMENTS // block_h))


@triton.jit
def _gather_rows_kernel(
    in_ptr, src_ptr, out_ptr, rows, in_rows, H, stride_row, stride_col, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr
):
    """out[s, :] = in[src[s], :] for a tile of BLOCK_S rows × BLOCK_H columns."""
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = s < rows
    src = tl.load(src_ptr + s, mask=row_ok, other=-1)
    valid = row_ok & (src >= 0) & (src < in_rows)
    mask = valid[:, None] & (cols < H)[None, :]
    values = tl.load(in_ptr + src[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    tl.store(out_ptr + s[:, None] * H + cols[None, :], values, mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr,
    slot_ptr,
    w_ptr,
    out_ptr,
    T,
    S,
    H,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t, :] (float32) for a tile of BLOCK_T tokens × BLOCK_H columns; j runs 0..K−1 in order."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = t < T
    col_ok = cols < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    bad = t < 0  # all False
    for j in tl.static_range(K):
        slot = tl.load(slot_ptr + t * K + j, mask=row_ok, other=-1)
        valid = (slot >= 0) & (slot < S)
        bad = bad | ((slot != -1) & ~valid)
        y = tl.load(y_ptr + slot[:, None] * H + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0).to(
            tl.float32
        )
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + t * K + j, mask=valid, other=0.0).to(tl.float32)
            term = w[:, None] * y
        else:
            term = y
        acc += tl.where(valid[:, None], term, 0.0)
    acc = tl.where(bad[:, None], float("nan"), acc)
    tl.store(out_ptr + t[:, None] * H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_backward_y_kernel(
    grad_out_ptr,
    slot_ptr,
    slot_to_token_ptr,
    w_ptr,
    grad_y_ptr,
    S,
    T,
    H,
    K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_y[s, :] (float32) for a tile of BLOCK_S rows × BLOCK_H columns."""
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = s < S
    col_ok = cols < H
    t = tl.load(slot_to_token_ptr + s, mask=row_ok, other=0)
    valid = row_ok & (t >= 0) & (t < T)
    scale = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = tl.load(slot_ptr + t * K + j, mask=valid, other=-1)
        w = tl.load(w_ptr + t * K + j, mask=valid, other=0.0).to(tl.float32)
        scale += tl.where(slot == s, w, 0.0)
    g = tl.load(grad_out_ptr + t[:, None] * H + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0).to(
        tl.float32
    )
    result = tl.where(valid[:, None], scale[:, None] * g, float("nan"))
    tl.store(grad_y_ptr + s[:, None] * H + cols[None, :], result, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_backward_w_kernel(
    grad_out_ptr, y_ptr, slot_ptr, grad_w_ptr, T, S, H, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr
):
    """grad_w[t, j] (float32) for a tile of BLOCK_T tokens, every j: fixed BLOCK_H column tiles, then one tl.sum."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tl.arange(0, BLOCK_H)
    row_ok = t < T
    for j in tl.static_range(K):
        slot = tl.load(slot_ptr + t * K + j, mask=row_ok, other=-1)
        valid = (slot >= 0) & (slot < S)
        partial = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + offs
            mask = valid[:, None] & (cols < H)[None, :]
            g = tl.load(grad_out_ptr + t[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + slot[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            partial += g * y
        dot = tl.sum(partial, axis=1)
        result = tl.where(valid, dot, tl.where(slot == -1, 0.0, float("nan")))
        tl.store(grad_w_ptr + t * K + j, result, mask=row_ok)


def gather_rows(x: Tensor, src_row: Tensor) -> Tensor:
    """x[src_row] as a new contiguous [len(src_row), H] tensor in x's dtype (x may have any strides)."""
    rows, H = src_row.shape[0], x.shape[1]
    out = torch.empty((rows, H), dtype=x.dtype, device=x.device)
    if rows == 0 or H == 0:
        return out
    block_h = _block_h(H)
    block_s = _block_rows(block_h)
    _gather_rows_kernel[(triton.cdiv(rows, block_s), triton.cdiv(H, block_h))](
        x, src_row.contiguous(), out, rows, x.shape[0], H, x.stride(0), x.stride(1), BLOCK_S=block_s, BLOCK_H=block_h
    )
    return out


def moe_combine(y_sorted: Tensor, token_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
    """[T, H] in y_sorted's dtype (float32 sums); weights None means all ones (dispatch's backward)."""
    T, k = token_slot.shape
    S, H = y_sorted.shape
    out = torch.empty((T, H), dtype=torch.float32, device=y_sorted.device)
    if T > 0 and H > 0:
        y = y_sorted.contiguous()
        slots = token_slot.contiguous()
        w = weights.contiguous() if weights is not None else slots  # unused pointer when HAS_WEIGHTS=False
        block_h = _block_h(H)
        block_t = _block_rows(block_h)
        _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
            y, slots, w, out, T, S, H, K=k, HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h
        )
    return out.to(y_sorted.dtype)


def moe_combine_backward(
    grad_out: Tensor,
    y_sorted: Tensor,
    slot_to_token: Tensor,
    token_slot: Tensor,
    weights: Tensor,
    need_weights: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """(grad_y [S, H] in y_sorted's dtype, grad_w [T, k] in weights' dtype, or None when not need_weights)."""
    T, k = token_slot.shape
    S, H = y_sorted.shape
    device = y_sorted.device
    grad_y = torch.empty((S, H), dtype=torch.float32, device=device)
    grad_w = torch.empty((T, k), dtype=torch.float32, device=device)
    go = grad_out.contiguous()
    y = y_sorted.contiguous()
    slots = token_slot.contiguous()
    w = weights.contiguous()
    block_h = _block_h(H)
    block_rows = _block_rows(block_h)
    if S > 0 and H > 0:
        _combine_backward_y_kernel[(triton.cdiv(S, block_rows), triton.cdiv(H, block_h))](
            go, slots, slot_to_token.contiguous(), w, grad_y, S, T, H, K=k, BLOCK_S=block_rows, BLOCK_H=block_h
        )
    if not need_weights:
        return grad_y.to(y_sorted.dtype), None
    if T > 0:
        _combine_backward_w_kernel[(triton.cdiv(T, block_rows),)](
            go, y, slots, grad_w, T, S, H, K=k, BLOCK_T=block_rows, BLOCK_H=block_h
        )
    return grad_y.to(y_sorted.dtype), grad_w.to(weights.dtype)

"""Reference MoE dispatch / combine (pure torch). Same plan and math as csrc/kernels/moe/dispatch.h.

Slots (t, j) are numbered i = t·k + j. The plan is a stable sort of the kept slots by expert id:
  expert_offsets [E+1] = exclusive scan of the kept-slot counts per expert (last entry S)
  slot_to_token [S]    = the token of the s-th slot in (expert, slot order) order
  token_slot [T, k]    = the position of slot (t, j) in that order, −1 when dropped
Dispatch: x_sorted = x[slot_to_token]. Combine: out[t] = Σ_j w[t, j] · y[token_slot[t, j]] over the
kept j in order j = 0..k−1 (dropped slots contribute exactly zero), computed in float32 (float64 for
float64 input) and returned in y's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _accumulate_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_expert_ids(expert_ids: Tensor, num_experts: int) -> None:
    """ValueError naming one id outside [0, num_experts) (the message every backend gives)."""
    bad = (expert_ids < 0) | (expert_ids >= num_experts)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        k = expert_ids.shape[1]
        value = int(expert_ids.reshape(-1)[flat])
        raise ValueError(
            f"fastcore_ai.ops.moe_dispatch: expert_ids must lie in [0, num_experts) = [0, {num_experts}), "
            f"got {int(bad.sum())} id(s) outside, e.g. {value} at ({flat // k}, {flat % k})"
        )


def dispatch_plan(expert_ids: Tensor, kept: Optional[Tensor], num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(expert_offsets [E+1], slot_to_token [S], token_slot [T, k]) by a stable sort (no Python loop)."""
    check_expert_ids(expert_ids, num_experts)
    T, k = expert_ids.shape
    device = expert_ids.device
    flat_ids = expert_ids.reshape(-1)
    keep = torch.ones_like(flat_ids, dtype=torch.bool) if kept is None else kept.reshape(-1)
    kept_slots = keep.nonzero().reshape(-1)  # ascending slot order
    kept_ids = flat_ids[kept_slots]
    order = torch.sort(kept_ids, stable=True).indices  # stable: slot order within an expert
    sorted_slots = kept_slots[order]
    counts = torch.bincount(kept_ids, minlength=num_experts)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    expert_offsets[1:] = torch.cumsum(counts, 0)
    slot_to_token = torch.div(sorted_slots, k, rounding_mode="floor")
    token_slot = torch.full((T * k,), -1, dtype=torch.int64, device=device)
    token_slot[sorted_slots] = torch.arange(sorted_slots.numel(), dtype=torch.int64, device=device)
    return expert_offsets, slot_to_token, token_slot.reshape(T, k)


def moe_dispatch(
    x: Tensor, expert_ids: Tensor, kept: Optional[Tensor], num_experts: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_sorted [S, H] in x's dtype, expert_offsets, slot_to_token, token_slot)."""
    expert_offsets, slot_to_token, token_slot = dispatch_plan(expert_ids, kept, num_experts)
    x_sorted = x.index_select(0, slot_to_token).contiguous()
    return x_sorted, expert_offsets, slot_to_token, token_slot


def _check_plan(token_slot: Tensor, slot_to_token: Optional[Tensor], num_rows: int, num_tokens: int) -> None:
    bad = bool(((token_slot < -1) | (token_slot >= num_rows)).any())
    if slot_to_token is not None:
        bad = bad or bool(((slot_to_token < 0) | (slot_to_token >= num_tokens)).any())
    if bad:
        raise ValueError(
            "fastcore_ai.ops.moe_combine: plan is malformed: token_slot must lie in [-1, S) with S = "
            "y_sorted.shape[0], and slot_to_token in [0, T) (use the plan moe_dispatch returned)"
        )


def moe_combine(y_sorted: Tensor, token_slot: Tensor, weights: Optional[Tensor]) -> Tensor:
    """out[t] = Σ_j w[t, j] · y[token_slot[t, j]] in fixed j order (w = 1 when weights is None)."""
    T, k = token_slot.shape
    S, H = y_sorted.shape
    _check_plan(token_slot, None, S, T)
    acc = _accumulate_dtype(y_sorted)
    y = y_sorted.to(acc)
    w = torch.ones(T, k, dtype=acc, device=y.device) if weights is None else weights.to(acc)
    y = torch.cat([y, torch.zeros(1, H, dtype=acc, device=y.device)])  # row S: read by dropped slots, then masked
    out = torch.zeros(T, H, dtype=acc, device=y.device)
    for j in range(k):  # k is small; the fixed order is the point
        slot = token_slot[:, j]
        kept = slot >= 0
        rows = y.index_select(0, torch.where(kept, slot, S))
        out = out + torch.where(kept[:, None], w[:, j : j + 1] * rows, torch.zeros((), dtype=acc, device=y.device))
    return out.to(y_sorted.dtype)


def moe_combine_backward(
    grad_out: Tensor, y_sorted: Tensor, slot_to_token: Tensor, token_slot: Tensor, weights: Tensor, need_weights: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """grad_y [S, H] = w[t, j] · grad_out[t] for s = token_slot[t, j] (y's dtype);
    grad_w [T, k] = <grad_out[t], y[token_slot[t, j]]>, 0 when dropped (weights' dtype)."""
    T, k = token_slot.shape
    S, H = y_sorted.shape
    _check_plan(token_slot, slot_to_token, S, T)
    acc = _accumulate_dtype(y_sorted)
    go = grad_out.to(acc)
    y = y_sorted.to(acc)
    w = weights.to(acc)
    flat = token_slot.reshape(-1)
    kept = flat >= 0
    scale = torch.zeros(S, dtype=acc, device=y.device)
    scale[flat[kept]] = w.reshape(-1)[kept]  # each kept slot has one position
    grad_y = scale[:, None] * go.index_select(0, slot_to_token)
    grad_w = None
    if need_weights:
        y_padded = torch.cat([y, torch.zeros(1, H, dtype=acc, device=y.device)])
        rows = y_padded.index_select(0, torch.where(kept, flat, S)).reshape(T, k, H)
        grad_w = torch.where(
            token_slot >= 0, (rows * go[:, None, :]).sum(-1), torch.zeros((), dtype=acc, device=y.device)
        )
        grad_w = grad_w.to(weights.dtype)
    return grad_y.to(y_sorted.dtype), grad_w

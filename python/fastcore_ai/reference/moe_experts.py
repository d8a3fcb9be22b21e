"""Reference of the whole MoE expert computation (pure torch, the oracle of `ops.moe_experts`).

    out[t] = Σ_{j : kept[t, j]} weights[t, j] · f_{e(t, j)}(x[t]),     e(t, j) = expert_ids[t, j]
    f_e(x) = W_down[e] (act(W_gate[e] x) ⊙ W_up[e] x)     (gated; W_gate_up[e] = [W_gate[e]; W_up[e]])
    f_e(x) = W_down[e] act(W_gate_up[e] x)                (not gated)

Shapes: x [T, H], expert_ids / weights / kept [T, k], w_gate_up [E, 2I, H] (or [E, I, H]), w_down
[E, H, I] (Hugging Face MixtralExperts' layout). Computed per slot in the accumulate dtype (float64
for float64 input, else float32), summed over j = 0..k−1 in order; a dropped slot adds exactly 0.
A loop over experts (readable, not fast).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .moe_grouped_mlp import activation


def moe_experts(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    kept: Optional[Tensor],
    w_gate_up: Tensor,
    w_down: Tensor,
    act: str = "silu",
    gated: bool = True,
) -> Tensor:
    """[T, H] in x's dtype (see the module docstring)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, w1, w2 = x.to(acc), w_gate_up.to(acc), w_down.to(acc)
    T, k = expert_ids.shape
    inner = w_down.shape[2]
    keep = torch.ones_like(expert_ids, dtype=torch.bool) if kept is None else kept
    per_slot = xa.new_zeros((T, k, x.shape[1]))  # f_{e(t, j)}(x[t]), zero where dropped
    for e in range(w_down.shape[0]):
        tokens, slots = torch.nonzero((expert_ids == e) & keep, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate_up = xa[tokens] @ w1[e].t()
        hidden = (activation(act, gate_up[:, :inner]) * gate_up[:, inner:]) if gated else activation(act, gate_up)
        per_slot[tokens, slots] = hidden @ w2[e].t()
    out = xa.new_zeros((T, x.shape[1]))
    for j in range(k):  # fixed order j = 0..k−1
        out += weights[:, j : j + 1].to(acc) * per_slot[:, j]
    return out.to(x.dtype)

"""MoE op: the whole expert computation in one call,

    out[t] = Σ_j weights[t, j] · expert_{expert_ids[t, j]}(x[t])   over the kept assignments,

as moe_dispatch -> moe_grouped_mlp -> moe_combine (each a registered op with its own backends and
autograd). Layers and the Hugging Face integration call this, so a fused implementation (row gather
inside the GEMM, routing weight in the epilogue; issue 4) can replace the composition in one place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .moe_grouped_mlp import moe_grouped_mlp
from .moe_permute import moe_combine, moe_dispatch


def moe_experts(x: Tensor, expert_ids: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                kept: Optional[Tensor] = None, activation: str = "silu", gated: bool = True,
                backend: str = "auto", mlp_backend: Optional[str] = None) -> Tensor:
    """x [T, H], expert_ids [T, k] int64, weights [T, k] (float32 or x's dtype), kept [T, k] bool or None,
    w_gate_up [E, 2I, H] (or [E, I, H]), w_down [E, H, I] (HF MixtralExperts' layout) -> [T, H] in x's dtype.
    Deterministic (fixed-order combine); dropped assignments contribute exactly zero. `mlp_backend`
    overrides `backend` for the grouped MLP (which has no cuda backend yet)."""
    x_sorted, plan = moe_dispatch(x, expert_ids, kept, w_down.shape[0], backend=backend)
    y_sorted = moe_grouped_mlp(x_sorted, plan.expert_offsets, w_gate_up, w_down, activation=activation, gated=gated,
                               backend=mlp_backend or backend)
    if weights.dtype not in (y_sorted.dtype, torch.float32):  # what moe_combine accepts
        weights = weights.float()
    return moe_combine(y_sorted, plan, weights, backend=backend)

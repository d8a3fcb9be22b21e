"""Reference MoE expert MLP over rows grouped by expert (pure torch, a loop over experts: the oracle).

Weights in Hugging Face MixtralExperts' layout: w_gate_up [E, 2I, H] (gate rows first, then up) when
gated, [E, I, H] otherwise; w_down [E, H, I]. For the rows X of expert e (x_sorted[o_e : o_{e+1}]):
  GU = X W_gate_upᵀ;  gated: Hd = act(GU[:, :I]) ⊙ GU[:, I:];  plain: Hd = act(GU);  Y = Hd W_downᵀ.
Backward: dHd = dY W_down;  dW_down = dYᵀ Hd;  gated: dG = dHd ⊙ U ⊙ act'(G), dU = dHd ⊙ act(G);
dX = dGU W_gate_up;  dW_gate_up = dGUᵀ X.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

ACTIVATIONS = ("silu", "gelu", "relu")


def activation(name: str, g: Tensor) -> Tensor:
    if name == "silu":
        return g * torch.sigmoid(g)
    if name == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return torch.clamp_min(g, 0)


def activation_derivative(name: str, g: Tensor) -> Tensor:
    if name == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(g / math.sqrt(2))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    return (g > 0).to(g.dtype)


def _accumulate(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _segments(expert_offsets: Tensor):
    bounds = expert_offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def _hidden(gate_up: Tensor, inner: int, act: str, gated: bool) -> Tensor:
    if gated:
        return activation(act, gate_up[:, :inner]) * gate_up[:, inner:]
    return activation(act, gate_up)


def moe_grouped_mlp(
    x_sorted: Tensor, expert_offsets: Tensor, w_gate_up: Tensor, w_down: Tensor, act: str = "silu", gated: bool = True
) -> Tuple[Tensor, Tensor]:
    """(y_sorted [S, H] in x's dtype, gate_up [S, 2I or I] in the accumulate dtype, kept for backward)."""
    acc = _accumulate(x_sorted)
    x, w1, w2 = x_sorted.to(acc), w_gate_up.to(acc), w_down.to(acc)
    inner = w_down.shape[2]
    gate_up = x.new_zeros((x.shape[0], w_gate_up.shape[1]))
    y = x.new_zeros((x.shape[0], w_down.shape[1]))
    for e, begin, end in _segments(expert_offsets):
        gate_up[begin:end] = x[begin:end] @ w1[e].t()
        y[begin:end] = _hidden(gate_up[begin:end], inner, act, gated) @ w2[e].t()
    return y.to(x_sorted.dtype), gate_up


def moe_grouped_mlp_backward(
    grad_y: Tensor,
    x_sorted: Tensor,
    expert_offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    gate_up: Tensor,
    act: str,
    gated: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    acc = _accumulate(x_sorted)
    x, w1, w2, gy, gu = (t.to(acc) for t in (x_sorted, w_gate_up, w_down, grad_y, gate_up))
    inner = w_down.shape[2]
    grad_x, grad_w1, grad_w2 = torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(w2)
    for e, begin, end in _segments(expert_offsets):
        g = gu[begin:end]
        hidden = _hidden(g, inner, act, gated)
        grad_hidden = gy[begin:end] @ w2[e]
        grad_w2[e] = gy[begin:end].t() @ hidden
        if gated:
            gate, up = g[:, :inner], g[:, inner:]
            grad_gu = torch.cat(
                [grad_hidden * up * activation_derivative(act, gate), grad_hidden * activation(act, gate)], dim=1
            )
        else:
            grad_gu = grad_hidden * activation_derivative(act, g)
        grad_x[begin:end] = grad_gu @ w1[e]
        grad_w1[e] = grad_gu.t() @ x[begin:end]
    return grad_x.to(x_sorted.dtype), grad_w1.to(w_gate_up.dtype), grad_w2.to(w_down.dtype)

"""MoE layers."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops


class TopKRouter(nn.Module):
    """Token-choice top-k router: logits = x W_rᵀ (no bias), run in float32 whatever the autocast or
    parameter dtype (ST-MoE, Switch: the router is where low precision hurts), then the fused
    `ops.moe_topk_route`.

    forward(x [..., hidden_size]) -> RouterOutput over the flattened tokens (T = x.numel() / hidden_size).
    `aux_loss(out)` = aux_loss_coef · L_B + z_loss_coef · L_z with ST-MoE's defaults 1e-2 and 1e-3.
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int = 2, *, renormalize: bool = True,
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.renormalize, self.backend = renormalize, backend
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small init keeps the initial router near uniform (Switch Transformer scales init by 0.1).
        nn.init.normal_(self.weight, std=0.1 / self.hidden_size ** 0.5)

    def forward(self, x: Tensor) -> ops.RouterOutput:
        tokens = x.reshape(-1, self.hidden_size)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = tokens.float() @ self.weight.float().t()
        return ops.moe_topk_route(logits, self.k, renormalize=self.renormalize, backend=self.backend)

    def aux_loss(self, out: ops.RouterOutput) -> Tensor:
        return self.aux_loss_coef * out.load_balancing_loss() + self.z_loss_coef * out.z_loss

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.k}, "
                f"renormalize={self.renormalize}, backend={self.backend!r}")

"""MoE layers: the router, the experts (Hugging Face MixtralExperts' weight layout) and the whole
MoE block, on fastcore_ai.ops (route -> dispatch -> grouped expert MLP -> combine)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


class TopKRouter(nn.Module):
    """Token-choice top-k router: logits = x W_rᵀ (no bias), run in float32 whatever the autocast or
    parameter dtype (ST-MoE, Switch: the router is where low precision hurts), then the fused
    `ops.moe_topk_route` (with capacity when capacity_factor is set).

    forward(x [..., hidden_size]) -> RouterOutput over the flattened tokens (T = x.numel() / hidden_size).
    `aux_loss(out)` = aux_loss_coef · L_B + z_loss_coef · L_z with ST-MoE's defaults 1e-2 and 1e-3.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int = 2,
        *,
        renormalize: bool = True,
        capacity_factor: Optional[float] = None,
        min_capacity: int = 4,
        priority: str = "token",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        jitter: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.hidden_size, self.num_experts, self.k = hidden_size, num_experts, k
        self.renormalize, self.backend = renormalize, backend
        self.capacity_factor, self.min_capacity, self.priority = capacity_factor, min_capacity, priority
        self.aux_loss_coef, self.z_loss_coef, self.jitter = aux_loss_coef, z_loss_coef, jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small init keeps the initial router near uniform (Switch Transformer scales init by 0.1).
        nn.init.normal_(self.weight, std=0.1 / self.hidden_size**0.5)

    def forward(self, x: Tensor, capacity_factor: Optional[float] = None) -> ops.RouterOutput:
        tokens = x.reshape(-1, self.hidden_size)
        with torch.autocast(device_type=x.device.type, enabled=False):
            tokens = tokens.float()
            if self.training and self.jitter > 0:  # multiplicative input jitter U[1 − ε, 1 + ε] (Switch)
                tokens = tokens * torch.empty_like(tokens).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = tokens @ self.weight.float().t()
        factor = self.capacity_factor if capacity_factor is None else capacity_factor
        return ops.moe_topk_route(
            logits,
            self.k,
            renormalize=self.renormalize,
            capacity_factor=factor,
            min_capacity=self.min_capacity,
            priority=self.priority,
            backend=self.backend,
        )

    def aux_loss(self, out: ops.RouterOutput) -> Tensor:
        return self.aux_loss_coef * out.load_balancing_loss() + self.z_loss_coef * out.z_loss

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, k={self.k}, "
            f"renormalize={self.renormalize}, capacity_factor={self.capacity_factor}, backend={self.backend!r}"
        )


class MoEExperts(nn.Module):
    """E expert MLPs with Hugging Face MixtralExperts' parameters: gate_up_proj [E, 2I, H] (gate rows,
    then up rows; [E, I, H] when not gated) and down_proj [E, H, I], so HF weights load unchanged.

    forward(x [T, H], expert_ids [T, k], weights [T, k], kept [T, k] or None) -> [T, H]:
    out[t] = Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) over the kept assignments, computed as
    moe_dispatch -> moe_grouped_mlp -> moe_combine (deterministic, dropped assignments add exactly 0).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "silu",
        gated: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation, self.gated, self.backend = activation, gated, backend
        rows = 2 * intermediate_size if gated else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, rows, hidden_size, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=self.intermediate_size**-0.5)

    def forward(self, x: Tensor, expert_ids: Tensor, weights: Tensor, kept: Optional[Tensor] = None) -> Tensor:
        return ops.moe_experts(
            x,
            expert_ids,
            weights.to(x.dtype),
            self.gate_up_proj,
            self.down_proj,
            kept=kept,
            activation=self.activation,
            gated=self.gated,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, gated={self.gated}"
        )


class MoE(nn.Module):
    """Sparse MoE feed-forward block (ST-MoE defaults): float32 top-k router without bias, capacity
    factors for training (1.25) and evaluation (2.0), experts in HF layout.

    forward(x [..., d_model]) -> same shape. After a forward, `self.aux_loss` holds
    aux_loss_coef · L_B + z_loss_coef · L_z for the training loop to add, and `self.last_router`
    the RouterOutput (weights, ids, kept, counts) for logging.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 2,
        *,
        capacity_factor: Optional[float] = 1.25,
        eval_capacity_factor: Optional[float] = 2.0,
        min_capacity: int = 4,
        z_loss_coef: float = 1e-3,
        aux_loss_coef: float = 1e-2,
        jitter: float = 0.0,
        activation: str = "silu",
        gated: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.d_model = d_model
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        # The router itself is dropless; the block passes the train or eval factor on every call.
        self.router = TopKRouter(
            d_model,
            num_experts,
            k,
            capacity_factor=None,
            min_capacity=min_capacity,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
            jitter=jitter,
            backend=backend,
            device=device,
        )
        self.experts = MoEExperts(
            num_experts, d_model, d_ff, activation=activation, gated=gated, backend=backend, device=device, dtype=dtype
        )
        self.aux_loss: Optional[Tensor] = None
        self.last_router: Optional[ops.RouterOutput] = None

    def forward(self, x: Tensor) -> Tensor:
        tokens, routed = route_tokens(self, x)
        out = self.experts(tokens, routed.expert_ids, routed.weights, routed.kept)
        return out.reshape(x.shape)


def route_tokens(block: nn.Module, x: Tensor):
    """The routing half of an MoE block's forward (shared by MoE and ExpertParallelMoE): the router with
    the training or evaluation capacity factor; records `aux_loss` and `last_router` on the block.
    Returns (tokens [T, d_model], RouterOutput)."""
    factor = block.capacity_factor if block.training else block.eval_capacity_factor
    routed = block.router(x, capacity_factor=factor)
    block.last_router = routed
    block.aux_loss = block.router.aux_loss(routed)
    return x.reshape(-1, block.d_model), routed

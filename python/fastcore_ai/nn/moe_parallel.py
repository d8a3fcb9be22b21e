"""Expert-parallel MoE block on torch.distributed: the E experts are sharded across the ranks of a
process group (rank r owns the contiguous block of expert ids [r·E_local, (r + 1)·E_local)), the
router is replicated, and token rows travel with `torch.distributed.all_to_all_single` using uneven
splits (the per-(rank, expert) counts are exchanged first), as in MegaBlocks / torchtitan.

Forward on each rank, over its own tokens:
  route (replicated router) -> moe_dispatch over all E experts (rows for rank r are one contiguous
  block) -> all_to_all_single of the int64 counts [W, E_local] -> one host read of the split sizes
  -> uneven all_to_all_single of the rows (they arrive rank-major) -> stable permutation to
  expert-major -> moe_grouped_mlp with the local experts -> inverse permutation -> all_to_all_single
  back (transposed splits) -> moe_combine with the original plan and routing weights.

Host syncs: moe_dispatch reads S once (see ops.moe_permute), and the split sizes are read once
(`.tolist()` on a [2, W] tensor) because all_to_all_single takes Python lists.

Gradients: the token exchange is differentiable (backward = the transposed all_to_all_single), so
backward is a collective too: every rank of the group must run it. Expert weight gradients stay local
(each rank owns its experts; exclude them from any data-parallel all-reduce over this group). The
router is replicated, so its gradient is only the local tokens' share: call `sync_router_grads()`
after backward (all-reduce SUM) to get the gradient of the sum of the ranks' losses, i.e. what one
process would compute on the concatenated batch. Capacity (when a capacity factor is set) is computed
per rank on its own tokens, and `aux_loss` is the local tokens' auxiliary loss.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import ops
from .moe import MoE, MoEExperts, TopKRouter, route_tokens


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all_to_all_single over dim 0; backward sends the gradients back with the
    input and output split sizes swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: List[int], input_splits: List[int], group) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_in = grad_out.new_empty((sum(ctx.input_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


class ExpertParallelMoE(nn.Module):
    """`MoE` with its experts sharded across the ranks of `group` (default: the world group, which must
    be initialised). Same arguments and attributes as `MoE` (router, experts, aux_loss, last_router);
    `experts` holds only this rank's E_local = E / world_size experts, global ids
    [expert_start, expert_start + E_local). E must be divisible by the group size.

    `from_moe(moe)` builds one from a single-process `MoE` (router copied, this rank's experts sliced).
    After backward, call `sync_router_grads()` (see the module docstring).
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
        group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallelMoE needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.world_size != 0:
            raise ValueError(
                f"ExpertParallelMoE: num_experts ({num_experts}) must be divisible by the "
                f"expert-parallel group size ({self.world_size})"
            )
        self.d_model, self.num_experts, self.backend = d_model, num_experts, backend
        self.num_local_experts = num_experts // self.world_size
        self.expert_start = self.rank * self.num_local_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
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
            self.num_local_experts,
            d_model,
            d_ff,
            activation=activation,
            gated=gated,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.aux_loss: Optional[Tensor] = None
        self.last_router: Optional[ops.RouterOutput] = None

    @classmethod
    def from_moe(cls, moe: MoE, group=None) -> "ExpertParallelMoE":
        """This rank's shard of a single-process `MoE`: same configuration, router weight copied, experts
        [expert_start, expert_start + E_local) copied from moe.experts."""
        r, e = moe.router, moe.experts
        layer = cls(
            moe.d_model,
            e.intermediate_size,
            r.num_experts,
            r.k,
            capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor,
            min_capacity=r.min_capacity,
            z_loss_coef=r.z_loss_coef,
            aux_loss_coef=r.aux_loss_coef,
            jitter=r.jitter,
            activation=e.activation,
            gated=e.gated,
            backend=r.backend,
            group=group,
            device=e.gate_up_proj.device,
            dtype=e.gate_up_proj.dtype,
        )
        local = slice(layer.expert_start, layer.expert_start + layer.num_local_experts)
        with torch.no_grad():
            layer.router.weight.copy_(r.weight)
            layer.experts.gate_up_proj.copy_(e.gate_up_proj[local])
            layer.experts.down_proj.copy_(e.down_proj[local])
        return layer.train(moe.training)

    def sync_router_grads(self) -> None:
        """All-reduce (SUM) the router weight gradient over the group: afterwards every rank holds the
        gradient of the sum of all ranks' losses. Call on every rank after backward."""
        grad = self.router.weight.grad
        if grad is None:
            grad = self.router.weight.grad = torch.zeros_like(self.router.weight)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)

    def forward(self, x: Tensor) -> Tensor:
        tokens, routed = route_tokens(self, x)
        out = self._experts_parallel(tokens, routed.expert_ids, routed.weights, routed.kept)
        return out.reshape(x.shape)

    def _experts_parallel(self, tokens: Tensor, expert_ids: Tensor, weights: Tensor, kept: Optional[Tensor]) -> Tensor:
        W, E_local, experts = self.world_size, self.num_local_experts, self.experts
        # Rows grouped by global expert id: rank r's rows are the contiguous block at expert_offsets[r·E_local].
        x_sorted, plan = ops.moe_dispatch(tokens, expert_ids, kept, self.num_experts, backend=experts.backend)
        send_counts = plan.tokens_per_expert()  # [W·E_local], destination-rank major
        recv_counts = torch.empty_like(send_counts)  # [W·E_local], source-rank major
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The one host read: both split lists in a single transfer.
        splits = torch.stack([send_counts.view(W, E_local).sum(1), recv_counts.view(W, E_local).sum(1)]).tolist()
        send_splits, recv_splits = splits
        x_recv = _AllToAll.apply(x_sorted, recv_splits, send_splits, self.group)
        # Received rows are (source rank, local expert, slot order); a stable sort by local expert id makes
        # them expert-major with the source ranks in order, i.e. the single-process row order.
        local_ids = torch.arange(E_local, device=recv_counts.device).repeat(W)
        row_expert = local_ids.repeat_interleave(recv_counts, output_size=sum(recv_splits))
        order = torch.sort(row_expert, stable=True).indices
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        per_expert = recv_counts.view(W, E_local).sum(0)
        local_offsets = torch.cat([per_expert.new_zeros(1), per_expert.cumsum(0)])
        y_local = ops.moe_grouped_mlp(
            x_recv.index_select(0, order),
            local_offsets,
            experts.gate_up_proj,
            experts.down_proj,
            activation=experts.activation,
            gated=experts.gated,
            backend=experts.backend,
        )
        y_sorted = _AllToAll.apply(y_local.index_select(0, inverse), send_splits, recv_splits, self.group)
        return ops.moe_combine(y_sorted, plan, weights.to(y_sorted.dtype), backend=experts.backend)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, world_size={self.world_size}, rank={self.rank}, "
            f"local_experts=[{self.expert_start}, {self.expert_start + self.num_local_experts}), "
            f"capacity_factor={self.capacity_factor}"
        )

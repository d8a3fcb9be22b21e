"""Reference MoE router (pure torch). See csrc/kernels/moe/topk_route.h for the same math.

Shapes: logits [T, E]; weights, expert_ids [T, k]; z_loss []; tokens_per_expert, mean_prob [E];
lse [T]. Float outputs are float32 (float64 when logits are float64): the router computes in float32
whatever the input dtype, and the oracle is this function called on `logits.double()`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor


def _accumulate_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def row_log_sum_exp(x: Tensor) -> Tensor:
    """lse_t = m_t + log Σ_e exp(x_te − m_t), m_t = max_e x_te. NaN for a row holding a NaN or only −inf
    (there is no distribution to route with); torch.logsumexp would give −inf for the latter."""
    finite_max = torch.where(torch.isnan(x), torch.full_like(x, -torch.inf), x).amax(dim=1, keepdim=True)
    return (finite_max + torch.log(torch.exp(x - finite_max).sum(dim=1, keepdim=True))).squeeze(1)


def select_top_k(x: Tensor, k: int) -> Tensor:
    """Indices of the k largest logits per row, best first; NaN counts as −inf; equal values keep the
    lower index first (a stable sort preserves index order among equal keys)."""
    key = torch.where(torch.isnan(x), torch.full_like(x, -torch.inf), x)
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k].contiguous()


def moe_topk_route(
    logits: Tensor, k: int, renormalize: bool = True
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Softmax over experts, top-k, optional renormalisation, and router statistics.

    p_te = exp(x_te − lse_t);  weight_tj = p_{t,s_j} (/ Σ_i p_{t,s_i} if renormalize);
    z_loss = mean_t lse_t² (0 when T = 0);  tokens_per_expert_e = #{(t, j): s_tj = e};
    mean_prob_e = mean_t p_te (0 when T = 0).
    Returns (weights, expert_ids, z_loss, tokens_per_expert, mean_prob, lse).
    """
    acc = _accumulate_dtype(logits)
    x = logits.to(acc)
    T, E = x.shape
    lse = row_log_sum_exp(x)
    probs = torch.exp(x - lse[:, None])
    expert_ids = select_top_k(x, k)
    weights = probs.gather(1, expert_ids)
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    if T == 0:
        z_loss = torch.zeros((), dtype=acc, device=x.device)
        mean_prob = torch.zeros(E, dtype=acc, device=x.device)
    else:
        z_loss = (lse * lse).mean()
        mean_prob = probs.mean(dim=0)
    tokens_per_expert = torch.bincount(expert_ids.reshape(-1), minlength=E)
    return weights, expert_ids, z_loss, tokens_per_expert, mean_prob, lse


def moe_topk_route_backward(
    logits: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    lse: Tensor,
    grad_weights: Tensor,
    grad_z_loss: Tensor,
    grad_mean_prob: Tensor,
    renormalize: bool,
) -> Tensor:
    """d(loss)/d(logits) in the accumulate dtype, by the closed form (checked by gradcheck and against
    torch autograd in tests/test_moe_topk_route.py):

      g_e = gP_e / T (+ gw_j at e = s_j when not renormalising),   c = 2 gz lse / T
      dx_e = p_e (g_e − Σ_e' p_e' g_e') + c p_e (+ w_j (gw_j − Σ_i w_i gw_i) at e = s_j when renormalising)
    """
    acc = _accumulate_dtype(logits)
    x = logits.to(acc)
    T, E = x.shape
    if T == 0:
        return torch.zeros_like(x)
    lse = lse.to(acc)
    grad_weights = grad_weights.to(acc).expand(T, expert_ids.shape[1])
    probs = torch.exp(x - lse[:, None])
    dense = (grad_mean_prob.to(acc) / T).expand(T, E).clone()
    if not renormalize:
        dense.scatter_add_(1, expert_ids, grad_weights)
    dot = (probs * dense).sum(dim=1, keepdim=True)
    c = 2 * grad_z_loss.to(acc) * lse / T
    grad = probs * (dense - dot) + c[:, None] * probs
    if renormalize:
        w = weights.to(acc)
        grad.scatter_add_(1, expert_ids, w * (grad_weights - (w * grad_weights).sum(dim=1, keepdim=True)))
    return grad


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert: C = max(min_capacity, ceil(capacity_factor · T · k / E)).

    The factor multiplies T·k, the number of (token, slot) assignments, as DeepSpeed, Tutel and
    MegaBlocks do (flaxformer's ST-MoE code uses T / E, i.e. capacity_factor · k here)."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * k / num_experts))


def capacity_mask(
    expert_ids: Tensor, top1_weight: Tensor, num_experts: int, capacity: int, priority: str = "token"
) -> Tensor:
    """kept [T, k] bool: which (token, slot) assignments fit in their expert's `capacity` slots.

    Slots are filled in priority order: every token's first choice before any second choice (choice
    level j = 0, 1, ..., k−1), and within a level by token order (priority="token") or by descending
    top-1 routing weight, ties by token order (priority="batch", batch-prioritised routing). A slot is
    kept when fewer than `capacity` earlier slots in that order chose the same expert. Computed as a
    stable sort by expert of the slots in priority order (static shapes, any device, deterministic).
    """
    T, k = expert_ids.shape
    if priority == "batch":
        token_order = torch.sort(-top1_weight, stable=True).indices
    else:
        token_order = torch.arange(T, device=expert_ids.device)
    in_priority_order = expert_ids[token_order].t().reshape(-1)  # [k·T], level-major
    grouped = torch.sort(in_priority_order, stable=True).indices  # slots grouped by expert
    counts = torch.bincount(in_priority_order, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_grouped = torch.arange(k * T, device=expert_ids.device) - starts[in_priority_order[grouped]]
    rank = torch.empty_like(rank_grouped)
    rank[grouped] = rank_grouped  # rank within its expert
    kept_in_order = (rank < capacity).reshape(k, T).t()  # [T', k] in token_order rows
    kept = torch.empty_like(kept_in_order)
    kept[token_order] = kept_in_order
    return kept

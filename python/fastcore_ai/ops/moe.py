"""MoE ops: the fused top-k router.

Layering (DESIGN): validate -> choose backend -> registered torch op `fastcore_ai::moe_topk_route`
(fake impl, autograd, opcheck, torch.compile) -> backend implementation (`_C`, Triton launcher or
the pure-torch reference).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from .._validation import _describe, check_bool, check_choice, check_int, check_positive_float, check_size, check_tensor
from ..reference import moe as reference_moe
from ._define import call_naming_allocation_errors, define_op, native, native_impls

MAX_EXPERTS = 1024
MAX_TOP_K = 16
_OP = "moe_topk_route"
_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_COUNT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8) + _LOGITS_DTYPES
# The native router that also returns the dropless `kept` mask (all True): the direct cpu path of the
# public function, where a separate torch.ones_like would cost as much as routing a small batch.
_route_with_kept = native("moe_topk_route_with_kept")


class RouterOutput(NamedTuple):
    """Result of `moe_topk_route`.

    weights [T, k] float32: routing weight of each chosen expert (float64 for float64 logits).
    expert_ids [T, k] int64: chosen experts, best first, always in [0, E).
    z_loss [] float32: ST-MoE router z-loss mean_t (logsumexp_e logits[t, e])² (0 when T = 0).
    tokens_per_expert [E] int64: number of (token, slot) assignments per expert.
    mean_prob [E] float32: mean softmax probability per expert (differentiable; 0 when T = 0).
    kept [T, k] bool: the assignments that fit their expert's capacity (all True when dropless);
      the weights of dropped assignments are exactly 0, so they contribute nothing.
    """

    weights: Tensor
    expert_ids: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    mean_prob: Tensor
    kept: Tensor

    def load_balancing_loss(self) -> Tensor:
        """Switch load-balancing loss E · Σ_e f_e · P_e (see `switch_load_balancing_loss`)."""
        return switch_load_balancing_loss(self.tokens_per_expert, self.mean_prob)


def switch_load_balancing_loss(tokens_per_expert: Tensor, mean_prob: Tensor) -> Tensor:
    """Switch Transformer auxiliary loss L_B = E · Σ_e f_e · P_e.

    f_e = tokens_per_expert_e / Σ tokens_per_expert is the fraction of (token, slot) assignments sent
    to expert e (all k slots count, as in MegaBlocks), P_e = mean_prob_e. A perfectly balanced router
    gives L_B = 1 for every k. Gradients flow through P_e (f_e is a count). Scale it by the usual
    coefficient c_B = 1e-2 (Switch, ST-MoE) yourself.

    Args: tokens_per_expert [E] integer (or float) counts, mean_prob [E] float, E >= 1, same device.
    """
    op = "switch_load_balancing_loss"
    check_tensor(op, "mean_prob", mean_prob, ndim=1, dtypes=_LOGITS_DTYPES, layout="[E]")
    check_tensor(op, "tokens_per_expert", tokens_per_expert, ndim=1, dtypes=_COUNT_DTYPES, layout="[E]")
    if tokens_per_expert.shape != mean_prob.shape or tokens_per_expert.device != mean_prob.device:
        raise ValueError(
            f"fastcore_ai.ops.{op}: tokens_per_expert must have mean_prob's shape {tuple(mean_prob.shape)} and "
            f"device {mean_prob.device}, got {_describe(tokens_per_expert)}"
        )
    check_size(op, "E (mean_prob.shape[0])", mean_prob.shape[0], 1, 2**62, mean_prob)
    counts = tokens_per_expert.to(mean_prob.dtype)
    fraction = counts / counts.sum().clamp_min(1)
    return mean_prob.shape[0] * (fraction * mean_prob).sum()


# ---- the registered torch ops: forward (logits, k, renormalize) -> 6 tensors, and its backward -------

backends.register_op(backends.standard_table(_OP))


@define_op(
    "moe_topk_route_backward",
    impls=native_impls(
        "moe_topk_route_backward",
        triton_launcher=("moe", "moe_topk_route_backward"),
        reference=reference.moe_topk_route_backward,
    ),
)
def _route_backward_op(
    logits: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    lse: Tensor,
    grad_weights: Tensor,
    grad_z_loss: Tensor,
    grad_mean_prob: Tensor,
    renormalize: bool,
) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, k, renormalize, backend = inputs
    weights, expert_ids, _, _, _, lse = output
    ctx.save_for_backward(logits, expert_ids, weights, lse)
    ctx.mark_non_differentiable(lse)  # internal: saved for the backward, hidden by the public API
    ctx.renormalize = renormalize
    ctx.backend = backend


def _backward(ctx, grad_weights, grad_ids, grad_z_loss, grad_counts, grad_mean_prob, grad_lse):
    logits, expert_ids, weights, lse = ctx.saved_tensors
    grad = _route_backward_op(
        logits,
        expert_ids,
        weights,
        lse,
        grad_weights,
        grad_z_loss,
        grad_mean_prob,
        ctx.renormalize,
        backend=ctx.backend,
    )
    return grad.to(logits.dtype), None, None, None


@define_op(
    "moe_topk_route",
    impls=native_impls("moe_topk_route", triton_launcher=("moe", "moe_topk_route"), reference=reference.moe_topk_route),
    autograd=(_setup_context, _backward),
)
def _route_op(logits: Tensor, k: int, renormalize: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, E = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    floats = dict(dtype=acc, device=logits.device)
    longs = dict(dtype=torch.int64, device=logits.device)
    return (
        logits.new_empty((T, k), **floats),
        logits.new_empty((T, k), **longs),
        logits.new_empty((), **floats),
        logits.new_empty((E,), **longs),
        logits.new_empty((E,), **floats),
        logits.new_empty((T,), **floats),
    )


# ---- public API -------------------------------------------------------------------------------


def moe_topk_route(
    logits: Tensor,
    k: int,
    *,
    renormalize: bool = True,
    capacity_factor: Optional[float] = None,
    min_capacity: int = 4,
    priority: str = "token",
    backend: str = "auto",
) -> RouterOutput:
    """Fused MoE router: softmax over experts, top-k, optional renormalisation and router statistics,
    in one pass per row with float32 math whatever the input dtype.

    Args:
      logits: [T, E] float32, bfloat16 or float16 router logits (float64 on the cpu/reference
        backends, for gradcheck), any strides. 1 <= E <= 1024.
      k: experts per token, 1 <= k <= min(E, 16).
      renormalize: divide the k chosen probabilities by their sum (Mixtral, GShard) instead of
        returning the raw softmax probabilities (Switch, ST-MoE reference code).
      capacity_factor: None for dropless routing; otherwise every expert takes at most
        C = max(min_capacity, ceil(capacity_factor · T · k / E)) assignments. The factor multiplies
        T·k as in DeepSpeed, Tutel and MegaBlocks, so 1.0 is exactly the balanced load; flaxformer's
        ST-MoE code uses C = CF·T/E, so its CF equals capacity_factor·k here.
      min_capacity: the floor of C (ST-MoE: 4).
      priority: "token": all first choices before any second choice, each level in token order;
        "batch": within a level, by descending top-1 router probability (batch-prioritised routing;
        it looks at the whole batch, so use it in encoders only).
      backend: "auto" | "cpu" | "cuda" | "triton" | "reference" (see fastcore_ai.backends).

    Selection is by logit with ties broken toward the lower expert index, identically in every
    backend. A row containing NaN gives NaN weights and z-loss, yet ids in [0, E). A row of only −inf
    has no distribution: its weights are NaN. Gradients flow from `weights`, `z_loss` and `mean_prob`
    to `logits`.
    """
    # The checks run on every call: the common case is tested in one expression, and the helpers
    # (which build the messages) only run when something is wrong.
    if not (isinstance(logits, torch.Tensor) and logits.dtype in _LOGITS_DTYPES and logits.dim() == 2):
        check_tensor(_OP, "logits", logits, ndim=2, dtypes=_LOGITS_DTYPES, layout="[T, E]")
    num_experts = logits.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        check_size(_OP, "E (logits.shape[1])", num_experts, 1, MAX_EXPERTS, logits)
    if type(k) is not int or not 1 <= k <= min(num_experts, MAX_TOP_K):
        check_int(_OP, "k", k, 1, min(num_experts, MAX_TOP_K), f"at most min(E, {MAX_TOP_K}) with E={num_experts}")
    if renormalize is not True and renormalize is not False:
        check_bool(_OP, "renormalize", renormalize)
    if capacity_factor is not None:
        check_positive_float(_OP, "capacity_factor", capacity_factor)
        check_int(_OP, "min_capacity", min_capacity, 0, 2**62)
    if priority != "token" and priority != "batch":
        check_choice(_OP, "priority", priority, ("token", "batch"))
    chosen = backends.select(_OP, backend, logits.device, logits.dtype, "logits")
    if capacity_factor is None and chosen == "cpu" and _route_op.direct_call_allowed((logits, k, renormalize)):
        # What _route_op would run (its direct path), with the all-True mask made by the same call.
        weights, expert_ids, z_loss, tokens_per_expert, mean_prob, _, kept = call_naming_allocation_errors(
            "moe_topk_route", "cpu", _route_with_kept, logits, k, renormalize
        )
        return RouterOutput(weights, expert_ids, z_loss, tokens_per_expert, mean_prob, kept)
    weights, expert_ids, z_loss, tokens_per_expert, mean_prob, lse = _route_op(logits, k, renormalize, backend=chosen)
    if capacity_factor is None:
        kept = torch.ones_like(expert_ids, dtype=torch.bool)
    else:
        # Capacity is a stable sort by expert of the assignments in priority order, in torch ops on
        # every backend (static shapes, deterministic); see reference.moe.capacity_mask.
        capacity = reference_moe.expert_capacity(logits.shape[0], k, num_experts, capacity_factor, min_capacity)
        top1_probability = torch.exp(logits.detach().gather(1, expert_ids[:, :1]).squeeze(1).to(lse.dtype) - lse)
        kept = reference_moe.capacity_mask(expert_ids, top1_probability, num_experts, capacity, priority)
        weights = weights * kept  # dropped assignments weigh exactly 0 (and get no gradient)
    return RouterOutput(weights, expert_ids, z_loss, tokens_per_expert, mean_prob, kept)

"""MoE ops: token dispatch (group the kept (token, slot) pairs by expert) and combine (weighted sum of
the expert outputs back per token, in a fixed order).

Layering (DESIGN): validate -> choose backend -> registered torch ops `fastcore_ai::moe_dispatch`,
`fastcore_ai::moe_combine` (+ their backward ops; fake impls, autograd, opcheck, torch.compile) ->
backend implementation (`_C`, Triton launcher or the pure-torch reference).

Plan (identical, element for element, on every backend): slots (t, j) are numbered i = t·k + j; the
kept ones are stably sorted by expert id, so within an expert they keep slot order.
  expert_offsets [E + 1] int64: expert e's rows of x_sorted are expert_offsets[e] : expert_offsets[e + 1]
  slot_to_token  [S] int64:     token of each row of x_sorted
  token_slot     [T, k] int64:  row of x_sorted holding slot (t, j), −1 when the slot is dropped

Host syncs: S is data-dependent, so moe_dispatch reads it on the host once (the cuda backend copies
(S, number of out-of-range ids) in one 16-byte transfer; the triton backend's plan is torch ops, whose
bincount/nonzero sync too). moe_combine never syncs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._validation import _describe, check_int, check_size, check_tensor
from ..reference.moe_permute import moe_combine as _reference_combine
from ..reference.moe_permute import moe_combine_backward as _reference_combine_backward
from ..reference.moe_permute import dispatch_plan as _reference_plan
from ..reference.moe_permute import moe_dispatch as _reference_dispatch
from ._define import define_op, native_impls, triton

MAX_DISPATCH_EXPERTS = 4096
_DISPATCH = "moe_dispatch"
_COMBINE = "moe_combine"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class DispatchPlan(NamedTuple):
    """Where every kept (token, slot) pair went; returned by `moe_dispatch`, consumed by `moe_combine`.

    expert_offsets [E + 1] int64: exclusive scan of the kept slots per expert (last entry S).
    slot_to_token [S] int64: the token each row of x_sorted came from.
    token_slot [T, k] int64: the row of x_sorted that holds slot (t, j), or −1 when it was dropped.
    """

    expert_offsets: Tensor
    slot_to_token: Tensor
    token_slot: Tensor

    def tokens_per_expert(self) -> Tensor:
        """Kept slots per expert, [E] int64."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]


# ---- backend implementations (adapting the native and Triton entry points to the op schemas) ------

_triton_gather_rows = triton("moe_permute", "gather_rows")


def _dispatch_triton(x, expert_ids, kept, num_experts):
    # the plan by torch ops (the reference's, so identical on every backend), the row gather in Triton
    expert_offsets, slot_to_token, token_slot = _reference_plan(expert_ids, kept, num_experts)
    return _triton_gather_rows(x, slot_to_token), expert_offsets, slot_to_token, token_slot


_COMBINE_IMPLS = native_impls(
    "moe_combine", triton_launcher=("moe_permute", "moe_combine"), reference=_reference_combine
)


def _unit_weights(combine: Callable) -> Callable:
    """dispatch's backward: grad_x[t] = Σ_j grad_x_sorted[token_slot[t, j]] in fixed j order, i.e. combine
    with unit weights (None)."""
    return lambda grad_x_sorted, token_slot: combine(grad_x_sorted, token_slot, None)


def _combine_impl(combine: Callable) -> Callable:
    """slot_to_token is in moe_combine's schema (its backward needs it); the forward reads only token_slot."""
    return lambda y_sorted, slot_to_token, token_slot, weights: combine(y_sorted, token_slot, weights)


def _combine_backward_impl(function: Callable) -> Callable:
    """The op returns an empty [0] grad_weights when not need_weights (entry points return None)."""

    def call(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights):
        grad_y, grad_w = function(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights)
        return grad_y, (grad_w if need_weights else weights.new_empty((0,)))

    return call


backends.register_op(backends.standard_table(_DISPATCH))
backends.register_op(backends.standard_table(_COMBINE))


# ---- the registered torch ops -------------------------------------------------------------------


@define_op("moe_dispatch_backward", impls={name: _unit_weights(f) for name, f in _COMBINE_IMPLS.items()})
def _dispatch_backward_op(grad_x_sorted: Tensor, token_slot: Tensor) -> Tensor:
    return grad_x_sorted.new_empty((token_slot.shape[0], grad_x_sorted.shape[1]))


def _dispatch_setup_context(ctx, inputs, output):
    _, _, _, _, backend = inputs
    _, expert_offsets, slot_to_token, token_slot = output
    ctx.save_for_backward(token_slot)
    ctx.mark_non_differentiable(expert_offsets, slot_to_token, token_slot)
    ctx.backend = backend


def _dispatch_backward(ctx, grad_x_sorted, grad_offsets, grad_slot_to_token, grad_token_slot):
    (token_slot,) = ctx.saved_tensors
    return _dispatch_backward_op(grad_x_sorted, token_slot, backend=ctx.backend), None, None, None, None


_DISPATCH_IMPLS = native_impls("moe_dispatch", reference=_reference_dispatch)
_DISPATCH_IMPLS["triton"] = _dispatch_triton


@define_op("moe_dispatch", impls=_DISPATCH_IMPLS, autograd=(_dispatch_setup_context, _dispatch_backward))
def _dispatch_op(
    x: Tensor, expert_ids: Tensor, kept: Optional[Tensor], num_experts: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    num_rows = torch.library.get_ctx().new_dynamic_size()  # S = number of kept slots: data-dependent
    T, k = expert_ids.shape
    return (
        x.new_empty((num_rows, x.shape[1])),
        expert_ids.new_empty((num_experts + 1,)),
        expert_ids.new_empty((num_rows,)),
        expert_ids.new_empty((T, k)),
    )


@define_op(
    "moe_combine_backward",
    impls={
        name: _combine_backward_impl(function)
        for name, function in native_impls(
            "moe_combine_backward",
            triton_launcher=("moe_permute", "moe_combine_backward"),
            reference=_reference_combine_backward,
        ).items()
    },
)
def _combine_backward_op(
    grad_out: Tensor, y_sorted: Tensor, slot_to_token: Tensor, token_slot: Tensor, weights: Tensor, need_weights: bool
) -> Tuple[Tensor, Tensor]:
    """(grad_y [S, H], grad_weights [T, k]); grad_weights is an empty [0] tensor when not need_weights."""
    grad_w = (
        torch.empty_like(weights, memory_format=torch.contiguous_format) if need_weights else weights.new_empty((0,))
    )
    return torch.empty_like(y_sorted, memory_format=torch.contiguous_format), grad_w


def _combine_setup_context(ctx, inputs, output):
    y_sorted, slot_to_token, token_slot, weights, backend = inputs
    ctx.save_for_backward(y_sorted, slot_to_token, token_slot, weights)
    ctx.backend = backend


def _combine_backward(ctx, grad_out):
    y_sorted, slot_to_token, token_slot, weights = ctx.saved_tensors
    need_weights = ctx.needs_input_grad[3]
    grad_y, grad_w = _combine_backward_op(
        grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights, backend=ctx.backend
    )
    return grad_y, None, None, (grad_w if need_weights else None), None


@define_op(
    "moe_combine",
    impls={name: _combine_impl(f) for name, f in _COMBINE_IMPLS.items()},
    autograd=(_combine_setup_context, _combine_backward),
)
def _combine_op(y_sorted: Tensor, slot_to_token: Tensor, token_slot: Tensor, weights: Tensor) -> Tensor:
    return y_sorted.new_empty((token_slot.shape[0], y_sorted.shape[1]))


# ---- public API ---------------------------------------------------------------------------------


def _check_same_device(op: str, name: str, value: Tensor, reference_name: str, reference: Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(
            f"fastcore_ai.ops.{op}: {name} must be on {reference_name}'s device {reference.device}, "
            f"got {_describe(value)}"
        )


def moe_dispatch(
    x: Tensor,
    expert_ids: Tensor,
    kept: Optional[Tensor] = None,
    num_experts: Optional[int] = None,
    *,
    backend: str = "auto",
) -> Tuple[Tensor, DispatchPlan]:
    """Group the kept (token, slot) pairs by expert and gather their rows of x.

    Args:
      x: [T, H] float32, bfloat16 or float16 (float64 on the cpu/reference backends), any strides.
      expert_ids: [T, k] int64, every id in [0, num_experts) (checked: an id outside raises ValueError,
        dropped slots included), e.g. `moe_topk_route(...).expert_ids`.
      kept: optional [T, k] bool; False drops the slot (capacity). None keeps every slot.
      num_experts: E, 1 <= E <= 4096.
      backend: "auto" | "cpu" | "cuda" | "triton" | "reference" (see fastcore_ai.backends).

    Returns (x_sorted, plan): x_sorted [S, H] contiguous in x's dtype, S = number of kept slots, rows
    grouped by expert and in slot order (t, then j) within an expert; `plan` is a DispatchPlan. The
    plan is identical on every backend. Differentiable w.r.t. x: grad_x[t] = Σ_j grad_x_sorted[token_slot[t, j]],
    summed in fixed j order. Reads S on the host once (see the module docstring).
    """
    check_tensor(_DISPATCH, "x", x, ndim=2, dtypes=_FLOATS, layout="[T, H]")
    check_tensor(_DISPATCH, "expert_ids", expert_ids, ndim=2, dtypes=(torch.int64,), layout="[T, k]")
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"fastcore_ai.ops.{_DISPATCH}: expert_ids must have T = x.shape[0] = {x.shape[0]} rows, "
            f"got {_describe(expert_ids)}"
        )
    check_size(_DISPATCH, "k (expert_ids.shape[1])", expert_ids.shape[1], 1, 2**31 - 1, expert_ids)
    if x.shape[0] * expert_ids.shape[1] >= 2**31:
        raise ValueError(
            f"fastcore_ai.ops.{_DISPATCH}: expert_ids must have T*k < 2^31 slots, got {_describe(expert_ids)}"
        )
    _check_same_device(_DISPATCH, "expert_ids", expert_ids, "x", x)
    if kept is not None:
        check_tensor(_DISPATCH, "kept", kept, ndim=2, dtypes=(torch.bool,), layout="[T, k]")
        if kept.shape != expert_ids.shape:
            raise ValueError(
                f"fastcore_ai.ops.{_DISPATCH}: kept must have expert_ids' shape {tuple(expert_ids.shape)}, "
                f"got {_describe(kept)}"
            )
        _check_same_device(_DISPATCH, "kept", kept, "x", x)
    if num_experts is None:
        raise TypeError(f"fastcore_ai.ops.{_DISPATCH}: num_experts must be an int, got None (it is required)")
    check_int(_DISPATCH, "num_experts", num_experts, 1, MAX_DISPATCH_EXPERTS)
    chosen = backends.select(_DISPATCH, backend, x.device, x.dtype, "x", num_experts=num_experts)
    x_sorted, expert_offsets, slot_to_token, token_slot = _dispatch_op(x, expert_ids, kept, num_experts, backend=chosen)
    return x_sorted, DispatchPlan(expert_offsets, slot_to_token, token_slot)


def moe_combine(y_sorted: Tensor, plan: DispatchPlan, weights: Tensor, *, backend: str = "auto") -> Tensor:
    """out[t] = Σ_j weights[t, j] · y_sorted[token_slot[t, j]], summed in the fixed order j = 0..k−1 in
    float32 (float64 for float64 input) and returned in y_sorted's dtype; dropped slots (token_slot = −1)
    contribute exactly zero. Bitwise reproducible across runs and thread counts.

    Args:
      y_sorted: [S, H] float32, bfloat16 or float16 (float64 on cpu/reference): the expert outputs in
        x_sorted's row order.
      plan: the DispatchPlan moe_dispatch returned (a malformed plan raises on cpu/reference and gives
        NaN rows on cuda/triton; it is never read out of bounds).
      weights: [T, k] float32 or y_sorted's dtype, e.g. `moe_topk_route(...).weights`.

    Differentiable w.r.t. y_sorted and weights.
    """
    check_tensor(_COMBINE, "y_sorted", y_sorted, ndim=2, dtypes=_FLOATS, layout="[S, H]")
    if not (isinstance(plan, tuple) and len(plan) == 3 and all(isinstance(t, Tensor) for t in plan)):
        raise TypeError(
            f"fastcore_ai.ops.{_COMBINE}: plan must be the DispatchPlan returned by moe_dispatch, "
            f"got {type(plan).__name__}"
        )
    expert_offsets, slot_to_token, token_slot = plan
    check_tensor(_COMBINE, "plan.token_slot", token_slot, ndim=2, dtypes=(torch.int64,), layout="[T, k]")
    check_tensor(_COMBINE, "plan.slot_to_token", slot_to_token, ndim=1, dtypes=(torch.int64,), layout="[S]")
    check_tensor(_COMBINE, "plan.expert_offsets", expert_offsets, ndim=1, dtypes=(torch.int64,), layout="[E + 1]")
    if slot_to_token.shape[0] != y_sorted.shape[0]:
        raise ValueError(
            f"fastcore_ai.ops.{_COMBINE}: y_sorted must have S = plan.slot_to_token.shape[0] = "
            f"{slot_to_token.shape[0]} rows, got {_describe(y_sorted)}"
        )
    check_tensor(_COMBINE, "weights", weights, ndim=2, dtypes=_FLOATS, layout="[T, k]")
    if weights.shape != token_slot.shape:
        raise ValueError(
            f"fastcore_ai.ops.{_COMBINE}: weights must have plan.token_slot's shape [T, k] = "
            f"{tuple(token_slot.shape)}, got {_describe(weights)}"
        )
    if weights.dtype not in (torch.float32, y_sorted.dtype):
        raise TypeError(
            f"fastcore_ai.ops.{_COMBINE}: weights must be float32 or y_sorted's dtype "
            f"{str(y_sorted.dtype).replace('torch.', '')}, got {_describe(weights)}"
        )
    for name, value in (("plan.token_slot", token_slot), ("plan.slot_to_token", slot_to_token), ("weights", weights)):
        _check_same_device(_COMBINE, name, value, "y_sorted", y_sorted)
    chosen = backends.select(_COMBINE, backend, y_sorted.device, y_sorted.dtype, "y_sorted")
    return _combine_op(y_sorted, slot_to_token, token_slot, weights, backend=chosen)

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

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_int, check_size, check_tensor
from ..reference.moe_permute import moe_combine as _reference_combine
from ..reference.moe_permute import moe_combine_backward as _reference_combine_backward
from ..reference.moe_permute import moe_dispatch as _reference_dispatch

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


# ---- backend implementations --------------------------------------------------------------------

def _dispatch_native(x, expert_ids, kept, num_experts):
    return tuple(_native.native().moe_dispatch(x, expert_ids, kept, num_experts))


def _dispatch_triton(x, expert_ids, kept, num_experts):
    from ..triton_kernels import moe_permute as triton_dispatch
    return triton_dispatch.moe_dispatch(x, expert_ids, kept, num_experts)


def _combine_native(y_sorted, token_slot, weights):
    return _native.native().moe_combine(y_sorted, token_slot, weights)


def _combine_triton(y_sorted, token_slot, weights):
    from ..triton_kernels import moe_permute as triton_dispatch
    return triton_dispatch.moe_combine(y_sorted, token_slot, weights)


def _combine_backward_native(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights):
    return tuple(_native.native().moe_combine_backward(grad_out, y_sorted, slot_to_token, token_slot, weights,
                                                       need_weights))


def _combine_backward_triton(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights):
    from ..triton_kernels import moe_permute as triton_dispatch
    return triton_dispatch.moe_combine_backward(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights)


_DISPATCH_IMPL: Dict[str, Callable] = {
    "cpu": _dispatch_native, "cuda": _dispatch_native, "triton": _dispatch_triton,
    "reference": _reference_dispatch,
}
_COMBINE_IMPL: Dict[str, Callable] = {
    "cpu": _combine_native, "cuda": _combine_native, "triton": _combine_triton,
    "reference": _reference_combine,
}
_COMBINE_BACKWARD_IMPL: Dict[str, Callable] = {
    "cpu": _combine_backward_native, "cuda": _combine_backward_native, "triton": _combine_backward_triton,
    "reference": _reference_combine_backward,
}


backends.register_op(backends.standard_table(_DISPATCH))
backends.register_op(backends.standard_table(_COMBINE))


# ---- the registered torch ops -------------------------------------------------------------------

@torch.library.custom_op("fastcore_ai::moe_dispatch", mutates_args=())
def _dispatch_op(x: Tensor, expert_ids: Tensor, kept: Optional[Tensor], num_experts: int,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_DISPATCH_IMPL[backend](x, expert_ids, kept, num_experts))


@_dispatch_op.register_fake
def _dispatch_fake(x, expert_ids, kept, num_experts, backend):
    num_rows = torch.library.get_ctx().new_dynamic_size()  # S = number of kept slots: data-dependent
    T, k = expert_ids.shape
    return (x.new_empty((num_rows, x.shape[1])), expert_ids.new_empty((num_experts + 1,)),
            expert_ids.new_empty((num_rows,)), expert_ids.new_empty((T, k)))


@torch.library.custom_op("fastcore_ai::moe_dispatch_backward", mutates_args=())
def _dispatch_backward_op(grad_x_sorted: Tensor, token_slot: Tensor, backend: str) -> Tensor:
    # grad_x[t] = Σ_j grad_x_sorted[token_slot[t, j]] in fixed j order: combine with unit weights.
    return _COMBINE_IMPL[backend](grad_x_sorted, token_slot, None)


@_dispatch_backward_op.register_fake
def _dispatch_backward_fake(grad_x_sorted, token_slot, backend):
    return grad_x_sorted.new_empty((token_slot.shape[0], grad_x_sorted.shape[1]))


def _dispatch_setup_context(ctx, inputs, output):
    _, _, _, _, backend = inputs
    _, expert_offsets, slot_to_token, token_slot = output
    ctx.save_for_backward(token_slot)
    ctx.mark_non_differentiable(expert_offsets, slot_to_token, token_slot)
    ctx.backend = backend


def _dispatch_backward(ctx, grad_x_sorted, grad_offsets, grad_slot_to_token, grad_token_slot):
    token_slot, = ctx.saved_tensors
    return _dispatch_backward_op(grad_x_sorted, token_slot, ctx.backend), None, None, None, None


_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup_context)


@torch.library.custom_op("fastcore_ai::moe_combine", mutates_args=())
def _combine_op(y_sorted: Tensor, slot_to_token: Tensor, token_slot: Tensor, weights: Tensor, backend: str) -> Tensor:
    return _COMBINE_IMPL[backend](y_sorted, token_slot, weights)


@_combine_op.register_fake
def _combine_fake(y_sorted, slot_to_token, token_slot, weights, backend):
    return y_sorted.new_empty((token_slot.shape[0], y_sorted.shape[1]))


@torch.library.custom_op("fastcore_ai::moe_combine_backward", mutates_args=())
def _combine_backward_op(grad_out: Tensor, y_sorted: Tensor, slot_to_token: Tensor, token_slot: Tensor,
                         weights: Tensor, need_weights: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(grad_y [S, H], grad_weights [T, k]); grad_weights is an empty [0] tensor when not need_weights."""
    grad_y, grad_w = _COMBINE_BACKWARD_IMPL[backend](grad_out, y_sorted, slot_to_token, token_slot, weights,
                                                     need_weights)
    return grad_y, (grad_w if need_weights else weights.new_empty((0,)))


@_combine_backward_op.register_fake
def _combine_backward_fake(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights, backend):
    grad_w = (torch.empty_like(weights, memory_format=torch.contiguous_format) if need_weights
              else weights.new_empty((0,)))
    return torch.empty_like(y_sorted, memory_format=torch.contiguous_format), grad_w


def _combine_setup_context(ctx, inputs, output):
    y_sorted, slot_to_token, token_slot, weights, backend = inputs
    ctx.save_for_backward(y_sorted, slot_to_token, token_slot, weights)
    ctx.backend = backend


def _combine_backward(ctx, grad_out):
    y_sorted, slot_to_token, token_slot, weights = ctx.saved_tensors
    need_weights = ctx.needs_input_grad[3]
    grad_y, grad_w = _combine_backward_op(grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights,
                                          ctx.backend)
    return grad_y, None, None, (grad_w if need_weights else None), None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup_context)


# ---- public API ---------------------------------------------------------------------------------

def _check_same_device(op: str, name: str, value: Tensor, reference_name: str, reference: Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(f"fastcore_ai.ops.{op}: {name} must be on {reference_name}'s device {reference.device}, "
                         f"got {_describe(value)}")


def moe_dispatch(x: Tensor, expert_ids: Tensor, kept: Optional[Tensor] = None, num_experts: Optional[int] = None, *,
                 backend: str = "auto") -> Tuple[Tensor, DispatchPlan]:
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
        raise ValueError(f"fastcore_ai.ops.{_DISPATCH}: expert_ids must have T = x.shape[0] = {x.shape[0]} rows, "
                         f"got {_describe(expert_ids)}")
    check_size(_DISPATCH, "k (expert_ids.shape[1])", expert_ids.shape[1], 1, 2**31 - 1, expert_ids)
    if x.shape[0] * expert_ids.shape[1] >= 2**31:
        raise ValueError(f"fastcore_ai.ops.{_DISPATCH}: expert_ids must have T*k < 2^31 slots, got {_describe(expert_ids)}")
    _check_same_device(_DISPATCH, "expert_ids", expert_ids, "x", x)
    if kept is not None:
        check_tensor(_DISPATCH, "kept", kept, ndim=2, dtypes=(torch.bool,), layout="[T, k]")
        if kept.shape != expert_ids.shape:
            raise ValueError(f"fastcore_ai.ops.{_DISPATCH}: kept must have expert_ids' shape {tuple(expert_ids.shape)}, "
                             f"got {_describe(kept)}")
        _check_same_device(_DISPATCH, "kept", kept, "x", x)
    if num_experts is None:
        raise TypeError(f"fastcore_ai.ops.{_DISPATCH}: num_experts must be an int, got None (it is required)")
    check_int(_DISPATCH, "num_experts", num_experts, 1, MAX_DISPATCH_EXPERTS)
    chosen = backends.select(_DISPATCH, backend, x.device, x.dtype, "x", num_experts=num_experts)
    x_sorted, expert_offsets, slot_to_token, token_slot = _dispatch_op(x, expert_ids, kept, num_experts, chosen)
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
        raise TypeError(f"fastcore_ai.ops.{_COMBINE}: plan must be the DispatchPlan returned by moe_dispatch, "
                        f"got {type(plan).__name__}")
    expert_offsets, slot_to_token, token_slot = plan
    check_tensor(_COMBINE, "plan.token_slot", token_slot, ndim=2, dtypes=(torch.int64,), layout="[T, k]")
    check_tensor(_COMBINE, "plan.slot_to_token", slot_to_token, ndim=1, dtypes=(torch.int64,), layout="[S]")
    check_tensor(_COMBINE, "plan.expert_offsets", expert_offsets, ndim=1, dtypes=(torch.int64,), layout="[E + 1]")
    if slot_to_token.shape[0] != y_sorted.shape[0]:
        raise ValueError(f"fastcore_ai.ops.{_COMBINE}: y_sorted must have S = plan.slot_to_token.shape[0] = "
                         f"{slot_to_token.shape[0]} rows, got {_describe(y_sorted)}")
    check_tensor(_COMBINE, "weights", weights, ndim=2, dtypes=_FLOATS, layout="[T, k]")
    if weights.shape != token_slot.shape:
        raise ValueError(f"fastcore_ai.ops.{_COMBINE}: weights must have plan.token_slot's shape [T, k] = "
                         f"{tuple(token_slot.shape)}, got {_describe(weights)}")
    if weights.dtype not in (torch.float32, y_sorted.dtype):
        raise TypeError(f"fastcore_ai.ops.{_COMBINE}: weights must be float32 or y_sorted's dtype "
                        f"{str(y_sorted.dtype).replace('torch.', '')}, got {_describe(weights)}")
    for name, value in (("plan.token_slot", token_slot), ("plan.slot_to_token", slot_to_token), ("weights", weights)):
        _check_same_device(_COMBINE, name, value, "y_sorted", y_sorted)
    chosen = backends.select(_COMBINE, backend, y_sorted.device, y_sorted.dtype, "y_sorted")
    return _combine_op(y_sorted, slot_to_token, token_slot, weights, chosen)

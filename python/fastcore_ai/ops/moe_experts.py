"""MoE op: the whole expert computation in one call,

    out[t] = Σ_{j kept} weights[t, j] · f_{expert_ids[t, j]}(x[t]),
    f_e(x) = W_down[e] (act(W_gate[e] x) ⊙ W_up[e] x)   (gated)   or   W_down[e] act(W_gate_up[e] x),

summed over j = 0..k−1 in that fixed order (bitwise reproducible); a dropped slot adds exactly 0.

Two paths, chosen per call:

* Inference (no input requires grad, or grad mode off): the registered op `fastcore_ai::moe_experts`,
  one fused implementation per backend:
    triton     vLLM-style fused MoE: block-aligned expert segments, x rows gathered by token index
               inside the gate_up GEMM (no x_sorted copy), act(gate)·up fused in its epilogue, the down
               GEMM with the routing weight in its epilogue, then a fixed-order sum over k
               (triton_kernels/moe_experts.py);
    cuda       one grouped-GEMM launch over all experts per projection, rows gathered by index in-kernel,
               bf16/fp16 on tensor cores (fp32 accumulation), fp32 on a SIMT path, routing weight in the
               down GEMM's epilogue (csrc/kernels/moe/grouped_gemm.cu);
    cpu        dispatch -> per-expert BLAS GEMMs on segment views with the fused activation -> combine;
    reference  a float64/float32 loop over experts (reference/moe_experts.py).
* Training (some input requires grad):
    cpu        the fused training op `fastcore_ai::moe_experts_train`: the inference computation (bitwise
               the same output) that also keeps each routed row's gate_up GEMM output in x's dtype and the
               plan; its backward `fastcore_ai::moe_experts_backward` recomputes h from gate_up and runs
               the four gradient GEMMs per expert segment (segments in parallel with single-threaded BLAS),
               never materialising x_sorted, y_sorted or float32 copies of whole bf16 tensors
               (csrc/torch/moe_experts.cpp, experts_backward, has the math);
    others     the composition of registered ops moe_dispatch -> moe_grouped_mlp -> moe_combine on the
               same backend, which saves what its backward needs (x_sorted, gate_up, y_sorted).
  The inference op also has autograd (so it is a complete torch op), but its backward recomputes the
  forward through that composition.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._validation import _describe, check_bool, check_choice, check_tensor
from ..reference import moe_experts as reference_experts
from ..reference import moe_grouped_mlp as reference_mlp
from ..reference import moe_permute as reference_permute
from ._define import define_op, native, triton
from .moe_grouped_mlp import _ACTIVATION_CODES, _mlp_backward_op, _mlp_op, moe_grouped_mlp
from .moe_permute import (
    MAX_DISPATCH_EXPERTS,
    _combine_backward_op,
    _dispatch_backward_op,
    _dispatch_op,
    moe_combine,
    moe_dispatch,
)

_OP = "moe_experts"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- backend implementations (forward, inference) -----------------------------------------------


def _check_experts_ids(x, expert_ids, weights, kept, w1, w2, act, gated):
    """The ids are checked inside the op (every backend, the direct path included): torch.compile never
    traces the host read."""
    _check_ids(expert_ids, w2.shape[0])


_native_experts = native("moe_experts")
_native_experts_train = native("moe_experts_train")
_native_experts_backward = native("moe_experts_backward")


def _forward_native(x, expert_ids, weights, kept, w1, w2, act, gated):
    return _native_experts(x, expert_ids, weights, kept, w1, w2, _ACTIVATION_CODES[act], gated)


_FORWARD = {
    "cpu": _forward_native,
    "cuda": _forward_native,
    "triton": triton("moe_experts", "moe_experts_forward"),
    "reference": reference_experts.moe_experts,
}


backends.register_op(backends.standard_table(_OP))  # cuda, triton, cpu, reference


def _experts_setup_context(ctx, inputs, output):
    x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated, backend = inputs
    ctx.save_for_backward(x, expert_ids, weights, kept, w_gate_up, w_down)
    ctx.activation, ctx.gated, ctx.backend = activation, gated, backend


def _experts_backward(ctx, grad_out):
    """Recomputes the forward through the composition (dispatch -> grouped MLP) and runs its backward."""
    x, expert_ids, weights, kept, w_gate_up, w_down = ctx.saved_tensors
    backend = ctx.backend
    x_sorted, offsets, slot_to_token, token_slot = _dispatch_op(x, expert_ids, kept, w_down.shape[0], backend=backend)
    y_sorted, gate_up = _mlp_op(x_sorted, offsets, w_gate_up, w_down, ctx.activation, ctx.gated, backend=backend)
    need_weights = ctx.needs_input_grad[2]
    grad_y, grad_weights = _combine_backward_op(
        grad_out.contiguous(), y_sorted, slot_to_token, token_slot, weights, need_weights, backend=backend
    )
    grad_x_sorted, grad_w1, grad_w2 = _mlp_backward_op(
        grad_y, x_sorted, offsets, w_gate_up, w_down, gate_up, ctx.activation, ctx.gated, backend=backend
    )
    grad_x = _dispatch_backward_op(grad_x_sorted, token_slot, backend=backend)
    return (grad_x, None, grad_weights if need_weights else None, None, grad_w1, grad_w2, None, None, None)


@define_op(
    "moe_experts", impls=_FORWARD, autograd=(_experts_setup_context, _experts_backward), check=_check_experts_ids
)
def _experts_op(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    kept: Optional[Tensor],
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str,
    gated: bool,
) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1]))


# ---- fused training path (cpu backend; the reference is the composition of the reference ops) ----


def _train_native(x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated):
    return tuple(
        _native_experts_train(x, expert_ids, weights, kept, w_gate_up, w_down, _ACTIVATION_CODES[activation], gated)
    )


def _train_reference(x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated):
    x_sorted, expert_offsets, slot_to_token, token_slot = reference_permute.moe_dispatch(
        x, expert_ids, kept, w_down.shape[0]
    )
    y_sorted, gate_up = reference_mlp.moe_grouped_mlp(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated)
    out = reference_permute.moe_combine(y_sorted, token_slot, weights)
    return out, gate_up.to(x.dtype), expert_offsets, slot_to_token, token_slot


def _backward_native(
    grad_out,
    x,
    expert_offsets,
    slot_to_token,
    token_slot,
    weights,
    gate_up,
    w_gate_up,
    w_down,
    activation,
    gated,
    need_x,
    need_weights,
    need_params,
):
    return tuple(
        _native_experts_backward(
            grad_out,
            x,
            expert_offsets,
            slot_to_token,
            token_slot,
            weights,
            gate_up,
            w_gate_up,
            w_down,
            _ACTIVATION_CODES[activation],
            gated,
            need_x,
            need_weights,
            need_params,
        )
    )


def _backward_reference(
    grad_out,
    x,
    expert_offsets,
    slot_to_token,
    token_slot,
    weights,
    gate_up,
    w_gate_up,
    w_down,
    activation,
    gated,
    need_x,
    need_weights,
    need_params,
):
    x_sorted = x.index_select(0, slot_to_token)
    y_sorted, _ = reference_mlp.moe_grouped_mlp(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated)
    grad_y, grad_weights = reference_permute.moe_combine_backward(
        grad_out, y_sorted, slot_to_token, token_slot, weights, need_weights
    )
    grad_x_sorted, grad_w1, grad_w2 = reference_mlp.moe_grouped_mlp_backward(
        grad_y, x_sorted, expert_offsets, w_gate_up, w_down, gate_up, activation, gated
    )
    grad_x = reference_permute.moe_combine(grad_x_sorted, token_slot, None)

    def asked(t, needed, like):
        return t.to(like.dtype).contiguous() if needed else like.new_empty((0,))

    return (
        asked(grad_x, need_x, x),
        asked(grad_weights, need_weights, weights),
        asked(grad_w1, need_params, w_gate_up),
        asked(grad_w2, need_params, w_down),
    )


@define_op("moe_experts_backward", impls={"cpu": _backward_native, "reference": _backward_reference})
def _experts_backward_op(
    grad_out: Tensor,
    x: Tensor,
    expert_offsets: Tensor,
    slot_to_token: Tensor,
    token_slot: Tensor,
    weights: Tensor,
    gate_up: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str,
    gated: bool,
    need_x: bool,
    need_weights: bool,
    need_params: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weights, grad_w_gate_up, grad_w_down); the ones not asked for are empty [0] tensors."""

    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else t.new_empty((0,))

    return like(x, need_x), like(weights, need_weights), like(w_gate_up, need_params), like(w_down, need_params)


def _experts_train_setup_context(ctx, inputs, output):
    x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated, backend = inputs
    _, gate_up, expert_offsets, slot_to_token, token_slot = output
    ctx.save_for_backward(x, weights, w_gate_up, w_down, gate_up, expert_offsets, slot_to_token, token_slot)
    ctx.mark_non_differentiable(gate_up, expert_offsets, slot_to_token, token_slot)
    # Without this, autograd hands the backward a zero-filled float [S, 2I] gradient for gate_up (as large
    # as gate_up itself: 32 MB at T=2048, k=2, I=1024 in float32) that it never reads.
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.gated, ctx.backend = activation, gated, backend


def _experts_train_backward(ctx, grad_out, *_unused_grads):
    if grad_out is None:  # out did not reach the loss
        return (None,) * 9
    x, weights, w_gate_up, w_down, gate_up, expert_offsets, slot_to_token, token_slot = ctx.saved_tensors
    need_x, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    need_params = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
    grad_x, grad_weights, grad_w1, grad_w2 = _experts_backward_op(
        grad_out.contiguous(),
        x,
        expert_offsets,
        slot_to_token,
        token_slot,
        weights,
        gate_up,
        w_gate_up,
        w_down,
        ctx.activation,
        ctx.gated,
        need_x,
        need_weights,
        need_params,
        backend=ctx.backend,
    )
    return (
        grad_x if need_x else None,
        None,
        grad_weights if need_weights else None,
        None,
        grad_w1 if ctx.needs_input_grad[4] else None,
        grad_w2 if ctx.needs_input_grad[5] else None,
        None,
        None,
        None,
    )


@define_op(
    "moe_experts_train",
    impls={"cpu": _train_native, "reference": _train_reference},
    autograd=(_experts_train_setup_context, _experts_train_backward),
    check=_check_experts_ids,
)
def _experts_train_op(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    kept: Optional[Tensor],
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str,
    gated: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [T, H], gate_up [S, 2I or I] in x's dtype, expert_offsets [E + 1], slot_to_token [S], token_slot [T, k])."""
    num_rows = torch.library.get_ctx().new_dynamic_size()  # S = number of kept slots: data-dependent
    return (
        x.new_empty((x.shape[0], x.shape[1])),
        x.new_empty((num_rows, w_gate_up.shape[1])),
        expert_ids.new_empty((w_down.shape[0] + 1,)),
        expert_ids.new_empty((num_rows,)),
        expert_ids.new_empty(tuple(expert_ids.shape)),
    )


# ---- public API ---------------------------------------------------------------------------------


def _validate(x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated) -> None:
    check_tensor(_OP, "x", x, ndim=2, dtypes=_FLOATS, layout="[T, H]")
    check_tensor(_OP, "expert_ids", expert_ids, ndim=2, dtypes=(torch.int64,), layout="[T, k]")
    check_tensor(_OP, "weights", weights, ndim=2, dtypes=_FLOATS, layout="[T, k]")
    check_tensor(_OP, "w_gate_up", w_gate_up, ndim=3, dtypes=_FLOATS, layout="[E, 2I, H]" if gated else "[E, I, H]")
    check_tensor(_OP, "w_down", w_down, ndim=3, dtypes=_FLOATS, layout="[E, H, I]")
    check_choice(_OP, "activation", activation, tuple(_ACTIVATION_CODES))
    check_bool(_OP, "gated", gated)
    T, H = x.shape
    E, _, I = w_down.shape
    if expert_ids.shape[0] != T or expert_ids.shape[1] < 1:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: expert_ids must have shape [T, k] with T = x.shape[0] = {T} "
            f"and k >= 1, got {_describe(expert_ids)}"
        )
    if weights.shape != expert_ids.shape:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: weights must have expert_ids' shape {tuple(expert_ids.shape)}, "
            f"got {_describe(weights)}"
        )
    if kept is not None:
        check_tensor(_OP, "kept", kept, ndim=2, dtypes=(torch.bool,), layout="[T, k]")
        if kept.shape != expert_ids.shape:
            raise ValueError(
                f"fastcore_ai.ops.{_OP}: kept must have expert_ids' shape {tuple(expert_ids.shape)}, "
                f"got {_describe(kept)}"
            )
    if not 1 <= E <= MAX_DISPATCH_EXPERTS:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: w_down must have 1 <= E <= {MAX_DISPATCH_EXPERTS} experts, got {_describe(w_down)}"
        )
    if w_down.shape[1] != H:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: w_down must have shape [E, H, I] with H = x.shape[1] = {H}, "
            f"got {_describe(w_down)}"
        )
    expected = (E, 2 * I if gated else I, H)
    if tuple(w_gate_up.shape) != expected:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: w_gate_up must have shape [E, {'2I' if gated else 'I'}, H] = "
            f"{expected} (gated={gated}), got {_describe(w_gate_up)}"
        )
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError(
            f"fastcore_ai.ops.{_OP}: x, w_gate_up and w_down must share one dtype, got "
            f"{x.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )
    if x.shape[0] * expert_ids.shape[1] >= 2**31:
        raise ValueError(f"fastcore_ai.ops.{_OP}: expert_ids must have T*k < 2^31 slots, got {_describe(expert_ids)}")
    for name, t in (
        ("expert_ids", expert_ids),
        ("weights", weights),
        ("kept", kept),
        ("w_gate_up", w_gate_up),
        ("w_down", w_down),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"fastcore_ai.ops.{_OP}: {name} must be on x's device {x.device}, got {_describe(t)}")


def _check_ids(expert_ids: Tensor, num_experts: int) -> None:
    """Every id in [0, E), dropped slots included (one host read: an id outside would index weights out
    of bounds in the fused kernels)."""
    if expert_ids.numel() and bool(((expert_ids < 0) | (expert_ids >= num_experts)).any()):
        bad = expert_ids[(expert_ids < 0) | (expert_ids >= num_experts)][0].item()
        raise ValueError(f"fastcore_ai.ops.{_OP}: expert_ids must lie in [0, num_experts = {num_experts}), got {bad}")


def moe_experts(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    *,
    kept: Optional[Tensor] = None,
    activation: str = "silu",
    gated: bool = True,
    backend: str = "auto",
    mlp_backend: Optional[str] = None,
) -> Tensor:
    """The expert computation of an MoE layer: [T, H] in x's dtype (see the module docstring for the math).

    Args:
      x: [T, H] float32, bfloat16 or float16 (float64 on cpu/reference), any strides.
      expert_ids: [T, k] int64, every id in [0, E) (checked; raises ValueError otherwise).
      weights: [T, k] routing weights (any float dtype; used in float32, or float64 for float64 x).
      w_gate_up: [E, 2I, H] (gated: gate rows then up rows) or [E, I, H]; w_down: [E, H, I] (HF
        MixtralExperts' layout; x's dtype).
      kept: optional [T, k] bool; False drops the slot (it adds exactly 0).
      activation: "silu" | "gelu" (exact) | "relu".  backend: "auto" | "cuda" | "triton" | "cpu" | "reference".
      mlp_backend: runs the grouped MLP stage on another backend (forces the unfused composition).

    Differentiable w.r.t. x, weights, w_gate_up and w_down. Deterministic.
    """
    _validate(x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated)
    E = w_down.shape[0]
    if weights.dtype not in (x.dtype, torch.float32):  # what moe_combine accepts
        weights = weights.float()
    chosen = backends.select(_OP, backend, x.device, x.dtype, "x")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w_gate_up, w_down))
    if needs_grad and chosen == "cpu" and mlp_backend is None:
        return _experts_train_op(x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated, backend=chosen)[0]
    if needs_grad or (mlp_backend is not None and mlp_backend != backend):
        x_sorted, plan = moe_dispatch(x, expert_ids, kept, E, backend=chosen)
        y_sorted = moe_grouped_mlp(
            x_sorted,
            plan.expert_offsets,
            w_gate_up,
            w_down,
            activation=activation,
            gated=gated,
            backend=mlp_backend or chosen,
        )
        return moe_combine(y_sorted, plan, weights, backend=chosen)
    return _experts_op(x, expert_ids, weights, kept, w_gate_up, w_down, activation, gated, backend=chosen)

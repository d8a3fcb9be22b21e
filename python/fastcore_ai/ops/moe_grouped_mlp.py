"""MoE op: the expert MLP over rows grouped by expert (`moe_dispatch`'s x_sorted and expert_offsets),
with Hugging Face MixtralExperts' weight layout, so HF weights are used without copies.

Backends: cuda (csrc/kernels/moe/grouped_gemm.cu: one grouped-GEMM launch over all experts per
projection, bf16/fp16 on tensor cores with float32 accumulation, float32 on an exact SIMT path, the
activation fused into the epilogues; the backward's two weight-gradient GEMMs are cuBLAS at::mm on
per-expert segment views, which reads the offsets on the host once), cpu (one BLAS GEMM per expert
segment on views + a fused activation kernel), triton (a grouped GEMM over expert row tiles with the
activation fused into its epilogue; float32 inputs use IEEE fp32 dots, not TF32) and reference.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import backends
from .._validation import check_bool, check_choice, check_tensor
from ..reference import moe_grouped_mlp as reference_mlp
from ._define import define_op, native, triton

_OP = "moe_grouped_mlp"
_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "relu": 2}  # fastcore::moe::Activation
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_offset_values(expert_offsets: Tensor, num_rows: int) -> None:
    """First 0, last S = num_rows, non-decreasing: the ValueError every backend that reads offsets on the
    host gives (the cpu backend's own check raises RuntimeError "expert_offsets must start at 0 and end at S").
    One host read, so it runs only where the values are read anyway (reference impl, CPU tensors)."""
    bad = expert_offsets.numel() == 0 or bool(
        (expert_offsets[0] != 0) | (expert_offsets[-1] != num_rows) | (expert_offsets[1:] < expert_offsets[:-1]).any()
    )
    if bad:
        shown = expert_offsets.tolist() if expert_offsets.numel() <= 17 else "[...]"
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: expert_offsets must start at 0 and end at S = {num_rows} and be "
            f"non-decreasing, got {shown}"
        )


# ---- the registered torch ops: forward -> (y_sorted, gate_up), and its backward ---------------------

_native_forward = native("moe_grouped_mlp")
_native_backward = native("moe_grouped_mlp_backward")
_triton_forward = triton("moe_grouped_mlp", "grouped_mlp_forward")
_triton_backward = triton("moe_grouped_mlp", "grouped_mlp_backward")


def _forward_native(x, offsets, w1, w2, act, gated):
    return tuple(_native_forward(x, offsets, w1, w2, _ACTIVATION_CODES[act], gated))


def _backward_native(gy, x, offsets, w1, w2, gate_up, act, gated):
    return tuple(_native_backward(gy, x, offsets, w1, w2, gate_up, _ACTIVATION_CODES[act], gated))


# Offset values are checked where reading them is free (CPU tensors); on a GPU the Triton kernels read a
# clamped, non-decreasing copy, so bad offsets can never index out of bounds.


def _forward_triton(x, offsets, w1, w2, act, gated):
    if x.device.type == "cpu":
        check_offset_values(offsets, x.shape[0])
    return tuple(_triton_forward(x, offsets, w1, w2, act, gated, False))


def _backward_triton(gy, x, offsets, w1, w2, gate_up, act, gated):
    if x.device.type == "cpu":
        check_offset_values(offsets, x.shape[0])
    return tuple(_triton_backward(gy, x, offsets, w1, w2, gate_up, act, gated, False))


def _forward_reference(x, offsets, w1, w2, act, gated):
    check_offset_values(offsets, x.shape[0])  # the reference reads the offsets on the host anyway
    return reference_mlp.moe_grouped_mlp(x, offsets, w1, w2, act, gated)


def _backward_reference(gy, x, offsets, w1, w2, gate_up, act, gated):
    check_offset_values(offsets, x.shape[0])
    return reference_mlp.moe_grouped_mlp_backward(gy, x, offsets, w1, w2, gate_up, act, gated)


backends.register_op(backends.standard_table(_OP))  # cuda, triton, cpu, reference


@define_op(
    "moe_grouped_mlp_backward",
    impls={
        "cpu": _backward_native,
        "cuda": _backward_native,
        "triton": _backward_triton,
        "reference": _backward_reference,
    },
)
def _mlp_backward_op(
    grad_y: Tensor,
    x_sorted: Tensor,
    expert_offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    gate_up: Tensor,
    activation: str,
    gated: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(x_sorted, memory_format=torch.contiguous_format),
        torch.empty_like(w_gate_up, memory_format=torch.contiguous_format),
        torch.empty_like(w_down, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x_sorted, expert_offsets, w_gate_up, w_down, activation, gated, backend = inputs
    _, gate_up = output
    ctx.save_for_backward(x_sorted, expert_offsets, w_gate_up, w_down, gate_up)
    ctx.mark_non_differentiable(gate_up)
    ctx.activation, ctx.gated, ctx.backend = activation, gated, backend


def _backward(ctx, grad_y, grad_gate_up):
    x_sorted, expert_offsets, w_gate_up, w_down, gate_up = ctx.saved_tensors
    grad_x, grad_w1, grad_w2 = _mlp_backward_op(
        grad_y.contiguous(),
        x_sorted,
        expert_offsets,
        w_gate_up,
        w_down,
        gate_up,
        ctx.activation,
        ctx.gated,
        backend=ctx.backend,
    )
    return grad_x, None, grad_w1, grad_w2, None, None, None


@define_op(
    "moe_grouped_mlp",
    impls={"cpu": _forward_native, "cuda": _forward_native, "triton": _forward_triton, "reference": _forward_reference},
    autograd=(_setup_context, _backward),
)
def _mlp_op(
    x_sorted: Tensor, expert_offsets: Tensor, w_gate_up: Tensor, w_down: Tensor, activation: str, gated: bool
) -> Tuple[Tensor, Tensor]:
    acc = torch.float64 if x_sorted.dtype == torch.float64 else torch.float32
    return (
        x_sorted.new_empty((x_sorted.shape[0], w_down.shape[1])),
        x_sorted.new_empty((x_sorted.shape[0], w_gate_up.shape[1]), dtype=acc),
    )


def moe_grouped_mlp(
    x_sorted: Tensor,
    expert_offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    *,
    activation: str = "silu",
    gated: bool = True,
    backend: str = "auto",
) -> Tensor:
    """y_sorted [S, H]: the expert MLP applied to each row of x_sorted by the expert that owns it.

    x_sorted [S, H] (rows grouped by expert, as `moe_dispatch` returns them), expert_offsets [E + 1]
    int64 (expert e owns rows expert_offsets[e] : expert_offsets[e + 1]), w_gate_up [E, 2I, H] (gated:
    gate rows, then up rows) or [E, I, H], w_down [E, H, I] — Hugging Face MixtralExperts' layout.
    y = W_down[e] (act(W_gate[e] x) ⊙ W_up[e] x), or W_down[e] act(W_gate_up[e] x) when not gated;
    activation "silu" | "gelu" (exact) | "relu". Gradients for x_sorted and both weights.
    Offsets are checked (start 0, end S, non-decreasing) where reading them is free: on the cpu backend
    (RuntimeError) and on the reference backend and CPU tensors on triton (ValueError).
    """
    dtypes = _FLOATS
    check_tensor(_OP, "x_sorted", x_sorted, ndim=2, dtypes=dtypes, layout="[S, H]")
    check_tensor(_OP, "expert_offsets", expert_offsets, ndim=1, dtypes=(torch.int64,), layout="[E + 1]")
    check_tensor(_OP, "w_gate_up", w_gate_up, ndim=3, dtypes=dtypes, layout="[E, 2I, H]")
    check_tensor(_OP, "w_down", w_down, ndim=3, dtypes=dtypes, layout="[E, H, I]")
    check_choice(_OP, "activation", activation, tuple(_ACTIVATION_CODES))
    check_bool(_OP, "gated", gated)
    S, H = x_sorted.shape
    E, _, I = w_down.shape
    expected_gate_up = (E, 2 * I if gated else I, H)
    if tuple(w_down.shape) != (E, H, I) or w_down.shape[1] != H:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: w_down must have shape [E, H, I] with H = x_sorted.shape[1] = {H}, "
            f"got {tuple(w_down.shape)}"
        )
    if tuple(w_gate_up.shape) != expected_gate_up:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: w_gate_up must have shape [E, {'2I' if gated else 'I'}, H] = "
            f"{expected_gate_up} (gated={gated}), got {tuple(w_gate_up.shape)}"
        )
    if expert_offsets.shape[0] != E + 1:
        raise ValueError(
            f"fastcore_ai.ops.{_OP}: expert_offsets must have E + 1 = {E + 1} entries, got {expert_offsets.shape[0]}"
        )
    if not (x_sorted.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError(
            f"fastcore_ai.ops.{_OP}: x_sorted, w_gate_up and w_down must share one dtype, got "
            f"{x_sorted.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )
    for name, t in (("expert_offsets", expert_offsets), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.device != x_sorted.device:
            raise ValueError(f"fastcore_ai.ops.{_OP}: {name} is on {t.device} but x_sorted is on {x_sorted.device}")
    chosen = backends.select(_OP, backend, x_sorted.device, x_sorted.dtype, "x_sorted")
    y, _ = _mlp_op(x_sorted, expert_offsets, w_gate_up, w_down, activation, gated, backend=chosen)
    return y

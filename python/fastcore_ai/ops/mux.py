"""DataMUX ops: multiplexing (`mux`), index demultiplexing (`demux`) and fused flash-style `attention`.

Layering (DESIGN): validate -> choose backend -> registered torch ops `fastcore_ai::mux_attention`,
`fastcore_ai::mux_mux`, `fastcore_ai::mux_demux` (+ their backward ops; fake impls, autograd, opcheck,
torch.compile) -> backend implementation (`_C`, Triton launcher or the pure-torch reference).
The math of each op is written out in `fastcore_ai.reference.mux`.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from .._validation import _describe, check_bool, check_choice, check_int, check_tensor
from ._define import define_op, native_impls, triton

# The submodule fastcore_ai.reference.mux: the package attribute `reference.mux` is the function `mux` its
# star-export binds over the submodule (so `from ..reference import mux` gives the function).
reference_mux = sys.modules[reference.__name__ + ".mux"]

__all__ = ["attention", "attention_with_lse", "mux", "demux", "MAX_HEAD_DIM", "MUX_MODES"]

MAX_HEAD_DIM = 256
MUX_MODES = ("hadamard", "ortho")
_ATTENTION, _MUX, _DEMUX = "attention", "mux", "demux"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOW = frozenset({torch.float32, torch.bfloat16, torch.float16})
_FLOAT_SET = frozenset(_FLOATS)
_MASK_DTYPES = _FLOAT_SET | {torch.bool}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- backend tables -----------------------------------------------------------------------------


def _attention_limits(head_dim: int = 1, **_) -> list:
    return [] if 1 <= head_dim <= MAX_HEAD_DIM else [f"head size {head_dim} is outside 1..{MAX_HEAD_DIM}"]


# On a GPU "auto" prefers Triton (tensor cores through tl.dot for bf16/fp16) over the SIMT cuda kernel.
backends.register_op(
    backends.OpTable(
        _ATTENTION,
        ("triton", "cuda", "cpu", "reference"),
        {
            "cuda": backends.Support(_LOW, _attention_limits),
            "triton": backends.Support(_LOW, _attention_limits),
            "cpu": backends.Support(_LOW | {torch.float64}, _attention_limits),
            "reference": backends.Support(_LOW | {torch.float64}),
        },
    )
)
backends.register_op(
    backends.OpTable(
        _MUX,
        ("triton", "cpu", "reference"),
        {
            "triton": backends.Support(_LOW),
            "cpu": backends.Support(_LOW | {torch.float64}),
            "reference": backends.Support(_LOW | {torch.float64}),
        },
    )
)
backends.register_op(
    backends.OpTable(
        _DEMUX,
        ("triton", "cpu", "reference"),
        {
            "triton": backends.Support(_LOW),
            "cpu": backends.Support(_LOW | {torch.float64}),
            "reference": backends.Support(_LOW | {torch.float64}),
        },
    )
)


# ---- attention: the registered torch ops (forward -> (out, lse), and its backward) --------------


def _attention_reference(q, k, v, attn_mask, key_padding_mask, causal, scale):
    acc = _acc_dtype(q.dtype)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(acc)
    out, lse = reference_mux.attention_with_lse(q.to(acc), k.to(acc), v.to(acc), mask, key_padding_mask, causal, scale)
    return out.to(q.dtype), lse.to(acc)


def _attention_backward_reference(
    grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, causal, scale, need_mask_grad
):
    acc = _acc_dtype(q.dtype)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(acc)
    *grads, grad_mask = reference_mux.attention_backward(
        grad_out.to(acc),
        q.to(acc),
        k.to(acc),
        v.to(acc),
        mask,
        key_padding_mask,
        causal,
        scale,
        need_mask_grad=need_mask_grad,
    )
    grad_mask = grad_mask.to(attn_mask.dtype) if need_mask_grad else q.new_empty((0,))
    return (*(g.to(q.dtype) for g in grads), grad_mask)


_attention_forward_triton_kernel = triton("mux", "attention_forward")
_attention_backward_triton_grads = triton("mux", "attention_backward")


# Grouped kv heads (H_kv < H) on the Triton backend: its kernels take one k/v head per query head, so the
# k/v heads are expanded here (repeat_interleave, what a user would do) and dK, dV summed back per group.
# The cpu and cuda backends read the grouped k/v in place (csrc/kernels/mux/attention.h).
def _attention_triton(q, k, v, attn_mask, key_padding_mask, causal, scale):
    H = q.shape[1]
    k, v = reference_mux.expand_kv(k, H), reference_mux.expand_kv(v, H)
    return _attention_forward_triton_kernel(q, k, v, attn_mask, key_padding_mask, causal, scale)


def _attention_backward_triton(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, causal, scale, need_mask_grad):
    # need_mask_grad is never True here: ops.attention rejects a differentiable mask for this backend
    H, kv_heads = q.shape[1], k.shape[1]
    k, v = reference_mux.expand_kv(k, H), reference_mux.expand_kv(v, H)
    dq, dk, dv = _attention_backward_triton_grads(
        grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, causal, scale
    )[:3]
    if kv_heads != H:  # float32 sums of the G query heads' slices, cast back
        dk = reference_mux.reduce_kv_grad(dk.float(), kv_heads).to(dk.dtype)
        dv = reference_mux.reduce_kv_grad(dv.float(), kv_heads).to(dv.dtype)
    return dq, dk, dv, q.new_empty((0,))


# Backends whose backward also returns the additive attn_mask's gradient (ds summed over its broadcast dims).
_MASK_GRAD_BACKENDS = ("cpu", "reference")


@define_op(
    "mux_attention_backward",
    impls={
        **native_impls("mux_attention_backward", reference=_attention_backward_reference),
        "triton": _attention_backward_triton,
    },
)
def _attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    need_mask_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d attn_mask): the last is the additive mask's gradient in its shape and dtype when
    need_mask_grad (cpu and reference backends), else an empty tensor."""
    grad_mask = (
        torch.empty(attn_mask.shape, dtype=attn_mask.dtype, device=attn_mask.device)
        if need_mask_grad
        else q.new_empty((0,))
    )
    return (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
        torch.empty(v.shape, dtype=v.dtype, device=v.device),
        grad_mask,
    )


def _attention_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_padding_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, key_padding_mask)
    ctx.mark_non_differentiable(lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, key_padding_mask = ctx.saved_tensors
    need_mask_grad = bool(ctx.needs_input_grad[3])  # only ever True for an additive mask (bool has no grad)
    dq, dk, dv, dmask = _attention_backward_op(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        attn_mask,
        key_padding_mask,
        ctx.causal,
        ctx.scale,
        need_mask_grad,
        backend=ctx.backend,
    )
    return dq, dk, dv, (dmask if need_mask_grad else None), None, None, None, None


@define_op(
    "mux_attention",
    impls={**native_impls("mux_attention", reference=_attention_reference), "triton": _attention_triton},
    autograd=(_attention_setup_context, _attention_backward),
)
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    return q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=_acc_dtype(q.dtype))


def _attention_valid(q, k, v, attn_mask, key_padding_mask, causal, scale) -> int:
    """The head size D when `_check_attention` would accept the call, decided without building any message
    or broadcasting shapes (this runs per layer per token in a decode step); 0 sends the call through
    `_check_attention`, whose full checks raise the error."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and causal.__class__ is bool):
        return 0
    dtype = q.dtype
    if dtype not in _FLOAT_SET or k.dtype is not dtype or v.dtype is not dtype:
        return 0
    try:
        B, H, Lq, D = q.shape
        Bk, Hk, Lk, Dk = k.shape
        Bv, Hv, Lv, Dv = v.shape
    except ValueError:  # not 4-D
        return 0
    if Bk != B or Bv != B or Hv != Hk or Dk != D or Dv != D or Lv != Lk or not 1 <= D <= MAX_HEAD_DIM:
        return 0
    if Hk < 1 or H % Hk:  # grouped-query attention: H_kv must divide H
        return 0
    device = q.device
    if k.device != device or v.device != device:
        return 0
    if scale is not None and (scale.__class__ not in (float, int) or not math.isfinite(scale)):
        return 0
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype not in _MASK_DTYPES or attn_mask.device != device:
            return 0
        # broadcastable to [B, H, Lq, Lk] without changing that shape (what torch.broadcast_shapes checks)
        shape = attn_mask.shape
        if len(shape) > 4:
            return 0
        for size, full in zip(reversed(shape), (Lk, Lq, H, B)):
            if size != 1 and size != full:
                return 0
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype is not torch.bool:
            return 0
        try:
            Bp, Lp = key_padding_mask.shape
        except ValueError:  # not 2-D
            return 0
        if Bp != B or Lp != Lk or key_padding_mask.device != device:
            return 0
    return D


def _check_attention(q, k, v, attn_mask, key_padding_mask, causal, scale) -> int:
    """Every check, each with its message: raise on an invalid call, else return the head size D."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_ATTENTION, name, t, ndim=4, dtypes=_FLOATS, layout="[B, H, L, D]")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(
            f"fastcore_ai.ops.{_ATTENTION}: head size D = q.shape[3] must satisfy 1 <= D <= "
            f"{MAX_HEAD_DIM}, got {D} ({_describe(q)})"
        )
    Hk = k.shape[1]
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"fastcore_ai.ops.{_ATTENTION}: {name} must have q's dtype {q.dtype}, got {_describe(t)}")
        if t.device != q.device:
            raise ValueError(
                f"fastcore_ai.ops.{_ATTENTION}: {name} must be on q's device {q.device}, got {_describe(t)}"
            )
        if t.shape[0] != B or t.shape[3] != D:
            raise ValueError(
                f"fastcore_ai.ops.{_ATTENTION}: {name} must have shape [B, H_kv, Lk, D] = "
                f"[{B}, H_kv, Lk, {D}] to match q {tuple(q.shape)}, got {_describe(t)}"
            )
    if Hk < 1 or H % Hk:
        raise ValueError(
            f"fastcore_ai.ops.{_ATTENTION}: k's head count H_kv = k.shape[1] must divide q's H = {H} "
            f"(grouped-query attention: query head h reads kv head h // (H / H_kv)), got {_describe(k)}"
        )
    if v.shape[1] != Hk:
        raise ValueError(f"fastcore_ai.ops.{_ATTENTION}: v must have k's head count H_kv = {Hk}, got {_describe(v)}")
    if v.shape[2] != Lk:
        raise ValueError(f"fastcore_ai.ops.{_ATTENTION}: v must have k's length Lk = {Lk}, got {_describe(v)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(
                f"fastcore_ai.ops.{_ATTENTION}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in _FLOATS:
            raise TypeError(
                f"fastcore_ai.ops.{_ATTENTION}: attn_mask must be bool (True = attend) or a float "
                f"additive mask, got {_describe(attn_mask)}"
            )
        if attn_mask.device != q.device:
            raise ValueError(
                f"fastcore_ai.ops.{_ATTENTION}: attn_mask must be on q's device, got {_describe(attn_mask)}"
            )
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, Lk)) == (B, H, Lq, Lk)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"fastcore_ai.ops.{_ATTENTION}: attn_mask must be broadcastable to [B, H, Lq, Lk] = "
                f"{[B, H, Lq, Lk]}, got {_describe(attn_mask)}"
            )
    if key_padding_mask is not None:
        check_tensor(_ATTENTION, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), layout="[B, Lk]")
        if tuple(key_padding_mask.shape) != (B, Lk) or key_padding_mask.device != q.device:
            raise ValueError(
                f"fastcore_ai.ops.{_ATTENTION}: key_padding_mask must be bool [B, Lk] = [{B}, {Lk}] on "
                f"q's device, got {_describe(key_padding_mask)}"
            )
    check_bool(_ATTENTION, "causal", causal)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"fastcore_ai.ops.{_ATTENTION}: scale must be a finite float or None, got {scale!r}")
    return D


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """`attention` that also returns the log-sum-exp per query row, lse [B, H, Lq] (float32; float64 for
    float64 inputs; −inf for a fully masked row). lse is not differentiable."""
    return _attention_with_lse(q, k, v, attn_mask, key_padding_mask, causal, scale, backend)


def _attention_with_lse(q, k, v, attn_mask, key_padding_mask, causal, scale, backend):
    head_dim = _attention_valid(q, k, v, attn_mask, key_padding_mask, causal, scale) or _check_attention(
        q, k, v, attn_mask, key_padding_mask, causal, scale
    )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):
        attn_mask = attn_mask.to(q.dtype)
    chosen = backends.select(_ATTENTION, backend, q.device, q.dtype, "q", head_dim=head_dim)
    if (
        attn_mask is not None
        and attn_mask.requires_grad
        and torch.is_grad_enabled()
        and chosen not in _MASK_GRAD_BACKENDS
    ):
        raise ValueError(
            f"fastcore_ai.ops.{_ATTENTION}: attn_mask requires grad, and the gradient of an additive "
            f"mask is computed by the {' and '.join(_MASK_GRAD_BACKENDS)} backends only; the chosen "
            f"backend is {chosen!r} (pass backend='cpu' for CPU tensors, or detach the mask), got "
            f"{_describe(attn_mask)}"
        )
    return _attention_op(q, k, v, attn_mask, key_padding_mask, causal, scale, backend=chosen)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Fused attention softmax(scale · q kᵀ + mask) v without materialising [Lq, Lk] (tiled online softmax).

    Args:
      q: [B, H, Lq, D]; k, v: [B, H_kv, Lk, D] (Lq ≠ Lk is cross-attention). D any of 1..256, any Lq, Lk.
        H_kv divides H: grouped-query / multi-query attention (SDPA's enable_gqa), query head h reads kv
        head h // (H / H_kv), and k, v's gradients sum over each kv head's query heads; H_kv = H is plain
        multi-head attention.
        float32, bfloat16, float16 (float32 softmax and accumulation), float64 on cpu/reference. Any strides.
      attn_mask: optional, broadcastable to [B, H, Lq, Lk]: bool (True = attend, as torch SDPA) or an
        additive float mask, differentiable on the cpu and reference backends (its gradient is ds, the
        softmax input's gradient, summed over the dimensions it was broadcast along; other backends raise
        for a mask that requires grad).
      key_padding_mask: optional bool [B, Lk], True = ignore that key (as nn.MultiheadAttention).
      causal: mask keys j > i (top-left aligned, as SDPA's is_causal).
      scale: score scale, default 1/√D.
      backend: "auto" | "cpu" | "cuda" | "triton" | "reference".

    Returns out [B, H, Lq, D] in q's dtype. A query row whose keys are all masked gets out = 0 (and zero
    gradients), never NaN. Differentiable w.r.t. q, k, v (the backward recomputes the probabilities from
    the saved log-sum-exp).
    """
    return _attention_with_lse(q, k, v, attn_mask, key_padding_mask, causal, scale, backend)[0]


# ---- mux ----------------------------------------------------------------------------------------


def _mux_reference(x, keys, mode):
    acc = _acc_dtype(x.dtype)
    return reference_mux.mux(x.to(acc), keys.to(acc), MUX_MODES[mode]).to(x.dtype)


def _mux_backward_reference(grad_out, x, keys, mode, need_keys):
    acc = _acc_dtype(x.dtype)
    gx, gk = reference_mux.mux_backward(grad_out.to(acc), x.to(acc), keys.to(acc), MUX_MODES[mode], need_keys)
    # contiguous like the fake (and the cpu/triton outputs): the einsums may return transposed strides
    return gx.to(x.dtype).contiguous(), gk.to(keys.dtype).contiguous()


# Every backend returns grad_keys as an empty tensor when not need_keys.
@define_op(
    "mux_mux_backward",
    impls=native_impls(
        "mux_mux_backward", triton_launcher=("mux", "mux_backward"), reference=_mux_backward_reference, cuda=False
    ),
)
def _mux_backward_op(grad_out: Tensor, x: Tensor, keys: Tensor, mode: int, need_keys: bool) -> Tuple[Tensor, Tensor]:
    gk = torch.empty(keys.shape, dtype=keys.dtype, device=keys.device) if need_keys else keys.new_empty((0,))
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), gk


def _mux_setup_context(ctx, inputs, output):
    x, keys, mode, backend = inputs
    ctx.save_for_backward(x, keys)
    ctx.mode, ctx.backend = mode, backend


def _mux_backward(ctx, grad_out):
    x, keys = ctx.saved_tensors
    need_keys = ctx.needs_input_grad[1]
    gx, gk = _mux_backward_op(grad_out.contiguous(), x, keys, ctx.mode, need_keys, backend=ctx.backend)
    return gx, (gk if need_keys else None), None, None


@define_op(
    "mux_mux",
    impls=native_impls("mux_mux", triton_launcher=("mux", "mux_forward"), reference=_mux_reference, cuda=False),
    autograd=(_mux_setup_context, _mux_backward),
)
def _mux_op(x: Tensor, keys: Tensor, mode: int) -> Tensor:
    B, N, L, d = x.shape
    return x.new_empty((B, L, d))


def mux(
    x: Tensor, keys: Tensor, mode: str = "hadamard", *, num_instances: Optional[int] = None, backend: str = "auto"
) -> Tensor:
    """DataMUX multiplexing of N instances into one: [B, N, L, d] (or [B·N, L, d] with num_instances=N) -> [B, L, d].

    mode "hadamard": out = (1/N) Σ_i x_i ⊙ v_i with keys v [N, d] (DataMUX: Gaussian vectors scaled to a norm);
    mode "ortho":    out = (1/√N) Σ_i x_i Φ_iᵀ with keys Φ [N, d, d] (orthogonal matrices).
    float32/bfloat16/float16 (float32 accumulation), float64 on cpu/reference; keys in x's dtype.
    Differentiable w.r.t. x and keys (learned multiplexing). A flat batch whose size is not a multiple of
    N raises (pad it explicitly, as nn.DataMUXEncoder does).
    """
    check_choice(_MUX, "mode", mode, MUX_MODES)
    if isinstance(x, Tensor) and x.dim() == 3:
        if num_instances is None:
            raise ValueError(
                f"fastcore_ai.ops.{_MUX}: x [B·N, L, d] needs num_instances=N, got None (or pass x as [B, N, L, d])"
            )
        check_int(_MUX, "num_instances", num_instances, 1, 2**31 - 1)
        if x.shape[0] % num_instances != 0:
            raise ValueError(
                f"fastcore_ai.ops.{_MUX}: x.shape[0] = {x.shape[0]} must be a multiple of "
                f"num_instances = {num_instances} (pad the batch, e.g. with nn.DataMUXEncoder, which "
                f"masks and removes the padding), got {_describe(x)}"
            )
        x = x.reshape(x.shape[0] // num_instances, num_instances, *x.shape[1:])
    check_tensor(_MUX, "x", x, ndim=4, dtypes=_FLOATS, layout="[B, N, L, d]")
    B, N, L, d = x.shape
    if num_instances is not None and num_instances != N:
        raise ValueError(f"fastcore_ai.ops.{_MUX}: num_instances = {num_instances} must equal x.shape[1] = {N}")
    if N < 1:
        raise ValueError(f"fastcore_ai.ops.{_MUX}: x must hold N >= 1 instances, got {_describe(x)}")
    want = (N, d) if mode == "hadamard" else (N, d, d)
    check_tensor(
        _MUX, "keys", keys, ndim=len(want), dtypes=_FLOATS, layout="[N, d]" if mode == "hadamard" else "[N, d, d]"
    )
    if tuple(keys.shape) != want:
        raise ValueError(
            f"fastcore_ai.ops.{_MUX}: keys must have shape {list(want)} for mode {mode!r}, got {_describe(keys)}"
        )
    if keys.dtype != x.dtype or keys.device != x.device:
        raise TypeError(
            f"fastcore_ai.ops.{_MUX}: keys must have x's dtype and device ({x.dtype}, {x.device}), "
            f"got {_describe(keys)}"
        )
    chosen = backends.select(_MUX, backend, x.device, x.dtype, "x")
    return _mux_op(x, keys, MUX_MODES.index(mode), backend=chosen)


# ---- demux --------------------------------------------------------------------------------------


def _demux_reference(h, keys, weight, bias, norm_weight, norm_bias, eps):
    acc = _acc_dtype(h.dtype)
    return reference_mux.demux(*(t.to(acc) for t in (h, keys, weight, bias, norm_weight, norm_bias)), eps=eps).to(
        h.dtype
    )


def _demux_backward_reference(grad_out, h, keys, weight, bias, norm_weight, norm_bias, eps):
    acc = _acc_dtype(h.dtype)
    inputs = (h, keys, weight, bias, norm_weight, norm_bias)
    grads = reference_mux.demux_backward(grad_out.to(acc), *(t.to(acc) for t in inputs), eps=eps)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs))


@define_op(
    "mux_demux_backward",
    impls=native_impls(
        "mux_demux_backward", triton_launcher=("mux", "demux_backward"), reference=_demux_backward_reference, cuda=False
    ),
)
def _demux_backward_op(
    grad_out: Tensor,
    h: Tensor,
    index_keys: Tensor,
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(
        torch.empty(t.shape, dtype=t.dtype, device=t.device)
        for t in (h, index_keys, weight, bias, norm_weight, norm_bias)
    )


def _demux_setup_context(ctx, inputs, output):
    *tensors, eps, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps, ctx.backend = eps, backend


def _demux_backward(ctx, grad_out):
    grads = _demux_backward_op(grad_out.contiguous(), *ctx.saved_tensors, ctx.eps, backend=ctx.backend)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6])) + (None, None)


@define_op(
    "mux_demux",
    impls=native_impls("mux_demux", triton_launcher=("mux", "demux_forward"), reference=_demux_reference, cuda=False),
    autograd=(_demux_setup_context, _demux_backward),
)
def _demux_op(
    h: Tensor, index_keys: Tensor, weight: Tensor, bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float
) -> Tensor:
    B, L, _ = h.shape
    return h.new_empty((B * index_keys.shape[-2], L, weight.shape[0]))


def demux(
    h: Tensor,
    index_keys: Tensor,
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    *,
    eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """DataMUX index demultiplexing: out[b·N + i, t] = LayerNorm(GELU(W [p_i ; h_t] + bias)), [B·N, L, e].

    Computed as (W_L p_i + bias) + W_R h_t with W = [W_L | W_R]: the index term once per index and the
    token term once per token (two small GEMMs), then GELU (exact erf form) and LayerNorm fused per row.

    Args:
      h: [B, L, d] the multiplexed encoder output; index_keys: [N, d] (shared learned keys, MUX-PLMs
        index_pos) or [B, N, d] (per-sequence prefix outputs, DataMUX index demux).
      weight: [e, 2d]; bias, norm_weight, norm_bias: [e]. All in h's dtype.
    Differentiable w.r.t. every tensor input.
    """
    check_tensor(_DEMUX, "h", h, ndim=3, dtypes=_FLOATS, layout="[B, L, d]")
    B, L, d = h.shape
    if not isinstance(index_keys, Tensor) or index_keys.dim() not in (2, 3):
        raise ValueError(
            f"fastcore_ai.ops.{_DEMUX}: index_keys must be a 2-D [N, d] or 3-D [B, N, d] tensor, got "
            f"{_describe(index_keys) if isinstance(index_keys, Tensor) else type(index_keys).__name__}"
        )
    if index_keys.shape[-1] != d or (index_keys.dim() == 3 and index_keys.shape[0] != B) or index_keys.shape[-2] < 1:
        raise ValueError(
            f"fastcore_ai.ops.{_DEMUX}: index_keys must be [N, {d}] or [{B}, N, {d}] with N >= 1 to match "
            f"h {tuple(h.shape)}, got {_describe(index_keys)}"
        )
    check_tensor(_DEMUX, "weight", weight, ndim=2, dtypes=_FLOATS, layout="[e, 2d]")
    if weight.shape[1] != 2 * d or weight.shape[0] < 1:
        raise ValueError(
            f"fastcore_ai.ops.{_DEMUX}: weight must be [e, 2d] = [e, {2 * d}] with e >= 1, got {_describe(weight)}"
        )
    e = weight.shape[0]
    for name, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        check_tensor(_DEMUX, name, t, ndim=1, dtypes=_FLOATS, layout="[e]")
        if t.shape[0] != e:
            raise ValueError(f"fastcore_ai.ops.{_DEMUX}: {name} must be [e] = [{e}], got {_describe(t)}")
    for name, t in (
        ("index_keys", index_keys),
        ("weight", weight),
        ("bias", bias),
        ("norm_weight", norm_weight),
        ("norm_bias", norm_bias),
    ):
        if t.dtype != h.dtype or t.device != h.device:
            raise TypeError(
                f"fastcore_ai.ops.{_DEMUX}: {name} must have h's dtype and device ({h.dtype}, {h.device}), "
                f"got {_describe(t)}"
            )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"fastcore_ai.ops.{_DEMUX}: eps must be a float > 0, got {eps!r}")
    chosen = backends.select(_DEMUX, backend, h.device, h.dtype, "h")
    return _demux_op(h, index_keys, weight, bias, norm_weight, norm_bias, float(eps), backend=chosen)

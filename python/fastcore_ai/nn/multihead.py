"""`MultiheadAttention`: a drop-in for torch.nn.MultiheadAttention on the fused `ops.attention` kernel, and
`replace_attention(model)`, which swaps every torch.nn.MultiheadAttention of a model for it in place.

What runs where (the rule of `MultiheadAttention.forward`):
  need_weights=False, and (eval mode or dropout == 0)   -> fastcore_ai.ops.attention (fused: the [L, S]
                                                           probabilities are never formed)
  need_weights=True (torch's default!)                  -> explicit softmax(q kᵀ / √D + mask) v, so the
                                                           probabilities can be returned
  need_weights=False, training mode and dropout > 0     -> the same explicit path with dropout on the
                                                           probabilities (the fused kernel has no dropout;
                                                           warned once per process)
One deliberate difference from torch: a query whose keys are all masked gets output out_proj(0) =
out_proj.bias and all-zero weights (torch returns NaN there), on both paths.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import ops

__all__ = ["MultiheadAttention", "replace_attention"]

_NAME = "fastcore_ai.nn.MultiheadAttention"
_REPLACE = "fastcore_ai.nn.replace_attention"

# Reasons already warned about in this process (warn once, not once per layer per step).
_warned: set = set()


def _warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(message, UserWarning, stacklevel=3)


def _leave_torch_fast_path(module, args):
    """A forward pre-hook that does nothing. torch.nn.TransformerEncoderLayer skips its native inference
    fast path (torch._transformer_encoder_layer_fwd, which reads self_attn's weights and never calls
    self_attn.forward) when any of its submodules has a hook (`why_not_sparsity_fast_path = "forward
    pre-/hooks are attached to the module"`); this hook is how a layer holding our module really runs
    our forward, in eval mode and under no_grad too."""
    return None


def _flag(name: str, value) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{_NAME}: {name} must be a bool, got {type(value).__name__} {value!r}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_NAME}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{_NAME}: {name} must be > 0, got {value}")
    return value


def _shape(t: Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # a torch whose is_autocast_enabled takes no device type (CUDA only)
        return torch.is_autocast_enabled()


def _unsqueeze_keeping_identity(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(1, ·, ·) views of unbatched inputs in which arguments that were one tensor stay one tensor (the
    projection fuses the GEMMs of query, key and value that are the same object, as torch does)."""
    views = {}
    for t in (query, key, value):
        views.setdefault(id(t), t.unsqueeze(0))
    return views[id(query)], views[id(key)], views[id(value)]


def _pad_keys(mask: Optional[Tensor], extra: int) -> Optional[Tensor]:
    """Append `extra` key columns that every query may attend (False for a bool mask, 0 for an additive one):
    the columns of bias_k and of the zero attention key, as torch pads its masks for them."""
    if mask is None or extra == 0:
        return mask
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], extra)], dim=-1)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention with the fused fastcore_ai attention kernel.

    The constructor arguments, parameter names and shapes (in_proj_weight [3E, E], or q/k/v_proj_weight
    when kdim/vdim differ from embed_dim; in_proj_bias [3E]; out_proj; bias_k, bias_v [1, 1, E]), the
    initialisation (same order of random draws: the same seed gives the same parameters), the state_dict
    keys and `forward`'s signature and semantics are torch's; a state_dict loads either way, strictly.
    `backend` (keyword only) picks the kernel's backend, as every fastcore_ai op.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)
      query (L, N, E), or (N, L, E) with batch_first, or unbatched (L, E); key (S, N, kdim) / value
      (S, N, vdim) in the same layout. Masks as torch's: key_padding_mask (N, S) or (S), bool True = ignore
      or additive float; attn_mask (L, S) or (N·num_heads, L, S), bool True = NOT allowed (the opposite of
      SDPA's) or additive float. is_causal is torch's hint that attn_mask is causal: it needs attn_mask, and
      replaces it by the kernel's causal masking (top-left aligned) when key_padding_mask is None and
      need_weights is False; otherwise attn_mask is applied as given.

    Only need_weights=False (eval mode, or dropout == 0) runs the fused kernel; need_weights=True forms the
    probabilities explicitly to return them, and so does training with dropout > 0 (the kernel has no
    dropout: dropout is applied to the probabilities as torch does, not with torch's random bits). A query
    whose keys are all masked outputs out_proj.bias with zero weights (torch gives NaN).
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        embed_dim = _positive_int("embed_dim", embed_dim)
        num_heads = _positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"{_NAME}: embed_dim = {embed_dim} must be divisible by num_heads = {num_heads}")
        head_dim = embed_dim // num_heads
        if head_dim > ops.MAX_HEAD_DIM:
            raise ValueError(
                f"{_NAME}: the head size embed_dim // num_heads = {head_dim} must be <= {ops.MAX_HEAD_DIM} "
                f"(the fused kernel's limit); use more heads"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"{_NAME}: dropout must be a float in [0, 1], got {type(dropout).__name__} {dropout!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{_NAME}: dropout must be a probability in [0, 1], got {dropout}")
        if not isinstance(backend, str):
            raise TypeError(f"{_NAME}: backend must be a str, got {type(backend).__name__} {backend!r}")
        bias, add_bias_kv = _flag("bias", bias), _flag("add_bias_kv", add_bias_kv)
        add_zero_attn, batch_first = _flag("add_zero_attn", add_zero_attn), _flag("batch_first", batch_first)
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else _positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _positive_int("vdim", vdim)
        # torch's name and meaning (packed in_proj_weight); torch.nn.TransformerEncoder reads it
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.head_dim = head_dim
        self.backend = backend

        # Parameters in torch's registration order (state_dict and parameters() order, and the order of
        # random draws at initialisation: out_proj's own Linear init first, then _reset_parameters).
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        self.register_forward_pre_hook(_leave_torch_fast_path)

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal bias_k / bias_v."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, backend: str = "auto") -> "MultiheadAttention":
        """Ours for a torch.nn.MultiheadAttention, sharing its Parameter objects (so the weights, device,
        dtype, requires_grad flags and an optimizer's references are kept) and its hyper-parameters and
        training mode. Raises for what it cannot serve (a subclass, hooks, extra state, head size > 256)."""
        _check_servable(module, "module", _NAME + ".from_torch")
        weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
        new = cls(
            module.embed_dim,
            module.num_heads,
            dropout=module.dropout,
            bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
            device="meta",  # no memory and no random draws: every parameter is replaced by module's below
            dtype=weight.dtype,
            backend=backend,
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            if getattr(module, name) is not None:
                setattr(new, name, getattr(module, name))
        new.out_proj = module.out_proj
        if module.bias_k is not None:
            new.bias_k, new.bias_v = module.bias_k, module.bias_v
        new.training = module.training
        return new

    # ---- forward ----------------------------------------------------------------------------------------

    def _check_inputs(self, query, key, value) -> Tuple[bool, int, int, int]:
        """(batched, N, L, S) of valid inputs; raises naming the argument otherwise."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(
                    f"{_NAME}: {name} is a NestedTensor, which only torch's native fast path takes; build "
                    f"torch.nn.TransformerEncoder with enable_nested_tensor=False (replace_attention sets "
                    f"use_nested_tensor = False on the encoders it changes)"
                )
            if not t.is_floating_point():
                raise TypeError(f"{_NAME}: {name} must be a floating-point tensor, got {_shape(t)}")
        if query.dim() not in (2, 3):
            raise ValueError(
                f"{_NAME}: query must be 3-D (batched) or 2-D (unbatched (L, E)), got {query.dim()}-D {_shape(query)}"
            )
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"{_NAME}: {name} must be {query.dim()}-D like query {tuple(query.shape)}, got {_shape(t)}"
                )
            if t.dtype != query.dtype:
                raise TypeError(f"{_NAME}: {name} must have query's dtype {query.dtype}, got {_shape(t)}")
        layout = "(N, L, E)" if batched and self.batch_first else ("(L, N, E)" if batched else "(L, E)")
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                dim = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
                raise ValueError(f"{_NAME}: {name} must be {layout} with {dim} = {width} features, got {_shape(t)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"{_NAME}: key and value must agree in batch and sequence length, got key {_shape(key)} "
                f"and value {_shape(value)}"
            )
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        if query.dtype != weight.dtype and not _autocast_on(query.device.type):
            raise TypeError(
                f"{_NAME}: query must have the parameters' dtype {weight.dtype} (or run under autocast), "
                f"got {_shape(query)}"
            )
        if not batched:
            return False, 1, query.shape[0], key.shape[0]
        batch_dim = 0 if self.batch_first else 1
        N, L, S = query.shape[batch_dim], query.shape[1 - batch_dim], key.shape[1 - batch_dim]
        if key.shape[batch_dim] != N:
            raise ValueError(f"{_NAME}: key must have query's batch size N = {N} in {layout}, got {_shape(key)}")
        return True, N, L, S

    def _check_masks(self, key_padding_mask, attn_mask, batched, N, L, S) -> None:
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is None:
                continue
            if not isinstance(m, Tensor):
                raise TypeError(f"{_NAME}: {name} must be a torch.Tensor or None, got {type(m).__name__}")
            if m.dtype != torch.bool and not m.is_floating_point():
                raise TypeError(
                    f"{_NAME}: {name} must be bool (True = not allowed) or an additive float mask, got {_shape(m)}"
                )
        if key_padding_mask is not None:
            want = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(
                    f"{_NAME}: key_padding_mask must have shape {'(N, S)' if batched else '(S)'} = {want}, "
                    f"got {_shape(key_padding_mask)}"
                )
        if attn_mask is not None:
            heads = N * self.num_heads
            if tuple(attn_mask.shape) not in ((L, S), (heads, L, S)):
                rows = "N·num_heads" if batched else "num_heads"
                raise ValueError(
                    f"{_NAME}: attn_mask must have shape (L, S) = {(L, S)} or ({rows}, L, S) = "
                    f"{(heads, L, S)}, got {_shape(attn_mask)}"
                )

    def _split_heads(self, x: Tensor, seq_first: bool) -> Tensor:
        """(N, L, E) or (L, N, E) -> (N, H, L, D), a view (the kernel takes any strides)."""
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        return x.permute(1, 2, 0, 3) if seq_first else x.transpose(1, 2)

    def _project(self, query, key, value, seq_first):
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim and key is query and value is query:  # self-attention: one GEMM
            q, k, v = nn.functional.linear(query, w, b).chunk(3, dim=-1)
        elif self._qkv_same_embed_dim and key is value:  # encoder-decoder attention: q, then k and v together
            q = nn.functional.linear(query, w[:E], None if b is None else b[:E])
            k, v = nn.functional.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1)
        else:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            if self._qkv_same_embed_dim:
                wq, wk, wv = w.chunk(3)
            else:
                wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            q = nn.functional.linear(query, wq, bq)
            k = nn.functional.linear(key, wk, bk)
            v = nn.functional.linear(value, wv, bv)
        return tuple(self._split_heads(t, seq_first) for t in (q, k, v))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        batched, N, L, S = self._check_inputs(query, key, value)
        self._check_masks(key_padding_mask, attn_mask, batched, N, L, S)
        if is_causal and attn_mask is None:
            raise ValueError(
                f"{_NAME}: is_causal=True needs attn_mask (torch's rule: is_causal is a hint that attn_mask is "
                f"the causal mask); pass nn.Transformer.generate_square_subsequent_mask(L) as attn_mask"
            )
        seq_first = batched and not self.batch_first
        if not batched:  # run as a batch of one, (1, L, E) batch-first
            query, key, value = _unsqueeze_keeping_identity(query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        q, k, v = self._project(query, key, value, seq_first)  # (N, H, L or S, D)

        # torch's is_causal rule: the hint replaces attn_mask only without key padding and weights
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        # masks in canonical form: `blocked` bool (True = not allowed) broadcastable to (N, H, L, S'),
        # `additive` float likewise, `ignored` bool (N, S') key padding
        blocked = additive = ignored = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(N, self.num_heads, L, S)
            if attn_mask.dtype == torch.bool:
                blocked = attn_mask
            else:
                additive = attn_mask.to(q.dtype)
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                ignored = key_padding_mask
            else:
                padding = key_padding_mask.to(q.dtype).view(N, 1, 1, S)
                additive = padding if additive is None else additive + padding

        # bias_k / bias_v: one more key and value per sequence; add_zero_attn: a zero key and value per head
        extra = 0
        if self.bias_k is not None:
            k_bias, v_bias = (
                b.view(1, self.num_heads, 1, self.head_dim).expand(N, -1, -1, -1) for b in (self.bias_k, self.bias_v)
            )
            k = torch.cat([k, k_bias.to(k.dtype)], dim=2)
            v = torch.cat([v, v_bias.to(v.dtype)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, self.num_heads, 1, self.head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(N, self.num_heads, 1, self.head_dim)], dim=2)
            extra += 1
        blocked, additive, ignored = (_pad_keys(m, extra) for m in (blocked, additive, ignored))

        dropout_active = self.training and self.dropout > 0.0
        if need_weights or dropout_active:
            if dropout_active and not need_weights:
                _warn_once(
                    "dropout",
                    f"{_NAME}: dropout = {self.dropout} in training mode runs the explicit attention path "
                    f"(materialised probabilities): the fused kernel has no dropout. Use dropout=0.0 (or eval "
                    f"mode) to run the fused kernel.",
                )
            out, weights = self._explicit_attention(q, k, v, blocked, additive, ignored, causal, dropout_active)
            weights = weights if need_weights else None
        else:
            out, weights = self._fused_attention(q, k, v, blocked, additive, ignored, causal), None

        # (N, H, L, D) -> the input's layout, then the output projection
        if seq_first:
            out = out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)
        else:
            out = out.transpose(1, 2).reshape(N, L, self.embed_dim)
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _fused_attention(self, q, k, v, blocked, additive, ignored, causal) -> Tensor:
        if blocked is not None and additive is not None:
            mask = additive.masked_fill(blocked, float("-inf"))
        elif blocked is not None:
            mask = ~blocked  # ops.attention's bool masks are SDPA's: True = attend
        else:
            mask = additive
        return ops.attention(q, k, v, attn_mask=mask, key_padding_mask=ignored, causal=causal, backend=self.backend)

    def _explicit_attention(self, q, k, v, blocked, additive, ignored, causal, dropout_active):
        """softmax(q kᵀ · √(1/D) + mask) (dropout) v with the probabilities returned, (N, H, L, S').
        A row with every key masked gets zero probabilities (and zero gradients), as the fused kernel."""
        scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
        if additive is not None:
            scores = scores + additive
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        if ignored is not None:
            scores = scores.masked_fill(ignored[:, None, None, :], float("-inf"))
        if causal:  # top-left aligned: query i sees keys j <= i
            Lq, Lk = scores.shape[-2:]
            future = torch.ones(Lq, Lk, dtype=torch.bool, device=scores.device).triu_(1)
            scores = scores.masked_fill(future, float("-inf"))
        masked = additive is not None or blocked is not None or ignored is not None
        if masked:
            # softmax of an all −inf row is NaN (and so is its gradient): give it zeros instead
            dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
            scores = scores.masked_fill(dead, 0.0)
        weights = torch.softmax(scores, dim=-1)
        if masked:
            weights = weights.masked_fill(dead, 0.0)
        if dropout_active:
            weights = nn.functional.dropout(weights, p=self.dropout, training=True)
        return torch.matmul(weights, v), weights

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if not self._qkv_same_embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        if self.bias_k is not None:
            parts.append("add_bias_kv=True")
        if self.add_zero_attn:
            parts.append("add_zero_attn=True")
        parts.append(f"batch_first={self.batch_first}, backend={self.backend!r}")
        return ", ".join(parts)


# ---- replace_attention ------------------------------------------------------------------------------------


def _expected_state_keys(module: nn.MultiheadAttention) -> List[str]:
    keys = ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if module.in_proj_bias is not None:
        keys.append("in_proj_bias")
    keys.append("out_proj.weight")
    if module.out_proj.bias is not None:
        keys.append("out_proj.bias")
    if module.bias_k is not None:
        keys += ["bias_k", "bias_v"]
    return keys


def _check_servable(module, where: str, fn: str) -> None:
    """Raise for a torch.nn.MultiheadAttention that MultiheadAttention cannot stand in for."""
    if type(module) is not nn.MultiheadAttention:
        raise TypeError(
            f"{fn}: {where} is {type(module).__module__}.{type(module).__qualname__}, not exactly "
            f"torch.nn.MultiheadAttention (a subclass may compute something else); replace it yourself"
        )
    if any(
        getattr(module, hooks, None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    ):
        raise ValueError(
            f"{fn}: {where} has hooks registered on it, which would be lost; remove them, swap, and "
            f"register them on the new module"
        )
    if module.embed_dim // module.num_heads > ops.MAX_HEAD_DIM:
        raise ValueError(
            f"{fn}: {where} has head size embed_dim // num_heads = {module.embed_dim // module.num_heads} > "
            f"{ops.MAX_HEAD_DIM}, the fused kernel's limit"
        )
    if (module.bias_k is None) != (module.bias_v is None):
        raise ValueError(f"{fn}: {where} has only one of bias_k and bias_v set; torch needs both or neither")
    got = list(module.state_dict().keys())
    want = _expected_state_keys(module)
    if sorted(got) != sorted(want) or list(module.children()) != [module.out_proj]:
        raise ValueError(
            f"{fn}: {where} holds state beyond torch.nn.MultiheadAttention's ({sorted(set(got) ^ set(want))} "
            f"differ from its parameters {want}), which would be lost"
        )
    params = list(module.parameters())
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise ValueError(
            f"{fn}: {where} has parameters of mixed dtypes or devices "
            f"{sorted({f'{p.dtype} on {p.device}' for p in params})}; move it to one first"
        )


def replace_attention(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap every torch.nn.MultiheadAttention in `model` for fastcore_ai.nn.MultiheadAttention, in place.

    Each new module shares the old one's Parameter objects (weights, device, dtype, requires_grad and an
    optimizer's references stay valid) and keeps its hyper-parameters and training mode; a module shared
    by several parents stays shared. Every module is checked before any is changed, so a configuration
    that cannot be served (a subclass of torch.nn.MultiheadAttention, hooks on it, extra state, head size
    > 256, mixed parameter dtypes) raises and leaves the model as it was.

    torch.nn.TransformerEncoderLayer's inference fast path bypasses self_attn.forward; the new modules carry
    a no-op forward pre-hook that turns it off, and every torch.nn.TransformerEncoder whose layers now hold
    ours gets use_nested_tensor = False (its nested-tensor conversion would feed the attention a
    NestedTensor). So in eval mode the outputs at padded positions (src_key_padding_mask True) are computed
    like every other position instead of being zero-filled by the nested path; the rest is unchanged.

    Returns `model` (or the new module when `model` itself is a torch.nn.MultiheadAttention).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_REPLACE}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"{_REPLACE}: backend must be a str, got {type(backend).__name__} {backend!r}")
    if isinstance(model, nn.MultiheadAttention):
        return MultiheadAttention.from_torch(model, backend=backend)
    names: Dict[int, str] = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, nn.MultiheadAttention)
    ]
    for _, _, child in targets:  # check all before changing any
        _check_servable(child, f"model.{names[id(child)]}", _REPLACE)
    swapped: Dict[int, MultiheadAttention] = {}
    for parent, child_name, child in targets:
        if id(child) not in swapped:
            swapped[id(child)] = MultiheadAttention.from_torch(child, backend=backend)
        setattr(parent, child_name, swapped[id(child)])
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(m, MultiheadAttention) for m in module.layers.modules()
        ):
            module.use_nested_tensor = False
    return model

"""Hugging Face `transformers` (>= 5) integration: an experts and an attention implementation, both named
"fastcore_ai".

    import fastcore_ai.integrations.transformers as fc_hf
    fc_hf.register()
    model.set_experts_implementation("fastcore_ai")   # or from_pretrained(..., experts_implementation="fastcore_ai")
    model.set_attn_implementation("fastcore_ai")      # or from_config / from_pretrained(..., attn_implementation=...)

Experts: the module's own weights are used in place (MixtralExperts' layout: gate_up_proj [E, 2I, H],
down_proj [E, H, I]) by `ops.moe_experts`, deterministic (no index_add_ atomics, unlike HF's eager path on GPU).

Attention: `ops.attention` on HF's [B, H, L, D] query and [B, H_kv, L, D] key/value as the model hands them
over — grouped-query attention without repeating K/V, the boolean mask HF builds for "sdpa" (the same
mask interface is registered for "fastcore_ai": True = attend, padding, causal, sliding-window and packed
patterns all inside it), or SDPA's `is_causal` when HF skips the mask. What the kernel cannot serve raises
(dropout in training, output_attentions, head_mask, softcap, attention sinks); it never falls back to
another implementation. docs/mux.md lists the rules.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops

IMPLEMENTATION_NAME = "fastcore_ai"


def _activation_name(act_fn) -> str:
    from transformers.activations import GELUActivation, SiLUActivation

    if isinstance(act_fn, (torch.nn.SiLU, SiLUActivation)):
        return "silu"
    if isinstance(act_fn, torch.nn.ReLU):
        return "relu"
    if isinstance(act_fn, GELUActivation) or (isinstance(act_fn, torch.nn.GELU) and act_fn.approximate == "none"):
        return "gelu"
    raise ValueError(
        f"fastcore_ai experts implementation: activation {type(act_fn).__name__} is not supported "
        "(silu, exact gelu and relu are); use another experts implementation for this model"
    )


def experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts forward HF calls: hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]."""
    unsupported = [
        name
        for name, bad in (
            ("bias", getattr(self, "has_bias", False)),
            ("transposed weights", getattr(self, "is_transposed", False)),
            ("interleaved gate/up", not getattr(self, "is_concatenated", True)),
            ("post-expert norm", getattr(self, "has_post_expert_norm", False)),
        )
        if bad
    ]
    if unsupported:
        raise ValueError(
            "fastcore_ai experts implementation: this experts module uses "
            + ", ".join(unsupported)
            + ", which fastcore_ai.ops.moe_grouped_mlp does not support yet"
        )
    gated = getattr(self, "has_gate", True)
    w_gate_up = self.gate_up_proj if gated else self.up_proj
    out = ops.moe_experts(
        hidden_states,
        top_k_index.to(torch.int64),
        top_k_weights,
        w_gate_up,
        self.down_proj,
        activation=_activation_name(self.act_fn),
        gated=gated,
    )
    return out.to(hidden_states.dtype)


def _attention_error(message: str) -> ValueError:
    return ValueError(f"fastcore_ai attention implementation: {message}")


# kwargs HF passes to an attention implementation that change the result and that ops.attention does not
# compute; each raises rather than being ignored
_UNSUPPORTED_ATTENTION_KWARGS = {
    "softcap": "logit soft-capping (Gemma 2) is not supported; use attn_implementation='eager' for this model",
    "s_aux": "attention sinks (gpt-oss) are not supported; use attn_implementation='eager' for this model",
    "head_mask": "head_mask is not supported (it scales probabilities per head); use attn_implementation='eager'",
}


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[Tensor] = None,
    **kwargs,
) -> tuple:
    """The attention forward HF calls: query [B, H, Lq, D], key/value [B, H_kv, Lk, D], attention_mask
    broadcastable to [B, H, Lq, Lk] (bool True = attend, or additive float) or None -> ([B, Lq, H, D], None).

    The same decisions as HF's sdpa implementation, so results agree with it: `is_causal` (the module's
    flag unless passed) applies only when HF skipped the mask and Lq > 1 — top-left aligned, which for
    Lq = Lk and for one decode query (no mask: every cached key) is what causal decoding needs; a
    `position_bias` (T5-style relative bias) is added to the scores, masked positions getting the dtype's
    minimum as in sdpa."""
    for name, why in _UNSUPPORTED_ATTENTION_KWARGS.items():
        if kwargs.get(name) is not None:
            raise _attention_error(f"{name} was passed: {why}")
    if kwargs.get("output_attentions"):
        raise _attention_error(
            "output_attentions=True needs the attention probabilities, which the fused kernel never forms; "
            "use attn_implementation='eager' to get them"
        )
    if dropout:
        raise _attention_error(
            f"attention dropout p={dropout} in training is not implemented by the fused kernel; set the "
            "model's attention dropout to 0 (e.g. config.attention_dropout / attention_probs_dropout_prob), "
            "call model.eval(), or use attn_implementation='sdpa' for training with attention dropout"
        )
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, causal, q_length, key)
        causal = False
    out = ops.attention(query, key, value, attn_mask=attention_mask, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _position_bias_mask(position_bias: Tensor, attention_mask: Optional[Tensor], causal: bool, q_length: int, key):
    """An additive mask = the bias where attending, the dtype's minimum elsewhere (sdpa's rule)."""
    fill = max(torch.finfo(key.dtype).min, torch.finfo(position_bias.dtype).min)
    if attention_mask is None:
        if not causal:
            return position_bias
        k_length = key.shape[2]
        allowed = torch.ones(q_length, k_length, dtype=torch.bool, device=key.device).tril()
        return torch.where(allowed, position_bias, fill)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, fill)
    return position_bias + attention_mask


def register() -> None:
    """Register the "fastcore_ai" experts and attention implementations with transformers (idempotent).

    The attention implementation also gets HF's sdpa mask builder under its name: a boolean mask, True =
    attend (ops.attention's convention), or None where SDPA's `is_causal` suffices."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, experts_forward)
    ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION_NAME, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION_NAME, sdpa_mask)

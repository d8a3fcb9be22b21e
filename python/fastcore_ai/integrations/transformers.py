"""Hugging Face `transformers` (>= 5) integration: an experts implementation named "fastcore_ai".

    import fastcore_ai.integrations.transformers as fc_hf
    fc_hf.register()
    model.set_experts_implementation("fastcore_ai")   # or from_pretrained(..., experts_implementation="fastcore_ai")

The experts module's own weights are used in place (MixtralExperts' layout: gate_up_proj [E, 2I, H],
down_proj [E, H, I]); the computation is moe_dispatch -> moe_grouped_mlp -> moe_combine, deterministic
(no index_add_ atomics, unlike HF's eager path on GPU).
"""

from __future__ import annotations

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


def register() -> None:
    """Register the "fastcore_ai" experts implementation with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, experts_forward)

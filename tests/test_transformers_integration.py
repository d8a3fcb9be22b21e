"""The one-line Hugging Face switch: a tiny randomly initialised MixtralForCausalLM gives the same
logits and gradients with experts_implementation="fastcore_ai" as with "eager"."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import fastcore_ai.integrations.transformers as fastcore_hf
from _helpers import relative_error


@pytest.fixture(scope="module")
def tiny_mixtral():
    fastcore_hf.register()
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config)


def run(model, implementation, ids):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_logits_and_gradients_match_eager(tiny_mixtral):
    ids = torch.randint(0, 97, (2, 13))
    eager_logits, eager_grads = run(tiny_mixtral, "eager", ids)
    ours_logits, ours_grads = run(tiny_mixtral, "fastcore_ai", ids)
    assert tiny_mixtral.config._experts_implementation == "fastcore_ai"
    assert relative_error(ours_logits, eager_logits) < 1e-5
    assert eager_grads.keys() == ours_grads.keys()
    for name in eager_grads:
        assert relative_error(ours_grads[name], eager_grads[name]) < 1e-4, name


def test_unsupported_activation_is_a_clear_error(tiny_mixtral):
    experts = tiny_mixtral.model.layers[0].mlp.experts
    original = experts.act_fn
    experts.act_fn = torch.nn.Tanh()
    try:
        with pytest.raises(ValueError, match="activation Tanh is not supported"):
            fastcore_hf.experts_forward(
                experts, torch.randn(3, 32), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
            )
    finally:
        experts.act_fn = original

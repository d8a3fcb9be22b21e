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
    """Logits, parameter gradients and each layer's experts output (captured by forward hooks: the experts'
    share of the logits is small next to the residual stream, so the logits alone would hide a wrong
    expert output)."""
    model.set_experts_implementation(implementation)
    model.zero_grad()
    expert_outputs = []
    hooks = [
        layer.mlp.experts.register_forward_hook(lambda module, args, out: expert_outputs.append(out.detach()))
        for layer in model.model.layers
    ]
    try:
        logits = model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    logits.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, expert_outputs


def test_logits_and_gradients_match_eager(tiny_mixtral, monkeypatch):
    calls = []
    kernel = fastcore_hf.ops.moe_experts

    def counting_kernel(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fastcore_hf.ops, "moe_experts", counting_kernel)
    ids = torch.randint(0, 97, (2, 13))
    eager_logits, eager_grads, eager_experts = run(tiny_mixtral, "eager", ids)
    assert not calls
    ours_logits, ours_grads, ours_experts = run(tiny_mixtral, "fastcore_ai", ids)
    assert tiny_mixtral.config._experts_implementation == "fastcore_ai"
    assert len(calls) == len(tiny_mixtral.model.layers)  # our kernel ran once per layer
    assert len(ours_experts) == len(eager_experts) == len(tiny_mixtral.model.layers)
    for ours, eager in zip(ours_experts, eager_experts):
        assert float(eager.norm()) > 0
        assert relative_error(ours, eager) < 1e-5
    assert relative_error(ours_logits, eager_logits) < 1e-6
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

"""Whole Hugging Face models with attn_implementation "fastcore_ai" vs "sdpa" vs "eager" on the same weights
(`bench --family hf_attention`; needs transformers >= 5).

Each case also times the model with a "no-attention" implementation (returns zeros, computes nothing): the
time of everything but attention. `sdpa / no-attention` is then the largest end-to-end speedup any
attention kernel could give that model (Amdahl's bound), stated next to what ours gives.
"""

from __future__ import annotations

import torch

NO_ATTENTION = "fastcore_bench_no_attention"
IMPLEMENTATIONS = {"fastcore": "fastcore_ai", "hf-sdpa": "sdpa", "hf-eager": "eager", "no-attention": NO_ATTENTION}


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    batch, heads, length, head_dim = query.shape
    return query.new_zeros(batch, length, heads, head_dim), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..integrations import transformers as fastcore_hf

    fastcore_hf.register()
    ALL_ATTENTION_FUNCTIONS.register(NO_ATTENTION, _no_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NO_ATTENTION, sdpa_mask)


def _padded_batch(batch: int, length: int, vocab: int, padded_fraction: float, side: str):
    """Token ids and an attention mask with `padded_fraction` of all positions padding, spread over the rows
    (row r keeps a length falling linearly from `length`), on the right or left."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded_fraction > 0 and batch > 1:
        # lengths falling linearly from `length`: mean padding = padded_fraction
        drop = [round(2 * padded_fraction * length * row / (batch - 1)) for row in range(batch)]
        for row, pad in enumerate(drop):
            pad = min(pad, length - 1)
            if pad:
                if side == "right":
                    mask[row, length - pad :] = 0
                else:
                    mask[row, :pad] = 0
    return ids, mask


def _bert(quick: bool):
    from transformers import BertConfig, BertModel

    layers, hidden, heads = (2, 128, 4) if quick else (12, 768, 12)
    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).eval(), config.vocab_size


def _llama(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    # a Llama-shaped decoder: GQA 32/8 heads of 64, 8 layers, TinyLlama's MLP; a small vocabulary keeps the
    # lm_head from dominating the timing
    shapes = (
        dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if quick
        else dict(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8
        )
    )
    config = LlamaConfig(vocab_size=8192, max_position_embeddings=2048, **shapes)
    return LlamaForCausalLM(config).eval(), config.vocab_size


def hf_attention_cases(device: str, quick: bool = False) -> list:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("  [hf_attention] transformers >= 5 is not installed (pip install fastcore_ai[bench]); skipped")
        return []
    from .harness import Case

    _register()
    cases = []

    def forward_case(label, build, batch, length, padded_fraction, side):
        def setup():
            torch.manual_seed(0)
            model, vocab = build(quick)
            ids, mask = _padded_batch(batch, length, vocab, padded_fraction, side)
            return model.to(device), ids.to(device), mask.to(device)

        def provider(model, ids, mask, implementation):
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state

        def error(output, inputs):
            model, ids, mask = inputs
            if output is None or float(output.abs().max()) == 0:
                return float("nan")
            expected = provider(model, ids, mask, "eager")  # float32 eager on the same weights
            valid = mask.bool()
            return float((output[valid].double() - expected[valid].double()).norm() / expected[valid].norm())

        providers = {
            name: (lambda *inputs, impl=impl: provider(*inputs, impl))
            for name, impl in IMPLEMENTATIONS.items()
            if name != "no-attention"
        }

        def no_attention(*inputs):
            provider(*inputs, NO_ATTENTION)
            return None  # its output means nothing (attention replaced by zeros): kept out of the error column

        providers["no-attention"] = no_attention
        shape = f"{label} B={batch} L={length} {int(padded_fraction * 100)}% {side}-padded forward float32"
        cases.append(Case("hf_attention", shape, setup, providers, error, peer="hf-sdpa"))

    def decode_case(label, build, batch, prompt, new_tokens):
        def setup():
            torch.manual_seed(0)
            model, vocab = build(quick)
            ids, mask = _padded_batch(batch, prompt, vocab, 0.0, "left")
            return model.to(device), ids.to(device), mask.to(device)

        def provider(model, ids, mask, implementation):
            model.set_attn_implementation(implementation)
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

        def error(output, inputs):
            # greedy tokens: the fraction of generated tokens that differ from eager's (0 = identical)
            if output is None:
                return float("nan")
            expected = provider(*inputs, "eager")
            return float((output != expected).double().mean())

        providers = {
            name: (lambda *inputs, impl=impl: provider(*inputs, impl))
            for name, impl in IMPLEMENTATIONS.items()
            if name != "no-attention"  # zeros change the generated tokens, so the bound is not this run's work
        }
        shape = f"{label} B={batch} prompt={prompt} generate {new_tokens} tokens (KV cache) float32"
        cases.append(Case("hf_attention", shape, setup, providers, error, peer="hf-sdpa"))

    for shape in forward_shapes(quick):
        forward_case(*shape)
    if quick:
        decode_case("llama-tiny", _llama, 1, 8, 4)
    else:
        decode_case("llama-8L-2048 gqa32/8", _llama, 2, 64, 64)
    return cases


def forward_shapes(quick: bool = False) -> list:
    """The whole-model forwards measured: (label, build, batch, length, padded fraction, padding side);
    build(quick) -> (model, vocab). benchmarks/hf_attention_share.py times attention inside the same ones."""
    if quick:
        return [("bert-tiny", _bert, 4, 32, 0.3, "right"), ("llama-tiny", _llama, 2, 64, 0.0, "left")]
    return [
        ("bert-base", _bert, 16, 128, 0.3, "right"),
        ("llama-8L-2048 gqa32/8", _llama, 2, 512, 0.0, "left"),
        ("llama-8L-2048 gqa32/8", _llama, 2, 512, 0.3, "left"),
    ]


FAMILIES = {"hf_attention": hf_attention_cases}

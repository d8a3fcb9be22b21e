"""The Hugging Face attention door: attn_implementation="fastcore_ai" in tiny randomly initialised BERT,
Llama, Qwen2 and Mistral models gives sdpa's and eager's logits (bound in docs/mux.md), gradients and greedy
tokens, with right- and left-padded batches, grouped-query attention and a binding sliding window — and
the kernel really runs (calls are counted), once per layer per forward."""

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import fastcore_ai.integrations.transformers as fastcore_hf
from _helpers import relative_error

VOCAB = 101
LOGITS_BOUND = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # relative error vs sdpa, docs/mux.md
GRAD_BOUND = 1e-4

DECODER_SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,  # grouped-query attention, 4 query heads per kv head
    max_position_embeddings=128,
)


def _bert():
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**DECODER_SHAPES))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**DECODER_SHAPES))


def _mistral():
    # a window shorter than the sequences, so the sliding-window pattern is in the mask HF builds
    return MistralForCausalLM(MistralConfig(**DECODER_SHAPES, sliding_window=6))


MODELS = {"bert": _bert, "llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


@pytest.fixture(scope="module", autouse=True)
def registered():
    fastcore_hf.register()


@pytest.fixture(scope="module")
def models():
    built = {}
    for index, (name, make) in enumerate(MODELS.items()):
        torch.manual_seed(index)
        built[name] = make()
    return built


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    kernel = fastcore_hf.ops.attention

    def counting_attention(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fastcore_hf.ops, "attention", counting_attention)
    return calls


def _batch(padding: str, batch: int = 3, length: int = 17):
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    pads = [0, length // 3, 2 * length // 3][:batch]  # row 0 unpadded, the others by a third and two thirds
    for row, pad in enumerate(pads):
        if pad and padding == "right":
            mask[row, length - pad :] = 0
        elif pad and padding == "left":
            mask[row, :pad] = 0
    return ids, mask


def _output(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_sdpa_and_eager(models, kernel_calls, name, padding):
    if name == "bert" and padding == "left":
        padding = "right"  # an encoder has no left padding convention; right padding is its case
    model = models[name].eval()
    ids, mask = _batch(padding)
    outputs = {}
    for implementation in ("eager", "sdpa", "fastcore_ai"):
        model.set_attn_implementation(implementation)
        calls_before = len(kernel_calls)
        with torch.no_grad():
            outputs[implementation] = _output(model, ids, mask)
        ran = len(kernel_calls) - calls_before
        assert ran == (model.config.num_hidden_layers if implementation == "fastcore_ai" else 0)
    valid = mask.bool()  # padded positions' outputs are not defined the same way by the implementations
    for reference in ("sdpa", "eager"):
        expected = outputs[reference][valid]
        assert float(expected.norm()) > 0
        assert relative_error(outputs["fastcore_ai"][valid], expected) < LOGITS_BOUND[torch.float32], reference


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_sdpa_in_training(models, kernel_calls, name):
    model = models[name].train()  # no dropout is configured in these models
    ids, mask = _batch("right")
    valid = mask.bool()
    grads, outputs = {}, {}
    # a fixed random projection: BERT's output is layer-normalised, so its mean square is ~1 whatever the
    # weights and its gradient would be rounding noise
    projection = None
    for implementation in ("sdpa", "fastcore_ai"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        out = _output(model, ids, mask)
        if projection is None:
            projection = torch.randn(out[valid].shape, generator=torch.Generator().manual_seed(5))
        (out[valid] * projection).sum().backward()
        outputs[implementation] = out.detach()[valid]
        grads[implementation] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(kernel_calls) == model.config.num_hidden_layers
    assert relative_error(outputs["fastcore_ai"], outputs["sdpa"]) < LOGITS_BOUND[torch.float32]
    assert grads["sdpa"].keys() == grads["fastcore_ai"].keys()
    # a key projection's bias has an exactly zero gradient (softmax ignores a score shift shared by all
    # keys): such a parameter is held to an absolute floor, a millionth of the whole gradient's norm
    floor = 1e-6 * torch.stack([g.norm() for g in grads["sdpa"].values()]).norm()
    for parameter, expected in grads["sdpa"].items():
        difference = (grads["fastcore_ai"][parameter] - expected).norm()
        assert difference <= GRAD_BOUND * expected.norm() + floor, parameter
    model.eval()


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_generate_with_kv_cache_gives_the_same_greedy_tokens(models, kernel_calls, name, padding):
    model = models[name].eval()
    ids, mask = _batch(padding, batch=2, length=9)
    tokens = {}
    for implementation in ("sdpa", "eager", "fastcore_ai"):
        model.set_attn_implementation(implementation)
        tokens[implementation] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert tokens["fastcore_ai"].shape == (2, 9 + 12)
    assert torch.equal(tokens["fastcore_ai"], tokens["sdpa"])
    assert torch.equal(tokens["fastcore_ai"], tokens["eager"])
    # the prefill and every decode step ran our kernel; decode steps see one query row
    assert len(kernel_calls) == model.config.num_hidden_layers * 12
    assert sum(shape[2] == 1 for shape in kernel_calls) == model.config.num_hidden_layers * 11


def test_bfloat16_logits_within_the_documented_bound(kernel_calls):
    torch.manual_seed(3)
    model = _llama().to(torch.bfloat16).eval()
    ids, mask = _batch("left")
    outputs = {}
    for implementation in ("sdpa", "fastcore_ai"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = _output(model, ids, mask)
    assert outputs["fastcore_ai"].dtype == torch.bfloat16
    valid = mask.bool()
    assert relative_error(outputs["fastcore_ai"][valid], outputs["sdpa"][valid]) < LOGITS_BOUND[torch.bfloat16]
    assert len(kernel_calls) == model.config.num_hidden_layers


def test_from_config_selects_the_implementation(kernel_calls):
    config = LlamaConfig(**DECODER_SHAPES)
    model = AutoModel.from_config(config, attn_implementation="fastcore_ai")
    assert model.config._attn_implementation == "fastcore_ai"
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (1, 5)))
    assert len(kernel_calls) == config.num_hidden_layers


def test_attention_dropout_in_training_is_a_clear_error():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )  # attention_probs_dropout_prob defaults to 0.1
    model = BertModel(config)
    model.set_attn_implementation("fastcore_ai")
    model.train()
    with pytest.raises(ValueError, match=r"fastcore_ai attention implementation: attention dropout p=0\.1"):
        model(input_ids=torch.randint(0, VOCAB, (2, 5)))
    model.eval()  # inference turns dropout off: the same model then runs
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, VOCAB, (2, 5))).last_hidden_state.shape == (2, 5, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_attentions": True}, "output_attentions=True needs the attention probabilities"),
        ({"softcap": 30.0}, "softcap was passed"),
        ({"s_aux": torch.zeros(4)}, "s_aux was passed"),
        ({"head_mask": torch.ones(4)}, "head_mask was passed"),
    ],
)
def test_unsupported_features_raise_naming_them(kwargs, message):
    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=message):
        fastcore_hf.attention_forward(torch.nn.Module(), q, kv, kv, None, **kwargs)


def _sdpa(q, k, v, mask, scale, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_direct_call_matches_sdpa_with_scaling_masks_and_gqa(mask_kind, causal):
    """The function HF calls, on its own: a scaling other than 1/sqrt(D), bool and additive masks broadcast
    over heads, the module's causal flag (used only when no mask is given, as in sdpa)."""
    torch.manual_seed(1)
    B, H, H_kv, L, D = 2, 6, 3, 11, 16
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H_kv, L, D), torch.randn(B, H_kv, L, D)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, L, L) > 0.3
        mask[..., 0] = True  # no fully masked row (sdpa gives NaN there, we give 0: docs/mux.md)
    elif mask_kind == "additive":
        mask = torch.randn(B, 1, L, L)
    module = torch.nn.Module()
    module.is_causal = causal
    out, weights = fastcore_hf.attention_forward(module, q, k, v, mask, scaling=0.37)
    assert weights is None
    expected = _sdpa(q, k, v, mask, 0.37, causal and mask is None).transpose(1, 2)
    assert out.shape == (B, L, H, D) and out.is_contiguous()
    assert relative_error(out, expected) < 1e-5


def test_position_bias_is_added_as_sdpa_does():
    torch.manual_seed(2)
    B, H, L, D = 2, 4, 7, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    bias = torch.randn(1, H, L, L)
    mask = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    out, _ = fastcore_hf.attention_forward(torch.nn.Module(), q, k, v, mask, position_bias=bias)
    expected = _sdpa(q, k, v, torch.where(mask, bias, torch.finfo(q.dtype).min), None, False).transpose(1, 2)
    assert relative_error(out, expected) < 1e-5
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = fastcore_hf.attention_forward(module, q, k, v, None, position_bias=bias)
    assert relative_error(out, expected) < 1e-5  # the causal pattern joins the bias when no mask is given


def test_mistral_sliding_window_binds_and_is_followed(models, kernel_calls):
    """The window (6) is shorter than the sequence (17), so HF puts the sliding pattern into the mask it
    hands over: the logits follow sdpa's with the window, and differ from the same weights without it."""
    model = models["mistral"].eval()
    ids, mask = _batch("left")
    outputs = {}
    for implementation in ("sdpa", "fastcore_ai"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = _output(model, ids, mask)
    window = model.config.sliding_window
    try:
        model.config.sliding_window = None
        with torch.no_grad():
            unwindowed = _output(model, ids, mask)
    finally:
        model.config.sliding_window = window
    valid = mask.bool()
    assert relative_error(outputs["fastcore_ai"][valid], outputs["sdpa"][valid]) < LOGITS_BOUND[torch.float32]
    assert relative_error(unwindowed[valid], outputs["sdpa"][valid]) > 1e-3  # the window changed the result

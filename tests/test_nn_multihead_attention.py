"""fastcore_ai.nn.MultiheadAttention against torch.nn.MultiheadAttention (outputs, weights and gradients for
every argument combination), its initialisation and state_dict, the fused kernel actually running (counted
calls), and replace_attention on torch Transformer encoders and decoders (eval fast path included).

Tolerances (float32, relative Frobenius error against torch's module on the same weights and inputs):
outputs and attention weights < 1e-5, gradients (inputs, parameters, float masks) < 1e-4.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastcore_ai
from fastcore_ai import nn as fnn
from fastcore_ai.nn import multihead

E, H, N, L, S = 12, 3, 2, 5, 6
OUT_BOUND, GRAD_BOUND = 1e-5, 1e-4


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_rel(a, b, bound, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: not finite"
    err = rel(a, b)
    assert err < bound, f"{what}: relative error {err:.2e} >= {bound:.0e}"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of fastcore_ai.ops.attention (and records their causal flag)."""
    calls = []
    original = fastcore_ai.ops.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("causal", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(fastcore_ai.ops, "attention", counting)
    return calls


def module_pair(**kwargs):
    """torch's module and ours with the same weights (ours built from the same seed: initialisation equal)."""
    torch.manual_seed(123)
    theirs = nn.MultiheadAttention(E, H, **kwargs)
    torch.manual_seed(123)
    ours = fnn.MultiheadAttention(E, H, **kwargs)  # the default backend, as users build it
    for (name_t, p_t), (name_o, p_o) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert name_t == name_o and torch.equal(p_t, p_o), name_t
    return theirs, ours


def make_inputs(layout, kind, kdim):
    """query, key, value for layout 'seq_first' (L, N, E), 'batch_first' (N, L, E) or 'unbatched' (L, E);
    kind 'self' (one tensor), 'cross' (key is value) or 'separate' (three tensors)."""

    def shape(length, width):
        return {"seq_first": (length, N, width), "batch_first": (N, length, width), "unbatched": (length, width)}[
            layout
        ]

    query = torch.randn(*shape(L, E), requires_grad=True)
    if kind == "self":
        return query, query, query
    key = torch.randn(*shape(S, kdim), requires_grad=True)
    if kind == "cross":
        return query, key, key
    return query, key, torch.randn(*shape(S, kdim), requires_grad=True)


def make_masks(config, layout, Lq, Lk):
    """Masks in torch.nn.MultiheadAttention's conventions, never masking a whole row (key 0 always allowed).
    config: '+'-joined parts of bool2d, float2d, bool3d, float3d, kpm_bool, kpm_float, causal, causal_bool,
    noncausal_hint (is_causal=True with a mask that is not causal: torch's hint rule decides)."""
    batched = layout != "unbatched"
    rows = N * H if batched else H
    kwargs = {}
    for part in config.split("+"):
        if part == "none":
            continue
        if part in ("bool2d", "bool3d"):
            mask = torch.rand((Lq, Lk) if part == "bool2d" else (rows, Lq, Lk)) > 0.6
            mask[..., 0] = False
            kwargs["attn_mask"] = mask
        elif part in ("float2d", "float3d"):
            kwargs["attn_mask"] = torch.randn((Lq, Lk) if part == "float2d" else (rows, Lq, Lk), requires_grad=True)
        elif part in ("kpm_bool", "kpm_float"):
            if part == "kpm_bool":
                kpm = torch.zeros(N, Lk, dtype=torch.bool)
                kpm[-1, -2:] = True
            else:
                kpm = torch.randn(N, Lk, requires_grad=True)
            kwargs["key_padding_mask"] = kpm if batched else kpm[0].detach().requires_grad_(kpm.requires_grad)
        elif part == "causal":  # the float mask torch's Transformer builds, plus the hint
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(max(Lq, Lk))[:Lq, :Lk]
            kwargs["is_causal"] = True
        elif part == "causal_bool":
            kwargs["attn_mask"] = torch.ones(Lq, Lk, dtype=torch.bool).triu(1)  # True = not allowed
            kwargs["is_causal"] = True
        elif part == "noncausal_hint":
            mask = torch.rand(Lq, Lk) > 0.6
            mask[..., 0] = False
            kwargs["attn_mask"], kwargs["is_causal"] = mask, True
        else:
            raise ValueError(part)
    return kwargs


def compare(theirs, ours, inputs, call_kwargs):
    """Forward both modules, compare outputs and weights, backward the same random cotangent and compare
    the gradients of every input, parameter and float mask that requires grad."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning for mixed bool/float masks
        expected, expected_w = theirs(*inputs, **call_kwargs)
    out, weights = ours(*inputs, **call_kwargs)
    assert_rel(out, expected, OUT_BOUND, "attn_output")
    if expected_w is None:
        assert weights is None
    else:
        assert_rel(weights, expected_w, OUT_BOUND, "attn_weights")
    leaves = list(dict.fromkeys(t for t in inputs if t.requires_grad))
    leaves += [m for m in call_kwargs.values() if isinstance(m, torch.Tensor) and m.requires_grad]
    cotangent = torch.randn_like(expected)
    grads_t = torch.autograd.grad(expected, leaves + list(theirs.parameters()), cotangent)
    grads_o = torch.autograd.grad(out, leaves + list(ours.parameters()), cotangent)
    names = [f"input {i}" for i in range(len(leaves))] + [n for n, _ in ours.named_parameters()]
    for name, g_o, g_t in zip(names, grads_o, grads_t):
        assert_rel(g_o, g_t, GRAD_BOUND, f"grad of {name}")


NEED_WEIGHTS = [
    pytest.param({"need_weights": False}, id="fused"),
    pytest.param({"need_weights": True}, id="weights_avg"),
    pytest.param({"need_weights": True, "average_attn_weights": False}, id="weights_per_head"),
]
LAYOUTS = ["seq_first", "batch_first", "unbatched"]
EXTRAS = {"none": {}, "bias_kv": {"add_bias_kv": True}, "zero_attn": {"add_zero_attn": True}}
EXTRAS["both"] = {**EXTRAS["bias_kv"], **EXTRAS["zero_attn"]}


@pytest.mark.parametrize("weights", NEED_WEIGHTS)
@pytest.mark.parametrize("extras", list(EXTRAS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["self", "cross", "separate", "kdim_vdim"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_structure_matches_torch(layout, kind, bias, extras, weights):
    """Every layout × projection kind × bias × bias_kv/zero_attn × need_weights mode, with a bool attn_mask
    and a bool key_padding_mask."""
    kdim = 7 if kind == "kdim_vdim" else E
    dims = {"kdim": 7, "vdim": 7} if kind == "kdim_vdim" else {}
    theirs, ours = module_pair(bias=bias, batch_first=layout == "batch_first", **dims, **EXTRAS[extras])
    inputs = make_inputs(layout, "separate" if kind == "kdim_vdim" else kind, kdim)
    Lk = L if kind == "self" else S
    compare(theirs, ours, inputs, {**make_masks("bool2d+kpm_bool", layout, L, Lk), **weights})


MASKS = [
    "none",
    "bool2d",
    "float2d",
    "bool3d",
    "float3d",
    "kpm_bool",
    "kpm_float",
    "bool2d+kpm_bool",
    "float3d+kpm_bool",
    "float2d+kpm_float",
    "bool3d+kpm_float",
    "causal",
    "causal_bool",
    "causal+kpm_bool",
    "noncausal_hint",
]


@pytest.mark.parametrize("weights", NEED_WEIGHTS)
@pytest.mark.parametrize("extras", ["none", "both"])
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_masks_match_torch(layout, masks, extras, weights):
    """Every mask convention (bool True = not allowed, additive float, 2-D and 3-D attn_mask, bool and float
    key padding, is_causal with its mask and torch's hint rule) in every layout, self-attention."""
    theirs, ours = module_pair(batch_first=layout == "batch_first", **EXTRAS[extras])
    inputs = make_inputs(layout, "self", E)
    compare(theirs, ours, inputs, {**make_masks(masks, layout, L, L), **weights})


@pytest.mark.parametrize("masks", ["none", "bool3d+kpm_float", "causal"])
def test_cross_attention_masks_match_torch(masks):
    theirs, ours = module_pair()
    inputs = make_inputs("seq_first", "cross", E)
    compare(theirs, ours, inputs, {**make_masks(masks, "seq_first", L, S), "need_weights": False})


# ---- the kernel really runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("masks", ["none", "bool2d+kpm_bool", "float3d+kpm_float", "causal", "causal+kpm_bool"])
def test_fused_kernel_runs_when_weights_are_not_needed(kernel_calls, training, masks):
    _, ours = module_pair(batch_first=True, add_bias_kv=True)
    ours.train(training)
    x = torch.randn(N, L, E)
    kwargs = make_masks(masks, "batch_first", L, L)
    ours(x, x, x, need_weights=False, **kwargs)
    # torch's hint rule: is_causal replaces the mask by causal masking only without key padding
    assert kernel_calls == [masks == "causal"]
    ours(x, x, x, need_weights=True, **kwargs)
    assert len(kernel_calls) == 1  # weights needed: the explicit path, no kernel call


def test_dropout_in_training_takes_the_explicit_path_and_warns_once(kernel_calls, monkeypatch):
    monkeypatch.setattr(multihead, "_warned", set())
    _, ours = module_pair(batch_first=True, dropout=0.5)
    x = torch.randn(N, L, E)
    with pytest.warns(UserWarning, match="MultiheadAttention: dropout = 0.5 in training mode"):
        torch.manual_seed(7)
        out, weights = ours(x, x, x, need_weights=False)
    assert weights is None and kernel_calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call does not warn again
        torch.manual_seed(7)
        again, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    torch.manual_seed(7)
    out_weights, dropped = ours(x, x, x, need_weights=True, average_attn_weights=False)
    # the same random draws: need_weights=False ran the same explicit path, dropout on the probabilities
    torch.testing.assert_close(out, out_weights, rtol=0, atol=0)
    ours.eval()
    _, clean = ours(x, x, x, need_weights=True, average_attn_weights=False)
    kept = dropped != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.5)  # inverted dropout of the probabilities
    ours(x, x, x, need_weights=False)  # eval: dropout is off, so the kernel runs
    assert len(kernel_calls) == 1


def test_dropout_zero_in_training_runs_the_kernel(kernel_calls):
    theirs, ours = module_pair(batch_first=True)
    theirs.train(), ours.train()
    x = torch.randn(N, L, E, requires_grad=True)
    compare(theirs, ours, (x, x, x), {"need_weights": False})
    assert len(kernel_calls) == 1


# ---- the documented difference: fully masked rows ---------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_query_gives_out_proj_bias_not_nan(need_weights):
    theirs, ours = module_pair(batch_first=True)
    with torch.no_grad():
        ours.out_proj.bias.normal_()
        theirs.out_proj.bias.copy_(ours.out_proj.bias)
    x = torch.randn(N, L, E, requires_grad=True)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[2] = True  # query 2 may attend no key
    expected, _ = theirs(x, x, x, attn_mask=mask, need_weights=need_weights)
    out, weights = ours(x, x, x, attn_mask=mask, need_weights=need_weights)
    if need_weights:  # torch's explicit path: NaN (its SDPA path depends on the SDPA backend chosen)
        assert torch.isnan(expected[:, 2]).all()
    torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(N, E))
    keep = torch.arange(L) != 2
    torch.testing.assert_close(out[:, keep], expected[:, keep], rtol=1e-4, atol=1e-5)
    if need_weights:
        assert (weights[:, 2] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(ours.in_proj_weight.grad).all()


# ---- parameters, initialisation, state_dict --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"add_bias_kv": True}, {"kdim": 5, "vdim": 7}, {"kdim": 5, "add_bias_kv": True}],
    ids=["default", "no_bias", "bias_kv", "kdim_vdim", "kdim_bias_kv"],
)
def test_parameters_init_and_state_dict_round_trip(kwargs):
    theirs, ours = module_pair(**kwargs)  # same seed -> identical parameters (asserted inside)
    assert [(n, p.shape) for n, p in theirs.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    # torch -> ours and ours -> torch, strictly, with fresh random weights on the source
    fresh_torch = nn.MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(fresh_torch.state_dict(), strict=True)
    fresh_ours = fnn.MultiheadAttention(E, H, **kwargs)
    theirs.load_state_dict(fresh_ours.state_dict(), strict=True)
    for a, b in ((fresh_torch, ours), (fresh_ours, theirs)):
        assert list(a.state_dict()) == list(b.state_dict())
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    query = torch.randn(L, N, E)
    key = torch.randn(S, N, kwargs.get("kdim", E))
    value = torch.randn(S, N, kwargs.get("vdim", E))
    torch.testing.assert_close(ours(query, key, value)[0], fresh_torch(query, key, value)[0], rtol=1e-4, atol=1e-5)


def test_device_dtype_and_float64():
    ours = fnn.MultiheadAttention(E, H, batch_first=True, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    theirs = nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(N, L, E, dtype=torch.float64)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0])


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"embed_dim": 10, "num_heads": 3}, ValueError, "embed_dim = 10 must be divisible by num_heads = 3"),
        ({"embed_dim": 12, "num_heads": 0}, ValueError, "num_heads must be > 0"),
        ({"embed_dim": 12.0, "num_heads": 3}, TypeError, "embed_dim must be an int"),
        ({"embed_dim": 600, "num_heads": 2}, ValueError, "the head size embed_dim // num_heads = 300"),
        ({"embed_dim": 12, "num_heads": 3, "dropout": 1.5}, ValueError, "dropout must be a probability"),
        ({"embed_dim": 12, "num_heads": 3, "kdim": 0}, ValueError, "kdim must be > 0"),
        ({"embed_dim": 12, "num_heads": 3, "batch_first": "yes"}, TypeError, "batch_first must be a bool"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match="fastcore_ai.nn.MultiheadAttention: " + match):
        fnn.MultiheadAttention(**kwargs)


def _bad_calls():
    x = torch.randn(L, N, E)
    good = torch.zeros(N, L, dtype=torch.bool)
    cases = [
        ("attn_mask", {"attn_mask": torch.zeros(L, L + 1, dtype=torch.bool)}, ValueError, "attn_mask must have shape"),
        ("attn_mask", {"attn_mask": torch.zeros(N * H + 1, L, L)}, ValueError, "attn_mask must have shape"),
        ("attn_mask", {"attn_mask": torch.zeros(1, N * H, L, L)}, ValueError, "attn_mask must have shape"),
        ("attn_mask", {"attn_mask": torch.zeros(L, L, dtype=torch.int32)}, TypeError, "attn_mask must be bool"),
        ("kpm", {"key_padding_mask": good[:, :-1]}, ValueError, r"key_padding_mask must have shape \(N, S\)"),
        ("kpm", {"key_padding_mask": good.T}, ValueError, r"key_padding_mask must have shape \(N, S\)"),
        ("kpm", {"key_padding_mask": good.long()}, TypeError, "key_padding_mask must be bool"),
        ("causal", {"is_causal": True}, ValueError, "is_causal=True needs attn_mask"),
        ("query", {"query": torch.randn(1, L, N, E)}, ValueError, "query must be 3-D"),
        ("query", {"query": torch.randn(L, N, E + 1)}, ValueError, "query must be"),
        ("key", {"key": torch.randn(L, N + 1, E)}, ValueError, "key and value must agree"),
        ("key", {"key": torch.randn(L, N, E).double()}, TypeError, "key must have query's dtype"),
        ("value", {"value": torch.randn(L, E)}, ValueError, "value must be 3-D"),
        ("query", {"query": torch.randn(L, N + 1, E)}, ValueError, "key must have query's batch size"),
        (
            "query",
            {"query": x.double(), "key": x.double(), "value": x.double()},
            TypeError,
            "query must have the parameters' dtype",
        ),
        ("query", {"query": torch.ones(L, N, E, dtype=torch.long)}, TypeError, "query must be a floating-point"),
    ]
    return [pytest.param(*case[1:], id=f"{case[0]}-{i}") for i, case in enumerate(cases)]


@pytest.mark.parametrize("overrides, error, match", _bad_calls())
def test_forward_errors_name_the_class_and_argument(overrides, error, match):
    ours = fnn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    args = {"query": x, "key": x, "value": x, **overrides}
    with pytest.raises(error, match="fastcore_ai.nn.MultiheadAttention: " + match):
        ours(**args)


def test_unbatched_mask_shapes_are_checked():
    ours = fnn.MultiheadAttention(E, H)
    x = torch.randn(L, E)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(S\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(1, L, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape .*\(num_heads, L, S\)"):
        ours(x, x, x, attn_mask=torch.zeros(N * H, L, L, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensor_input_is_refused_clearly():
    ours = fnn.MultiheadAttention(E, H, batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(5, E)])
    with pytest.raises(ValueError, match="query is a NestedTensor.*enable_nested_tensor=False"):
        ours(nested, nested, nested)


# ---- replace_attention ------------------------------------------------------------------------------------

D_MODEL, HEADS, LAYERS, T = 16, 2, 2, 7


def encoder(batch_first, norm_first=False):
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(
        D_MODEL, HEADS, dim_feedforward=32, dropout=0.0, batch_first=batch_first, norm_first=norm_first
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor is off for norm_first: torch warns
        return nn.TransformerEncoder(layer, LAYERS)


def count_torch_attention_forwards(monkeypatch):
    calls = []
    original = nn.MultiheadAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", counting)
    return calls


@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (False, False), (True, True)])
def test_replace_attention_in_transformer_encoder(kernel_calls, monkeypatch, batch_first, norm_first):
    model = encoder(batch_first, norm_first)
    swapped = copy.deepcopy(model)
    old_weight = swapped.layers[0].self_attn.in_proj_weight
    assert fnn.replace_attention(swapped) is swapped
    for layer in swapped.layers:
        assert type(layer.self_attn) is fnn.MultiheadAttention
        assert layer.self_attn.batch_first == batch_first and layer.self_attn.training
    assert swapped.layers[0].self_attn.in_proj_weight is old_weight  # the Parameter objects are kept

    src = torch.randn(3, T, D_MODEL) if batch_first else torch.randn(T, 3, D_MODEL)
    padding = torch.zeros(3, T, dtype=torch.bool)
    padding[1, -3:] = True  # right padding: torch's nested-tensor fast path accepts it
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)  # causal, bool like the padding (torch warns on mixed types)

    # training mode: same outputs and gradients of the input and every parameter
    for call in ({"src_key_padding_mask": padding}, {"mask": mask}, {"mask": mask, "src_key_padding_mask": padding}):
        x = src.clone().requires_grad_(True)
        y = src.clone().requires_grad_(True)
        expected, out = model(x, **call), swapped(y, **call)
        assert_rel(out, expected, OUT_BOUND, "encoder output")
        cotangent = torch.randn_like(out)
        g_t = torch.autograd.grad(expected, [x, *model.parameters()], cotangent)
        g_o = torch.autograd.grad(out, [y, *swapped.parameters()], cotangent)
        for (name, _), a, b in zip([("input", None), *swapped.named_parameters()], g_o, g_t):
            assert_rel(a, b, GRAD_BOUND, f"grad of {name}")
    assert len(kernel_calls) == 3 * LAYERS

    # eval under no_grad: torch's own model takes its native fast path (its attention forward never runs) ...
    model.eval(), swapped.eval()
    torch_forwards = count_torch_attention_forwards(monkeypatch)
    del kernel_calls[:]
    with torch.no_grad():
        expected = model(src, src_key_padding_mask=padding)
        expected_masked = model(src, mask=mask)
        torch_calls = len(torch_forwards)
        out = swapped(src, src_key_padding_mask=padding)
        out_masked = swapped(src, mask=mask)
    assert (torch_calls == 0) == batch_first  # the fast path this test is about is taken by torch's model
    # ... while the swapped model runs our kernel in every layer (and never torch's attention)
    assert len(kernel_calls) == 2 * LAYERS and len(torch_forwards) == torch_calls
    keep = ~padding if batch_first else ~padding.T  # torch's nested path zero-fills padded positions
    assert_rel(out[keep], expected[keep], OUT_BOUND, "eval output (kept positions)")
    assert_rel(out_masked, expected_masked, OUT_BOUND, "eval output with causal mask")


def test_replace_attention_in_transformer_decoder(kernel_calls):
    torch.manual_seed(6)
    layer = nn.TransformerDecoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerDecoder(layer, LAYERS)
    swapped = fnn.replace_attention(copy.deepcopy(model))
    for layer in swapped.layers:
        assert type(layer.self_attn) is fnn.MultiheadAttention
        assert type(layer.multihead_attn) is fnn.MultiheadAttention
    tgt, memory = torch.randn(3, T, D_MODEL), torch.randn(3, T + 2, D_MODEL)
    memory_padding = torch.zeros(3, T + 2, dtype=torch.bool)
    memory_padding[0, -4:] = True
    call = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(T), "memory_key_padding_mask": memory_padding}
    for training in (True, False):
        model.train(training), swapped.train(training)
        x, m = tgt.clone().requires_grad_(True), memory.clone().requires_grad_(True)
        y, n = tgt.clone().requires_grad_(True), memory.clone().requires_grad_(True)
        expected, out = model(x, m, **call), swapped(y, n, **call)
        assert_rel(out, expected, OUT_BOUND, "decoder output")
        cotangent = torch.randn_like(out)
        g_t = torch.autograd.grad(expected, [x, m, *model.parameters()], cotangent)
        g_o = torch.autograd.grad(out, [y, n, *swapped.parameters()], cotangent)
        for a, b in zip(g_o, g_t):
            assert_rel(a, b, GRAD_BOUND, "decoder gradient")
    # the causal tgt_mask is detected (tgt_is_causal) and runs as the kernel's causal masking
    assert kernel_calls == [True, False] * LAYERS * 2


def test_replace_attention_keeps_mode_dtype_sharing_and_a_root_module():
    shared = nn.MultiheadAttention(8, 2, dtype=torch.float64).eval()
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(nn.Linear(8, 8), shared)})
    fnn.replace_attention(model, backend="reference")
    assert model["a"] is model["b"][1] and isinstance(model["a"], fnn.MultiheadAttention)
    assert not model["a"].training and model["a"].in_proj_weight.dtype == torch.float64
    assert model["a"].backend == "reference"
    root = nn.MultiheadAttention(8, 2, dropout=0.25, kdim=3, batch_first=True)
    new = fnn.replace_attention(root)
    assert isinstance(new, fnn.MultiheadAttention) and new.dropout == 0.25 and new.kdim == 3 and new.batch_first
    assert new.k_proj_weight is root.k_proj_weight


def test_replace_attention_refuses_what_it_cannot_serve_and_changes_nothing():
    class Custom(nn.MultiheadAttention):
        pass

    good = nn.MultiheadAttention(8, 2)
    model = nn.Sequential(good, Custom(8, 2))
    with pytest.raises(TypeError, match=r"replace_attention: model\.1 is .*Custom, not exactly"):
        fnn.replace_attention(model)
    assert model[0] is good  # checked before anything was swapped
    hooked = nn.MultiheadAttention(8, 2)
    hooked.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"model\.0 has hooks"):
        fnn.replace_attention(nn.Sequential(hooked))
    with pytest.raises(ValueError, match="head size embed_dim // num_heads = 260"):
        fnn.replace_attention(nn.Sequential(nn.MultiheadAttention(260, 1)))
    extra = nn.MultiheadAttention(8, 2)
    extra.register_buffer("scale", torch.ones(1))
    with pytest.raises(ValueError, match="holds state beyond"):
        fnn.replace_attention(nn.Sequential(extra))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fnn.replace_attention("model")

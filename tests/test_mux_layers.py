"""fastcore_ai.nn.Attention / MultiplexedSelfAttention / DataMUXEncoder: drop-in parity with
nn.MultiheadAttention, padding of a batch that is not a multiple of N (never dropping rows), gradients."""

import pytest
import torch
from torch import nn

from fastcore_ai import nn as fnn
from fastcore_ai import ops


@pytest.mark.parametrize("cross", [False, True])
def test_attention_is_a_drop_in_for_multihead_attention(cross):
    E, H, B, Lq, Lk = 24, 3, 2, 7, 9 if cross else 7
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    layer = fnn.Attention(E, H, backend="cpu")
    layer.load_state_dict(mha.state_dict())
    query = torch.randn(B, Lq, E)
    key = torch.randn(B, Lk, E) if cross else query
    pad = torch.zeros(B, Lk, dtype=torch.bool)
    pad[1, -2:] = True
    mask = torch.rand(Lq, Lk) > 0.8
    mask[:, 0] = False
    expected, _ = mha(query, key, key, key_padding_mask=pad, attn_mask=mask, need_weights=False)
    out, weights = layer(query, key, key, key_padding_mask=pad, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert layer.in_proj_weight.grad is not None and torch.isfinite(layer.in_proj_weight.grad).all()


def test_attention_causal_matches_sdpa_math():
    layer = fnn.Attention(16, 2, causal=True, backend="cpu")
    x = torch.randn(2, 5, 16)
    q, k, v = nn.functional.linear(x, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
    heads = lambda t: t.view(2, 5, 2, 8).transpose(1, 2)
    core = nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    expected = layer.out_proj(core.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="need_weights"):
        layer(x, need_weights=True)


def test_multiplexed_self_attention():
    layer = fnn.MultiplexedSelfAttention(3, 16, 2, backend="cpu")
    x = torch.randn(6, 5, 16)
    muxed = ops.mux(x, layer.keys, num_instances=3, backend="reference")
    torch.testing.assert_close(layer(x), layer.attention(muxed)[0])
    with pytest.raises(ValueError, match="multiple of num_instances"):
        layer(x[:5])


def test_encoder_pads_instead_of_dropping_rows():
    torch.manual_seed(0)
    encoder = fnn.DataMUXEncoder(num_instances=2, d_model=16, n_heads=2, n_layers=2, d_ff=32, backend="cpu").eval()
    x = torch.randn(3, 6, 16)
    out = encoder(x)
    assert out.shape == (3, 6, 16)  # 3 rows in, 3 rows out (N = 2: the last instance is padded, not dropped)
    torch.testing.assert_close(out[:2], encoder(x[:2]))  # rows are independent of the padding
    torch.testing.assert_close(out[2:], encoder(x[2:]))  # the lone instance equals its own batch
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mux", ["hadamard", "ortho"])
def test_encoder_backward_and_reference_parity(mux):
    torch.manual_seed(0)
    encoder = fnn.DataMUXEncoder(num_instances=3, d_model=12, n_heads=3, n_layers=1, d_ff=24, mux=mux, backend="cpu")
    x = torch.randn(7, 5, 12, requires_grad=True)
    out = encoder(x)
    reference = fnn.DataMUXEncoder(3, 12, 3, 1, 24, mux=mux, backend="reference")
    reference.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and encoder.index_embedding.grad.abs().sum() > 0


def test_encoder_errors():
    with pytest.raises(ValueError, match="demux must be 'index'"):
        fnn.DataMUXEncoder(2, 8, 2, 1, 16, demux="mlp")
    with pytest.raises(ValueError, match="mux must be one of"):
        fnn.DataMUXEncoder(2, 8, 2, 1, 16, mux="binary")
    encoder = fnn.DataMUXEncoder(2, 8, 2, 1, 16)
    with pytest.raises(ValueError, match="x must be"):
        encoder(torch.randn(4, 3, 9))

"""mux family benchmarks (pytest-benchmark): fused attention vs torch SDPA (forward, forward+backward) at
DataMUX shapes and odd head sizes, and mux + demux vs the torch composition. The same shapes as
`python -m fastcore_ai bench --family mux_attention --family mux`; compare rows of one run
(`--benchmark-group-by=group`)."""

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.bench.mux import attention_step, torch_composition_mux_demux
from fastcore_ai.nn.mux import hadamard_keys

SHAPES = [
    (16, 12, 128, 64),
    (16, 12, 169, 64),
    (16, 12, 169, 13),
    (16, 12, 169, 48),
    (16, 12, 169, 96),
    (16, 12, 169, 200),
]
PROVIDERS = {
    "fastcore-cpu": lambda q, k, v: ops.attention(q, k, v, backend="cpu"),
    "torch-sdpa": torch.nn.functional.scaled_dot_product_attention,
}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_attention_cpu(benchmark, provider, shape, mode):
    B, H, L, D = shape
    q, k, v, grad = (torch.randn(B, H, L, D) for _ in range(4))
    benchmark.group = f"attention cpu B={B} H={H} L={L} D={D} {mode}"
    out = benchmark(attention_step, PROVIDERS[provider], mode, q, k, v, grad)
    assert out.shape == (B, H, L, D)


@pytest.mark.parametrize("N", [2, 10, 40])
@pytest.mark.parametrize("provider", ["fastcore-cpu", "torch-composition"])
def test_mux_demux_cpu(benchmark, provider, N):
    B, L, d = (24 if N < 40 else 16), 128, 256
    x = torch.randn(B, N, L, d)
    keys = hadamard_keys(N, d)
    p = torch.randn(B, N, d)
    w = torch.randn(d, 2 * d) / (2 * d) ** 0.5
    b, gamma, beta = torch.zeros(d), torch.ones(d), torch.zeros(d)
    benchmark.group = f"mux+demux cpu B={B} N={N} L={L} d={d}"

    def fused():
        with torch.no_grad():
            return ops.demux(ops.mux(x, keys, backend="cpu"), p, w, b, gamma, beta, backend="cpu")

    def composition():
        with torch.no_grad():
            return torch_composition_mux_demux(x, keys, p, w, b, gamma, beta)

    out = benchmark(fused if provider == "fastcore-cpu" else composition)
    assert out.shape == (B * N, L, d)


@pytest.mark.parametrize("provider", ["fastcore-mha", "torch-mha"])
def test_transformer_encoder_training_step_cpu(benchmark, provider):
    """torch.nn.TransformerEncoder (4 layers, d = 256, 4 heads, dropout 0, batch_first) training step (forward +
    backward) before vs after fastcore_ai.nn.replace_attention, same weights (`bench --family mux_mha`)."""
    from fastcore_ai.bench.mux import encoder_training_step, transformer_encoder_pair

    B, L, d = 16, 128, 256
    reference, swapped = transformer_encoder_pair(d, 4, 4, "cpu")
    x, grad = torch.randn(B, L, d), torch.randn(B, L, d)
    benchmark.group = f"TransformerEncoder 4L d={d} h=4 B={B} L={L} training step cpu"
    out = benchmark(encoder_training_step, swapped if provider == "fastcore-mha" else reference, x, grad)
    assert out.shape == (B, L, d)

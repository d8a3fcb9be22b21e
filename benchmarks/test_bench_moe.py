"""Router benchmarks (pytest-benchmark). The same shapes as `python -m fastcore_ai bench --family moe`;
each parametrisation times one provider, so compare rows of one run (`--benchmark-group-by=param:shape`)."""

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.bench.moe import torch_composition_router

SHAPES = [(T, E, k) for T in (4096, 65536) for E in (8, 64, 128) for k in (2, 8)]
CPU_PROVIDERS = {
    "fastcore-cpu": lambda x, k: ops.moe_topk_route(x, k, backend="cpu"),
    "reference": lambda x, k: ops.moe_topk_route(x, k, backend="reference"),
    "torch-composition": torch_composition_router,
}
CUDA_PROVIDERS = {
    "fastcore-cuda": lambda x, k: ops.moe_topk_route(x, k, backend="cuda"),
    "fastcore-triton": lambda x, k: ops.moe_topk_route(x, k, backend="triton"),
    "torch-composition": torch_composition_router,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-E{s[1]}-k{s[2]}")
@pytest.mark.parametrize("provider", sorted(CPU_PROVIDERS))
def test_router_cpu(benchmark, provider, shape):
    T, E, k = shape
    logits = torch.randn(T, E)
    benchmark.group = f"moe_topk_route cpu T={T} E={E} k={k}"
    out = benchmark(CPU_PROVIDERS[provider], logits, k)
    assert out[0].shape == (T, k)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}-E{s[1]}-k{s[2]}")
@pytest.mark.parametrize("provider", sorted(CUDA_PROVIDERS))
def test_router_cuda(benchmark, provider, shape):
    T, E, k = shape
    logits = torch.randn(T, E, device="cuda")
    fn = CUDA_PROVIDERS[provider]

    def synchronised():
        out = fn(logits, k)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"moe_topk_route cuda T={T} E={E} k={k}"
    out = benchmark(synchronised)
    assert out[0].shape == (T, k)

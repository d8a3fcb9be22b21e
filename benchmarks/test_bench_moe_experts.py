"""Expert-computation benchmarks (pytest-benchmark) against Hugging Face's experts implementations on
the same MixtralExperts module; the same shapes as `python -m fastcore_ai bench --family moe_experts`.
Compare the rows of one run (`--benchmark-group-by=group`)."""

import pytest
import torch

from fastcore_ai.bench.moe import moe_experts_cases

CASES = moe_experts_cases("cpu")
# transformers >= 5 is a test dependency: without it the suite errors here instead of skipping
assert CASES, "transformers >= 5 is not installed (pip install fastcore_ai[test])"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.shape.replace(" ", "-"))
@pytest.mark.parametrize("provider", ["fastcore", "hf-eager", "hf-grouped_mm"])
def test_experts_cpu(benchmark, case, provider):
    inputs = case.setup()
    benchmark.group = case.shape
    out = benchmark.pedantic(case.providers[provider], args=inputs, rounds=3, warmup_rounds=1)
    assert out.shape == inputs[1].shape and bool(torch.isfinite(out).all())

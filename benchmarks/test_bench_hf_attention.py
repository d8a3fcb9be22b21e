"""Whole Hugging Face models with attn_implementation "fastcore_ai" vs "sdpa" vs "eager" (pytest-benchmark);
the same cases as `python -m fastcore_ai bench --family hf_attention`. Compare the rows of one run
(`--benchmark-group-by=group`)."""

import pytest
import torch

from fastcore_ai.bench.hf_models import hf_attention_cases

CASES = hf_attention_cases("cpu")
# transformers >= 5 is a test dependency: without it the suite errors here instead of skipping
assert CASES, "transformers >= 5 is not installed (pip install fastcore_ai[test])"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.shape.replace(" ", "-"))
@pytest.mark.parametrize("provider", ["fastcore", "hf-sdpa", "hf-eager"])
def test_hf_model_cpu(benchmark, case, provider):
    inputs = case.setup()
    benchmark.group = case.shape
    out = benchmark.pedantic(case.providers[provider], args=inputs, rounds=3, warmup_rounds=1)
    assert bool(torch.isfinite(out.float()).all())

"""s4 benchmarks (pytest-benchmark): the shapes and peers of `python -m fastcore_ai bench --family s4`
(cases from fastcore_ai.bench_s4); each parametrisation times one provider of one case, grouped by case,
so compare rows of one run. `--quick`-sized shapes by default; FASTCORE_AI_BENCH_FULL=1 for the issue's."""

import os

import pytest
import torch

from fastcore_ai.bench import s4 as bench_s4

FULL = os.environ.get("FASTCORE_AI_BENCH_FULL", "0") == "1"


def _params(device):
    params = []
    for case in bench_s4.s4_cases(device, quick=not FULL):
        for name in case.providers:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            params.append(pytest.param(case, name, id=f"{case.shape.split()[0]}-{name}", marks=marks))
    return params


@pytest.mark.parametrize("case,provider", _params("cpu"))
def test_s4_cpu(benchmark, case, provider):
    inputs = case.setup()
    benchmark.group = f"s4 cpu {case.shape}"
    out = benchmark(case.providers[provider], *inputs)
    assert case.error(out, inputs) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("case,provider", _params("cuda") if torch.cuda.is_available() else [])
def test_s4_cuda(benchmark, case, provider):
    inputs = case.setup()
    fn = case.providers[provider]

    def synchronised():
        out = fn(*inputs)
        torch.cuda.synchronize()
        return out

    benchmark.group = f"s4 cuda {case.shape}"
    out = benchmark(synchronised)
    assert case.error(out, inputs) < 1e-4

"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only`. GPU cases synchronise inside the
timed call so host timers measure the kernel, not the launch."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU visible"))

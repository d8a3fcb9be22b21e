"""Test configuration shared by every test module.

Triton kernels run on the CPU interpreter unless told otherwise: TRITON_INTERPRET must be set before
triton is imported, hence here, first. `make gpu-check` sets TRITON_INTERPRET=0 so they run natively.
CUDA-marked tests are skipped, with the reason, when no GPU is visible or the CUDA kernels were not built.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastcore_ai  # noqa: E402


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    if not fastcore_ai.build_info()["cuda_kernels_compiled"]:
        return "fastcore_ai was built without CUDA kernels"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_backend_selections():
    """Tests monkeypatch the facts a backend selection reads (the extension, triton's interpreter flag);
    a selection cached by an earlier test must not answer for them."""
    from fastcore_ai import backends

    backends.clear_selection_cache()
    yield
    backends.clear_selection_cache()


@pytest.fixture
def poisoned_outputs():
    """Make every torch.empty/at::empty allocation come back filled with NaN (floats) or the max
    value (ints), so an output element a kernel forgets to write fails the comparison."""
    import torch.utils.deterministic as deterministic

    previous_mode = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    yield
    deterministic.fill_uninitialized_memory = previous_fill
    torch.use_deterministic_algorithms(previous_mode, warn_only=previous_warn)

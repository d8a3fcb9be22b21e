"""Helpers shared by the tests: backend parametrisation and error measures."""

import pytest
import torch

from fastcore_ai import backends

# (backend, device) pairs every op test runs over. Triton on the CPU runs under the interpreter.
BACKEND_DEVICES = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", "cpu", id="triton-interpreter", marks=pytest.mark.triton),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.triton, pytest.mark.cuda]),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]


def backend_dtype_cases(op: str, dtypes) -> list:
    """(backend, device, dtype) parameters over BACKEND_DEVICES x dtypes, leaving out the combinations
    the op's capability table (fastcore_ai.backends) declares unsupported, e.g. Triton with float64:
    those are not generated rather than generated and skipped."""
    support = backends.op_table(op).support
    cases = []
    for param in BACKEND_DEVICES:
        backend, device = param.values
        for dtype in dtypes:
            if backend in support and dtype in support[backend].dtypes:
                cases.append(
                    pytest.param(
                        backend, device, dtype, marks=param.marks, id=f"{param.id}-{str(dtype).replace('torch.', '')}"
                    )
                )
    return cases


def require_backend(op: str, backend: str, device: str, dtype: torch.dtype = torch.float32) -> None:
    """Skip (with the registry's reasons) when `backend` cannot run here, e.g. Triton on CPU tensors
    without TRITON_INTERPRET=1 during `make gpu-check`. Never hides a failure of a backend that can run."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    reasons = backends.reasons_against(op, backend, torch.device(device), dtype, "input")
    if reasons:
        pytest.skip(f"{backend} cannot run here: " + "; ".join(reasons))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaNs must coincide; they are excluded)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN pattern differs"
    actual, expected = actual[~nan], expected[~nan]
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    if denominator == 0.0:
        return difference
    return difference / denominator

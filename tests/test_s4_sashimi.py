"""examples/sashimi.py at tiny size: recurrent generation reproduces the convolutional model's logits
(and greedy samples) in both modes, and both throughputs are reported."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sashimi.py"


def load_example():
    spec = importlib.util.spec_from_file_location("sashimi_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["s4d", "s4"])
def test_sashimi_tiny(mode, capsys):
    result = load_example().main(
        ["--samples", "20", "--d-model", "8", "--layers", "1", "--d-state", "8", "--batch", "2", "--mode", mode]
    )
    assert result["logits_rel_error"] < 1e-4
    assert result["same_samples"]
    assert result["recurrent_samples_per_s"] > 0 and result["convolution_samples_per_s"] > 0
    assert "samples/s" in capsys.readouterr().out

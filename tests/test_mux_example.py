"""examples/datamux_retrieval.py runs end to end at a tiny size and prints its table."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "datamux_retrieval.py"


def test_datamux_retrieval_tiny(capsys):
    spec = importlib.util.spec_from_file_location("datamux_retrieval", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--tiny", "--backend", "cpu"])
    assert [r["N"] for r in results] == [1, 2]
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["instances_per_s"] > 0
    assert "| N | token accuracy |" in capsys.readouterr().out

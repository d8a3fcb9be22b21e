"""The shape sweep's plumbing (`python -m fastcore_ai bench --sweep`, fastcore_ai.bench.sweep), not speed: every
public op has a sweep or a stated reason not to, a --quick run of two cheap ops writes well-formed JSON and
markdown (ratios positive and finite, nothing about their size), saved JSON redraws without timing, and the
heatmap PNG is drawn where matplotlib is installed."""

import json
import math

import pytest
import torch

from fastcore_ai import backends, ops
from fastcore_ai.__main__ import main as cli
from fastcore_ai.bench import sweep
from fastcore_ai.bench.harness import SweepCell, SweepOp

CHEAP = ["moe_topk_route", "ssm_step"]  # quick cells of a few microseconds each


def test_every_public_op_has_a_sweep_or_a_reason():
    public = set(ops.__all__)
    missing = sorted(public - set(sweep.SWEEPS) - set(sweep.NOT_SWEPT))
    assert not missing, (
        f"public ops without a sweep: {missing}; add a SweepOp to SWEEP in bench/<family>.py, or "
        f"(for a name that is not an op) a reason to NOT_SWEPT in bench/sweep.py"
    )
    assert not sorted(set(sweep.SWEEPS) - public), "sweeps of names that are not public ops"
    assert not sorted(set(sweep.NOT_SWEPT) - public), "NOT_SWEPT names that are no longer public: drop them"
    assert not set(sweep.SWEEPS) & set(sweep.NOT_SWEPT), "a name both swept and exempted"
    for name, reason in sweep.NOT_SWEPT.items():
        assert isinstance(reason, str) and len(reason) > 8, f"{name}: NOT_SWEPT needs a reason"


def test_not_swept_names_are_not_kernels():
    # an exempted callable must not be an op with a native backend: those are what the sweep is for
    with_cpu_kernels = {op for op, backend, _, _ in backends.describe() if backend in ("cpu", "cuda")}
    assert not set(sweep.NOT_SWEPT) & with_cpu_kernels


def test_grids_have_small_medium_large_and_the_low_precision_dtype():
    low = {
        op
        for op, backend, dtypes, _ in backends.describe()
        if backend == "cpu" and ("bfloat16" in dtypes or "float16" in dtypes)
    }
    for name, spec in sweep.SWEEPS.items():
        assert spec.op == name and isinstance(spec, SweepOp)
        assert 2 <= len(spec.dims) <= 3, f"{name}: 2 or 3 main dimensions"
        sized = 0
        for dim, values in spec.dims.items():
            if all(isinstance(v, (int, float)) for v in values):
                assert len(values) >= 3, f"{name}: {dim} needs small / medium / large values"
                assert list(values) == sorted(values), f"{name}: {dim} values small to large"
            else:  # a categorical dimension (E/k pairs, heads, forward vs forward+backward)
                assert len(values) >= 2, f"{name}: {dim}"
            sized += len(values) >= 3
        assert sized >= 2, f"{name}: at least two dimensions with small / medium / large values"
        assert 1 <= len(sweep.grid_points(spec, quick=True)) <= 4, f"{name}: the quick grid is a few tiny cells"
        assert spec.peer and spec.dtypes
        if name in low:
            assert {torch.bfloat16, torch.float16} & set(spec.dtypes), f"{name}: sweep its low-precision dtype too"
    assert sum(len(sweep.cells_of(s)) for s in sweep.SWEEPS.values()) > 1000


def _check_document(doc, spec, threads):
    assert doc["schema"] == sweep.SCHEMA and doc["op"] == spec.op and doc["family"] == spec.family
    meta = doc["meta"]
    for key in ("date", "machine", "torch", "build_info", "threads", "command"):
        assert key in meta, key
    assert meta["machine"]["cpu_model"] and meta["machine"]["logical_cores"] >= 1
    assert meta["build_info"]["version"]
    cells = doc["cells"]
    assert len(cells) == len(sweep.cells_of(spec, quick=True, threads=threads))
    dims = [g["name"] for g in doc["grid"]]
    for cell in cells:
        assert cell["error"] is None, cell
        assert set(cell["params"]) == set(dims)
        assert cell["threads"] in threads and cell["dtype"] in doc["dtypes"]
        for key in ("ours_us", "peer_us", "ratio"):
            assert isinstance(cell[key], float) and math.isfinite(cell[key]) and cell[key] > 0, (key, cell)
        assert cell["peer"] in cell["peers_us"]
        assert cell["ratio"] == pytest.approx(cell["peer_us"] / cell["ours_us"])
        assert cell["rel_diff"] is None or cell["rel_diff"] < 0.05, cell  # the peer computes the same thing


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    threads_before = torch.get_num_threads()
    docs = sweep.run_sweep(CHEAP[:1], quick=True, threads=(1, 2), out_dir=str(out), log=lambda line: None)
    docs.update(sweep.run_sweep(CHEAP[1:], quick=True, threads=(1,), out_dir=str(out), log=lambda line: None))
    assert torch.get_num_threads() == threads_before, "the per-cell thread count must be restored"
    return out, docs


def test_quick_sweep_writes_json_and_markdown(quick_run):
    out, docs = quick_run
    assert set(docs) == set(CHEAP)
    for name, threads in ((CHEAP[0], (1, 2)), (CHEAP[1], (1,))):
        with open(out / f"{name}.json") as handle:
            doc = json.load(handle)
        _check_document(doc, sweep.SWEEPS[name], threads)
        table = (out / f"{name}.md").read_text()
        assert f"`{name}` sweep" in table
        rows = [line for line in table.splitlines() if line.startswith("| ") and "ours us" not in line]
        assert len(rows) == len(doc["cells"])
    index = (out / "README.md").read_text()
    assert all(f"[`{name}`]({name}.md)" in index for name in CHEAP)


def test_cli_quick_sweep_of_one_op(tmp_path, capsys):
    cli(["bench", "--sweep", "--quick", "--op", "ssm_step", "--threads", "1", "--out", str(tmp_path)])
    with open(tmp_path / "ssm_step.json") as handle:
        _check_document(json.load(handle), sweep.SWEEPS["ssm_step"], (1,))
    assert "ssm_step" in capsys.readouterr().out
    cli(["bench", "--sweep", "--list", "--op", "fft_conv"])
    listed = capsys.readouterr().out
    assert f"{len(sweep.cells_of(sweep.SWEEPS['fft_conv']))} cells" in listed


def test_report_redraws_from_saved_json(quick_run, tmp_path, capsys):
    out, docs = quick_run
    source = out / f"{CHEAP[0]}.json"
    written = sweep.report(str(source), str(tmp_path), log=lambda line: None)
    assert str(tmp_path / f"{CHEAP[0]}.md") in written
    assert (tmp_path / f"{CHEAP[0]}.md").read_text() == (out / f"{CHEAP[0]}.md").read_text()
    assert json.loads((tmp_path / f"{CHEAP[0]}.json").read_text()) == json.loads(source.read_text())
    # a directory of JSONs, through the CLI, in place
    (out / f"{CHEAP[1]}.md").unlink()
    cli(["bench", "--sweep-report", str(out)])
    assert (out / f"{CHEAP[1]}.md").exists()
    assert "wrote" in capsys.readouterr().out


def test_failed_and_skipped_cells_are_recorded_not_fatal(tmp_path):
    def make(params, dtype, device):
        if params["n"] == 2:
            raise RuntimeError("this cell cannot run here")
        return SweepCell(
            lambda: (torch.ones(params["n"]),),
            lambda x: x * 2,
            {"torch": lambda x: x + x},
            lambda a, b, inputs: float((a - b).abs().max()),
        )

    spec = SweepOp(
        "fake_op",
        "test",
        {"n": [1, 2, 3], "m": [1, 2, 3]},
        {"n": [1, 2, 3], "m": [1, 5]},
        make,
        "x + x",
        skip=lambda params, dtype: params["m"] == 5 and params["n"] == 3,
    )
    threads_before = torch.get_num_threads()
    records = [
        sweep.run_cell(spec, params, dtype, 1, "cpu", 0.001)
        for params, dtype, _ in sweep.cells_of(spec, quick=True, threads=(1,))
    ]
    assert torch.get_num_threads() == threads_before
    assert len(records) == 5  # 3 x 2 minus the skipped point
    failed = [r for r in records if r["error"]]
    assert len(failed) == 2 and all("cannot run here" in r["error"] for r in failed)
    assert all(r["ratio"] > 0 and r["rel_diff"] == 0 for r in records if not r["error"])
    doc = sweep.op_document(spec, quick=True)
    doc.update(meta={"date": "2026-01-01", "quick": True}, cells=records)
    sweep.render(doc, str(tmp_path), log=lambda line: None)
    assert "failed: RuntimeError" in (tmp_path / "fake_op.md").read_text()


def test_heatmap_png(quick_run, tmp_path):
    import matplotlib  # noqa: F401  (in the test extra: a missing heatmap library is an error here, not a skip)

    out, _ = quick_run
    for name in CHEAP:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"({name}.png)" in (out / f"{name}.md").read_text()
    # a 3-dim grid with every cell, several below 1.0x, one failed: facets into small multiples
    spec = sweep.SWEEPS["attention"]
    doc = sweep.op_document(spec, quick=False)
    doc["meta"] = {"date": "2026-01-01"}
    for i, (params, dtype, threads) in enumerate(sweep.cells_of(spec)):
        ratio = 0.5 + (i % 7) * 0.4
        doc["cells"].append(
            {
                "op": spec.op,
                "params": params,
                "dtype": sweep.dtype_name(dtype),
                "threads": threads,
                "ours_us": 10.0,
                "peer_us": 10.0 * ratio,
                "peer": "torch-sdpa",
                "peers_us": {},
                "ratio": ratio if i != 3 else None,
                "rel_diff": None,
                "error": None if i != 3 else "x",
            }
        )
    sweep.heatmap(doc, str(tmp_path / "attention.png"))
    assert (tmp_path / "attention.png").stat().st_size > 20000


def test_without_matplotlib_json_and_markdown_still_written(quick_run, tmp_path, monkeypatch):
    out, _ = quick_run
    monkeypatch.setattr(sweep, "matplotlib_missing", lambda: "matplotlib is not importable (test)")
    lines = []
    written = sweep.report(str(out / f"{CHEAP[1]}.json"), str(tmp_path), log=lines.append)
    assert not (tmp_path / f"{CHEAP[1]}.png").exists() and (tmp_path / f"{CHEAP[1]}.md").exists()
    assert any("no heatmap PNG" in line and "not importable" in line for line in lines)
    assert all(not path.endswith(".png") for path in written)

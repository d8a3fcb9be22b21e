"""`make gpu-check` cannot be run here (no GPU), so its plumbing is run in its dry mode: every step with a
CPU stand-in, the per-step budget, the per-family benchmark loop and the summary. A broken script fails
here instead of on the one lent GPU session that needed it."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_a_summary(tmp_path):
    env = dict(
        os.environ,
        GPU_CHECK_DRY="1",
        PYTHON=sys.executable,
        OUT=str(tmp_path),
        GPU_CHECK_FAMILIES="overhead",  # one small family keeps the dry run short
        GPU_CHECK_BUDGET_S="300",
    )
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    summary = (tmp_path / "summary.md").read_text()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "DRY RUN on the CPU" in summary
    assert "- build: ok via dry run" in summary
    assert "- extension: ok" in summary
    assert "pytest tests/test_backends.py (dry run): ok:" in summary and " passed" in summary
    assert "tests/test_cuda_build.py -q --collect-only: ok:" in summary and " collected" in summary
    assert "- bench --family overhead --device cpu --quick: ok" in summary
    assert "## overhead benchmark (cpu)" in summary and "| moe_topk_route [4, 8]" in summary
    assert (tmp_path / "bench_overhead_cpu.json").exists()

"""The bench package's plumbing (not speed): every family is registered, and the per-call overhead family
runs every provider and agrees with the float64 oracle."""

import math

from fastcore_ai import bench


def test_default_families_are_registered():
    assert set(bench.DEFAULT_FAMILIES) <= set(bench.FAMILIES)
    assert "overhead" in bench.FAMILIES


def test_overhead_family_runs_every_provider():
    rows = bench.run(["overhead"], "cpu", quick=True)
    assert {r.shape.split()[0] for r in rows} == {"moe_topk_route", "attention", "fft_conv", "ssm_step"}
    for row in rows:
        assert math.isfinite(row.median_ms) and row.median_ms > 0, row
        assert row.max_rel_error < 1e-5, row
    assert "| moe_topk_route" in bench.format_table(rows)

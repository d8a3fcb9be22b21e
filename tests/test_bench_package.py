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


def test_each_table_is_printed_as_its_family_finishes(monkeypatch, capsys):
    """`bench` prints a family's table before the next family starts (a full run takes many minutes)."""
    import torch

    seen_before_second = []

    def family(name):
        def cases(device, quick):
            if name == "second":
                seen_before_second.append(capsys.readouterr().out)
            return [
                bench.Case(
                    name,
                    f"{name} add",
                    lambda: (torch.ones(4),),
                    {"ours": lambda x: x + 1, "peer": lambda x: x + 1},
                    lambda out, inputs: 0.0,
                    peer="peer",
                )
            ]

        return cases

    monkeypatch.setitem(bench.FAMILIES, "first", family("first"))
    monkeypatch.setitem(bench.FAMILIES, "second", family("second"))
    rows = bench.main(["first", "second"], "cpu", None, quick=True)
    assert "## first" in seen_before_second[0] and "| first add | ours" in seen_before_second[0]
    assert "second" not in seen_before_second[0]
    assert [r.family for r in rows] == ["first", "first", "second", "second"]
    assert "## second" in capsys.readouterr().out

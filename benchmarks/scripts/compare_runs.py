"""Markdown tables comparing `python -m fastcore_ai bench --json` runs of two builds on the same machine
(before/after a change), one or more runs (rounds) of each.

Per family, every row that is neither its table's peer nor the pure-torch reference (ours, and other peers):
its median in the before and after runs, the peer's own after/before ratio (the machine's and the
allocator's drift between processes: the peer's code did not change), and the speedup vs the peer in each
run (the peer is re-timed in every run, so "vs peer" is the like-for-like comparison). With several rounds
each cell is the range over the rounds.

    python benchmarks/scripts/compare_runs.py --before OLD1.json [OLD2.json ...] --after NEW1.json [...]
        [--label-before X --label-after Y]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict


def _rows(path):
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"] if isinstance(data, dict) else data
    return OrderedDict(((r["family"], r["shape"], r["backend"]), r) for r in rows)


def _span(values, fmt):
    values = [v for v in values if v == v]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", nargs="+", required=True)
    parser.add_argument("--after", nargs="+", required=True)
    parser.add_argument("--label-before", default="before")
    parser.add_argument("--label-after", default="after")
    args = parser.parse_args()
    before = [_rows(p) for p in args.before]
    after = [_rows(p) for p in args.after]
    family = None
    for key, new in after[0].items():
        if key[2] in (new["peer"], "reference") or new["speedup_vs_peer"] != new["speedup_vs_peer"]:
            continue
        if not all(key in run for run in before + after):
            continue
        peer_key = (key[0], key[1], new["peer"])
        if key[0] != family:
            family = key[0]
            print(f"\n**{family}**\n")
            print(
                f"| shape | provider | {args.label_before} ms | {args.label_after} ms | after/before | "
                f"peer after/before | vs peer {args.label_before} | vs peer {args.label_after} | peer |"
            )
            print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        old_ms = [run[key]["median_ms"] for run in before]
        new_ms = [run[key]["median_ms"] for run in after]
        change = [n / o for n, o in zip(new_ms, old_ms)]
        drift = [
            a[peer_key]["median_ms"] / b[peer_key]["median_ms"]
            for a, b in zip(after, before)
            if peer_key in a and peer_key in b
        ]
        print(
            f"| {key[1]} | {key[2]} | {_span(old_ms, '{:.3f}')} | {_span(new_ms, '{:.3f}')} | "
            f"{_span(change, '{:.2f}')} | {_span(drift, '{:.2f}')} | "
            f"{_span([run[key]['speedup_vs_peer'] for run in before], '{:.2f}x')} | "
            f"{_span([run[key]['speedup_vs_peer'] for run in after], '{:.2f}x')} | {new['peer']} |"
        )


if __name__ == "__main__":
    main()

"""`python -m fastcore_ai bench` and the pytest-benchmark suites' cases, as a package with one direction:
harness (rows, cases, sweep specs, timing; imports nothing above it) <- one module per family (its cases and
its SWEEP) <- sweep (the generic shape sweep, `bench --sweep`) <- this module (the family registry, run, the
CLI's main).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import torch

from .._build_info import build_info
from . import hf_models, moe, mux, nerf, overhead, pq, s4, sweep  # noqa: F401  (sweep: bench --sweep)
from .harness import Case, Row, format_table, time_interleaved, cpu_peak_extra_mb  # noqa: F401  (the harness API)

FAMILIES: Dict[str, Callable] = {}


for _module in (moe, s4, nerf, pq, mux, overhead, hf_models):
    FAMILIES.update(_module.FAMILIES)

# What `bench` without --family and `demo` run: one entry per family's main table. The other names in
# FAMILIES are parts or subsets of these (e.g. nerf_render, pq_fastscan) for focused runs. nerf runs last:
# its render-backward case fixes glibc's mmap threshold for the rest of the process (to make its peak
# column exact), which would change every later family's allocation costs.
DEFAULT_FAMILIES = [
    "moe",
    "moe_experts",
    "s4",
    "pq",
    "mux_attention",
    "mux",
    "mux_encoder",
    "mux_mha",
    "hf_attention",
    "overhead",
    "nerf",
]


def run(families: List[str], device: str = "cpu", quick: bool = False) -> List[Row]:
    rows: List[Row] = []
    for family in families:
        for case in FAMILIES[family](device, quick):
            run_threads = torch.get_num_threads()  # a case may pin its own count (pq's 1-thread rows): restored below
            inputs = case.setup()
            times: Dict[str, float] = {}
            errors: Dict[str, float] = {}
            peaks: Dict[str, Optional[float]] = {}
            runnable: Dict[str, Callable[[], object]] = {}  # providers that ran once; timed together below
            for name, fn in case.providers.items():
                try:
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        output = fn(*inputs)
                        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    else:
                        fn(*inputs)  # warm-up first, so one-time workspaces do not count as the op's memory
                        result = []
                        peaks[name] = cpu_peak_extra_mb(lambda: result.append(fn(*inputs)))
                        output = result[0]
                    errors[name] = case.error(output, inputs)
                    runnable[name] = lambda fn=fn: fn(*inputs)
                except Exception as error:  # a provider that cannot run here is reported, not fatal
                    times[name], errors[name], peaks[name] = float("nan"), float("nan"), None
                    print(f"  [{case.shape}] {name} failed: {error}")
            try:
                times.update(time_interleaved(runnable, device, min_time_s=0.05 if quick else 0.2))
            except Exception as error:
                times.update({name: float("nan") for name in runnable})
                print(f"  [{case.shape}] timing failed: {error}")
            if torch.get_num_threads() != run_threads:
                torch.set_num_threads(run_threads)
            for name in case.providers:
                rows.append(
                    Row(
                        family,
                        case.shape,
                        name,
                        times[name],
                        times.get("reference", float("nan")) / times[name],
                        times.get(case.peer, float("nan")) / times[name],
                        case.peer,
                        errors[name],
                        peaks[name],
                    )
                )
    return rows


def main(families: List[str], device: str, json_path: Optional[str], quick: bool) -> List[Row]:
    rows: List[Row] = []
    for family in families:  # each table as soon as its family finishes (a full run takes many minutes)
        family_rows = run([family], device, quick)
        rows.extend(family_rows)
        print(f"\n## {family} ({device}, {torch.get_num_threads()} threads, torch {torch.__version__})\n")
        print(format_table(family_rows), flush=True)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(
                {"build_info": build_info(), "device": device, "rows": [asdict(r) for r in rows]}, handle, indent=2
            )
    return rows

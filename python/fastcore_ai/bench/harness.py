"""The benchmark harness (the bottom of fastcore_ai.bench): rows, cases, interleaved timing, the table.

One table per family: shape, backend, median time, speedup against the pure-torch reference and
against the named peer, max relative error against the float64 oracle, and peak extra memory (GPU:
allocator peak; CPU: resident-set peak, see cpu_peak_extra_mb).
All providers of a row are timed in the same process run, interleaved, so ratios are comparable;
GPU times use CUDA events after a synchronising warm-up, CPU times use perf_counter.
SweepOp / SweepCell describe one op's shape sweep (bench/sweep.py, `bench --sweep`), timed with the same
time_interleaved.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Row:
    family: str
    shape: str
    backend: str
    median_ms: float
    speedup_vs_reference: float
    speedup_vs_peer: float
    peer: str
    max_rel_error: float
    peak_extra_mb: Optional[float] = None


@dataclass
class SweepCell:
    """One cell of an op's sweep, made by SweepOp.make: `setup()` returns the inputs (untimed); `ours(*inputs)`
    is the public fastcore_ai op as a user calls it; `peers` map a name to the torch (or FAISS, HF) code a
    user would write instead, fn(*inputs); the cell's peer time is the fastest of them. `compare(ours_out,
    peer_out, inputs)` (optional) gives a relative difference of the two outputs (the first peer's), a check
    that the peer computes the same thing; None where outputs are not comparable numbers."""

    setup: Callable
    ours: Callable
    peers: Dict[str, Callable]
    compare: Optional[Callable] = None


@dataclass
class SweepOp:
    """The sweep of one public op (`python -m fastcore_ai bench --sweep`): a grid over its main dimensions
    (`dims`: name -> values, small to large; the first two are a heatmap's rows and columns, a third one
    facets it), crossed with `dtypes` and the thread counts; `quick` is the grid of a few tiny cells of
    `--quick` (the CI smoke run). `make(params, dtype, device)` returns the SweepCell of one grid point;
    `skip(params, dtype)` (optional) returns a reason to leave a point out (e.g. it would not fit in memory).
    `peer` and `fixed` describe the peers and what the grid holds fixed (markdown, docs)."""

    op: str
    family: str
    dims: Dict[str, Sequence]
    quick: Dict[str, Sequence]
    make: Callable
    peer: str
    dtypes: Sequence[torch.dtype] = (torch.float32,)
    fixed: str = ""
    skip: Optional[Callable] = None
    devices: Sequence[str] = ("cpu", "cuda")


@dataclass
class Case:
    """One benchmark shape: `setup(device)` returns the inputs; providers map a name to fn(*inputs);
    `error(output, inputs)` gives the relative error of an output against the float64 oracle."""

    family: str
    shape: str
    setup: Callable
    providers: Dict[str, Callable]
    error: Callable
    peer: str
    extra: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release_free_heap() -> None:
    """Hands glibc's free heap pages back to the OS (malloc_trim), so the next call's allocations fault
    fresh pages whether or not an earlier provider left freed memory behind: without it the first
    provider measured in a process pays for its buffers and later ones reuse them for free (an
    order effect of several MB). A no-op where glibc is absent."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_extra_mb(fn: Callable) -> Optional[float]:
    """Peak resident memory fn() adds on top of what the process holds before it, in MiB (Linux: free
    heap pages are released first, the peak-RSS counter is reset through /proc/self/clear_refs, then
    VmHWM read back); None elsewhere. Counts every allocator (torch, BLAS/FFT workspaces, numpy), at
    page granularity."""

    def status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])  # kB
        raise KeyError(field)

    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = status("VmRSS:")
    except OSError:
        return None
    fn()
    return max(0, status("VmHWM:") - before) / 1024


def time_interleaved(
    fns: Dict[str, Callable], device: str, min_time_s: float = 0.2, max_repeats: int = 50
) -> Dict[str, float]:
    """Median milliseconds of each fn() over rounds that call every fn in order (at least 5 rounds, until
    about min_time_s per fn). Interleaving makes a load change during the run hit every provider alike, so
    the ratios of one table stay comparable on a shared machine. On the CPU each timed call directly follows
    an untimed call of the same fn: a call pays for what its predecessor left behind (glibc trims the heap
    after a provider frees large temporaries, and the next call's output then faults fresh pages: the same
    ssm_step took 83 or 47 µs depending on which provider ran before it), so every provider is timed in its
    own steady state, as a loop of that op would run, not in the state another provider left."""
    for fn in fns.values():
        fn()
    _sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start_all < min_time_s * len(fns) and rounds < max_repeats):
        for name, fn in fns.items():
            if device == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(begin.elapsed_time(end))
            else:
                fn()  # untimed: the timed call below follows its own kind
                begin_s = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - begin_s) * 1e3)
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def format_table(rows: List[Row]) -> str:
    header = "| shape | backend | median ms | vs reference | vs peer | max rel err | peak extra MB |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]

    def ratio(value: float) -> str:
        return "-" if value != value else f"{value:.2f}x"  # NaN: that provider is not in this table

    for r in rows:
        peak = "-" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}"
        lines.append(
            f"| {r.shape} | {r.backend} | {r.median_ms:.3f} | {ratio(r.speedup_vs_reference)} | "
            f"{ratio(r.speedup_vs_peer)} ({r.peer}) | {r.max_rel_error:.1e} | {peak} |"
        )
    return "\n".join(lines)

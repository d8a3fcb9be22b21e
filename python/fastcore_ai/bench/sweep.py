"""`python -m fastcore_ai bench --sweep`: every public op against the torch code a user would write, over a grid of
shapes (issue 16). docs/sweep.md says how to run it and read it.

Each op's grid and peers live next to its family (`SWEEP` in bench/<family>.py: a list of harness.SweepOp); this
module is generic: it crosses each grid with the op's dtypes and the thread counts, times ours against the
fastest peer of every cell with the harness's interleaved timer (harness.time_interleaved), and writes per op
  <op>.json   every cell (params, dtype, threads, ours_us, peer_us, ratio = peer_us / ours_us, ...) and the
              run's metadata (build info, CPU, cores, torch, date, git commit, command)
  <op>.md     the table of cells (and the heatmap, linked)
  <op>.png    the heatmap (matplotlib, the `bench` extra; without it the PNG is skipped and the reason printed)
and README.md, an index of every op JSON in the output directory. `report()` redraws the markdown and PNGs
from saved JSONs without timing anything.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import moe, mux, nerf, pq, s4
from .harness import SweepOp, time_interleaved

SCHEMA = "fastcore_ai.sweep/1"
THREADS = (1, 2)
DEFAULT_OUT = "benchmarks/sweeps"
QUICK_OUT = "benchmarks/sweeps/quick"  # --quick's default, kept apart from the committed full-sweep files
MIN_TIME_S, QUICK_MIN_TIME_S = 0.2, 0.005

SWEEPS: Dict[str, SweepOp] = {}
for _module in (moe, s4, nerf, pq, mux):
    for _spec in _module.SWEEP:
        assert _spec.op not in SWEEPS, f"two sweeps of {_spec.op}"
        SWEEPS[_spec.op] = _spec

# Public names of fastcore_ai.ops that get no sweep, each with the reason (tests/test_bench_sweep.py checks that
# every other public name has a SWEEPS entry, so a new op cannot skip the sweep).
NOT_SWEPT: Dict[str, str] = {
    "RouterOutput": "a NamedTuple (moe_topk_route's output), not an op",
    "DispatchPlan": "a NamedTuple (moe_dispatch's plan), not an op",
    "RayAabbHits": "a NamedTuple (ray_aabb_intersect's output), not an op",
    "PackedSamples": "a NamedTuple (ray_march's output), not an op",
    "RenderOutput": "a NamedTuple (volume_render's output), not an op",
    "MAX_EXPERTS": "a constant",
    "MAX_TOP_K": "a constant",
    "MAX_DISPATCH_EXPERTS": "a constant",
    "MAX_STATES": "a constant",
    "MAX_GRID_LEVELS": "a constant",
    "MAX_HEAD_DIM": "a constant",
    "METRICS": "a constant (the pq metric names)",
    "MUX_MODES": "a constant (the mux mode names)",
    "fft_conv_size": "a size helper (an int from two ints), no kernel",
    "pq4_kernel": "a configuration query (the name of the SIMD family the pq kernels use), no tensor work",
    "switch_load_balancing_loss": "a three-term torch formula over [E] vectors (no kernel, no backend): it is "
    "the torch code itself",
    "pq4_pack": "a build-time layout conversion written in torch (reference backend only): ours is the torch "
    "code; its cost is part of index building, not of a search",
    "pq4_pack_lists": "a build-time layout helper in torch (no kernel), run once per index",
    "ivfpq_list_terms": "a build-time table of the IVF-PQ index (one torch GEMM-like product per model, no "
    "kernel), run once per trained index",
}


# ---- the grid ---------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def grid_points(spec: SweepOp, quick: bool = False) -> List[dict]:
    """Every point of the op's grid (dims product, in order), without the dtype and threads axes."""
    dims = spec.quick if quick else spec.dims
    names = list(dims)
    return [dict(zip(names, values)) for values in itertools.product(*(dims[n] for n in names))]


def cells_of(
    spec: SweepOp, quick: bool = False, threads: Sequence[int] = THREADS
) -> List[Tuple[dict, torch.dtype, int]]:
    """(params, dtype, threads) of every cell that will be timed: grid × dtypes × threads minus skipped ones."""
    out = []
    for dtype in spec.dtypes:
        for count in threads:
            for params in grid_points(spec, quick):
                if spec.skip is None or not spec.skip(params, dtype):
                    out.append((params, dtype, count))
    return out


# ---- timing ---------------------------------------------------------------------------------------------------


def run_cell(spec: SweepOp, params: dict, dtype: torch.dtype, threads: int, device: str, min_time_s: float) -> dict:
    """Time one cell: torch.set_num_threads(threads) for it (restored after), one untimed call of each provider
    (errors surface there, outputs compared), then harness.time_interleaved over ours and every peer."""
    record = {
        "op": spec.op,
        "params": dict(params),
        "dtype": dtype_name(dtype),
        "threads": threads,
        "ours_us": None,
        "peer_us": None,
        "peer": None,
        "peers_us": {},
        "ratio": None,
        "rel_diff": None,
        "error": None,
    }
    previous = torch.get_num_threads()
    try:
        if previous != threads:
            torch.set_num_threads(threads)
        cell = spec.make(dict(params), dtype, device)
        inputs = cell.setup()
        fns: Dict[str, Callable[[], object]] = {"fastcore_ai": (lambda: cell.ours(*inputs))}
        for name, fn in cell.peers.items():
            fns[name] = lambda fn=fn: fn(*inputs)
        outputs = {name: fn() for name, fn in fns.items()}
        if cell.compare is not None:
            first_peer = next(iter(cell.peers))
            diff = cell.compare(outputs["fastcore_ai"], outputs[first_peer], inputs)
            record["rel_diff"] = None if diff is None else float(diff)
        del outputs
        times_ms = time_interleaved(fns, device, min_time_s=min_time_s)
        ours = times_ms.pop("fastcore_ai") * 1e3
        record["peers_us"] = {name: t * 1e3 for name, t in times_ms.items()}
        best = min(record["peers_us"], key=record["peers_us"].get)
        record.update(
            ours_us=ours,
            peer=best,
            peer_us=record["peers_us"][best],
            ratio=record["peers_us"][best] / ours if ours > 0 else None,
        )
    except Exception as error:  # a cell that cannot run here is recorded, not fatal
        record["error"] = f"{type(error).__name__}: {error}"[:500]
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
    return record


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_info() -> dict:
    """The commit of the working tree this package runs from (read-only git calls), or {} outside a checkout."""
    root = Path(__file__).resolve().parents[3]

    def git(*args) -> Optional[str]:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("fastcore_ai", "__main__.py")):
        argv[0] = "-m fastcore_ai"
    return " ".join(["python"] + argv)


def run_metadata(device: str, quick: bool, threads: Sequence[int], min_time_s: float) -> dict:
    from .._build_info import build_info

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_info(),
        "machine": machine_info(),
        "torch": torch.__version__,
        "device": device,
        "quick": quick,
        "threads": list(threads),
        "min_time_s": min_time_s,
        "command": _command(),
        "build_info": build_info(),
    }


def op_document(spec: SweepOp, quick: bool) -> dict:
    dims = spec.quick if quick else spec.dims
    return {
        "schema": SCHEMA,
        "op": spec.op,
        "family": spec.family,
        "peer": spec.peer,
        "fixed": spec.fixed,
        "grid": [{"name": name, "values": list(values)} for name, values in dims.items()],
        "dtypes": [dtype_name(d) for d in spec.dtypes],
        "cells": [],
    }


def run_sweep(
    ops: Optional[Iterable[str]] = None,
    quick: bool = False,
    device: str = "cpu",
    threads: Sequence[int] = THREADS,
    min_time_s: Optional[float] = None,
    out_dir: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> Dict[str, dict]:
    """Sweep the named ops (default: every op in SWEEPS); returns {op: document}. With out_dir, each op's JSON,
    markdown and heatmap are written as soon as the op is done (so a long sweep keeps what it finished)."""
    names = list(ops) if ops else list(SWEEPS)
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise ValueError(f"no sweep for {unknown}; ops with a sweep: {sorted(SWEEPS)}")
    min_time_s = (QUICK_MIN_TIME_S if quick else MIN_TIME_S) if min_time_s is None else min_time_s
    meta = run_metadata(device, quick, threads, min_time_s)
    documents: Dict[str, dict] = {}
    for name in names:
        spec = SWEEPS[name]
        doc = op_document(spec, quick)
        doc["meta"] = meta
        if device not in spec.devices:
            log(f"[sweep] {name}: no {device} sweep (devices: {', '.join(spec.devices)}); skipped")
            continue
        cells = cells_of(spec, quick, threads)
        log(f"[sweep] {name}: {len(cells)} cells, peer {spec.peer}")
        start = time.perf_counter()
        for params, dtype, count in cells:
            record = run_cell(spec, params, dtype, count, device, min_time_s)
            doc["cells"].append(record)
            log("  " + _cell_line(record))
        doc["wall_s"] = round(time.perf_counter() - start, 2)
        documents[name] = doc
        if out_dir is not None:
            write_op(doc, out_dir, log)
    if out_dir is not None:
        write_index(out_dir)
    return documents


def _cell_line(record: dict) -> str:
    where = " ".join(f"{k}={v}" for k, v in record["params"].items())
    head = f"{where} {record['dtype']} {record['threads']}T"
    if record["error"]:
        return f"{head}: failed: {record['error']}"
    return (
        f"{head}: ours {record['ours_us']:.1f} us, {record['peer']} {record['peer_us']:.1f} us, {record['ratio']:.2f}x"
    )


# ---- outputs --------------------------------------------------------------------------------------------------


def _ok(record: dict) -> bool:
    ratio = record.get("ratio")
    return ratio is not None and isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0


def summary(doc: dict) -> dict:
    ratios = [c["ratio"] for c in doc["cells"] if _ok(c)]
    worst = min((c for c in doc["cells"] if _ok(c)), key=lambda c: c["ratio"], default=None)
    return {
        "cells": len(doc["cells"]),
        "timed": len(ratios),
        "failed": len(doc["cells"]) - len(ratios),
        "below_1": sum(r < 1.0 for r in ratios),
        "min": min(ratios) if ratios else None,
        "median": statistics.median(ratios) if ratios else None,
        "max": max(ratios) if ratios else None,
        "worst": worst,
    }


def _fmt_ratio(ratio) -> str:
    if ratio is None or not math.isfinite(ratio):
        return "-"
    text = f"{ratio:.2f}x"
    return f"**{text}** (<1)" if ratio < 1.0 else text


def _fmt_us(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1e4 else f"{value:.0f}"


def _meta_line(meta: dict) -> str:
    machine = meta.get("machine", {})
    commit = meta.get("git_commit", "unknown")[:12] + (" (dirty tree)" if meta.get("git_dirty") else "")
    return (
        f"{machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} usable cores, torch "
        f"{meta.get('torch', '?')}, {meta.get('device', 'cpu')}, commit {commit}, {meta.get('date', '?')}"
        + (", quick grid" if meta.get("quick") else "")
    )


def markdown(doc: dict, png_name: Optional[str] = None) -> str:
    dims = [g["name"] for g in doc["grid"]]
    s = summary(doc)
    lines = [
        f"# `{doc['op']}` sweep ({doc['family']})",
        "",
        f"Peer: {doc['peer']}." + (f" Fixed: {doc['fixed']}." if doc.get("fixed") else ""),
        "Ratio = peer time / our time (> 1: ours is faster; the fastest peer of each cell).",
        f"Machine: {_meta_line(doc.get('meta', {}))}.",
        f"Command: `{doc.get('meta', {}).get('command', '?')}`.",
        "",
    ]
    if s["timed"]:
        worst = s["worst"]
        where = ", ".join(f"{k}={v}" for k, v in worst["params"].items())
        lines.append(
            f"{s['timed']} cells timed ({s['failed']} failed): min {s['min']:.2f}x ({where}, "
            f"{worst['dtype']}, {worst['threads']}T), median {s['median']:.2f}x, max {s['max']:.2f}x; "
            f"{s['below_1']} below 1.0x."
        )
    else:
        lines.append(f"No cell timed ({s['failed']} failed).")
    if png_name:
        lines += ["", f"![{doc['op']} heatmap]({png_name})"]
    lines += [
        "",
        "| " + " | ".join(dims + ["dtype", "threads", "ours us", "peer us", "peer", "ratio"]) + " |",
        "|" + "---|" * len(dims) + "---|---:|---:|---:|---|---:|",
    ]
    for c in doc["cells"]:
        params = [str(c["params"].get(d, "")) for d in dims]
        if c.get("error"):
            tail = ["-", "-", "-", f"failed: {c['error'][:120]}".replace("|", "/")]
        else:
            tail = [_fmt_us(c["ours_us"]), _fmt_us(c["peer_us"]), str(c["peer"]), _fmt_ratio(c["ratio"])]
        lines.append("| " + " | ".join(params + [c["dtype"], str(c["threads"])] + tail) + " |")
    return "\n".join(lines) + "\n"


def heatmap(doc: dict, path: str) -> None:
    """The op's heatmap: ratio per cell (rows: the first dim, columns: the second), one panel per (third-dim
    value) × dtype × threads; a diverging map centred on 1.0x in log scale (red: slower than the peer, blue:
    faster), cells below 1.0x hatched and outlined, the ratio printed in each cell. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    grid = doc["grid"]
    row_dim = grid[0]
    col_dim = grid[1] if len(grid) > 1 else {"name": "", "values": [""]}
    facet_dims = grid[2:]
    facet_values = list(itertools.product(*(g["values"] for g in facet_dims))) or [()]
    variants = []  # (dtype, threads) in the order the cells have them
    for c in doc["cells"]:
        if (c["dtype"], c["threads"]) not in variants:
            variants.append((c["dtype"], c["threads"]))
    variants = variants or [(d, t) for d in doc.get("dtypes", ["float32"]) for t in THREADS]
    lookup = {}
    for c in doc["cells"]:
        key = (c["dtype"], c["threads"]) + tuple(c["params"].get(g["name"]) for g in grid)
        lookup[key] = c
    ratios = [c["ratio"] for c in doc["cells"] if _ok(c)]
    span = max([2.0] + [max(r, 1.0 / r) for r in ratios])
    span = min(span, 1000.0)
    norm = LogNorm(vmin=1.0 / span, vmax=span)
    cmap = plt.get_cmap("RdBu")
    # panels: one row per value of the facet dims, one column per (dtype, threads)
    n_rows, n_cols = len(facet_values), len(variants)
    nr, nc = len(row_dim["values"]), len(col_dim["values"])
    fig_w = max(6.0, n_cols * (nc * 0.8 + 1.3) + 1.5)
    fig_h = max(3.5, n_rows * (nr * 0.42 + 1.0) + 1.5)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, fig_h), squeeze=False, layout="constrained")
    image = None
    for i, facet in enumerate(facet_values):
        for j, (dtype, threads) in enumerate(variants):
            ax = axes[i][j]
            values = [[math.nan] * nc for _ in range(nr)]
            labels = [[""] * nc for _ in range(nr)]
            for a, rv in enumerate(row_dim["values"]):
                for b, cv in enumerate(col_dim["values"]):
                    key = (dtype, threads, rv) + ((cv,) if len(grid) > 1 else ()) + tuple(facet)
                    c = lookup.get(key)
                    if c is None:
                        labels[a][b] = "skip"
                    elif not _ok(c):
                        labels[a][b] = "err"
                    else:
                        values[a][b] = c["ratio"]
                        labels[a][b] = f"{c['ratio']:.2f}x"
            ax.set_facecolor("#d9d9d9")  # skipped and failed cells
            image = ax.imshow(numpy.array(values, dtype=float), cmap=cmap, norm=norm, aspect="auto")
            for a in range(nr):
                for b in range(nc):
                    value = values[a][b]
                    below = math.isfinite(value) and value < 1.0
                    if below:
                        ax.add_patch(
                            Rectangle(
                                (b - 0.5, a - 0.5), 1, 1, fill=False, hatch="///", edgecolor="black", linewidth=2.0
                            )
                        )
                    dark = math.isfinite(value) and abs(math.log(value)) > 0.6 * math.log(span)
                    ax.text(
                        b,
                        a,
                        labels[a][b],
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark and not below else "black",
                        fontweight="bold" if below else "normal",
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none") if below else None,
                    )
            ax.set_xticks(range(nc))
            ax.set_xticklabels([str(v) for v in col_dim["values"]], fontsize=8)
            ax.set_yticks(range(nr))
            ax.set_yticklabels([str(v) for v in row_dim["values"]], fontsize=8)
            ax.set_xlabel(col_dim["name"], fontsize=8)
            ax.set_ylabel(row_dim["name"], fontsize=8)
            title = [dtype, f"{threads} thread" + ("s" if threads != 1 else "")]
            title += [f"{g['name']}={v}" for g, v in zip(facet_dims, facet)]
            ax.set_title(", ".join(title), fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=min(1.0, 0.3 + 0.25 * n_rows), pad=0.02)
        bar.set_label("peer time / our time (log scale; 1.0x white)", fontsize=8)
    meta = doc.get("meta", {})
    width = max(40, int(fig_w * 13))
    text = "\n".join(
        textwrap.fill(line, width)
        for line in (
            f"{doc['op']}: peer time / our time (> 1: ours faster; red and hatched: slower than the peer)",
            f"peer: {doc['peer']}",
            _meta_line(meta),
        )
    )
    fig.suptitle(text, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matplotlib_missing() -> Optional[str]:
    """None when matplotlib imports, else why the heatmaps are skipped."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"matplotlib is not importable ({error}); install the bench extra: pip install 'fastcore_ai[bench]'"
    return None


def write_op(doc: dict, out_dir: str, log: Callable[[str], None] = print) -> List[str]:
    """<op>.json, <op>.md and (with matplotlib) <op>.png under out_dir; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    op = doc["op"]
    written = []
    json_path = out / f"{op}.json"
    with open(json_path, "w") as handle:
        json.dump(doc, handle, indent=1)
    written.append(str(json_path))
    written += render(doc, out_dir, log)
    return written


def render(doc: dict, out_dir: str, log: Callable[[str], None] = print) -> List[str]:
    """The op's markdown and heatmap from its document (no timing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    op = doc["op"]
    written = []
    missing = matplotlib_missing()
    png_name = None
    if missing is None and doc["cells"]:
        png_path = out / f"{op}.png"
        heatmap(doc, str(png_path))
        png_name = png_path.name
        written.append(str(png_path))
    elif missing:
        log(f"[sweep] {op}: no heatmap PNG: {missing}")
    md_path = out / f"{op}.md"
    md_path.write_text(markdown(doc, png_name))
    written.append(str(md_path))
    return written


def load(path: str) -> List[Tuple[Path, dict]]:
    """(file, op document) of a sweep JSON file, or of every sweep JSON in a directory."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    docs = []
    for f in files:
        with open(f) as handle:
            doc = json.load(handle)
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
            docs.append((f, doc))
    if not docs:
        raise ValueError(f"no sweep JSON ({SCHEMA}) at {path}")
    return docs


def write_index(out_dir: str) -> str:
    """README.md of out_dir: one line per op JSON found there (its run's commit and date, worst and median
    ratio, cells below 1.0x), linking each op's table and heatmap."""
    out = Path(out_dir)
    try:
        docs = [doc for _, doc in load(out_dir)]
    except ValueError:
        docs = []
    lines = [
        "# Shape sweeps: fastcore_ai against the torch code a user would write",
        "",
        "Written by `python -m fastcore_ai bench --sweep` (docs/sweep.md). Ratio = peer time / our time; "
        "> 1 means ours is faster. Each op's table and heatmap are linked.",
        "",
        "| op | family | peer | cells | min | median | below 1.0x | run |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for doc in sorted(docs, key=lambda d: (d["family"], d["op"])):
        s = summary(doc)
        op = doc["op"]
        link = f"[`{op}`]({op}.md)" + (f" ([png]({op}.png))" if (out / f"{op}.png").exists() else "")
        meta = doc.get("meta", {})
        run = f"{meta.get('git_commit', '?')[:8]} {meta.get('date', '?')[:10]}" + (
            " quick" if meta.get("quick") else ""
        )
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"
        lines.append(
            f"| {link} | {doc['family']} | {doc['peer']} | {s['timed']}/{s['cells']} | {fmt(s['min'])} | "
            f"{fmt(s['median'])} | {s['below_1']} | {run} |"
        )
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def report(path: str, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> List[str]:
    """Redraw the markdown and heatmaps of saved sweep JSON(s) (a file or a directory of them) into out_dir
    (default: where the JSONs are), and the index there; no timing. A JSON from elsewhere is copied into
    out_dir, so the index lists it."""
    docs = load(path)
    written = []
    targets = set()
    for source, doc in docs:
        target = Path(out_dir) if out_dir else source.parent
        target.mkdir(parents=True, exist_ok=True)
        copy = target / f"{doc['op']}.json"
        if copy.resolve() != source.resolve():
            copy.write_text(json.dumps(doc, indent=1))
            written.append(str(copy))
        written += render(doc, str(target), log)
        targets.add(str(target))
    written += [write_index(t) for t in sorted(targets)]
    return written


# ---- the CLI (python -m fastcore_ai bench --sweep ...) ---------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="time every op (or each --op) over its shape grid against its torch peer; writes "
        "<op>.json/.md/.png under --out (docs/sweep.md)",
    )
    parser.add_argument(
        "--op",
        action="append",
        choices=sorted(SWEEPS),
        metavar="OP",
        help="with --sweep: only this op (repeatable); choices: " + ", ".join(sorted(SWEEPS)),
    )
    parser.add_argument(
        "--out", help=f"with --sweep: output directory (default {DEFAULT_OUT}, with --quick {QUICK_OUT})"
    )
    parser.add_argument(
        "--sweep-report",
        metavar="JSON",
        help="redraw the markdown and heatmaps of a saved sweep JSON (or a directory of them) "
        "without timing; into --out, default the JSON's directory",
    )
    parser.add_argument(
        "--list",
        dest="sweep_list",
        action="store_true",
        help="with --sweep: print each op's grid and cell count, time nothing",
    )


def wants_sweep(args) -> bool:
    return bool(
        getattr(args, "sweep", False) or getattr(args, "sweep_report", None) or getattr(args, "sweep_list", False)
    )


def main(args) -> None:
    if args.sweep_report:
        for path in report(args.sweep_report, args.out):
            print(f"wrote {path}")
        return
    names = args.op or list(SWEEPS)
    threads = (args.threads,) if getattr(args, "threads", None) else THREADS
    if args.sweep_list:
        total = 0
        for name in names:
            spec = SWEEPS[name]
            count = len(cells_of(spec, args.quick, threads))
            total += count
            dims = ", ".join(f"{k} {list(v)}" for k, v in (spec.quick if args.quick else spec.dims).items())
            print(
                f"{name:22s} {count:4d} cells: {dims} x {[dtype_name(d) for d in spec.dtypes]} x threads "
                f"{list(threads)}"
            )
        print(f"total {total} cells")
        return
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    docs = run_sweep(names, quick=args.quick, device=args.device, threads=threads, out_dir=out)
    print(
        f"\n[sweep] {sum(len(d['cells']) for d in docs.values())} cells of {len(docs)} ops in "
        f"{time.perf_counter() - start:.1f} s; written under {out}/ (index: {out}/README.md)"
    )
    for doc in docs.values():
        s = summary(doc)
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"
        print(
            f"  {doc['op']:22s} min {fmt(s['min'])} median {fmt(s['median'])}, {s['below_1']} cells below 1.0x, "
            f"{s['failed']} failed"
        )

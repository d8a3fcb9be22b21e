"""Benchmark harness behind `python -m fastcore_ai bench` and the pytest-benchmark suites.

One table per family: shape, backend, median time, speedup against the pure-torch reference and
against the named peer, max relative error against the float64 oracle, and peak extra memory (GPU:
allocator peak; CPU: resident-set peak, see cpu_peak_extra_mb).
All providers of a row are timed in the same process run, interleaved, so ratios are comparable;
GPU times use CUDA events after a synchronising warm-up, CPU times use perf_counter.
"""
from __future__ import annotations

import ctypes
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import build_info, ops, reference


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


def time_call(fn: Callable, device: str, min_time_s: float = 0.2, max_repeats: int = 50) -> float:
    """Median milliseconds of fn() over repeated calls (at least 5, until about min_time_s)."""
    fn()
    _sync(device)
    samples: List[float] = []
    start_all = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start_all < min_time_s and len(samples) < max_repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin_s) * 1e3)
    return statistics.median(samples)


# ---- moe ----------------------------------------------------------------------------------------

def torch_composition_router(logits: torch.Tensor, k: int, renormalize: bool = True):
    """The router as separate torch calls, as a user would write it (the peer for moe_topk_route)."""
    x = logits.float()
    probs = torch.softmax(x, dim=-1)
    weights, expert_ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    z_loss = torch.logsumexp(x, dim=-1).pow(2).mean()
    tokens_per_expert = torch.bincount(expert_ids.flatten(), minlength=x.shape[1])
    mean_prob = probs.mean(dim=0)
    return weights, expert_ids, z_loss, tokens_per_expert, mean_prob


def moe_router_cases(device: str, quick: bool = False) -> List[Case]:
    fast_backends = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    cases = []
    token_counts = (4096, 65536)
    for T in token_counts:
        for E in (8, 64, 128):
            for k in (2, 8):
                if quick and (T, E) not in ((4096, 8), (65536, 128)):
                    continue

                def setup(T=T, E=E):
                    generator = torch.Generator().manual_seed(T * 1000 + E)
                    return (torch.randn(T, E, generator=generator).to(device),)

                providers = {b: (lambda x, k=k, b=b: ops.moe_topk_route(x, k, backend=b)) for b in fast_backends}
                providers["reference"] = lambda x, k=k: ops.moe_topk_route(x, k, backend="reference")
                providers["torch-composition"] = lambda x, k=k: torch_composition_router(x, k)

                def error(output, inputs, k=k):
                    oracle = reference.moe_topk_route(inputs[0].double().cpu(), k, True)
                    weights = output[0].double().cpu()
                    return float((weights - oracle[0]).norm() / oracle[0].norm())

                cases.append(Case("moe", f"moe_topk_route T={T} E={E} k={k} float32", setup, providers, error,
                                  peer="torch-composition"))
    return cases


def moe_experts_cases(device: str, quick: bool = False) -> List[Case]:
    """The expert computation (dispatch -> expert MLPs -> combine) against Hugging Face transformers'
    own experts implementations on the same MixtralExperts module and routing (needs transformers >= 5)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        print("  [moe_experts] transformers >= 5 is not installed (pip install fastcore_ai[bench]); skipped")
        return []
    from .integrations import transformers as fastcore_hf
    fastcore_hf.register()
    shapes = [("mixtral-like", 2048, 1024, 1024, 8, 2), ("qwen3-moe-like", 2048, 512, 256, 64, 8)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    implementations = ["fastcore_ai", "eager", "batched_mm", "grouped_mm"]
    cases = []
    for name, T, H, I, E, k in shapes:
        for dtype in dtypes:
            for mode in ("forward", "forward+backward"):
                def setup(T=T, H=H, I=I, E=E, k=k, dtype=dtype):
                    torch.manual_seed(0)
                    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                           num_experts_per_tok=k)
                    module = MixtralExperts(config).to(device=device, dtype=dtype)
                    for p in module.parameters():
                        torch.nn.init.normal_(p, std=0.02)
                    x = torch.randn(T, H, device=device, dtype=dtype)
                    probs = torch.softmax(torch.randn(T, E, device=device), dim=1)
                    weights, ids = torch.topk(probs, k, dim=1)
                    return module, x, ids, (weights / weights.sum(1, keepdim=True)).to(dtype)

                def provider(module, x, ids, weights, implementation, mode=mode):
                    module.config._experts_implementation = implementation
                    if mode == "forward":
                        with torch.no_grad():
                            return module(x, ids, weights)
                    module.zero_grad(set_to_none=True)
                    x_leaf = x.detach().requires_grad_()
                    out = module(x_leaf, ids, weights)
                    out.float().square().mean().backward()
                    return out.detach()

                # HF's batched_mm gathers a weight matrix per (token, slot): T·k·3·I·H elements.
                gathered_bytes = T * k * 3 * I * H * torch.finfo(dtype).bits // 8
                usable = [impl for impl in implementations if impl != "batched_mm" or gathered_bytes < 2**32]
                if len(usable) < len(implementations):
                    print(f"  [moe_experts {name}] hf-batched_mm left out: it would gather "
                          f"{gathered_bytes / 2**30:.0f} GiB of expert weights")
                providers = {f"hf-{impl}" if impl != "fastcore_ai" else "fastcore":
                             (lambda *a, impl=impl, run=provider: run(*a, impl))
                             for impl in usable}
                if mode == "forward":
                    # The same computation as three separate ops (dispatch -> grouped MLP -> combine): the
                    # gain of the fused moe_experts path over its own composition.
                    def unfused(module, x, ids, weights):
                        with torch.no_grad():
                            x_sorted, plan = ops.moe_dispatch(x, ids, None, module.gate_up_proj.shape[0])
                            y = ops.moe_grouped_mlp(x_sorted, plan.expert_offsets, module.gate_up_proj,
                                                    module.down_proj)
                            return ops.moe_combine(y, plan, weights)
                    providers["fastcore-unfused"] = unfused

                def error(output, inputs):
                    module, x, ids, weights = inputs
                    reference_module = type(module)(module.config).double()
                    reference_module.load_state_dict({key: v.double() for key, v in module.state_dict().items()})
                    reference_module.config._experts_implementation = "eager"
                    with torch.no_grad():
                        expected = reference_module(x.double(), ids, weights.double())
                    return float((output.double() - expected).norm() / expected.norm())

                cases.append(Case("moe_experts", f"experts {name} T={T} H={H} I={I} E={E} k={k} "
                                  f"{str(dtype).replace('torch.', '')} {mode}", setup, providers, error,
                                  peer="hf-grouped_mm"))
    return cases


FAMILIES = {"moe": moe_router_cases, "moe_experts": moe_experts_cases}


def _add_family_cases() -> None:
    """Each other family keeps its cases in fastcore_ai/bench_<family>.py (FAMILIES: name -> cases)."""
    from . import bench_mux, bench_nerf, bench_pq, bench_s4
    for module in (bench_s4, bench_nerf, bench_pq, bench_mux):
        FAMILIES.update(module.FAMILIES)


_add_family_cases()

# What `bench` without --family and `demo` run: one entry per family's main table. The other names in
# FAMILIES are parts or subsets of these (e.g. nerf_render, pq_fastscan) for focused runs.
DEFAULT_FAMILIES = ["moe", "moe_experts", "s4", "nerf", "pq", "mux_attention", "mux", "mux_encoder"]


def run(families: List[str], device: str = "cpu", quick: bool = False) -> List[Row]:
    rows: List[Row] = []
    for family in families:
        for case in FAMILIES[family](device, quick):
            inputs = case.setup()
            times: Dict[str, float] = {}
            errors: Dict[str, float] = {}
            peaks: Dict[str, Optional[float]] = {}
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
                    times[name] = time_call(lambda: fn(*inputs), device, min_time_s=0.05 if quick else 0.2)
                except Exception as error:  # a provider that cannot run here is reported, not fatal
                    times[name], errors[name], peaks[name] = float("nan"), float("nan"), None
                    print(f"  [{case.shape}] {name} failed: {error}")
            for name in case.providers:
                rows.append(Row(case.family, case.shape, name, times[name],
                                times.get("reference", float("nan")) / times[name],
                                times.get(case.peer, float("nan")) / times[name], case.peer, errors[name], peaks[name]))
    return rows


def format_table(rows: List[Row]) -> str:
    header = "| shape | backend | median ms | vs reference | vs peer | max rel err | peak extra MB |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    def ratio(value: float) -> str:
        return "-" if value != value else f"{value:.2f}x"  # NaN: that provider is not in this table

    for r in rows:
        peak = "-" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.1f}"
        lines.append(f"| {r.shape} | {r.backend} | {r.median_ms:.3f} | {ratio(r.speedup_vs_reference)} | "
                     f"{ratio(r.speedup_vs_peer)} ({r.peer}) | {r.max_rel_error:.1e} | {peak} |")
    return "\n".join(lines)


def main(families: List[str], device: str, json_path: Optional[str], quick: bool) -> List[Row]:
    rows = run(families, device, quick)
    for family in families:
        print(f"\n## {family} ({device}, {torch.get_num_threads()} threads, torch {torch.__version__})\n")
        print(format_table([r for r in rows if r.family == family]))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"build_info": build_info(), "device": device, "rows": [asdict(r) for r in rows]}, handle, indent=2)
    return rows

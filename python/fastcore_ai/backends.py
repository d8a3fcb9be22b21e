"""Backends as data, and the choice among them (DESIGN rule 5).

Each backend declares where it can run (tensor device types) and what its environment needs; each
op declares, per backend, the dtypes and limits it supports and a priority list for "auto".
`select(...)` returns the first backend with no reason against it, or raises an error that lists
every candidate with its reasons. An explicit backend (argument, `use_backend(...)` or the
FASTCORE_AI_BACKEND environment variable) that cannot serve the call is an error, never a silent
fallback.

Precedence: an explicit `backend=` argument, then the innermost `use_backend(...)`, then
FASTCORE_AI_BACKEND, then "auto".
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

from . import _native

BACKENDS = ("cuda", "triton", "cpu", "reference")
_ENV_VAR = "FASTCORE_AI_BACKEND"
_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastcore_ai_backend", default=None)


def _check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"fastcore_ai: unknown backend {name!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS)
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ops called with backend="auto" use `name` (which must then serve them)."""
    token = _context_backend.set(_check_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    import sys

    kernels = sys.modules.get("fastcore_ai.triton_kernels")
    if kernels is not None and hasattr(kernels, "INTERPRETED"):
        return bool(kernels.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# ---- environment checks: why a backend cannot run on a device at all --------------------------


def _cpu_reasons(device: torch.device, argument: str) -> List[str]:
    reasons = []
    if device.type != "cpu":
        reasons.append(f"the cpu backend takes CPU tensors, but {argument} is on {device}")
    error = _native.load_error()
    if error:
        reasons.append(error)
    return reasons


def _cuda_reasons(device: torch.device, argument: str) -> List[str]:
    reasons = []
    error = _native.load_error()
    if error:
        return [error]
    if not _native.CUDA_COMPILED:
        reasons.append(
            "fastcore_ai was built without CUDA kernels (no nvcc or a CPU-only torch at build time); "
            "rebuild on a machine with nvcc: FASTCORE_AI_CUDA=1 pip install --no-build-isolation -e ."
        )
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if device.type != "cuda":
        reasons.append(f"the cuda backend takes CUDA tensors, but {argument} is on {device} (move it with .cuda())")
    return reasons


# Read once: dynamo cannot trace importlib's finder, and whether triton is installed does not change.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_reasons(device: torch.device, argument: str) -> List[str]:
    if not TRITON_INSTALLED:
        return ["triton is not installed (pip install triton)"]
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        if triton_interpreted():
            return []
        return [
            f"{argument} is a CPU tensor and Triton runs on CPU tensors only under its interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (tests do), or pass CUDA tensors"
        ]
    return [
        f"the triton backend takes CUDA tensors (or CPU ones under TRITON_INTERPRET=1), but {argument} is on {device}"
    ]


def _reference_reasons(device: torch.device, argument: str) -> List[str]:
    return []


_ENVIRONMENT_CHECKS: Dict[str, Callable[[torch.device, str], List[str]]] = {
    "cpu": _cpu_reasons,
    "cuda": _cuda_reasons,
    "triton": _triton_reasons,
    "reference": _reference_reasons,
}


# ---- per-op capability tables -----------------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """What one backend supports for one op: dtypes of the main input, and extra limits
    (a function of the call's arguments returning the reasons it cannot serve them)."""

    dtypes: FrozenSet[torch.dtype]
    limits: Optional[Callable[..., List[str]]] = None


@dataclass(frozen=True)
class OpTable:
    op: str
    priority: Tuple[str, ...]  # order tried by "auto"
    support: Dict[str, Support] = field(default_factory=dict)


_OPS: Dict[str, OpTable] = {}


# The dtypes of the common case: GPU kernels take the three float types with float32 math; the cpu
# kernels and the reference also take float64 (gradcheck, the oracle).
KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
_FLOAT64_TOO = KERNEL_DTYPES | {torch.float64}


def standard_table(op: str, priority: Tuple[str, ...] = ("cuda", "triton", "cpu", "reference")) -> OpTable:
    """The OpTable of an op whose backends follow the common dtype rule above."""
    return OpTable(
        op,
        priority,
        {name: Support(_FLOAT64_TOO if name in ("cpu", "reference") else KERNEL_DTYPES) for name in priority},
    )


def register_op(table: OpTable) -> OpTable:
    for name in table.support:
        _check_name(name)
    _OPS[table.op] = table
    return table


def op_table(op: str) -> OpTable:
    return _OPS[op]


def reasons_against(
    op: str, backend: str, device: torch.device, dtype: torch.dtype, argument: str = "input", **call
) -> List[str]:
    """Every reason `backend` cannot run `op` on this device/dtype/call ([] when it can); `argument`
    names the tensor whose device and dtype decide (for the messages)."""
    table = _OPS[op]
    support = table.support.get(backend)
    if support is None:
        return [f"{op} has no {backend} implementation"]
    reasons = list(_ENVIRONMENT_CHECKS[backend](device, argument))
    if dtype not in support.dtypes:
        allowed = ", ".join(sorted(str(d).replace("torch.", "") for d in support.dtypes))
        reasons.append(f"{argument} dtype {str(dtype).replace('torch.', '')} is not supported (supported: {allowed})")
    if support.limits is not None:
        reasons.extend(support.limits(**call))
    return reasons


# FASTCORE_AI_BACKEND as the selection cache's key reads it: os.environ.get costs ~1 µs when the variable is
# unset (a KeyError raised and caught inside os._Environ), so the raw value is read from os.environ's own
# mapping where CPython has one (os.environ.__setitem__ / putenv, and so monkeypatch.setenv, update it).
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV_VAR) if hasattr(os.environ, "encodekey") else None


def backend_env_value():
    """The raw FASTCORE_AI_BACKEND value (None when unset), cheaply."""
    if _ENVIRON_DATA is not None and _ENV_KEY is not None:
        return _ENVIRON_DATA.get(_ENV_KEY)
    return os.environ.get(_ENV_VAR)


def requested_backend(backend: str) -> Tuple[str, str]:
    """(name, where it came from) after applying argument > use_backend > FASTCORE_AI_BACKEND > auto."""
    _check_name(backend)
    if backend != "auto":
        return backend, "backend argument"
    context = _context_backend.get()
    if context is not None and context != "auto":
        return context, "fastcore_ai.use_backend"
    env = os.environ.get(_ENV_VAR, "").strip()
    if env and env != "auto":
        return _check_name(env), f"{_ENV_VAR}={env}"
    return "auto", ""


# Successful selections, keyed by everything a selection reads that can change between calls (the
# arguments, use_backend, FASTCORE_AI_BACKEND); the rest (the build, triton's presence, the interpreter
# flag, whether a GPU is visible) is fixed for the process. Failures are never cached: they raise each time.
_SELECTED: Dict[tuple, str] = {}
_SELECTED_LIMIT = 4096


def clear_selection_cache() -> None:
    """Forget cached selections (tests that monkeypatch the environment facts; never needed otherwise)."""
    _SELECTED.clear()


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype, argument: str = "input", **call) -> str:
    """The backend that will run `op`, or a RuntimeError listing why none (or the requested one) can.
    Cached per call signature (~0.3 µs when cached); under torch.compile it is computed while tracing
    (every fact it reads is traceable), so the compiled graph holds the chosen backend as a constant."""
    if torch.compiler.is_compiling():
        return _select(op, backend, device, dtype, argument, call)
    key = (op, backend, _context_backend.get(), backend_env_value(), device, dtype, argument, *call.items())
    try:
        chosen = _SELECTED.get(key)
    except TypeError:  # an unhashable limit argument: select without the cache
        return _select(op, backend, device, dtype, argument, call)
    if chosen is None:
        chosen = _select(op, backend, device, dtype, argument, call)
        if len(_SELECTED) >= _SELECTED_LIMIT:
            _SELECTED.clear()
        _SELECTED[key] = chosen
    return chosen


def _select(op: str, backend: str, device: torch.device, dtype: torch.dtype, argument: str, call: dict) -> str:
    name, source = requested_backend(backend)
    if name != "auto":
        reasons = reasons_against(op, name, device, dtype, argument, **call)
        if reasons:
            raise RuntimeError(
                f"fastcore_ai.ops.{op}: backend '{name}' (from {source}) cannot run this call: " + "; ".join(reasons)
            )
        return name
    report = []
    for candidate in _OPS[op].priority:
        reasons = reasons_against(op, candidate, device, dtype, argument, **call)
        if candidate == "triton" and device.type == "cpu" and not reasons:
            reasons = ["auto never picks the Triton CPU interpreter (ask for backend='triton' explicitly)"]
        if not reasons:
            return candidate
        report.append(f"  {candidate}: " + "; ".join(reasons))
    raise RuntimeError(
        f"fastcore_ai.ops.{op}: no backend can run this call "
        f"({argument} on {device}, dtype {dtype}):\n" + "\n".join(report)
    )


def describe() -> List[Tuple[str, str, str, str]]:
    """(op, backend, dtypes, available-here) rows, for the README table and `python -m fastcore_ai`."""
    rows = []
    for table in _OPS.values():
        for name in table.priority:
            support = table.support[name]
            dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in support.dtypes))
            device = torch.device("cuda" if name in ("cuda", "triton") else "cpu")
            env = _ENVIRONMENT_CHECKS[name](device, "input")
            rows.append((table.op, name, dtypes, "yes" if not env else "no: " + env[0]))
    return rows


def priority_names(op: str) -> Sequence[str]:
    return _OPS[op].priority


_CPU_ISA_CAPS = {None: -1, "auto": 0, "portable": 1, "avx2": 2, "avx512": 3}


def cpu_isa(cap: Optional[str] = None) -> str:
    """The instruction-set level of the cpu backend's hand-written SIMD paths, for every family:
    "avx512" (AVX-512 F+BW), "avx2" or "portable" — what this CPU has, lowered by a cap.

    `cap` ("portable", "avx2", "avx512") lowers the level for the whole process until `cap="auto"` lifts
    it; a level above what the CPU has changes nothing. The environment variable FASTCORE_AI_CPU_ISA
    (same names, read once) is a cap `cap` cannot lift. Set it only while no kernel runs (tests use it
    to cover the portable loops on AVX-512 machines). The cap reaches the intrinsic paths only: the
    auto-vectorised loops are compiled in three copies (x86-64-v4/v3/baseline) of which the library
    loader picks one for this CPU, whatever the cap (csrc/include/fastcore/cpu_isa.h)."""
    if cap not in _CPU_ISA_CAPS:
        raise ValueError(
            f"fastcore_ai.backends.cpu_isa: cap must be one of {[c for c in _CPU_ISA_CAPS if c]} or None, got {cap!r}"
        )
    return _native.native().cpu_isa(_CPU_ISA_CAPS[cap])

"""The one place that checks user input. Every message names the op, the argument, what was
expected and what was given, e.g.
`fastcore_ai.ops.moe_topk_route: logits must be a 2-D tensor [T, E], got 3-D (2, 3, 4)`.
Raises TypeError for a wrong type/dtype and ValueError for a wrong shape or value (never assert,
which `python -O` strips)."""

from __future__ import annotations

from typing import Iterable

import torch


def _prefix(op: str) -> str:
    return f"fastcore_ai.ops.{op}: "


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)} on {t.device}"


def check_tensor(op: str, name: str, value, *, ndim: int, dtypes: Iterable[torch.dtype], layout: str) -> None:
    """`value` must be a tensor of rank `ndim` and one of `dtypes`; `layout` describes the shape ("[T, E]").
    The messages are built only on failure: this runs on every call of every op."""
    if isinstance(value, torch.Tensor) and value.dtype in dtypes and value.dim() == ndim:
        return
    allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{_prefix(op)}{name} must be a torch.Tensor {layout} of {allowed}, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{_prefix(op)}{name} must be {allowed} with shape {layout}, got {_describe(value)}")
    raise ValueError(f"{_prefix(op)}{name} must be a {ndim}-D tensor {layout}, got {value.dim()}-D {_describe(value)}")


def check_int(op: str, name: str, value, low: int, high: int, why: str = "") -> None:
    """`value` must be a Python int in [low, high]; `why` explains where the bounds come from."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_prefix(op)}{name} must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{_prefix(op)}{name} must satisfy {low} <= {name} <= {high}{reason}, got {value}")


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{_prefix(op)}{name} must be a bool, got {type(value).__name__} {value!r}")


def check_size(op: str, what: str, value: int, low: int, high: int, given: torch.Tensor) -> None:
    """A dimension `what` of tensor `given` must lie in [low, high]."""
    if not low <= value <= high:
        raise ValueError(
            f"{_prefix(op)}{what} must satisfy {low} <= {what.split()[0]} <= {high}, got {value} ({_describe(given)})"
        )


def check_positive_float(op: str, name: str, value) -> None:
    """`value` must be a finite real number > 0 (an int is accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_prefix(op)}{name} must be a positive float, got {type(value).__name__} {value!r}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{_prefix(op)}{name} must be a finite number > 0, got {value}")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{_prefix(op)}{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")

"""Loads the compiled extension fastcore_ai._C once, keeping the reason when it cannot be loaded.

Nothing here ever hands out None: `native()` returns the module or raises an error that says why
the extension is missing and how to build it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

_module = None
_load_error: Optional[BaseException] = None
_tried = False

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make test`) from the repository root"


def _load() -> None:
    global _module, _load_error, _tried
    if _tried:
        return
    _tried = True
    try:
        _module = importlib.import_module("fastcore_ai._C")
    except ImportError as error:  # the .so is missing or was built against another torch
        _load_error = error
        # Loud, once: backend="auto" then runs the slower pure-torch reference (build_info() says why too).
        warnings.warn(
            f"fastcore_ai: the native extension fastcore_ai._C could not be imported ({error}); "
            f"backend='auto' runs the pure-torch reference instead; {BUILD_HINT}",
            RuntimeWarning,
            stacklevel=2,
        )


def load_error() -> Optional[str]:
    """None when the extension loaded; otherwise a sentence saying why not and how to fix it."""
    _load()
    if _module is not None:
        return None
    return f"the native extension fastcore_ai._C could not be imported ({_load_error}); {BUILD_HINT}"


def native():
    """The fastcore_ai._C module, or a RuntimeError explaining why it is unavailable."""
    reason = load_error()
    if reason is not None:
        raise RuntimeError(f"fastcore_ai: {reason}")
    return _module


# Load at package import, not on first use: the first op call may happen while torch.compile traces,
# and dynamo cannot trace an import (nor the pybind build_config, so the build facts are read here once).
# A failed load is remembered, warned about once, and reported on use; never raised here.
_load()
_BUILD_CONFIG = dict(_module.build_config()) if _module is not None else {}
CUDA_COMPILED = bool(_BUILD_CONFIG.get("cuda_compiled", False))


def build_config() -> dict:
    """What the extension was compiled with ({} when it is not importable); read once at import."""
    return dict(_BUILD_CONFIG) if load_error() is None else {}

"""fastcore_ai: hand-written CUDA, Triton and C++ kernels for five ML hot paths, each tested against a
pure-PyTorch reference.

    import fastcore_ai.ops        # functional ops (registered torch ops)
    import fastcore_ai.nn         # drop-in layers
    fastcore_ai.build_info()      # how this install was built and what can run here
    with fastcore_ai.use_backend("reference"): ...
"""

from __future__ import annotations

from ._version import __version__
from ._build_info import build_info
from .backends import use_backend
from . import reference, ops, nn  # noqa: E402  (ops registers the torch ops)

__all__ = ["__version__", "build_info", "use_backend", "ops", "nn", "reference"]

"""build_info(): how this install was built and what can run here (below everything that reports it)."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import _native
from ._version import __version__


def build_info() -> dict:
    """Package version, the torch it was built against, whether CUDA kernels were compiled and for
    which archs, the CPU capability, whether Triton is importable, and whether a GPU is visible now."""
    config = _native.build_config()
    archs = [a for a in config.get("cuda_archs", "").replace(",", ";").split(";") if a]
    return {
        "version": __version__,
        "native_extension": "loaded" if _native.load_error() is None else _native.load_error(),
        "torch_built_against": config.get("torch_version"),
        "torch_running": torch.__version__,
        "cuda_kernels_compiled": bool(config.get("cuda_compiled", False)),
        "cuda_archs": ["sm_" + a.replace(".", "").replace("+PTX", "") for a in archs],
        "cuda_toolkit": config.get("cuda_version") or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_kernels": "x86-64 baseline + AVX2 + AVX-512 clones (picked at load)"
        if platform.machine() == "x86_64"
        else f"{platform.machine()} baseline",
        "cpu_threads": torch.get_num_threads(),
        "triton_importable": importlib.util.find_spec("triton") is not None,
        "gpu_visible": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }

"""Builds fastcore_ai._C, one pybind11 extension.

CPU kernels are always compiled. CUDA kernels are compiled when torch is a CUDA build and nvcc is
found; FASTCORE_AI_CUDA=0 forces them off, FASTCORE_AI_CUDA=1 forces them on (and fails loudly if
that is impossible). TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100); MAX_JOBS bounds the
parallel compile jobs (torch's ninja builder reads it). Host flags come from csrc/cxx_flags.txt,
the same list CMakeLists.txt reads.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc): prefer the toolkit that holds the runtime headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime_api.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


locate_cuda_home()

import torch  # noqa: E402  (the environment variable above must be set first)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def read_version() -> str:
    namespace: dict = {}
    exec((ROOT / "python" / "fastcore_ai" / "_version.py").read_text(), namespace)
    return namespace["__version__"]


def read_cxx_flags() -> list:
    lines = (ROOT / "csrc" / "cxx_flags.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def want_cuda() -> bool:
    forced = os.environ.get("FASTCORE_AI_CUDA")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists())
    possible = torch.version.cuda is not None and bool(nvcc)
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            raise RuntimeError(
                "FASTCORE_AI_CUDA=1 but CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, nvcc found={bool(nvcc)}. "
                "Install a CUDA build of torch and the CUDA toolkit, or set FASTCORE_AI_CUDA=0."
            )
        return True
    if not possible:
        # Loud, not silent: the build goes on CPU-only, and build_info() reports cuda_kernels_compiled False.
        import warnings

        warnings.warn(
            "fastcore_ai: building without CUDA kernels "
            f"(torch.version.cuda={torch.version.cuda!r}, nvcc found={bool(nvcc)}); set FASTCORE_AI_CUDA=0 "
            "to silence this, or FASTCORE_AI_CUDA=1 to make it an error",
            stacklevel=1,
        )
    return possible


def relative(paths) -> list:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def python_packages() -> list:
    """Every folder under python/ holding an __init__.py, as a dotted package name."""
    return sorted(".".join(p.parent.relative_to(ROOT / "python").parts) for p in (ROOT / "python").rglob("__init__.py"))


def extension():
    with_cuda = want_cuda()
    sources = relative(ROOT.glob("csrc/torch/*.cpp")) + relative(ROOT.glob("csrc/kernels/*/*_cpu.cpp"))
    cxx = read_cxx_flags() + [f'-DFASTCORE_TORCH_VERSION="{torch.__version__}"']
    if torch._C.has_openmp:
        # at::parallel_for is inline: with torch's OpenMP backend it only runs in parallel when the
        # caller is compiled with -fopenmp. Compile-only: the GOMP symbols then resolve to the
        # libgomp torch already loaded (no -lgomp, so no second OpenMP runtime; DESIGN rule 3).
        cxx.append("-fopenmp")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]
    if with_cuda:
        sources += relative(ROOT.glob("csrc/kernels/*/*.cu"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        defines = [
            "-DFASTCORE_WITH_CUDA",
            f'-DFASTCORE_CUDA_ARCHS="{archs}"',
            f'-DFASTCORE_CUDA_VERSION="{torch.version.cuda}"',
        ]
        return CUDAExtension(
            "fastcore_ai._C",
            sources,
            include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "kernels")],
            extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        )
    return CppExtension(
        "fastcore_ai._C",
        sources,
        include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "kernels")],
        extra_compile_args={"cxx": cxx},
    )


setup(
    version=read_version(),
    packages=python_packages() + ["fastcore_ai.triton_kernels"],
    package_dir={"fastcore_ai": "python/fastcore_ai", "fastcore_ai.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

"""The CUDA sources build for sm_80 and sm_90 without register spills, the built extension carries both
cubins, and the router's CUDA kernels compute the reference's answers when run, source unchanged, on a
small CPU emulation of the CUDA features they use (so their logic is checked on machines without a GPU).

Each test skips, with the reason, where its tool (nvcc, cuobjdump, a C++17 compiler) is missing.
"""

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")
# Every .cu whose kernels the ptxas check covers.
CUDA_SOURCES = tuple(sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/kernels/*/*.cu")))
INCLUDES = [f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'kernels'}"]


def _nvcc_or_skip() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH; the CUDA build checks need the CUDA toolkit")
    return nvcc


# ---- ptxas: no spills in any kernel, for every arch the extension is built for


def parse_ptxas_report(text: str) -> dict:
    """{kernel name: (registers, spill store bytes, spill load bytes)} from `-Xptxas -v` output.
    Only entry functions (kernels) are reported; a kernel whose spill line is missing maps to None."""
    kernels: dict = {}
    current = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = entry.group(1)
            kernels[current] = [None, None, None]
            continue
        properties = re.search(r"Function properties for (\S+)", line)
        if properties:
            current = properties.group(1) if properties.group(1) in kernels else None
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current is not None:
            kernels[current][1:] = [int(spills.group(1)), int(spills.group(2))]
            continue
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current is not None:
            kernels[current][0] = int(registers.group(1))
    return {name: tuple(values) if values[1] is not None else None for name, values in kernels.items()}


def test_parse_ptxas_report():
    report = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 480 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
"""
    assert parse_ptxas_report(report) == {"_Z3fooPf": (40, 4, 12), "_Z3barv": (8, 0, 0)}


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_ptxas_reports_no_spills(source, tmp_path):
    nvcc = _nvcc_or_skip()
    jobs = {}
    for arch in ARCHS:  # both archs compile at once
        command = [
            nvcc,
            "-std=c++17",
            "-O3",
            *INCLUDES,
            f"-arch={arch}",
            "-cubin",
            "-Xptxas",
            "-v",
            str(ROOT / source),
            "-o",
            str(tmp_path / f"{arch}.cubin"),
        ]
        jobs[arch] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for arch, job in jobs.items():
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"nvcc failed for {source} on {arch}:\n{output}"
        kernels = parse_ptxas_report(output)
        assert kernels, f"ptxas reported no kernel for {source} on {arch}; cannot check spills:\n{output}"
        unreported = [name for name, values in kernels.items() if values is None]
        assert not unreported, f"no spill line for {unreported} ({arch}):\n{output}"
        spilling = {name: values for name, values in kernels.items() if values[1] or values[2]}
        assert not spilling, (
            f"{source} spills registers on {arch} "
            f"(kernel: (registers, spill store bytes, spill load bytes)): {spilling}"
        )


# ---- the built extension holds sm_80 and sm_90 cubins


def _cuobjdump(nvcc: str):
    """cuobjdump from PATH, next to nvcc, in CUDA_HOME, or the copy Triton ships; None if absent."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path(nvcc).resolve().parent / "cuobjdump"]
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidates.append(Path(CUDA_HOME) / "bin" / "cuobjdump")
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def test_extension_holds_sm80_and_sm90_cubins():
    nvcc = _nvcc_or_skip()
    import fastcore_ai

    info = fastcore_ai.build_info()
    if not info["cuda_kernels_compiled"]:
        pytest.skip(f"fastcore_ai was built without CUDA kernels (native extension: {info['native_extension']})")
    cuobjdump = _cuobjdump(nvcc)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, next to nvcc, CUDA_HOME/bin, triton's bundled copy)")
    import fastcore_ai._C

    result = subprocess.run(
        [cuobjdump, "--list-elf", fastcore_ai._C.__file__], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    archs = set(re.findall(r"\.(sm_\d+)\.cubin", result.stdout))
    for arch in ARCHS:
        assert arch in archs, f"{fastcore_ai._C.__file__} has no {arch} cubin; cuobjdump --list-elf:\n{result.stdout}"


# ---- the router's CUDA kernels, run on a CPU emulation
#
# The emulator runs each CUDA block as cooperative fibers (ucontext), one per CUDA thread, blocks one
# after another: __syncthreads is a block barrier, a warp shuffle writes a per-warp slot and waits at a
# warp barrier, so every lane of the warp must reach every shuffle. A divergent shuffle or barrier
# (undefined on the GPU) deadlocks, and the launch then fails with cudaErrorLaunchFailure. __shared__
# becomes a function-local static, shared by the fibers of a block. The kernel source is compiled
# unchanged except that each `kernel<<<grid, block, smem, stream>>>(args)` launch is rewritten to an
# emulator call. Device math (expf, logf) is the host's, so values agree with the GPU to rounding, ids
# and counts exactly. What it cannot show: data races (fibers switch only at barriers), the memory
# model, and speed; those need `make gpu-check`.

EMULATED_RUNTIME = r"""
#pragma once
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef int cudaError_t;
enum : int {
  cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719
};
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
namespace emu { inline cudaError_t last_error = 0; }
inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emu::last_error;
  emu::last_error = cudaSuccess;
  return error;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = 2; return cudaSuccess; }  // 2 SMs

namespace emu {
struct Barrier {
  unsigned count = 0, arrived = 0;
  unsigned long generation = 0;
};
struct Fiber {
  ucontext_t context;
  const Barrier* waiting = nullptr;
  unsigned long waiting_generation = 0;
  bool done = false;
};
struct Block {
  explicit Block(unsigned threads) : fibers(threads), parity(threads, 0u) {
    block_barrier.count = threads;
    warp_barriers.resize((threads + 31) / 32);
    for (auto& b : warp_barriers) b.count = 32;
    slots[0].resize(threads);
    slots[1].resize(threads);
  }
  std::vector<Fiber> fibers;
  std::vector<unsigned> parity;
  ucontext_t scheduler;
  unsigned current = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> slots[2];
};
inline dim3 thread_idx, block_idx, grid_dim, block_dim;
inline Block* block = nullptr;
inline std::function<void()> body;

inline void wait(Barrier& b) {
  const unsigned long generation = b.generation;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber& self = block->fibers[block->current];
  self.waiting = &b;
  self.waiting_generation = generation;
  swapcontext(&self.context, &block->scheduler);
}

// Shuffle n of a lane uses slot buffer n % 2: a lane writes that buffer again only at shuffle n + 2,
// after all lanes passed the barrier of shuffle n + 1, so after they read their shuffle-n value.
template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "64-bit slots");
  const unsigned t = thread_idx.x, warp = t / 32;
  std::vector<uint64_t>& slots = block->slots[block->parity[t]];
  block->parity[t] ^= 1u;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[t] = bits;
  wait(block->warp_barriers[warp]);
  const uint64_t got = slots[warp * 32 + (src_lane & 31)];
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline void fiber_entry() {
  body();
  block->fibers[block->current].done = true;  // returning resumes uc_link, the scheduler
}

struct Launch {
  dim3 grid, threads;
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), threads(b) {}
  template <typename Kernel, typename... Args>
  void run(Kernel kernel, Args... args) {
    grid_dim = grid;
    block_dim = threads;
    body = [&]() { kernel(args...); };
    static std::vector<std::unique_ptr<char[]>> stacks;  // reused by every block
    constexpr size_t kStack = 64 * 1024;
    while (stacks.size() < threads.x) stacks.emplace_back(new char[kStack]);
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(threads.x);
        block = &blk;
        block_idx = dim3(bx, by);
        for (unsigned t = 0; t < threads.x; ++t) {
          Fiber& f = blk.fibers[t];
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = stacks[t].get();
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &blk.scheduler;
          makecontext(&f.context, fiber_entry, 0);
        }
        for (unsigned running = threads.x; running > 0;) {
          bool progressed = false;
          running = 0;
          for (unsigned t = 0; t < threads.x; ++t) {
            Fiber& f = blk.fibers[t];
            if (f.done) continue;
            if (f.waiting != nullptr && f.waiting->generation == f.waiting_generation) {
              ++running;
              continue;
            }
            f.waiting = nullptr;
            blk.current = t;
            thread_idx = dim3(t);
            swapcontext(&blk.scheduler, &f.context);
            progressed = true;
            if (!f.done) ++running;
          }
          if (!progressed && running > 0) {  // abandon the launch; cudaGetLastError reports it
            std::fprintf(stderr, "cuda emulator: deadlock, a barrier or shuffle is not reached by all threads\n");
            last_error = cudaErrorLaunchFailure;
            return;
          }
        }
      }
  }
};
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim
#define __global__
#define __shared__ static
#define __launch_bounds__(...)
template <typename T> T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return emu::shuffle(v, int(emu::thread_idx.x % 32) ^ lane_mask);
}
template <typename T> T __shfl_sync(unsigned, T v, int src_lane, int = 32) { return emu::shuffle(v, src_lane); }
inline void __syncthreads() { emu::wait(emu::block->block_barrier); }
inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long old = *p; *p += v; return old;
}
inline float __frcp_rn(float x) { return 1.0f / x; }
using std::max;
using std::min;
"""

EMULATOR_DRIVER = r"""
#include "topk_route_emulated.inc"
#include <vector>
using namespace fastcore;
using namespace fastcore::moe;
extern "C" {
int emu_topk_route(const void* logits, int kind, int64_t T, int64_t E, int64_t row_stride, int64_t col_stride, int k,
                   int renormalize, float* weights, int64_t* ids, float* lse, float* z_loss, float* mean_prob,
                   int64_t* counts) {
  TopkRouteParams p;
  p.logits = logits; p.logits_kind = ScalarKind(kind); p.num_tokens = T; p.num_experts = E;
  p.row_stride = row_stride; p.col_stride = col_stride; p.k = k; p.renormalize = renormalize != 0;
  p.weights = weights; p.expert_ids = ids; p.lse = lse; p.counts = counts;
  p.rows_per_block = route_rows_per_block(T, E, 64);  // as the torch layer does for CUDA
  p.num_blocks = (T + p.rows_per_block - 1) / p.rows_per_block;
  std::vector<float> partial_prob(p.num_blocks * E, NAN), partial_lse_sq(p.num_blocks, NAN);
  p.partial_prob_sum = partial_prob.data(); p.partial_lse_sq_sum = partial_lse_sq.data();
  return topk_route_cuda(p, z_loss, mean_prob, nullptr);
}
int emu_reduce(float* partial_prob, float* partial_lse_sq, int64_t num_blocks, int64_t T, int64_t E, float* z_loss,
               float* mean_prob) {
  TopkRouteParams p;
  p.num_tokens = T; p.num_experts = E; p.num_blocks = num_blocks;
  p.partial_prob_sum = partial_prob; p.partial_lse_sq_sum = partial_lse_sq;
  return launch_reduce(p, z_loss, mean_prob, nullptr);
}
int emu_backward(const void* logits, int kind, int64_t T, int64_t E, int64_t row_stride, int64_t col_stride, int k,
                 int renormalize, const int64_t* ids, const float* weights, const float* lse,
                 const float* grad_weights, const float* grad_mean_prob, const float* grad_z_loss,
                 float* grad_logits) {
  TopkRouteBackwardParams p;
  p.logits = logits; p.logits_kind = ScalarKind(kind); p.num_tokens = T; p.num_experts = E;
  p.row_stride = row_stride; p.col_stride = col_stride; p.k = k; p.renormalize = renormalize != 0;
  p.expert_ids = ids; p.weights = weights; p.lse = lse; p.grad_weights = grad_weights;
  p.grad_mean_prob = grad_mean_prob; p.grad_z_loss = grad_z_loss; p.grad_logits = grad_logits;
  return topk_route_backward_cuda(p, nullptr);
}
}
"""


# A functional stand-in for the WMMA API and the 16-bit float types, appended to EMULATED_RUNTIME by the
# tensor-core kernels' emulator tests (extra_runtime=WMMA_EMULATION): each emulated thread holds whole
# 16x16 fragments, so tile indexing, staging and epilogues are checked, not the hardware fragment layout.
WMMA_EMULATION = r"""
#define __align__(n) __attribute__((aligned(n)))
#define __device__
#define __forceinline__ inline
#include <cmath>
#include <cstring>
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float emu_widen(float v) { return v; }
inline float emu_widen(__nv_bfloat16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float emu_widen(__half v) {
  const uint32_t e = (v.bits >> 10) & 0x1f, m = v.bits & 0x3ff;
  float magnitude = e == 0 ? std::ldexp(float(m), -24)
                  : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(float(m | 0x400), int(e) - 25);
  return (v.bits & 0x8000) ? -magnitude : magnitude;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::block->warp_barriers[emu::thread_idx.x / 32]); }
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
// Each emulated thread holds the whole 16 x 16 tile (the real layout is opaque to the kernel anyway).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];
};
template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = emu_widen(p[r * ldm + c]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[r * ldm + c];
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (int i = 0; i < 256; ++i) f.x[i] = v;
}
template <class T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, row_major>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) sum += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda
"""


def build_emulated_kernels(work: Path, cuda_source: str, driver: str, name: str, extra_runtime: str = ""):
    """Compiles csrc/kernels/<cuda_source> unchanged (launches rewritten) against the CPU emulation of the
    CUDA runtime, with `driver` (C ABI entry points that #include "<name>_emulated.inc"), and loads it.
    Skips, with the reason, where the emulator cannot be built."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CUDA emulator uses glibc ucontext fibers (Linux only)")
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++, clang++) on PATH to build the CUDA emulator")
    (work / "fake").mkdir()
    (work / "fake" / "cuda_runtime.h").write_text(EMULATED_RUNTIME + extra_runtime)
    source = (ROOT / "csrc" / "kernels" / cuda_source).read_text()
    rewritten, launches = re.subn(
        r"([\w:]+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", r"emu::Launch(\2).run(\1, ", source, flags=re.S
    )
    assert launches > 0 and "<<<" not in rewritten, "could not rewrite the kernel launches for the emulator"
    (work / f"{name}_emulated.inc").write_text(rewritten)
    (work / "driver.cpp").write_text(driver)
    library = work / f"lib{name}_emulated.so"
    command = [
        compiler,
        "-std=c++17",
        "-O1",
        "-fPIC",
        "-shared",
        "-Wno-unknown-pragmas",
        f"-I{work / 'fake'}",
        f"-I{work}",
        *INCLUDES,
        str(work / "driver.cpp"),
        "-o",
        str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"building the CUDA emulator failed:\n{result.stderr}"
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def emulated_router(tmp_path_factory):
    return build_emulated_kernels(
        tmp_path_factory.mktemp("cuda_emulator"), "moe/topk_route.cu", EMULATOR_DRIVER, "topk_route"
    )


_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _emulated_route(lib, logits, k, renormalize):
    T, E = logits.shape
    weights = torch.full((T, k), float("nan"))  # poisoned: unwritten elements fail the comparison
    ids = torch.full((T, k), 2**62, dtype=torch.int64)
    lse = torch.full((T,), float("nan"))
    z_loss = torch.full((), float("nan"))
    mean_prob = torch.full((E,), float("nan"))
    counts = torch.zeros(E, dtype=torch.int64)  # the caller zeroes counts
    status = lib.emu_topk_route(
        _ptr(logits),
        _KIND[logits.dtype],
        ctypes.c_int64(T),
        ctypes.c_int64(E),
        ctypes.c_int64(logits.stride(0)),
        ctypes.c_int64(logits.stride(1)),
        k,
        int(renormalize),
        _ptr(weights),
        _ptr(ids),
        _ptr(lse),
        _ptr(z_loss),
        _ptr(mean_prob),
        _ptr(counts),
    )
    assert status == 0, f"emulated topk_route_cuda returned cudaError {status} (719: divergent barrier or shuffle)"
    return weights, ids, z_loss, counts, mean_prob, lse


def _emulated_backward(lib, logits, ids, weights, lse, grad_weights, grad_z_loss, grad_mean_prob, renormalize):
    T, E = logits.shape
    grad = torch.full((T, E), float("nan"))
    status = lib.emu_backward(
        _ptr(logits),
        _KIND[logits.dtype],
        ctypes.c_int64(T),
        ctypes.c_int64(E),
        ctypes.c_int64(logits.stride(0)),
        ctypes.c_int64(logits.stride(1)),
        ids.shape[1],
        int(renormalize),
        _ptr(ids),
        _ptr(weights),
        _ptr(lse),
        _ptr(grad_weights),
        _ptr(grad_mean_prob),
        _ptr(grad_z_loss),
        _ptr(grad),
    )
    assert status == 0, f"emulated topk_route_backward_cuda returned cudaError {status} (719: divergent shuffle)"
    return grad


def _relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN pattern differs"
    actual, expected = actual[~nan], expected[~nan]
    norm = expected.norm().item()
    return (actual - expected).norm().item() / (norm if norm else 1.0)


def _check_against_reference(lib, logits, k, renormalize):
    from fastcore_ai.reference import moe as reference

    out = _emulated_route(lib, logits, k, renormalize)
    ref = reference.moe_topk_route(logits.double(), k, renormalize)
    assert torch.equal(out[1], ref[1]), "expert ids differ from the reference"
    assert torch.equal(out[3], ref[3]), "tokens per expert differ from the reference"
    for index, name in ((0, "weights"), (2, "z_loss"), (4, "mean_prob"), (5, "lse")):
        assert _relative_error(out[index].reshape(-1), ref[index].reshape(-1)) < 1e-5, name
    again = _emulated_route(lib, logits, k, renormalize)
    for first, second in zip(out, again):
        assert torch.equal(
            first.view(-1).view(torch.int32) if first.is_floating_point() else first,
            second.view(-1).view(torch.int32) if second.is_floating_point() else second,
        ), "two runs differ bitwise"
    T, E = logits.shape
    grad_weights, grad_z_loss, grad_mean_prob = torch.randn(T, k), torch.randn(1), torch.randn(E)
    grad = _emulated_backward(
        lib, logits, out[1], out[0], out[5], grad_weights, grad_z_loss, grad_mean_prob, renormalize
    )
    expected = reference.moe_topk_route_backward(
        logits.double(),
        ref[1],
        ref[0],
        ref[5],
        grad_weights.double(),
        grad_z_loss.double()[0],
        grad_mean_prob.double(),
        renormalize,
    )
    assert _relative_error(grad, expected) < 1e-5, "gradient"
    return out


# Every row layout of the kernels (E ≤ 8, 16, 32, 64, 128, 256, 512, 1024), k = 1, some, min(E, 16).
EMULATED_CASES = [
    (70, 1, 1, True),
    (70, 3, 3, False),
    (70, 8, 2, True),
    (70, 16, 16, False),
    (70, 33, 8, True),
    (70, 61, 16, False),
    (70, 128, 2, True),
    (70, 200, 16, True),
    (7, 300, 5, False),
    (3, 1024, 16, True),
    (130, 9, 4, False),
]


def test_cuda_router_kernels_on_emulator(emulated_router):
    lib = emulated_router
    torch.manual_seed(0)
    for T, E, k, renormalize in EMULATED_CASES:
        _check_against_reference(lib, torch.randn(T, E) * 3, k, renormalize)
    # 16-bit inputs and strided views (columns not adjacent, rows not E apart).
    _check_against_reference(lib, (torch.randn(75, 61) * 4).half(), 6, True)
    _check_against_reference(lib, (torch.randn(75, 61) * 4).bfloat16(), 6, False)
    _check_against_reference(lib, (torch.randn(61, 75) * 3).t(), 5, True)
    _check_against_reference(lib, (torch.randn(70, 200) * 3)[:, ::3], 4, False)
    # Ties go to the lower index; rows of −inf, NaN or +inf still pick k ids in [0, E).
    ties = torch.zeros(70, 40)
    ties[:, 5] = 1.0
    _check_against_reference(lib, ties, 16, True)
    special = torch.randn(40, 33)
    special[3] = float("-inf")
    special[5, :30] = float("-inf")
    special[6, 2] = float("nan")
    special[7] = float("nan")
    special[8, 0] = float("inf")
    from fastcore_ai.reference import moe as reference

    out = _emulated_route(lib, special, 8, True)
    ref = reference.moe_topk_route(special.double(), 8, True)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[3], ref[3])
    for index in (0, 5):  # weights, lse
        assert torch.equal(torch.isnan(out[index]), torch.isnan(ref[index]))
    assert torch.isnan(out[2]) and torch.isnan(out[4]).all()  # a NaN row poisons the statistics, as on the CPU
    all_nan = torch.full((5, 1000), float("nan"))
    assert torch.equal(_emulated_route(lib, all_nan, 16, False)[1], torch.arange(16).expand(5, 16))


def test_cuda_partial_reduction_on_emulator(emulated_router):
    """Both reduction paths (one pass up to 256 blocks, two passes above) against a float64 sum."""
    torch.manual_seed(0)
    for num_blocks, E in ((5, 7), (256, 3), (257, 5), (3001, 70), (20000, 1)):
        partial_prob, partial_lse_sq = torch.rand(num_blocks, E), torch.rand(num_blocks) * 10
        expected_prob, expected_lse_sq = partial_prob.double().sum(0), partial_lse_sq.double().sum()
        T = num_blocks * 64 - 3
        z_loss, mean_prob = torch.full((), float("nan")), torch.full((E,), float("nan"))
        status = emulated_router.emu_reduce(
            _ptr(partial_prob),
            _ptr(partial_lse_sq),
            ctypes.c_int64(num_blocks),
            ctypes.c_int64(T),
            ctypes.c_int64(E),
            _ptr(z_loss),
            _ptr(mean_prob),
        )
        assert status == 0
        assert _relative_error(mean_prob, expected_prob / T) < 1e-6
        assert _relative_error(z_loss.reshape(1), (expected_lse_sq / T).reshape(1)) < 1e-6

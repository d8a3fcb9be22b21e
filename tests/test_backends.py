"""Backend registry: selection order, overrides, and the error messages when a backend cannot run."""

import pytest
import torch

import fastcore_ai
from fastcore_ai import _native, backends, ops


def test_auto_picks_cpu_for_cpu_tensors():
    assert backends.select("moe_topk_route", "auto", torch.device("cpu"), torch.float32, "logits") == "cpu"


def test_auto_never_picks_the_triton_interpreter():
    assert backends.select("moe_topk_route", "auto", torch.device("cpu"), torch.bfloat16, "logits") == "cpu"


def test_use_backend_context_manager():
    with fastcore_ai.use_backend("reference"):
        assert backends.select("moe_topk_route", "auto", torch.device("cpu"), torch.float32) == "reference"
        # An explicit argument still wins over the context.
        assert backends.select("moe_topk_route", "cpu", torch.device("cpu"), torch.float32) == "cpu"
    assert backends.select("moe_topk_route", "auto", torch.device("cpu"), torch.float32) == "cpu"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTCORE_AI_BACKEND", "reference")
    assert backends.select("moe_topk_route", "auto", torch.device("cpu"), torch.float32) == "reference"
    with fastcore_ai.use_backend("cpu"):
        assert backends.select("moe_topk_route", "auto", torch.device("cpu"), torch.float32) == "cpu"
    monkeypatch.setenv("FASTCORE_AI_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(from FASTCORE_AI_BACKEND=cuda\) cannot run"):
        ops.moe_topk_route(torch.randn(3, 4), 1)
    monkeypatch.setenv("FASTCORE_AI_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.moe_topk_route(torch.randn(3, 4), 1)


def test_unknown_backend_argument():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.moe_topk_route(torch.randn(3, 4), 1, backend="gpu")


def test_explicit_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.moe_topk_route(torch.randn(3, 4), 1, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_explicit_cuda_without_gpu_lists_every_reason():
    with pytest.raises(RuntimeError) as info:
        ops.moe_topk_route(torch.randn(3, 4), 1, backend="cuda")
    message = str(info.value)
    assert "no CUDA GPU is visible" in message and "logits is on cpu" in message
    if not fastcore_ai.build_info()["cuda_kernels_compiled"]:
        assert "built without CUDA kernels" in message


def test_missing_extension_gives_a_build_hint(monkeypatch):
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_tried", True)
    monkeypatch.setattr(_native, "_load_error", ImportError("libfoo.so: cannot open shared object file"))
    with pytest.raises(RuntimeError) as info:
        ops.moe_topk_route(torch.randn(3, 4), 1, backend="cpu")
    assert "pip install --no-build-isolation -e ." in str(info.value) and "libfoo" in str(info.value)
    # auto falls through to the reference, which needs no extension (loudly: see the test below)
    out = ops.moe_topk_route(torch.randn(3, 4), 1)
    assert out.weights.shape == (3, 1)


def test_missing_extension_is_loud_at_import():
    """A failed load of fastcore_ai._C warns once at import with the reason and the build hint, and
    build_info() says it, so "auto" running the reference is never silent."""
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "sys.modules['fastcore_ai._C'] = None\n"  # import of the extension raises ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastcore_ai\n"
        "messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and 'fastcore_ai._C' in str(w.message)]\n"
        "print(len(messages)); print(messages[0] if messages else '')\n"
        "print(fastcore_ai.build_info()['native_extension'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, message, info = result.stdout.strip().splitlines()[-3:]
    assert count == "1" and "reference" in message and "pip install --no-build-isolation" in message
    assert "could not be imported" in info


def test_no_backend_at_all_lists_each_candidate(monkeypatch):
    table = backends.op_table("moe_topk_route")
    monkeypatch.setitem(
        backends._OPS,
        "moe_topk_route",
        backends.OpTable(table.op, ("cuda", "cpu"), {k: table.support[k] for k in ("cuda", "cpu")}),
    )
    with pytest.raises(RuntimeError) as info:
        backends.select("moe_topk_route", "auto", torch.device("meta"), torch.float32, "logits")
    message = str(info.value)
    assert "no backend can run this call" in message and "  cuda:" in message and "  cpu:" in message
    assert "logits is on meta" in message


def test_build_info_fields():
    info = fastcore_ai.build_info()
    for key in (
        "version",
        "torch_built_against",
        "cuda_kernels_compiled",
        "cuda_archs",
        "cpu_capability",
        "triton_importable",
        "gpu_visible",
    ):
        assert key in info
    assert info["version"] == fastcore_ai.__version__
    assert info["native_extension"] == "loaded"
    assert info["torch_built_against"] == torch.__version__
    if info["cuda_kernels_compiled"]:
        assert "sm_80" in info["cuda_archs"] and "sm_90" in info["cuda_archs"]


def test_describe_rows_cover_every_backend():
    rows = [row for row in backends.describe() if row[0] == "moe_topk_route"]
    assert [row[1] for row in rows] == ["cuda", "triton", "cpu", "reference"]


def test_cpu_kernels_run_in_parallel():
    """at::parallel_for is inline; without -fopenmp it silently runs on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _native.native().parallel_for_threads_used() == 2
    finally:
        torch.set_num_threads(threads)


def test_cpu_isa_cap_lowers_and_lifts_for_every_family():
    """One process-wide level (fastcore/cpu_isa.h): a cap lowers it, "auto" lifts it, pq4_kernel is the
    same level under pq's names, and the cap changes which path runs, not the answer."""
    order = ["portable", "avx2", "avx512"]
    detected = backends.cpu_isa("auto")
    assert detected in order
    q, k, v = (torch.randn(1, 2, 5, 24) for _ in range(3))
    fast = ops.attention(q, k, v, backend="cpu")
    try:
        for cap in order:
            expected = order[min(order.index(cap), order.index(detected))]
            assert backends.cpu_isa(cap) == expected
            assert backends.cpu_isa() == expected  # None only reads
            assert ops.pq4_kernel() == ("avx512bw" if expected == "avx512" else expected)
        backends.cpu_isa("portable")
        torch.testing.assert_close(ops.attention(q, k, v, backend="cpu"), fast, rtol=1e-5, atol=1e-6)
    finally:
        assert backends.cpu_isa("auto") == detected
    assert ops.pq4_kernel("portable") == "portable" and backends.cpu_isa() == "portable"
    assert ops.pq4_kernel("auto") == ("avx512bw" if detected == "avx512" else detected)
    with pytest.raises(ValueError, match=r"backends\.cpu_isa: cap must be one of"):
        backends.cpu_isa("sse")
    with pytest.raises(ValueError, match="pq4_kernel"):
        ops.pq4_kernel("avx512")

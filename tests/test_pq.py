"""pq family: every backend against the float64 reference (tables, encode, decode, ADC distances,
top-k with ties), FAISS equality with shared codebooks and codes, fast-scan bounds, k-means (incl.
the balanced Sinkhorn variant), error paths, registered-op checks (opcheck, gradcheck, compile)."""

import contextlib

import numpy as np
import pytest
import torch

import fastcore_ai.ops as ops
from fastcore_ai import backends
from fastcore_ai.reference import pq as ref

from _helpers import relative_error, require_backend

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("reference", id="reference")]


def _codebooks(M, ksub, dsub, dtype=torch.float32):
    return torch.randn(M, ksub, dsub, dtype=dtype)


def _clustered(n, d, centers=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    return (c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)).to(dtype)


# ---- tables, encode, decode --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,device",
    [
        pytest.param("cpu", "cpu", id="cpu"),
        pytest.param("reference", "cpu", id="reference"),
        pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
    ],
)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("shape", [(7, 3, 16, 5), (1, 1, 256, 1), (33, 8, 256, 4), (0, 2, 16, 3)])
def test_lut_matches_reference(backend, device, metric, shape, poisoned_outputs):
    require_backend("pq_lut", backend, device)
    nq, M, ksub, dsub = shape
    cb = _codebooks(M, ksub, dsub)
    q = torch.randn(nq, M * dsub)
    out = ops.pq_lut(q.to(device), cb.to(device), metric, backend=backend).cpu()
    expected = ref.pq_lut(q.double(), cb.double(), metric)
    assert out.shape == (nq, M, ksub) and out.dtype == torch.float32
    if nq:
        assert relative_error(out, expected) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_decode(backend, poisoned_outputs):
    require_backend("pq_encode", backend, "cpu")
    cb = _codebooks(4, 256, 3)
    x = torch.randn(1000, 12)[::2]  # non-contiguous rows
    codes = ops.pq_encode(x, cb, backend=backend)
    expected = ref.pq_encode(x.double(), cb.double())
    assert codes.dtype == torch.uint8 and codes.shape == (500, 4)
    # float32 vs float64 argmin may only differ on a near tie
    mismatch = codes != expected
    if mismatch.any():
        lut = ref.pq_lut(x.double(), cb.double())
        got = lut.gather(2, codes.long()[..., None])[..., 0]
        best = lut.gather(2, expected.long()[..., None])[..., 0]
        assert torch.allclose(got[mismatch], best[mismatch], rtol=1e-5)
    dec = ops.pq_decode(codes, cb, backend=backend)
    assert torch.equal(dec, ref.pq_decode(codes, cb))
    empty = ops.pq_encode(torch.zeros(0, 12), cb, backend=backend)
    assert empty.shape == (0, 4)


# ---- exact ADC search ----------------------------------------------------------------------------------

SEARCH_BACKENDS = BACKENDS + [
    pytest.param("triton", "cpu", id="triton-interpreter", marks=pytest.mark.triton),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[pytest.mark.triton, pytest.mark.cuda]),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize(
    "backend,device",
    [pytest.param("cpu", "cpu", id="cpu"), pytest.param("reference", "cpu", id="reference")] + SEARCH_BACKENDS[2:],
)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq,n,k", [(5, 1000, 10), (1, 33, 7), (3, 7, 12), (0, 10, 3), (4, 0, 2), (20, 3000, 1)])
def test_search_matches_reference(backend, device, metric, nq, n, k, poisoned_outputs):
    require_backend("pq_search", backend, device)
    if backend == "triton" and device == "cpu":
        nq, n = min(nq, 2), min(n, 100)  # interpreter-sized
    M, ksub, dsub = 4, 256, 3
    cb = _codebooks(M, ksub, dsub)
    codes = torch.randint(0, ksub, (n, M), dtype=torch.uint8)
    q = torch.randn(nq, M * dsub)
    d, i = ops.pq_search(q.to(device), codes.to(device), cb.to(device), k, metric, backend=backend)
    assert d.device.type == device
    d, i = d.cpu(), i.cpu()
    ed, ei = ref.pq_search(q.double(), codes, cb.double(), k, metric)
    assert d.shape == (nq, k) and i.dtype == torch.int64
    assert torch.equal(torch.isinf(d), torch.isinf(ed))
    finite = torch.isfinite(ed)
    if finite.any():  # triton builds the tables in the GEMM form: 1e-5
        assert relative_error(d[finite], ed[finite]) < (1e-5 if backend == "triton" else 1e-6)
    pad = float("inf") if metric == "l2" else float("-inf")
    assert torch.all(i[:, n:] == -1) and torch.all(d[:, n:] == pad)
    # ids equal except where two distances are within float rounding of each other
    diff = i != ei
    if diff.any():
        assert torch.allclose(d[diff].double(), ed[diff], rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cuda_lut_and_large_k_with_m64(metric):
    """M = 64 with float32 tables (64 KiB of shared memory: the opt-in path) and k = 4096 > FAISS GPU's 2048."""
    cb = _codebooks(64, 256, 2)
    codes = torch.randint(0, 256, (20000, 64), dtype=torch.uint8)
    q = torch.randn(3, 128)
    lut = ops.pq_lut(q.cuda(), cb.cuda(), metric, backend="cuda")
    assert relative_error(lut, ref.pq_lut(q.double(), cb.double(), metric)) < 1e-6
    d, i = ops.pq_search(q.cuda(), codes.cuda(), cb.cuda(), 4096, metric, backend="cuda")
    ed, ei = ref.pq_search(q.double(), codes, cb.double(), 4096, metric)
    assert relative_error(d, ed) < 1e-6
    assert (i.cpu() == ei).float().mean() > 0.99


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_ties_broken_by_lower_id(metric):
    cb = torch.arange(16, dtype=torch.float32).reshape(2, 8, 1)  # M = 2, ksub = 8, dsub = 1
    codes = torch.tensor([[1, 2]] * 40, dtype=torch.uint8)  # every row identical
    codes[13] = torch.tensor([0, 0])
    q = torch.zeros(2, 2)
    for backend in ("cpu", "reference", "triton"):
        if backend == "triton" and backends.reasons_against("pq_search", "triton", torch.device("cpu"), q.dtype):
            continue
        d, i = ops.pq_search(q, codes, cb, 5, metric, backend=backend)
        if metric == "l2":
            assert i[0].tolist() == [13, 0, 1, 2, 3]
        else:  # ip with q = 0: all scores 0 -> lowest ids
            assert i[0].tolist() == [0, 1, 2, 3, 4]


def test_search_threads_and_parts_agree():
    """The row-part split (few queries) and the query split (many) give identical results."""
    cb = _codebooks(8, 256, 2)
    codes = torch.randint(0, 256, (40000, 8), dtype=torch.uint8)
    q = torch.randn(40, 16)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        d_many, i_many = ops.pq_search(q, codes, cb, 20, backend="cpu")
        d_one = [ops.pq_search(q[j : j + 1], codes, cb, 20, backend="cpu") for j in range(3)]
        torch.set_num_threads(1)
        d1, i1 = ops.pq_search(q, codes, cb, 20, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(i_many, i1) and torch.equal(d_many, d1)
    for j, (dj, ij) in enumerate(d_one):
        assert torch.equal(ij[0], i_many[j]) and torch.equal(dj[0], d_many[j])


# ---- FAISS equality --------------------------------------------------------------------------------------

try:
    import faiss
except ImportError:  # faiss-cpu is in the test extra; without it only the FAISS comparisons skip
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss-cpu is not installed (pip install -e .[test])")


def _faiss_pq(cb, codes, metric):
    M, ksub, dsub = cb.shape
    index = faiss.IndexPQ(
        M * dsub, M, 8 if ksub == 256 else 4, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    )
    faiss.copy_array_to_vector(cb.numpy().ravel(), index.pq.centroids)
    index.is_trained = True
    if codes is not None:  # 8-bit codes are IndexPQ's own byte layout
        index.add_sa_codes(codes.numpy())
    return index


def _faiss_tables(index, q, metric):
    nq = q.shape[0]
    M, ksub = index.pq.M, index.pq.ksub
    out = np.empty((nq, M * ksub), dtype=np.float32)
    qn = np.ascontiguousarray(q.numpy())
    fn = index.pq.compute_distance_tables if metric == "l2" else index.pq.compute_inner_prod_tables
    fn(nq, faiss.swig_ptr(qn), faiss.swig_ptr(out))
    return torch.from_numpy(out).reshape(nq, M, ksub)


@needs_faiss
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_equality_8bit(metric):
    torch.manual_seed(1)
    x = _clustered(3000, 32)
    cb = ops.pq_train(x, 8, 8, niter=4)
    codes = ops.pq_encode(x, cb)
    index = _faiss_pq(cb, codes, metric)
    # identical codes from FAISS's encoder (exact L2 argmin)
    assert (torch.from_numpy(index.pq.compute_codes(x.numpy())) != codes).float().mean() < 1e-3
    q = _clustered(16, 32, seed=5)
    fd, fi = index.search(q.numpy(), 10)
    d, i = ops.pq_search(q, codes, cb, 10, metric)
    assert torch.allclose(d, torch.from_numpy(fd), rtol=1e-5, atol=1e-4)
    same = i == torch.from_numpy(fi)
    assert same.float().mean() > 0.97  # the rest are float-rounding ties
    lut = _faiss_tables(index, q, metric)
    assert torch.allclose(ops.pq_lut(q, cb, metric), lut, rtol=1e-5, atol=1e-5)


@needs_faiss
def test_faiss_padding_convention():
    cb = _codebooks(2, 256, 2)
    codes = torch.randint(0, 256, (3, 2), dtype=torch.uint8)
    d, i = ops.pq_search(torch.randn(2, 4), codes, cb, 5)
    fd, fi = _faiss_pq(cb, codes, "l2").search(torch.randn(2, 4).numpy(), 5)
    assert (fi[:, 3:] == -1).all() and (i[:, 3:] == -1).all()
    assert torch.isinf(d[:, 3:]).all()  # FAISS pads with FLT_MAX; we use +inf as the issue asks (docs/pq.md)


# ---- 4-bit fast-scan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,n", [(4, 100), (7, 33), (1, 1), (16, 500), (3, 0)])
def test_pq4_pack_roundtrip(M, n):
    codes = torch.randint(0, 16, (n, M), dtype=torch.uint8)
    packed = ops.pq4_pack(codes)
    assert packed.shape == ((n + 31) // 32, (M + 1) // 2, 32)
    assert torch.equal(ref.pq4_unpack(packed, n, M), codes)


@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512bw"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("M,n,nq,k", [(8, 1000, 5, 10), (5, 70, 2, 100), (16, 3000, 1, 7), (32, 64, 9, 1)])
def test_pq4_search_matches_quantized_reference(kernel, metric, M, n, nq, k):
    chosen = ops.pq4_kernel(kernel)
    try:
        cb = _codebooks(M, 16, 2)
        codes = torch.randint(0, 16, (n, M), dtype=torch.uint8)
        packed = ops.pq4_pack(codes)
        q = torch.randn(nq, M * 2)
        d, i = ops.pq4_search(q, packed, n, cb, k, metric, backend="cpu")
        rd, ri = ops.pq4_search(q, packed, n, cb, k, metric, backend="reference")
        assert torch.equal(i, ri), chosen
        assert torch.allclose(d, rd, rtol=1e-5, atol=1e-4)
        # Error bound against the exact float ADC distance of the returned ids: M roundings of 1/(2a).
        exact = ref.pq_adc_distances(q.double(), codes, cb.double(), metric)
        lut = ref.pq_lut(q.double(), cb.double(), metric)
        span = (lut.amax(2) - lut.amin(2)).amax(1)
        bound = M * 0.5 * span / 255 + 1e-4
        valid = i >= 0
        got = exact.gather(1, i.clamp_min(0))
        assert torch.all((got - d.double()).abs()[valid] <= bound[:, None].expand_as(d)[valid])
    finally:
        ops.pq4_kernel("auto")


def test_pq4_rerank_improves_recall():
    x = _clustered(2000, 32, seed=3)
    cb = ops.pq_train(x, 16, 4, niter=5)
    codes = ops.pq_encode(x, cb)
    packed = ops.pq4_pack(codes)
    q = _clustered(20, 32, seed=4)
    gt = ref.topk_with_ties(torch.cdist(q.double(), x.double()) ** 2, 1)[1]
    _, i1 = ops.pq4_search(q, packed, 2000, cb, 10, k_factor=1)
    _, i2 = ops.pq4_search(q, packed, 2000, cb, 10, k_factor=10, rerank_vectors=x)
    r1 = (i1[:, :1] == gt).float().mean()
    r2 = (i2[:, :1] == gt).float().mean()
    assert r2 >= r1 and r2 > 0.9
    d3, i3 = ops.pq4_search(q, packed, 2000, cb, 10, k_factor=4)  # re-rank with decoded vectors = exact ADC
    ed, _ = ref.pq_search(q.double(), codes, cb.double(), 10)
    assert (d3.double() >= ed - 1e-3).all()


# ---- k-means -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_matches_reference_on_separated_data(backend):
    x = _clustered(600, 6, centers=5, seed=2)
    c = ops.kmeans(x, 5, niter=10, backend=backend)
    rc = ref.kmeans(x.double(), 5, niter=10)
    assert c.shape == (5, 6) and c.dtype == torch.float32
    assert relative_error(c, rc) < 1e-5


def test_kmeans_inertia_and_empty_clusters():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])  # 2 distinct points, k = 4: empties re-seeded
    c = ops.kmeans(x, 4, niter=5, backend="cpu")
    assert torch.isfinite(c).all()
    x = _clustered(2000, 8, centers=16, seed=6)
    for backend in ("cpu", "reference"):
        c = ops.kmeans(x, 16, niter=15, backend=backend)
        inertia = (torch.cdist(x, c) ** 2).min(1).values.mean()
        c0 = ops.kmeans(x, 16, niter=0, backend=backend)
        assert inertia < 0.7 * (torch.cdist(x, c0) ** 2).min(1).values.mean()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_constrained_kmeans_balances_skewed_data(backend):
    """constrained=True (RepCONC's balanced clustering) must move the centroids themselves: on heavily
    skewed data, plain nearest-centroid clusters of the constrained centroids are far more even than those
    of ordinary k-means. Both sides are judged by the same argmin assignment, so a `constrained` flag that
    changed nothing would fail (the previous test judged each side by its own assignment rule)."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(2000, 2).exponential_(generator=g) ** 2  # dense near 0, a long sparse tail
    spreads = {}
    for constrained in (False, True):
        c = ops.kmeans(x, 8, niter=20, constrained=constrained, backend=backend)
        sizes = torch.bincount((torch.cdist(x, c) ** 2).argmin(1), minlength=8)
        spreads[constrained] = int(sizes.max() - sizes.min())
    assert spreads[True] < 0.3 * spreads[False], spreads


def test_pq_train_shapes_and_recall():
    x = _clustered(3000, 32, seed=7)
    cb8 = ops.pq_train(x, 8, 8, niter=5)
    cb4 = ops.pq_train(x, 8, 4, niter=5)
    assert cb8.shape == (8, 256, 4) and cb4.shape == (8, 16, 4) and cb8.dtype == torch.float32
    q = x[:50] + 0.01 * torch.randn(50, 32)
    _, i = ops.pq_search(q, ops.pq_encode(x, cb8), cb8, 10)
    assert (i == torch.arange(50)[:, None]).any(1).float().mean() > 0.9  # recall@10 of the query's source row


# ---- errors ------------------------------------------------------------------------------------------------


def test_errors_name_op_and_argument():
    cb = _codebooks(4, 256, 3)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.pq_train: d must be divisible by M"):
        ops.pq_train(torch.randn(300, 10), 4, 8)
    with pytest.raises(ValueError, match=r"pq_train: nbits must be 4 or 8"):
        ops.pq_train(torch.randn(300, 8), 4, 6)
    with pytest.raises(ValueError, match=r"pq_search: queries must have d = M·dsub"):
        ops.pq_search(torch.randn(2, 11), torch.zeros(3, 4, dtype=torch.uint8), cb, 1)
    with pytest.raises(ValueError, match=r"pq_search: queries must be a 2-D"):
        ops.pq_search(torch.randn(12), torch.zeros(3, 4, dtype=torch.uint8), cb, 1)
    with pytest.raises(TypeError, match=r"pq_search: codes must be uint8"):
        ops.pq_search(torch.randn(2, 12), torch.zeros(3, 4, dtype=torch.int64), cb, 1)
    with pytest.raises(ValueError, match=r"pq_search: k must satisfy"):
        ops.pq_search(torch.randn(2, 12), torch.zeros(3, 4, dtype=torch.uint8), cb, 0)
    with pytest.raises(ValueError, match=r"pq_search: metric must be one of"):
        ops.pq_search(torch.randn(2, 12), torch.zeros(3, 4, dtype=torch.uint8), cb, 1, "cos")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, ksub\)"):
        ops.pq_decode(torch.full((2, 4), 20, dtype=torch.uint8), _codebooks(4, 16, 3))
    with pytest.raises(ValueError, match=r"kmeans: x must have at least k"):
        ops.kmeans(torch.randn(3, 2), 5)
    with pytest.raises(ValueError, match=r"pq4_search: packed must have shape"):
        ops.pq4_search(torch.randn(1, 12), torch.zeros(1, 2, 32, dtype=torch.uint8), 40, _codebooks(4, 16, 3), 1)
    with pytest.raises(ValueError, match=r"pq4_search: codebooks must have ksub = 16"):
        ops.pq4_search(torch.randn(1, 12), torch.zeros(1, 2, 32, dtype=torch.uint8), 4, cb, 1)
    with pytest.raises(RuntimeError, match=r"pq_search: backend 'cuda' .* cannot run this call: .*queries is on cpu"):
        ops.pq_search(torch.randn(2, 12), torch.zeros(3, 4, dtype=torch.uint8), cb, 1, backend="cuda")
    with pytest.raises(RuntimeError, match=r"pq_encode: backend 'cuda' .* cannot run this call: pq_encode has no cuda"):
        ops.pq_encode(torch.randn(2, 12), cb, backend="cuda")


def test_native_guards_out_of_range_codes():
    from fastcore_ai import _native

    lut = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="codes must lie in"):
        _native.native().pq_search_flat(lut, torch.full((3, 2), 200, dtype=torch.uint8), 1, 0)


# ---- registered ops ----------------------------------------------------------------------------------------


def test_opcheck():
    cb = _codebooks(3, 16, 2, torch.float64)
    q = torch.randn(4, 6, dtype=torch.float64)
    codes = torch.randint(0, 16, (20, 3), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.fastcore_ai.pq_lut.default, (q, cb, "l2", "cpu"))
    torch.library.opcheck(torch.ops.fastcore_ai.pq_decode.default, (codes, cb, "cpu"))
    torch.library.opcheck(
        torch.ops.fastcore_ai.pq_encode.default, (q, cb, "cpu"), test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(
        torch.ops.fastcore_ai.pq_search.default,
        (q.float(), codes, cb.float(), 5, "ip", "cpu"),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(torch.ops.fastcore_ai.pq4_pack.default, (codes, "reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_gradcheck_lut_and_decode(backend, metric):
    cb = _codebooks(2, 4, 3, torch.float64).requires_grad_()
    q = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.pq_lut(a, b, metric, backend=backend), (q, cb))
    codes = torch.randint(0, 4, (5, 2), dtype=torch.uint8)
    assert torch.autograd.gradcheck(lambda b: ops.pq_decode(codes, b, backend=backend), (cb,))


def test_torch_compile_fullgraph():
    cb = _codebooks(4, 256, 3)
    codes = torch.randint(0, 256, (100, 4), dtype=torch.uint8)
    q = torch.randn(5, 12)

    def f(q, codes, cb):
        lut = ops.pq_lut(q, cb, backend="cpu")
        d, i = ops.pq_search(q, codes, cb, 4, backend="cpu")
        return lut.sum() + d.sum(), i

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    a, ia = compiled(q, codes, cb)
    b, ib = f(q, codes, cb)
    assert torch.equal(ia, ib) and torch.allclose(a, b)


# ---- the CUDA kernels, source unchanged, on the CPU emulator of tests/test_cuda_build.py -------------

_EMU_RUNTIME = r"""
// What pq.cu uses beyond the router's features (host-side stand-ins).
inline unsigned long long* emu_dynamic_smem() {
  static std::vector<unsigned long long> buffer(1 << 17);  // 1 MiB, one block at a time
  return buffer.data();
}
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr cudaDeviceAttr cudaDevAttrMaxSharedMemoryPerBlockOptin = static_cast<cudaDeviceAttr>(97);
template <typename F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
"""

_EMU_DRIVER = r"""
#include "pq_emulated.inc"
using namespace fastcore;
using namespace fastcore::pq;
extern "C" {
int emu_lut(const float* x, const float* ct, int64_t n, int64_t M, int64_t dsub, int64_t ksub, int metric, float* lut) {
  TableParams<float> p;
  p.x = x; p.x_stride = M * dsub; p.codebooks_t = ct; p.n = n; p.M = M; p.dsub = dsub; p.ksub = ksub;
  p.metric = metric ? Metric::kIP : Metric::kL2; p.lut = lut;
  return pq_lut_cuda(p, nullptr);
}
int emu_scan(const float* lut, const uint8_t* codes, int64_t nq, int64_t n, int64_t M, int64_t ksub, int64_t k,
             int64_t chunk, int metric, unsigned long long* partial) {
  AdcCudaParams p;
  p.lut = lut; p.codes = codes; p.nq = nq; p.n = n; p.M = M; p.ksub = ksub; p.k = k; p.chunk = chunk;
  p.nchunks = (n + chunk - 1) / chunk; p.metric = metric ? Metric::kIP : Metric::kL2; p.partial = partial;
  return adc_topk_cuda(p, nullptr);
}
}
"""


@pytest.fixture(scope="module")
def emulated_pq(tmp_path_factory):
    from test_cuda_build import build_emulated_kernels

    return build_emulated_kernels(
        tmp_path_factory.mktemp("pq_emulator"), "pq/pq.cu", _EMU_DRIVER, "pq", extra_runtime=_EMU_RUNTIME
    )


def _unpack_partial(partial: torch.Tensor, n: int, ip: bool):
    """The torch layer's merge (csrc/torch/pq_ops.cpp), in Python: sort, unpack key bits and rows."""
    import numpy as np

    u = partial.numpy().view(np.uint64).reshape(partial.shape[0], -1)
    u = np.sort(u, axis=1)
    rows = (u & np.uint64(0xFFFFFFFF)).astype(np.int64)
    ukey = (u >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ukey & np.uint32(0x80000000), ukey & np.uint32(0x7FFFFFFF), ~ukey).astype(np.uint32)
    key = torch.from_numpy(bits.view(np.float32).copy())
    rows = torch.from_numpy(rows)
    return (-key if ip else key), rows


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize(
    "nq,n,M,ksub,k,chunk", [(2, 300, 3, 16, 5, 128), (1, 70, 4, 256, 64, 64), (3, 9, 2, 16, 4, 32)]
)
def test_cuda_kernels_on_emulator(emulated_pq, metric, nq, n, M, ksub, k, chunk):
    import ctypes

    lib = emulated_pq
    dsub = 3
    cb = _codebooks(M, ksub, dsub)
    q = torch.randn(nq, M * dsub)
    lut = torch.full((nq, M, ksub), float("nan"))
    ct = cb.permute(0, 2, 1).contiguous()
    ip = metric == "ip"
    i64 = ctypes.c_int64
    assert (
        lib.emu_lut(
            ctypes.c_void_p(q.data_ptr()),
            ctypes.c_void_p(ct.data_ptr()),
            i64(nq),
            i64(M),
            i64(dsub),
            i64(ksub),
            int(ip),
            ctypes.c_void_p(lut.data_ptr()),
        )
        == 0
    )
    assert relative_error(lut, ref.pq_lut(q.double(), cb.double(), metric)) < 1e-6
    codes = torch.randint(0, ksub, (n, M), dtype=torch.uint8)
    nchunks = (n + chunk - 1) // chunk
    partial = torch.full((nq, nchunks, k), -7, dtype=torch.int64)
    assert (
        lib.emu_scan(
            ctypes.c_void_p(lut.data_ptr()),
            ctypes.c_void_p(codes.data_ptr()),
            i64(nq),
            i64(n),
            i64(M),
            i64(ksub),
            i64(k),
            i64(chunk),
            int(ip),
            ctypes.c_void_p(partial.data_ptr()),
        )
        == 0
    )
    key, rows = _unpack_partial(partial, n, ip)
    d, i = key[:, :k], rows[:, :k]
    valid = i < n
    ed, ei = ref.topk_with_ties(ref.pq_adc_distances(q.double(), codes, cb.double(), metric), k, metric)
    assert torch.equal(torch.where(valid, i, torch.full_like(i, -1)), ei)
    assert torch.allclose(d[valid].double(), ed[ei >= 0], rtol=1e-5, atol=1e-5)


def test_pq_train_batched_cpu_matches_per_subspace_kmeans():
    """The cpu pq_train (all sub-spaces in one kernel call per iteration) equals one kmeans per sub-space."""
    x = _clustered(1500, 12, centers=6, seed=9)
    books = ops.pq_train(x, 3, 4, niter=6, backend="cpu")
    for m in range(3):
        c = ops.kmeans(x[:, 4 * m : 4 * m + 4], 16, niter=6, backend="cpu")
        assert torch.allclose(books[m], c, atol=1e-5)
    rb = ops.pq_train(x.double(), 3, 4, niter=6, backend="reference")
    assert relative_error(books, rb) < 1e-4


# ---- SIMD kernels against the portable loops ----------------------------------------------------------


@contextlib.contextmanager
def _kernel(name):
    """Run the body with the cpu backend's SIMD family forced (encode, 8-bit scans, fast-scan)."""
    chosen = ops.pq4_kernel(name)
    try:
        yield chosen
    finally:
        ops.pq4_kernel("auto")


@pytest.mark.parametrize("ksub,dsub", [(256, 4), (16, 2), (100, 3), (256, 16)])
def test_encode_simd_and_portable_agree(ksub, dsub):
    """GEMM-form encode: the AVX-512 register argmin (ksub 16, 256) and the portable loop pick the exact
    float64 argmin except on near ties."""
    cb = _codebooks(5, ksub, dsub)
    x = torch.randn(700, 5 * dsub)[::2]  # non-contiguous rows
    expected = ref.pq_encode(x.double(), cb.double())
    lut = ref.pq_lut(x.double(), cb.double())
    best = lut.gather(2, expected.long()[..., None])[..., 0]
    for kernel in ("portable", "auto"):
        with _kernel(kernel):
            codes = ops.pq_encode(x, cb, backend="cpu")
        assert codes.shape == (350, 5) and int(codes.max()) < ksub
        got = lut.gather(2, codes.long()[..., None])[..., 0]
        mismatch = codes != expected
        assert mismatch.float().mean() < 0.01, kernel
        assert torch.allclose(got[mismatch], best[mismatch], rtol=1e-5, atol=1e-5), kernel


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq,n,k", [(37, 2001, 10), (3, 500, 600), (16, 64, 1)])
def test_flat_scan_simd_equals_portable_bits(metric, nq, n, k):
    """The 16-query AVX-512 scan sums each lane in m order from 0 like the scalar loop: same bits."""
    cb = _codebooks(6, 256, 2)
    codes = torch.randint(0, 256, (n, 6), dtype=torch.uint8)
    q = torch.randn(nq, 12)
    with _kernel("portable"):
        d1, i1 = ops.pq_search(q, codes, cb, k, metric, backend="cpu")
    with _kernel("auto"):
        d2, i2 = ops.pq_search(q, codes, cb, k, metric, backend="cpu")
    assert torch.equal(i1, i2) and torch.equal(d1, d2)


@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512bw"])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("M,nq,k", [(8, 11, 10), (5, 3, 40), (16, 6, 1)])
def test_ivfpq4_search_matches_quantized_reference(kernel, metric, M, nq, k):
    """IVF fast-scan (queries grouped by list) against the quantized reference: same ids, same sums."""
    g = torch.Generator().manual_seed(M * 100 + nq)
    nlist, n = 7, 900
    codes = torch.randint(0, 16, (n, M), dtype=torch.uint8, generator=g)
    list_no = torch.randint(0, nlist, (n,), generator=g)
    list_no[list_no == 3] = 4  # an empty list
    ids = torch.randperm(n, generator=g) * 2 + 5
    packed, list_blocks, sizes, row_ids = ops.pq4_pack_lists(codes, list_no, ids, nlist)
    cb = _codebooks(M, 16, 2)
    q = torch.randn(nq, M * 2, generator=g)
    probes = torch.stack([torch.randperm(nlist, generator=g)[:4] for _ in range(nq)])
    probes[0, 1] = -1
    with _kernel(kernel):
        d, i = ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, cb, k, metric, backend="cpu")
    rd, ri = ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, cb, k, metric, backend="reference")
    assert torch.equal(i, ri)
    assert torch.allclose(d, rd, rtol=1e-5, atol=1e-4)


def test_ivfpq4_large_k_scans_queries_in_chunks():
    """k = 45000 (> the 900 vectors: padded) makes the IVF scan split a thread's queries into chunks of 64
    (its collectors are kept under ~64 MiB); 140 queries: two or three chunks per thread on 1-2 threads."""
    g = torch.Generator().manual_seed(3)
    n, M, nlist, nq, k = 900, 6, 5, 140, 45000
    codes = torch.randint(0, 16, (n, M), dtype=torch.uint8, generator=g)
    list_no = torch.randint(0, nlist, (n,), generator=g)
    ids = torch.randperm(n, generator=g) + 11
    packed, list_blocks, sizes, row_ids = ops.pq4_pack_lists(codes, list_no, ids, nlist)
    cb = _codebooks(M, 16, 2)
    q = torch.randn(nq, M * 2, generator=g)
    probes = torch.stack([torch.randperm(nlist, generator=g)[:3] for _ in range(nq)])
    d, i = ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, cb, k, "l2", backend="cpu")
    rd, ri = ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, cb, k, "l2", backend="reference")
    assert torch.equal(i, ri)
    assert torch.allclose(d, rd, rtol=1e-5, atol=1e-4)
    assert (i[:, 900:] == -1).all()


@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512bw"])
@pytest.mark.parametrize("k", [1, 7, 100])
def test_ivfpq4_equal_sums_keep_the_lowest_ids(kernel, k):
    """Every vector has the same code, so all sums tie and the result is the k lowest ids of the probed
    lists whatever the scan order (the collector keeps its k best (sum, id) pairs whenever its buffer fills)."""
    n, M, nlist = 600, 4, 3
    codes = torch.zeros(n, M, dtype=torch.uint8)
    list_no = torch.arange(n) % nlist
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(0)) * 3 + 1
    packed, list_blocks, sizes, row_ids = ops.pq4_pack_lists(codes, list_no, ids, nlist)
    cb = _codebooks(M, 16, 2)
    q = torch.randn(2, M * 2)
    probes = torch.tensor([[2, 0, 1], [1, -1, 0]])
    with _kernel(kernel):
        d, i = ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, cb, k, "l2", backend="cpu")
    for row, lists in enumerate(([2, 0, 1], [1, 0])):
        expected = ids[torch.isin(list_no, torch.tensor(lists))].sort().values[:k]
        assert torch.equal(i[row], expected), kernel
        assert (d[row] == d[row, 0]).all()


@pytest.mark.parametrize("kernel", ["portable", "auto"])
@pytest.mark.parametrize("n,L,count", [(50, 1024, 8), (7, 37, 37), (5, 16, 1), (33, 100, 20), (3, 5, 2)])
def test_best_columns_equal_a_stable_descending_sort(kernel, n, L, count):
    """The IVF probe selection: the count largest columns, largest first, the lower column on ties, a NaN
    below every number (the native selection's SIMD and scalar paths, many ties, all-NaN rows)."""
    from fastcore_ai.ops.pq import best_columns

    g = torch.Generator().manual_seed(L * 7 + count)
    scores = torch.randint(0, 30, (n, L), generator=g).float()
    scores[0, 3] = float("nan")
    scores[1] = float("nan")
    scores[1, L - 1] = -5.0
    scores[2, : L // 2] = float("-inf")
    expected = torch.sort(torch.nan_to_num(scores, nan=float("-inf")), dim=1, descending=True, stable=True).indices
    with _kernel(kernel):
        got = best_columns(scores, count)
    assert torch.equal(got, expected[:, :count])
    distinct = torch.randn(n, L, generator=g, dtype=torch.float64)  # float64: the torch.topk fallback
    assert torch.equal(best_columns(distinct, count), torch.sort(distinct, 1, descending=True).indices[:, :count])


def test_best_columns_rejects_a_count_outside_the_row():
    from fastcore_ai import _native

    with pytest.raises(RuntimeError, match="ivfpq_search: count must satisfy 1 <= count <= L = 4"):
        _native.native().pq_top_columns(torch.zeros(2, 4), 5)
    with pytest.raises(RuntimeError, match="ivfpq_search: scores must be float32"):
        _native.native().pq_top_columns(torch.zeros(2, 4, dtype=torch.float64), 1)


@pytest.mark.parametrize("nq,nprobe", [(21, 3), (2, 8)])
def test_ivfpq_list_terms_decomposition(nq, nprobe):
    """L2 residual search through the per-list tables (given, or built by the op when nlist <= nq·nprobe)
    agrees with the per-probe tables and the exact reference; SIMD and portable give the same bits."""
    g = torch.Generator().manual_seed(nq)
    nlist, M, dsub, n = 8, 4, 3, 2500
    coarse = torch.randn(nlist, M * dsub, generator=g) * 3
    cb = _codebooks(M, 256, dsub)
    codes = torch.randint(0, 256, (n, M), dtype=torch.uint8, generator=g)
    counts = torch.bincount(torch.randint(0, nlist, (n,), generator=g), minlength=nlist)
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    ids = torch.randperm(n, generator=g)
    q = torch.randn(nq, M * dsub, generator=g) * 3
    probes = torch.stack([torch.randperm(nlist, generator=g)[:nprobe] for _ in range(nq)])
    terms = ops.ivfpq_list_terms(coarse, cb)
    assert terms.shape == (nlist, M, 256) and terms.dtype == torch.float32
    args = (q, coarse, probes, codes, offsets, ids, cb, 15)
    rd, ri = ops.ivfpq_search(*args, backend="reference")
    results = []
    for kernel in ("portable", "auto"):
        with _kernel(kernel):
            results.append(ops.ivfpq_search(*args, list_terms=terms, backend="cpu"))
            d_auto, i_auto = ops.ivfpq_search(*args, backend="cpu")  # builds or skips the tables itself
        assert torch.allclose(d_auto, rd, rtol=1e-4, atol=1e-3)
        assert (i_auto == ri).float().mean() > 0.97
    (d1, i1), (d2, i2) = results
    assert torch.equal(d1, d2) and torch.equal(i1, i2)
    assert torch.allclose(d1, rd, rtol=1e-4, atol=1e-3)
    assert (i1 == ri).float().mean() > 0.97


def test_ivfpq_list_terms_errors():
    coarse, cb = torch.randn(4, 8), _codebooks(2, 256, 4)
    codes = torch.zeros(3, 2, dtype=torch.uint8)
    offsets = torch.tensor([0, 3, 3, 3, 3])
    args = (torch.randn(2, 8), coarse, torch.zeros(2, 1, dtype=torch.int64), codes, offsets, torch.arange(3), cb, 2)
    with pytest.raises(ValueError, match=r"ivfpq_search: list_terms must have shape \[nlist, M, ksub\]"):
        ops.ivfpq_search(*args, list_terms=torch.zeros(3, 2, 256))
    with pytest.raises(ValueError, match=r"ivfpq_search: list_terms apply to metric 'l2' with by_residual=True"):
        ops.ivfpq_search(*args[:-1], 2, "ip", list_terms=torch.zeros(4, 2, 256))
    with pytest.raises(TypeError, match=r"ivfpq_search: list_terms"):
        ops.ivfpq_search(*args, list_terms=torch.zeros(4, 2, 256, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ivfpq_list_terms: coarse_centroids must have d"):
        ops.ivfpq_list_terms(torch.randn(4, 7), cb)


# ---- k-means assignment and member sums (native) ----------------------------------------------------------


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 7, 16, 33, 1024])
def test_nearest_centroid_native_matches_float64(metric, k):
    """The blocked GEMM + SIMD argmin (and the portable loop) pick the float64 best centroid except on
    near ties; min_dist is the squared distance (l2) or the inner product (ip) of that centroid."""
    from fastcore_ai import _native
    from fastcore_ai.ops.pq import nearest_centroid

    x = _clustered(1300, 24, centers=9, seed=k)
    c = torch.randn(k, 24) * 2
    xd, cd = x.double(), c.double()
    score = -((xd[:, None] - cd[None]) ** 2).sum(-1) if metric == "l2" else xd @ cd.T
    expected = score.argmax(1)
    best = score.gather(1, expected[:, None])[:, 0]
    for kernel in ("portable", "auto"):
        with _kernel(kernel):
            assign, min_dist = _native.native().pq_kmeans_assign(x, c, 0 if metric == "l2" else 1)
        got = score.gather(1, assign[:, None])[:, 0]
        assert assign.dtype == torch.int64 and int(assign.min()) >= 0 and int(assign.max()) < k
        mismatch = assign != expected
        assert mismatch.float().mean() < 0.01, kernel
        assert torch.allclose(got[mismatch], best[mismatch], rtol=1e-5, atol=1e-4), kernel
        sign = -1.0 if metric == "l2" else 1.0
        assert torch.allclose(min_dist.double(), sign * got, rtol=1e-4, atol=1e-3), kernel
    assert torch.equal(nearest_centroid(x, c, metric), _native.native().pq_kmeans_assign(x, c, int(metric == "ip"))[0])
    # the torch fallback (float64 input) agrees on the exact answer
    assert torch.equal(nearest_centroid(xd, cd, metric), expected)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_nearest_centroid_ties_go_to_the_lower_index(metric):
    """Duplicated centroids (exact ties, across SIMD lanes and past a 16-column block) and an all-+inf
    row: the lowest index wins, as the scalar loop and torch's argmin."""
    from fastcore_ai import _native

    base = torch.randn(5, 8)
    c = torch.cat([torch.randn(20, 8) * 50, base, torch.randn(3, 8) * 50, base, base])  # 5-row copies at 20, 28, 33
    x = base[torch.tensor([0, 1, 2, 3, 4, 2])] * (1.0 if metric == "l2" else 1.0)
    for kernel in ("portable", "auto"):
        with _kernel(kernel):
            assign, _ = _native.native().pq_kmeans_assign(x, c, 0 if metric == "l2" else 1)
        if metric == "l2":
            assert assign.tolist() == [20, 21, 22, 23, 24, 22], kernel
        else:  # ip: the largest inner product; the copies tie, the first copy wins
            scores = x.double() @ c.double().T
            assert torch.equal(assign, scores.argmax(1)), kernel
    huge = torch.full((2, 3), 3e38)
    with _kernel("auto"):
        a, _ = _native.native().pq_kmeans_assign(torch.ones(1, 3) * 3e38, huge, 1)
    assert a.tolist() == [0]


@pytest.mark.parametrize("codes_dtype", [torch.uint8, torch.int64])
def test_centroid_sums_match_index_add(codes_dtype):
    """Member sums in float64, row order: the same bits as index_add_ over a float64 copy (what the
    reference kmeans_update does), for M sub-spaces at once and for M = 1 (a plain k-means), with a
    non-contiguous x and threads splitting the columns."""
    from fastcore_ai import _native

    for n, M, dsub, ksub in ((3000, 6, 4, 16), (2000, 1, 40, 100), (5, 3, 1, 256)):
        x = torch.randn(n, M * dsub * 2)[:, ::2]
        codes = torch.randint(0, ksub, (n, M)).to(codes_dtype)
        sums, counts = _native.native().pq_centroid_sums(x, codes, ksub)
        assert sums.shape == (M, ksub, dsub) and sums.dtype == torch.float64 and counts.shape == (M, ksub)
        for m in range(M):
            cm = codes[:, m].long()
            want = torch.zeros(ksub, dsub, dtype=torch.float64).index_add_(
                0, cm, x[:, m * dsub : (m + 1) * dsub].double()
            )
            assert torch.equal(sums[m], want)
            assert torch.equal(counts[m], torch.bincount(cm, minlength=ksub))


def test_centroid_sums_and_assign_bad_inputs():
    from fastcore_ai import _native

    N = _native.native()
    with pytest.raises((ValueError, RuntimeError), match=r"kmeans.*codes must lie in \[0, ksub\)"):
        N.pq_centroid_sums(torch.randn(4, 4), torch.full((4, 2), 9, dtype=torch.uint8), 8)
    with pytest.raises((ValueError, RuntimeError), match=r"kmeans.*codes must be uint8 or int64"):
        N.pq_centroid_sums(torch.randn(4, 4), torch.zeros(4, 2, dtype=torch.int32), 8)
    with pytest.raises((ValueError, RuntimeError), match=r"kmeans.*multiple of M"):
        N.pq_centroid_sums(torch.randn(4, 5), torch.zeros(4, 2, dtype=torch.uint8), 8)
    with pytest.raises((ValueError, RuntimeError), match=r"kmeans.*metric must be 0 \(l2\) or 1 \(ip\)"):
        N.pq_kmeans_assign(torch.randn(4, 4), torch.randn(2, 4), 2)
    with pytest.raises((ValueError, RuntimeError), match=r"kmeans.*float32"):
        N.pq_kmeans_assign(torch.randn(4, 4, dtype=torch.float64), torch.randn(2, 4), 0)


def test_kmeans_cpu_equals_reference_update_steps():
    """The cpu kmeans (native assignment + native member sums) takes the reference's update steps bit for
    bit: iterations from the same start, with empty clusters split, equal kmeans_update's."""
    from fastcore_ai import _native

    g = torch.Generator().manual_seed(4)
    # 6 distinct rows repeated, a few jittered: duplicated initial centroids tie (the lower index takes the
    # points), so the others come out empty and split the largest
    x = torch.randn(6, 40, generator=g)[torch.randint(0, 6, (800,), generator=g)]
    x[::7] += 0.01 * torch.randn(x[::7].shape, generator=g)
    k = 37
    sample, c = ref.kmeans_init(x, k, 0, 256)
    empty = 0
    for _ in range(4):
        assign = _native.native().pq_kmeans_assign(sample.contiguous(), c, 0)[0]
        empty += int((torch.bincount(assign, minlength=k) == 0).sum())
        c = ref.kmeans_update(sample.double(), assign, k, c.double()).float()
    assert empty > 0
    assert torch.equal(ops.kmeans(x, k, niter=4, backend="cpu"), c)


@pytest.mark.parametrize("codes_dtype", [torch.uint8, torch.int64])
def test_centroid_update_matches_reference_update(codes_dtype):
    """pq_centroid_update (counts, then per-thread column sums and means): new64 equals the reference
    kmeans_update's means before its empty-cluster split bit for bit (empty clusters keep the old
    centroid), new32 its float32 rounding, for M sub-spaces at once; after the split the cpu update
    equals kmeans_update."""
    from fastcore_ai import _native
    from fastcore_ai.ops.pq import _centroid_update_cpu

    n, M, dsub, ksub = 2500, 5, 6, 40
    x = torch.randn(n, M * dsub * 2)[:, ::2]
    codes = torch.randint(0, ksub - 3, (n, M)).to(codes_dtype)  # the last 3 centroids of each sub-space stay empty
    old = torch.randn(M, ksub, dsub)
    new32, new64, counts = _native.native().pq_centroid_update(x, codes, ksub, old)
    for m in range(M):
        cm = codes[:, m].long()
        xs = x[:, m * dsub : (m + 1) * dsub].double()
        sums = torch.zeros(ksub, dsub, dtype=torch.float64).index_add_(0, cm, xs)
        cnt = torch.bincount(cm, minlength=ksub)
        want = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None].double(), old[m].double())
        assert torch.equal(new64[m], want) and torch.equal(counts[m], cnt)
        assert torch.equal(new32[m], want.float())
        assert torch.equal(
            _centroid_update_cpu(x.contiguous(), codes, ksub, old)[m],
            ref.kmeans_update(xs, cm, ksub, old[m].double()).float(),
        )
    with pytest.raises((ValueError, RuntimeError), match=r"kmeans.*old must be float32 \[M, ksub, dsub\]"):
        _native.native().pq_centroid_update(x, codes, ksub, old[:, :4])


def test_pq4_pack_lists_rejects_bad_input_with_named_errors():
    """Out-of-range list numbers, wide codes and mismatched lengths used to surface as raw bincount /
    indexing errors (issue 20); each now names the op and the argument."""
    codes = torch.randint(0, 16, (10, 3), dtype=torch.uint8)
    list_no, ids = torch.randint(0, 4, (10,)), torch.arange(10)
    bad_lists = list_no.clone()
    bad_lists[3] = 4
    with pytest.raises(ValueError, match=r"pq4_pack_lists: list_no must lie in \[0, nlist\) = \[0, 4\), got 4"):
        ops.pq4_pack_lists(codes, bad_lists, ids, 4)
    bad_lists[3] = -1
    with pytest.raises(ValueError, match="list_no must lie in .* got -1"):
        ops.pq4_pack_lists(codes, bad_lists, ids, 4)
    with pytest.raises(ValueError, match=r"pq4_pack_lists: ids must have n = codes.shape\[0\] = 10 entries"):
        ops.pq4_pack_lists(codes, list_no, ids[:9], 4)
    with pytest.raises(ValueError, match="codes must be 4-bit"):
        ops.pq4_pack_lists(codes + 16, list_no, ids, 4)
    with pytest.raises(TypeError, match="pq4_pack_lists: list_no must be int64"):
        ops.pq4_pack_lists(codes, list_no.int(), ids, 4)
    with pytest.raises(ValueError, match="pq4_pack_lists: nlist must satisfy 1 <= nlist"):
        ops.pq4_pack_lists(codes, list_no, ids, 0)
    empty = ops.pq4_pack_lists(codes[:0], list_no[:0], ids[:0], 4)
    assert empty[0].shape == (0, 2, 32) and empty[2].tolist() == [0, 0, 0, 0]

"""Product quantization ops: k-means (incl. the Sinkhorn-balanced variant of RepCONC), PQ training,
encoding/decoding, distance tables (LUTs) and exact 8-bit ADC search with top-k; the 4-bit fast-scan is
in ops/pq_fastscan.py and the IVF scans in ops/pq_ivf.py (the same conventions). Semantics (FAISS's IndexPQ definitions) in fastcore_ai.reference.pq.

Layering (DESIGN): validate -> choose backend ("cpu": the C++ kernels, "reference": pure torch) ->
registered torch ops `fastcore_ai::pq_*`, `ivfpq_*` (declared by `define_op`: fake impls; autograd for
pq_lut and pq_decode).

`nearest_centroid` and `best_columns` are the index-building helpers (coarse assignment, IVF probe
lists) that fastcore_ai.search uses; they call the native kernels directly and are not registered ops.

Search conventions: distances float32 [nq, k], ids int64 [nq, k], best first; l2 = squared distance
ascending, ip = inner product descending; ties go to the lower id; fewer than k results are padded
with id −1 and +inf (l2) / −inf (ip).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_bool, check_choice, check_int, check_tensor
from ..reference import pq as _ref
from ._define import define_op, triton

__all__ = ["kmeans", "pq_train", "pq_encode", "pq_decode", "pq_lut", "pq_search", "METRICS"]

METRICS = ("l2", "ip")
_FLOATS = (torch.float32, torch.float64)
_METRIC_ID = {"l2": 0, "ip": 1}


def _table(op: str) -> backends.OpTable:
    dtypes = frozenset(_FLOATS)
    return backends.OpTable(
        op, ("cpu", "reference"), {"cpu": backends.Support(dtypes), "reference": backends.Support(dtypes)}
    )


for _op in ("kmeans", "pq_encode", "pq_decode", "pq4_search", "ivfpq_search"):
    backends.register_op(_table(_op))
_F32 = frozenset({torch.float32})
# pq_lut has a CUDA kernel; pq_search has the CUDA scan (table in shared memory, block-wide top-k, k <= 4096)
# and the Triton ADC scan (CUDA tensors, or CPU ones under the interpreter).
backends.register_op(
    backends.OpTable(
        "pq_lut",
        ("cuda", "cpu", "reference"),
        {
            "cuda": backends.Support(_F32),
            "cpu": backends.Support(frozenset(_FLOATS)),
            "reference": backends.Support(frozenset(_FLOATS)),
        },
    )
)
backends.register_op(
    backends.OpTable(
        "pq_search",
        ("cuda", "triton", "cpu", "reference"),
        {
            "cuda": backends.Support(
                _F32, limits=lambda k=1, **_: [] if k <= 4096 else [f"the cuda scan supports k <= 4096, got {k}"]
            ),
            "triton": backends.Support(_F32),
            "cpu": backends.Support(frozenset(_FLOATS)),
            "reference": backends.Support(frozenset(_FLOATS)),
        },
    )
)


def _err(op: str, message: str) -> str:
    return f"fastcore_ai.ops.{op}: {message}"


def _check_codebooks(op: str, codebooks) -> None:
    check_tensor(op, "codebooks", codebooks, ndim=3, dtypes=_FLOATS, layout="[M, ksub, dsub]")
    M, ksub, dsub = codebooks.shape
    if M < 1 or dsub < 1 or not 1 <= ksub <= 256:
        raise ValueError(
            _err(op, f"codebooks must have M >= 1, 1 <= ksub <= 256 and dsub >= 1, got {_describe(codebooks)}")
        )


def _check_vectors(op: str, name: str, x, codebooks: Tensor) -> None:
    check_tensor(op, name, x, ndim=2, dtypes=_FLOATS, layout="[n, d]")
    M, _, dsub = codebooks.shape
    if x.shape[1] != M * dsub:
        raise ValueError(
            _err(
                op,
                f"{name} must have d = M·dsub = {M}·{dsub} = {M * dsub} columns (codebooks "
                f"{tuple(codebooks.shape)}), got {_describe(x)}",
            )
        )
    if x.device != codebooks.device:
        raise ValueError(_err(op, f"{name} must be on codebooks' device {codebooks.device}, got {_describe(x)}"))


def _check_codes(op: str, codes, codebooks: Tensor) -> None:
    check_tensor(op, "codes", codes, ndim=2, dtypes=(torch.uint8,), layout="[n, M]")
    if codes.shape[1] != codebooks.shape[0]:
        raise ValueError(
            _err(op, f"codes must have M = {codebooks.shape[0]} columns (codebooks), got {_describe(codes)}")
        )
    if codes.device != codebooks.device:
        raise ValueError(_err(op, f"codes must be on codebooks' device {codebooks.device}, got {_describe(codes)}"))


def _check_code_range(op: str, codes: Tensor, ksub: int) -> None:
    """Codes index the tables: one ≥ ksub would read out of bounds (uint8 codes are always < 256).
    Under torch.compile the check is a traced assertion (no host read, so no graph break): the compiled
    call raises RuntimeError with the same text, without the offending code."""
    if ksub < 256 and codes.numel() > 0:
        if torch.compiler.is_compiling():
            torch._assert_async(codes.max() < ksub, _err(op, f"codes must lie in [0, ksub) = [0, {ksub})"))
            return
        top = int(codes.max())
        if top >= ksub:
            raise ValueError(_err(op, f"codes must lie in [0, ksub) = [0, {ksub}), got a code {top}"))


def _check_probe_range(op: str, probes: Tensor, nlist: int) -> None:
    """Probes are list numbers or −1; a traced assertion under torch.compile (as _check_code_range)."""
    if probes.numel():
        message = _err(op, f"probes must lie in [-1, nlist) = [-1, {nlist})")
        if torch.compiler.is_compiling():
            torch._assert_async(((probes >= -1) & (probes < nlist)).all(), message)
        elif int(probes.min()) < -1 or int(probes.max()) >= nlist:
            raise ValueError(message)


def _same_dtype(op: str, name: str, x: Tensor, codebooks: Tensor) -> Tensor:
    if x.dtype != codebooks.dtype:
        raise TypeError(
            _err(
                op,
                f"{name} must have codebooks' dtype {str(codebooks.dtype).replace('torch.', '')}, got {_describe(x)}",
            )
        )
    return x


# ---- k-means ----------------------------------------------------------------------------------------


def _kmeans_cpu(x: Tensor, k: int, niter: int, seed: int, max_points_per_centroid: int, constrained: bool) -> Tensor:
    sample, c = _ref.kmeans_init(x.float(), k, seed, max_points_per_centroid)
    sample = sample.contiguous()
    for _ in range(niter):
        if constrained:
            dist = ((sample * sample).sum(1, keepdim=True) - 2.0 * sample @ c.T + (c * c).sum(1)[None]).clamp_min_(0)
            assign = _ref.sinkhorn_balanced_assign(dist)
        elif k <= 256 and sample.shape[1] <= 32:
            # PQ sub-spaces: a GEMM with inner dimension dsub <= 32 is memory-bound (about 1 GFLOP/s
            # measured); the encode kernel's direct ‖x − c‖² over all k centroids at once is faster.
            assign = _native.native().pq_tables(sample, c[None].contiguous(), 0, False, True)[1][:, 0].long()
        else:
            assign = nearest_centroid(sample, c)
        c = _centroid_update_cpu(sample, assign[:, None], k, c[None])[0]
    return c.to(x.dtype)


def _centroid_update_cpu(sample: Tensor, codes: Tensor, ksub: int, old: Tensor) -> Tensor:
    """kmeans_update of the M sub-spaces of `sample` [n, M·dsub] float32 at once (codes [n, M] uint8 or
    int64; old centroids [M, ksub, dsub] float32): the member means (float64 sums in row order, the same
    bits as the reference's index_add_), old centroids kept for empty clusters, which then split the
    largest one (reference.pq.kmeans_update's rule). One native call (one parallel region) per
    iteration; float32 [M, ksub, dsub]."""
    new32, new64, counts = _native.native().pq_centroid_update(sample, codes, ksub, old.contiguous())
    if not bool((counts == 0).any()):
        return new32
    for m in torch.nonzero((counts == 0).any(1)).reshape(-1).tolist():  # rare: split per sub-space
        new64[m] = _split_empty(new64[m], counts[m].double())
    return new64.float()


def nearest_centroid(x: Tensor, centroids: Tensor, metric: str = "l2") -> Tensor:
    """The nearest centroid of every row: assign [n] int64, argmin_j ‖x_i − c_j‖² (l2, GEMM form) or
    argmax_j ⟨x_i, c_j⟩ (ip), the lower j on ties.

    x [n, d] and centroids [k, d] of one dtype and device, metric "l2" or "ip" (not validated: an
    index-building helper, used by kmeans and fastcore_ai.search for the coarse assignment and the
    single-probe IVF search). float32 CPU tensors: the native fused assignment (register tiles with a
    running argmin, no [n, k] product in memory; docs/pq.md); otherwise torch in row chunks."""
    if (
        x.dtype == torch.float32
        and centroids.dtype == torch.float32
        and x.device.type == "cpu"
        and centroids.device.type == "cpu"
        and _native.load_error() is None
    ):
        return _native.native().pq_kmeans_assign(x.contiguous(), centroids.contiguous(), _METRIC_ID[metric])[0]
    step = max(1, (1 << 22) // max(centroids.shape[0], 1))
    c_norms = (centroids * centroids).sum(1)[None]
    parts = []
    for i in range(0, x.shape[0], step):
        g = x[i : i + step] @ centroids.T
        parts.append((c_norms - 2.0 * g).argmin(1) if metric == "l2" else g.argmax(1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=x.device)


def best_columns(scores: Tensor, count: int) -> Tensor:
    """The count highest-scoring columns of each row: [n, count] int64, best first, the lower column on
    ties (a NaN ranks last); scores [n, L], 1 <= count <= L (not validated: an index-building helper).
    fastcore_ai.search's IVF probe lists (nprobe > 1). float32 CPU
    tensors: the native selection (a 16-wide compare against the current count-th best; torch.topk costs
    ~25x as much for nlist = 1024); otherwise torch.topk (the same lists up to the order of ties)."""
    if scores.dtype == torch.float32 and scores.device.type == "cpu" and _native.load_error() is None:
        return _native.native().pq_top_columns(scores.contiguous(), count)
    return torch.topk(scores, count, dim=1).indices.contiguous()


@define_op("pq_kmeans", impls={"cpu": _kmeans_cpu, "reference": _ref.kmeans}, contiguous_outputs=True)
def _kmeans_op(x: Tensor, k: int, niter: int, seed: int, max_points_per_centroid: int, constrained: bool) -> Tensor:
    return x.new_empty((k, x.shape[1]))


def kmeans(
    x: Tensor,
    k: int,
    niter: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    constrained: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """Lloyd's k-means: centroids [k, d] in x's dtype.

    x [n, d] float32/float64 with n >= k. Trains on at most k·max_points_per_centroid rows (a random
    subsample, as FAISS), starting from k random sample rows (both from `seed`); each of `niter`
    iterations assigns by the GEMM form ‖x‖² − 2x·c + ‖c‖² (lower index on ties) and re-seeds empty
    clusters by splitting the largest. constrained=True assigns by Sinkhorn iterations with uniform
    cluster marginals (RepCONC), so clusters come out near-equal in size.
    """
    op = "kmeans"
    check_tensor(op, "x", x, ndim=2, dtypes=_FLOATS, layout="[n, d]")
    check_int(op, "k", k, 1, 2**24)
    check_int(op, "niter", niter, 0, 10**6)
    check_int(op, "seed", seed, 0, 2**63 - 1)
    check_int(op, "max_points_per_centroid", max_points_per_centroid, 1, 2**30)
    check_bool(op, "constrained", constrained)
    if x.shape[0] < k:
        raise ValueError(_err(op, f"x must have at least k = {k} rows to seed k centroids, got {_describe(x)}"))
    if x.shape[1] < 1:
        raise ValueError(_err(op, f"x must have d >= 1 columns, got {_describe(x)}"))
    chosen = backends.select(op, backend, x.device, x.dtype, "x")
    return _kmeans_op(x, k, niter, seed, max_points_per_centroid, constrained, backend=chosen)


def pq_train(
    x: Tensor,
    M: int,
    nbits: int = 8,
    metric: str = "l2",
    niter: int = 25,
    constrained: bool = False,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    *,
    backend: str = "auto",
) -> Tensor:
    """PQ codebooks [M, 2^nbits, d/M] (float32; float64 for float64 x): one k-means per sub-space,
    sub-space m seeded with seed + m. nbits ∈ {4, 8}; d % M == 0. As in FAISS, sub-quantizers are
    L2 k-means for both metrics (`metric` is validated and kept for the caller's record)."""
    op = "pq_train"
    check_tensor(op, "x", x, ndim=2, dtypes=_FLOATS, layout="[n, d]")
    check_int(op, "M", M, 1, 4096)
    if nbits not in (4, 8) or isinstance(nbits, bool):
        raise ValueError(_err(op, f"nbits must be 4 or 8, got {nbits!r}"))
    check_choice(op, "metric", metric, METRICS)
    # kmeans checks these too, but the batched cpu path never calls it: checked here under pq_train's name
    check_int(op, "niter", niter, 0, 10**6)
    check_int(op, "seed", seed, 0, 2**63 - M)
    check_int(op, "max_points_per_centroid", max_points_per_centroid, 1, 2**30)
    check_bool(op, "constrained", constrained)
    d = x.shape[1]
    if d % M != 0:
        raise ValueError(_err(op, f"d must be divisible by M, got d = {d}, M = {M} ({_describe(x)})"))
    ksub = 2**nbits
    if x.shape[0] < ksub:
        raise ValueError(_err(op, f"x must have at least 2^nbits = {ksub} rows, got {_describe(x)}"))
    dsub = d // M
    chosen = backends.select("kmeans", backend, x.device, x.dtype, "x")
    if chosen == "cpu" and not constrained:
        return _pq_train_batched_cpu(x, M, ksub, niter, seed, max_points_per_centroid)
    books = [
        kmeans(x[:, m * dsub : (m + 1) * dsub], ksub, niter, seed, max_points_per_centroid, constrained, backend=chosen)
        for m in range(M)
    ]
    return torch.stack(books).contiguous()


def _pq_train_batched_cpu(x: Tensor, M: int, ksub: int, niter: int, seed: int, max_points_per_centroid: int) -> Tensor:
    """All M sub-space k-means at once (the same training rows and initial rows in every sub-space, as
    the per-sub-space loop with one seed): each iteration is one call of the encode kernel for the
    assignments of every sub-space and one native pass for all the member sums (float64, straight from
    the float32 rows: an index_add_ over a float64 copy of the [ns·M, dsub] rows cost a quarter of the
    RepCONC training), instead of M small calls."""
    n, d = x.shape
    dsub = d // M
    sample, init = _ref.kmeans_init(x.float(), ksub, seed, max_points_per_centroid)
    sample = sample.contiguous()
    c = init.reshape(ksub, M, dsub).permute(1, 0, 2).contiguous()  # [M, ksub, dsub]
    for _ in range(niter):
        codes = _native.native().pq_tables(sample, c, 0, False, True)[1]  # [ns, M] uint8
        c = _centroid_update_cpu(sample, codes, ksub, c)
    return c.to(x.dtype) if x.dtype == torch.float64 else c


def _split_empty(centroids: Tensor, counts: Tensor) -> Tensor:
    """kmeans_update's empty-cluster rule on already-averaged centroids."""
    new, counts = centroids.clone(), counts.clone()
    for j in range(new.shape[0]):
        if counts[j] == 0:
            big = int(torch.argmax(counts))
            new[j] = new[big] * (1.0 + _ref._SPLIT_EPS)
            new[big] = new[big] * (1.0 - _ref._SPLIT_EPS)
            half = torch.floor(counts[big] / 2)
            counts[j] = half
            counts[big] = counts[big] - half
    return new


# ---- encode / decode / tables ----------------------------------------------------------------------


def _encode_cpu(x, codebooks):
    return _native.native().pq_tables(x, codebooks, 0, False, True)[1]


@define_op("pq_encode", impls={"cpu": _encode_cpu, "reference": _ref.pq_encode})
def _encode_op(x: Tensor, codebooks: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.uint8)


def pq_encode(x: Tensor, codebooks: Tensor, *, backend: str = "auto") -> Tensor:
    """codes [n, M] uint8: code[i, m] = argmin_j ‖x_i,m − C[m, j]‖² (lower j on ties). For 4-bit
    codebooks (ksub = 16) the values are < 16; `pq4_pack` turns them into the fast-scan layout."""
    op = "pq_encode"
    _check_codebooks(op, codebooks)
    _check_vectors(op, "x", x, codebooks)
    _same_dtype(op, "x", x, codebooks)
    chosen = backends.select(op, backend, x.device, x.dtype, "x")
    return _encode_op(x, codebooks, backend=chosen)


def _decode_setup(ctx, inputs, output):
    codes, codebooks, backend = inputs
    ctx.save_for_backward(codes)
    ctx.shape = tuple(codebooks.shape)


def _decode_backward(ctx, grad):
    (codes,) = ctx.saved_tensors
    M, ksub, dsub = ctx.shape
    # grad_C[m, j] = Σ_{i : code[i, m] = j} grad[i, m·dsub : (m+1)·dsub]
    flat = (codes.long() + torch.arange(M, device=codes.device)[None, :] * ksub).reshape(-1)
    g = grad.reshape(-1, dsub)
    out = torch.zeros(M * ksub, dsub, dtype=grad.dtype, device=grad.device).index_add(0, flat, g)
    return None, out.reshape(M, ksub, dsub), None


# A gather on every backend (memory-bound; torch's indexing is already optimal for it).
@define_op(
    "pq_decode",
    impls={"cpu": _ref.pq_decode, "reference": _ref.pq_decode},
    autograd=(_decode_setup, _decode_backward),
    contiguous_outputs=True,
)
def _decode_op(codes: Tensor, codebooks: Tensor) -> Tensor:
    return codebooks.new_empty((codes.shape[0], codebooks.shape[0] * codebooks.shape[2]))


def pq_decode(codes: Tensor, codebooks: Tensor, *, backend: str = "auto") -> Tensor:
    """x̂ [n, d] = concat_m C[m, code[:, m]] in codebooks' dtype; differentiable w.r.t. codebooks."""
    op = "pq_decode"
    _check_codebooks(op, codebooks)
    _check_codes(op, codes, codebooks)
    _check_code_range(op, codes, codebooks.shape[1])
    chosen = backends.select(op, backend, codebooks.device, codebooks.dtype, "codebooks")
    return _decode_op(codes, codebooks, backend=chosen)


def _lut_cpu(queries, codebooks, metric):
    return _native.native().pq_tables(queries, codebooks, _METRIC_ID[metric], True, False)[0]


def _lut_reference(queries, codebooks, metric):
    return _ref.pq_lut(queries, codebooks, metric).to(queries.dtype)


def _lut_setup(ctx, inputs, output):
    queries, codebooks, metric, backend = inputs
    ctx.save_for_backward(queries, codebooks)
    ctx.metric = metric


def _lut_backward(ctx, grad):
    queries, codebooks = ctx.saved_tensors
    M, ksub, dsub = codebooks.shape
    q = queries.reshape(-1, M, dsub)
    if ctx.metric == "l2":
        # lut = Σ_t (q_mt − C_mjt)²: ∂q_mt = 2(q_mt Σ_j g − Σ_j g C_mjt), ∂C_mjt = −2 Σ_q g (q_mt − C_mjt)
        gsum = grad.sum(2)  # [nq, M]
        grad_q = 2.0 * (q * gsum[..., None] - torch.einsum("qmj,mjt->qmt", grad, codebooks))
        grad_c = -2.0 * (torch.einsum("qmj,qmt->mjt", grad, q) - grad.sum(0)[..., None] * codebooks)
    else:
        grad_q = torch.einsum("qmj,mjt->qmt", grad, codebooks)
        grad_c = torch.einsum("qmj,qmt->mjt", grad, q)
    return grad_q.reshape(queries.shape), grad_c, None, None


@define_op(
    "pq_lut",
    impls={"cpu": _lut_cpu, "cuda": _lut_cpu, "reference": _lut_reference},
    autograd=(_lut_setup, _lut_backward),
)
def _lut_op(queries: Tensor, codebooks: Tensor, metric: str) -> Tensor:
    return queries.new_empty((queries.shape[0], codebooks.shape[0], codebooks.shape[1]))


def pq_lut(queries: Tensor, codebooks: Tensor, metric: str = "l2", *, backend: str = "auto") -> Tensor:
    """Distance tables [nq, M, ksub] in queries' dtype: l2 ‖q_m − C[m, j]‖², ip ⟨q_m, C[m, j]⟩.
    Differentiable w.r.t. queries and codebooks (JPQ/RepCONC-style centroid training)."""
    op = "pq_lut"
    _check_codebooks(op, codebooks)
    _check_vectors(op, "queries", queries, codebooks)
    _same_dtype(op, "queries", queries, codebooks)
    check_choice(op, "metric", metric, METRICS)
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _lut_op(queries, codebooks, metric, backend=chosen)


# ---- exact ADC search --------------------------------------------------------------------------------


def _search_dtype(queries: Tensor) -> torch.dtype:
    """The registered pq_search's distance dtype: float64 for float64 queries, else float32, on every
    backend (a fake sees no backend). The cpu, cuda and triton scans compute float32 distances (widened
    losslessly for float64 queries); the public pq_search returns float32 from them, the reference's
    float64 distances as they are."""
    return torch.float64 if queries.dtype == torch.float64 else torch.float32


def _search_cpu(queries, codes, codebooks, k, metric):
    lut = _native.native().pq_tables(queries.float(), codebooks.float(), _METRIC_ID[metric], True, False)[0]
    d, i = _native.native().pq_search_flat(lut, codes, k, _METRIC_ID[metric])
    return d.to(_search_dtype(queries)), i


def _search_reference(queries, codes, codebooks, k, metric):
    d, i = _ref.pq_search(queries, codes, codebooks, k, metric)
    return d.to(_search_dtype(queries)), i


_adc_search = triton("pq", "adc_search")


def _search_triton(queries, codes, codebooks, k, metric):
    M, ksub, dsub = codebooks.shape
    q = queries.float().reshape(-1, M, dsub)
    cb = codebooks.float()
    dots = torch.einsum("qmt,mjt->qmj", q, cb)  # one batched GEMM over the sub-spaces
    if metric == "l2":
        lut = ((q * q).sum(-1)[..., None] - 2.0 * dots + (cb * cb).sum(-1)[None]).clamp_min_(0.0)
    else:
        lut = dots
    d, i = _adc_search(lut.contiguous(), codes, k, metric)
    return d.to(_search_dtype(queries)), i


@define_op(
    "pq_search",
    impls={"cpu": _search_cpu, "cuda": _search_cpu, "triton": _search_triton, "reference": _search_reference},
)
def _search_op(queries: Tensor, codes: Tensor, codebooks: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=_search_dtype(queries)), queries.new_empty((nq, k), dtype=torch.int64)


def _check_k(op: str, k) -> None:
    check_int(op, "k", k, 1, 2**24)


def pq_search(
    queries: Tensor, codes: Tensor, codebooks: Tensor, k: int, metric: str = "l2", *, backend: str = "auto"
) -> Tuple[Tensor, Tensor]:
    """Exact ADC k-nearest-neighbour search over PQ codes (FAISS IndexPQ semantics).

    queries [nq, d], codes [n, M] uint8, codebooks [M, ksub, dsub] (any ksub ≤ 256, 8-bit typical).
    Returns (distances [nq, k] float32, ids [nq, k] int64), best first, ties to the lower id, padded
    with −1 and +inf (l2) / −inf (ip) when n < k. The cpu backend builds float32 tables and scans
    several queries per block of codes with a bounded heap per query; the reference backend returns
    float64 distances for float64 queries.
    """
    op = "pq_search"
    _check_codebooks(op, codebooks)
    _check_vectors(op, "queries", queries, codebooks)
    _same_dtype(op, "queries", queries, codebooks)
    _check_codes(op, codes, codebooks)
    _check_k(op, k)
    check_choice(op, "metric", metric, METRICS)
    _check_code_range(op, codes, codebooks.shape[1])
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries", k=k)
    d, i = _search_op(queries, codes.contiguous(), codebooks, k, metric, backend=chosen)
    return (d, i) if chosen == "reference" else (d.float(), i)

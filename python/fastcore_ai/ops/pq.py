"""Product quantization ops: k-means (incl. the Sinkhorn-balanced variant of RepCONC), PQ training,
encoding/decoding, distance tables (LUTs), exact 8-bit ADC search with top-k, the 4-bit fast-scan and
the IVF-PQ scan. Semantics (FAISS's IndexPQ definitions) in fastcore_ai.reference.pq.

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

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_bool, check_choice, check_int, check_tensor
from ..reference import pq as _ref
from ._define import define_op, triton

__all__ = ["kmeans", "pq_train", "pq_encode", "pq_decode", "pq_lut", "pq_search", "pq4_pack", "pq4_search",
           "ivfpq_search", "pq4_kernel", "METRICS"]

METRICS = ("l2", "ip")
_FLOATS = (torch.float32, torch.float64)
_METRIC_ID = {"l2": 0, "ip": 1}


def _table(op: str) -> backends.OpTable:
    dtypes = frozenset(_FLOATS)
    return backends.OpTable(op, ("cpu", "reference"), {"cpu": backends.Support(dtypes),
                                                       "reference": backends.Support(dtypes)})


for _op in ("kmeans", "pq_encode", "pq_decode", "pq4_search", "ivfpq_search"):
    backends.register_op(_table(_op))
_F32 = frozenset({torch.float32})
# pq_lut has a CUDA kernel; pq_search has the CUDA scan (table in shared memory, block-wide top-k, k <= 4096)
# and the Triton ADC scan (CUDA tensors, or CPU ones under the interpreter).
backends.register_op(backends.OpTable("pq_lut", ("cuda", "cpu", "reference"), {
    "cuda": backends.Support(_F32), "cpu": backends.Support(frozenset(_FLOATS)),
    "reference": backends.Support(frozenset(_FLOATS))}))
backends.register_op(backends.OpTable("pq_search", ("cuda", "triton", "cpu", "reference"), {
    "cuda": backends.Support(_F32, limits=lambda k=1, **_: [] if k <= 4096 else [f"the cuda scan supports k <= 4096, got {k}"]),
    "triton": backends.Support(_F32),
    "cpu": backends.Support(frozenset(_FLOATS)), "reference": backends.Support(frozenset(_FLOATS))}))


def _err(op: str, message: str) -> str:
    return f"fastcore_ai.ops.{op}: {message}"


def _check_codebooks(op: str, codebooks) -> None:
    check_tensor(op, "codebooks", codebooks, ndim=3, dtypes=_FLOATS, layout="[M, ksub, dsub]")
    M, ksub, dsub = codebooks.shape
    if M < 1 or dsub < 1 or not 1 <= ksub <= 256:
        raise ValueError(_err(op, f"codebooks must have M >= 1, 1 <= ksub <= 256 and dsub >= 1, got {_describe(codebooks)}"))


def _check_vectors(op: str, name: str, x, codebooks: Tensor) -> None:
    check_tensor(op, name, x, ndim=2, dtypes=_FLOATS, layout="[n, d]")
    M, _, dsub = codebooks.shape
    if x.shape[1] != M * dsub:
        raise ValueError(_err(op, f"{name} must have d = M·dsub = {M}·{dsub} = {M * dsub} columns (codebooks "
                                  f"{tuple(codebooks.shape)}), got {_describe(x)}"))
    if x.device != codebooks.device:
        raise ValueError(_err(op, f"{name} must be on codebooks' device {codebooks.device}, got {_describe(x)}"))


def _check_codes(op: str, codes, codebooks: Tensor) -> None:
    check_tensor(op, "codes", codes, ndim=2, dtypes=(torch.uint8,), layout="[n, M]")
    if codes.shape[1] != codebooks.shape[0]:
        raise ValueError(_err(op, f"codes must have M = {codebooks.shape[0]} columns (codebooks), got {_describe(codes)}"))
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
        raise TypeError(_err(op, f"{name} must have codebooks' dtype {str(codebooks.dtype).replace('torch.', '')}, "
                                 f"got {_describe(x)}"))
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
    if (x.dtype == torch.float32 and centroids.dtype == torch.float32 and x.device.type == "cpu"
            and centroids.device.type == "cpu" and _native.load_error() is None):
        return _native.native().pq_kmeans_assign(x.contiguous(), centroids.contiguous(), _METRIC_ID[metric])[0]
    step = max(1, (1 << 22) // max(centroids.shape[0], 1))
    c_norms = (centroids * centroids).sum(1)[None]
    parts = []
    for i in range(0, x.shape[0], step):
        g = x[i:i + step] @ centroids.T
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


def kmeans(x: Tensor, k: int, niter: int = 25, seed: int = 0, max_points_per_centroid: int = 256,
           constrained: bool = False, *, backend: str = "auto") -> Tensor:
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


def pq_train(x: Tensor, M: int, nbits: int = 8, metric: str = "l2", niter: int = 25, constrained: bool = False,
             seed: int = 0, max_points_per_centroid: int = 256, *, backend: str = "auto") -> Tensor:
    """PQ codebooks [M, 2^nbits, d/M] (float32; float64 for float64 x): one k-means per sub-space,
    sub-space m seeded with seed + m. nbits ∈ {4, 8}; d % M == 0. As in FAISS, sub-quantizers are
    L2 k-means for both metrics (`metric` is validated and kept for the caller's record)."""
    op = "pq_train"
    check_tensor(op, "x", x, ndim=2, dtypes=_FLOATS, layout="[n, d]")
    check_int(op, "M", M, 1, 4096)
    if nbits not in (4, 8) or isinstance(nbits, bool):
        raise ValueError(_err(op, f"nbits must be 4 or 8, got {nbits!r}"))
    check_choice(op, "metric", metric, METRICS)
    d = x.shape[1]
    if d % M != 0:
        raise ValueError(_err(op, f"d must be divisible by M, got d = {d}, M = {M} ({_describe(x)})"))
    ksub = 2 ** nbits
    if x.shape[0] < ksub:
        raise ValueError(_err(op, f"x must have at least 2^nbits = {ksub} rows, got {_describe(x)}"))
    dsub = d // M
    chosen = backends.select("kmeans", backend, x.device, x.dtype, "x")
    if chosen == "cpu" and not constrained:
        return _pq_train_batched_cpu(x, M, ksub, niter, seed, max_points_per_centroid)
    books = [kmeans(x[:, m * dsub:(m + 1) * dsub], ksub, niter, seed, max_points_per_centroid, constrained,
                    backend=chosen) for m in range(M)]
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
    codes, = ctx.saved_tensors
    M, ksub, dsub = ctx.shape
    # grad_C[m, j] = Σ_{i : code[i, m] = j} grad[i, m·dsub : (m+1)·dsub]
    flat = (codes.long() + torch.arange(M, device=codes.device)[None, :] * ksub).reshape(-1)
    g = grad.reshape(-1, dsub)
    out = torch.zeros(M * ksub, dsub, dtype=grad.dtype, device=grad.device).index_add(0, flat, g)
    return None, out.reshape(M, ksub, dsub), None


# A gather on every backend (memory-bound; torch's indexing is already optimal for it).
@define_op("pq_decode", impls={"cpu": _ref.pq_decode, "reference": _ref.pq_decode},
           autograd=(_decode_setup, _decode_backward), contiguous_outputs=True)
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


@define_op("pq_lut", impls={"cpu": _lut_cpu, "cuda": _lut_cpu, "reference": _lut_reference},
           autograd=(_lut_setup, _lut_backward))
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


@define_op("pq_search", impls={"cpu": _search_cpu, "cuda": _search_cpu, "triton": _search_triton,
                               "reference": _search_reference})
def _search_op(queries: Tensor, codes: Tensor, codebooks: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=_search_dtype(queries)), queries.new_empty((nq, k), dtype=torch.int64)


def _check_k(op: str, k) -> None:
    check_int(op, "k", k, 1, 2**24)


def pq_search(queries: Tensor, codes: Tensor, codebooks: Tensor, k: int, metric: str = "l2", *,
              backend: str = "auto") -> Tuple[Tensor, Tensor]:
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


# ---- 4-bit fast-scan ----------------------------------------------------------------------------------

# A byte shuffle in torch on any device: one implementation, registered as "reference" (pq4_pack has no
# backend choice).
@define_op("pq4_pack", impls={"reference": _ref.pq4_pack})
def _pack_op(codes: Tensor) -> Tensor:
    n, M = codes.shape
    return codes.new_empty(((n + 31) // 32, (M + 1) // 2, 32))


def pq4_pack(codes: Tensor) -> Tensor:
    """Pack 4-bit codes [n, M] uint8 (< 16) into the fast-scan layout [ceil(n/32), ceil(M/2), 32]
    (blocks of 32 vectors, sub-quantizers in pairs; see fastcore_ai.reference.pq)."""
    op = "pq4_pack"
    check_tensor(op, "codes", codes, ndim=2, dtypes=(torch.uint8,), layout="[n, M]")
    if codes.shape[1] < 1:
        raise ValueError(_err(op, f"codes must have M >= 1 columns, got {_describe(codes)}"))
    _check_code_range(op, codes, 16)
    return _pack_op(codes, backend="reference")


def _pq4_scan_reference(lut: Tensor, packed: Tensor, n: int, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    """The quantized scan in torch: same LUT quantization and (D, id) order as the kernel."""
    nq, M, _ = lut.shape
    key = lut.float() if metric == "l2" else -lut.float()
    mins = key.amin(2, keepdim=True)
    span = (key.amax(2) - mins[..., 0]).amax(1)  # [nq]
    a = torch.where(span > 0, 255.0 / span, torch.ones_like(span))
    qlut = torch.floor((key - mins) * a[:, None, None] + 0.5).clamp_(0, 255)
    codes = _ref.pq4_unpack(packed, n, M).long()
    D = qlut[:, torch.arange(M)[:, None], codes.T].sum(1)  # [nq, n] exact integers
    d_sorted, ids = _ref.topk_with_ties(D, k, "l2")
    dist = d_sorted / a[:, None] + mins[..., 0].sum(1)[:, None]
    if metric == "ip":
        dist = -dist
    return dist.float(), ids


def _pq4_cpu(queries, packed, n, codebooks, k, metric):
    lut = _native.native().pq_tables(queries.float(), codebooks.float(), _METRIC_ID[metric], True, False)[0]
    return tuple(_native.native().pq4_search(lut, packed, n, k, _METRIC_ID[metric]))


def _pq4_reference(queries, packed, n, codebooks, k, metric):
    return _pq4_scan_reference(_ref.pq_lut(queries, codebooks, metric).float(), packed, n, k, metric)




def _rerank(queries, candidates, codebooks, packed, n, k, metric, rerank_vectors):
    """Exact re-ranking of the candidate ids [nq, k'] (−1 = none) with the original vectors or, when
    None, the exact float ADC distance of the decoded codes."""
    nq, kk = candidates.shape
    valid = candidates >= 0
    safe = candidates.clamp_min(0)
    if rerank_vectors is not None:
        vec = rerank_vectors[safe.reshape(-1)].reshape(nq, kk, -1).to(queries.dtype)
    else:
        codes = _ref.pq4_unpack(packed, n, codebooks.shape[0])
        vec = _ref.pq_decode(codes[safe.reshape(-1)], codebooks).reshape(nq, kk, -1).to(queries.dtype)
    if metric == "l2":
        dist = ((vec - queries[:, None, :]) ** 2).sum(-1)
    else:
        dist = (vec * queries[:, None, :]).sum(-1)
    bad = float("inf") if metric == "l2" else float("-inf")
    dist = torch.where(valid, dist, torch.full_like(dist, bad))
    ids = torch.where(valid, candidates, torch.full_like(candidates, 2**62))  # sorts last on ties
    # Sort by (dist, id) with the id tie-break: sort by id first, then stable sort by distance.
    by_id = torch.argsort(ids, dim=1, stable=True)
    dist_i = torch.gather(dist, 1, by_id)
    ids_i = torch.gather(ids, 1, by_id)
    order = torch.argsort(dist_i, dim=1, stable=True, descending=(metric == "ip"))[:, :k]
    out_d = torch.gather(dist_i, 1, order).float()
    out_i = torch.gather(ids_i, 1, order)
    out_i = torch.where(out_i == 2**62, torch.full_like(out_i, -1), out_i)
    return out_d, out_i


def _with_rerank(scan):
    """The pq4_search impl over the quantized `scan` of a backend: the best k·k_factor, re-ranked
    exactly (_rerank) when k_factor > 1 or rerank_vectors are given."""
    def search(queries, packed, n, codebooks, k, metric, k_factor, rerank_vectors):
        d, i = scan(queries, packed, n, codebooks, k * k_factor, metric)
        if k_factor == 1 and rerank_vectors is None:
            return d, i
        return _rerank(queries, i, codebooks, packed, n, k, metric, rerank_vectors)
    search.__name__ = search.__qualname__ = f"{scan.__name__}_with_rerank"
    return search


@define_op("pq4_search", impls={"cpu": _with_rerank(_pq4_cpu), "reference": _with_rerank(_pq4_reference)})
def _pq4_op(queries: Tensor, packed: Tensor, n: int, codebooks: Tensor, k: int, metric: str, k_factor: int,
            rerank_vectors: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def pq4_search(queries: Tensor, packed: Tensor, n: int, codebooks: Tensor, k: int, metric: str = "l2", *,
               k_factor: int = 1, rerank_vectors: Optional[Tensor] = None,
               backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """4-bit fast-scan search (FAISS IndexPQFastScan semantics, approximate distances).

    queries [nq, d]; packed = pq4_pack(codes) for n vectors; codebooks [M, 16, d/M]. Per query the
    float tables are quantized to uint8 (per sub-quantizer offset, one scale a = 255 / max span), the
    scan sums them in uint16 and keeps the k best quantized sums (ties to the lower id), and returns
    D / a + Σ min (negated for ip). k_factor > 1 (or rerank_vectors given) re-ranks the best k·k_factor
    exactly: with rerank_vectors [n, d] (the original vectors) or else the decoded codes.
    Error bound without re-ranking: |dist − ADC| ≤ M / (2a) per returned distance (rounding of M entries).
    """
    op = "pq4_search"
    _check_codebooks(op, codebooks)
    if codebooks.shape[1] != 16:
        raise ValueError(_err(op, f"codebooks must have ksub = 16 (nbits = 4), got {_describe(codebooks)}"))
    if codebooks.shape[0] > 256:
        raise ValueError(_err(op, f"codebooks must have M <= 256 (uint16 sums), got {_describe(codebooks)}"))
    _check_vectors(op, "queries", queries, codebooks)
    _same_dtype(op, "queries", queries, codebooks)
    check_tensor(op, "packed", packed, ndim=3, dtypes=(torch.uint8,), layout="[ceil(n/32), ceil(M/2), 32]")
    check_int(op, "n", n, 0, 2**40)
    M = codebooks.shape[0]
    if tuple(packed.shape) != ((n + 31) // 32, (M + 1) // 2, 32):
        raise ValueError(_err(op, f"packed must have shape [ceil(n/32), ceil(M/2), 32] = "
                                  f"{((n + 31) // 32, (M + 1) // 2, 32)} for n = {n}, M = {M}, got {_describe(packed)}"))
    _check_k(op, k)
    check_int(op, "k_factor", k_factor, 1, 4096)
    check_choice(op, "metric", metric, METRICS)
    if rerank_vectors is not None:
        check_tensor(op, "rerank_vectors", rerank_vectors, ndim=2, dtypes=_FLOATS, layout="[n, d]")
        if tuple(rerank_vectors.shape) != (n, queries.shape[1]):
            raise ValueError(_err(op, f"rerank_vectors must have shape [n, d] = {(n, queries.shape[1])}, "
                                      f"got {_describe(rerank_vectors)}"))
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _pq4_op(queries, packed.contiguous(), n, codebooks, k, metric, k_factor, rerank_vectors, backend=chosen)


def pq4_kernel(force: Optional[str] = None) -> str:
    """The SIMD family the cpu backend's pq kernels use ("avx512bw", "avx2" or "portable"): the fast-scan
    kernel, and for "avx512bw" also the AVX-512 encode and 8-bit scans (the others run their portable
    loops). `force` selects one ("auto" restores the run-time choice; a kernel this CPU lacks falls
    back to auto)."""
    codes = {None: -1, "auto": 0, "portable": 1, "avx2": 2, "avx512bw": 3}
    check_choice("pq4_kernel", "force", force, tuple(codes))
    return _native.native().pq4_kernel(codes[force])


# ---- IVF-PQ scan ------------------------------------------------------------------------------------------

def _ivf_tables(queries, coarse, probes, codebooks, metric, by_residual):
    """(lut [nq, L, M, ksub] float32, bias [nq, nprobe] float32).

    l2, residual:  ‖q − c_l − y_R‖² = Σ_m ‖(q − c_l)_m − C[m, code_m]‖²: one table per probe on the
                   residual q − c_l, bias 0.
    ip, residual:  ⟨q, c_l + y_R⟩ = ⟨q, c_l⟩ + Σ_m ⟨q_m, C[m, code_m]⟩: one table per query, bias ⟨q, c_l⟩.
    non-residual:  the flat tables of q, bias 0.
    """
    nq, nprobe = probes.shape
    safe = probes.clamp_min(0)
    if by_residual and metric == "l2":
        res = (queries[:, None, :] - coarse[safe]).reshape(nq * nprobe, -1)
        lut = _native_or_ref_lut(res, codebooks, metric).reshape(nq, nprobe, codebooks.shape[0], codebooks.shape[1])
        return lut, torch.zeros(nq, nprobe, dtype=torch.float32, device=queries.device)
    lut = _native_or_ref_lut(queries, codebooks, metric)[:, None]
    if by_residual:  # ip
        bias = torch.einsum("qd,qpd->qp", queries.double(), coarse.double()[safe]).float()
    else:
        bias = torch.zeros(nq, nprobe, dtype=torch.float32, device=queries.device)
    return lut, bias


def _native_or_ref_lut(x, codebooks, metric):
    if _native.load_error() is None:
        return _native.native().pq_tables(x.float().contiguous(), codebooks.float(), _METRIC_ID[metric], True, False)[0]
    return _ref.pq_lut(x, codebooks, metric).float()


def _ivf_reference(queries, coarse, probes, codes, list_offsets, ids, codebooks, k, metric, by_residual,
                   list_terms=None):
    """Exact: gather the probed lists' rows and compute the float64 distance to the reconstruction."""
    nq = queries.shape[0]
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    offsets = list_offsets.tolist()
    for q in range(nq):
        rows = [torch.arange(offsets[l], offsets[l + 1]) for l in probes[q].tolist() if l >= 0]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        lists = torch.cat([torch.full((offsets[l + 1] - offsets[l],), l, dtype=torch.int64)
                           for l in probes[q].tolist() if l >= 0]) if rows.numel() else rows
        recon = _ref.pq_decode(codes[rows], codebooks.double())
        if by_residual:
            recon = recon + coarse.double()[lists]
        qv = queries[q].double()
        dist = ((recon - qv) ** 2).sum(1) if metric == "l2" else recon @ qv
        d, i = _ref.topk_with_ties(dist[None], k, metric, ids[rows])
        out_d[q], out_i[q] = d[0], i[0]
    return out_d.float(), out_i


def ivfpq_list_terms(coarse_centroids: Tensor, codebooks: Tensor) -> Tensor:
    """The per-list tables of the L2 residual decomposition (FAISS's precomputed table), float32
    [nlist, M, ksub]: T[l, m, j] = ‖C[m, j]‖² + 2⟨c_l,m, C[m, j]⟩, where c_l,m is sub-vector m of
    coarse centroid l. With them ‖q − c_l − y‖² = ‖q − c_l‖² + Σ_m (T[l, m, code_m] − 2⟨q_m, C[m, code_m]⟩),
    so a search needs one table per query instead of one per (query, probe). Cost nlist·M·ksub·dsub;
    an index computes them once (ivfpq_search(list_terms=...))."""
    op = "ivfpq_list_terms"
    _check_codebooks(op, codebooks)
    _check_vectors(op, "coarse_centroids", coarse_centroids, codebooks)
    M, ksub, dsub = codebooks.shape
    cb = codebooks.float()
    sub = coarse_centroids.float().reshape(-1, M, dsub).permute(1, 0, 2)  # [M, nlist, dsub]
    cross = torch.bmm(sub, cb.transpose(1, 2))  # [M, nlist, ksub]
    return (2.0 * cross + (cb * cb).sum(2)[:, None, :]).permute(1, 0, 2).contiguous()


def _ivf_cpu(queries, coarse, probes, codes, list_offsets, ids, codebooks, k, metric, by_residual, list_terms):
    nq, nprobe = probes.shape
    if by_residual and metric == "l2" and (list_terms is not None or nq * nprobe >= coarse.shape[0]):
        # Decomposition: one table per query (−2⟨q_m, C[m, j]⟩: the ip table times −2, exact), the
        # per-list tables, and bias ‖q − c_l‖² per probe. Without given list tables they are built
        # here when that is cheaper than one table per (query, probe) (nlist ≤ nq·nprobe).
        terms = list_terms.float().contiguous() if list_terms is not None else ivfpq_list_terms(coarse, codebooks)
        lut = _native_or_ref_lut(queries * -2.0, codebooks, "ip")[:, None]  # ⟨−2q, c⟩: the scaling is exact
        bias = ((queries.float()[:, None, :] - coarse.float()[probes.clamp_min(0)]) ** 2).sum(-1)
        return tuple(_native.native().pq_search_ivf(lut.contiguous(), codes, list_offsets, probes, bias.contiguous(),
                                                    ids, k, _METRIC_ID[metric], terms))
    lut, bias = _ivf_tables(queries, coarse, probes, codebooks, metric, by_residual)
    return tuple(_native.native().pq_search_ivf(lut.contiguous(), codes, list_offsets, probes, bias, ids, k,
                                                _METRIC_ID[metric], None))


@define_op("ivfpq_search", impls={"cpu": _ivf_cpu, "reference": _ivf_reference})
def _ivf_op(queries: Tensor, coarse: Tensor, probes: Tensor, codes: Tensor, list_offsets: Tensor, ids: Tensor,
            codebooks: Tensor, k: int, metric: str, by_residual: bool,
            list_terms: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def ivfpq_search(queries: Tensor, coarse_centroids: Tensor, probes: Tensor, codes: Tensor, list_offsets: Tensor,
                 ids: Tensor, codebooks: Tensor, k: int, metric: str = "l2", by_residual: bool = True, *,
                 list_terms: Optional[Tensor] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """IVF-PQ scan of the probed inverted lists (FAISS IndexIVFPQ semantics).

    queries [nq, d]; coarse_centroids [nlist, d]; probes [nq, nprobe] int64 list numbers (−1 = none);
    codes [n, M] uint8 grouped by list, list l = rows list_offsets[l] : list_offsets[l + 1]
    (list_offsets [nlist + 1] int64); ids [n] int64; codebooks of the residuals (by_residual) or of
    the vectors. Distance to the reconstruction c_l + y_R (l2: squared, ip: inner product), top-k as
    in pq_search. Returns (distances [nq, k] float32, ids [nq, k] int64).
    list_terms = ivfpq_list_terms(coarse_centroids, codebooks) (l2 with by_residual only) lets the cpu
    backend use the decomposition without rebuilding them; distances then differ from the per-probe
    tables by float rounding (as FAISS's precomputed tables). The reference backend is exact either way.
    """
    op = "ivfpq_search"
    _check_codebooks(op, codebooks)
    _check_vectors(op, "queries", queries, codebooks)
    _same_dtype(op, "queries", queries, codebooks)
    _check_vectors(op, "coarse_centroids", coarse_centroids, codebooks)
    _check_codes(op, codes, codebooks)
    check_tensor(op, "probes", probes, ndim=2, dtypes=(torch.int64,), layout="[nq, nprobe]")
    check_tensor(op, "list_offsets", list_offsets, ndim=1, dtypes=(torch.int64,), layout="[nlist + 1]")
    check_tensor(op, "ids", ids, ndim=1, dtypes=(torch.int64,), layout="[n]")
    nlist = coarse_centroids.shape[0]
    if probes.shape[0] != queries.shape[0]:
        raise ValueError(_err(op, f"probes must have nq = {queries.shape[0]} rows, got {_describe(probes)}"))
    if list_offsets.shape[0] != nlist + 1:
        raise ValueError(_err(op, f"list_offsets must have nlist + 1 = {nlist + 1} entries, got {_describe(list_offsets)}"))
    if ids.shape[0] != codes.shape[0]:
        raise ValueError(_err(op, f"ids must have n = {codes.shape[0]} entries, got {_describe(ids)}"))
    _check_probe_range(op, probes, nlist)
    _check_k(op, k)
    check_choice(op, "metric", metric, METRICS)
    check_bool(op, "by_residual", by_residual)
    _check_code_range(op, codes, codebooks.shape[1])
    if list_terms is not None:
        M, ksub = codebooks.shape[0], codebooks.shape[1]
        check_tensor(op, "list_terms", list_terms, ndim=3, dtypes=(torch.float32,), layout="[nlist, M, ksub]")
        if tuple(list_terms.shape) != (nlist, M, ksub):
            raise ValueError(_err(op, f"list_terms must have shape [nlist, M, ksub] = {(nlist, M, ksub)}, "
                                      f"got {_describe(list_terms)}"))
        if metric != "l2" or not by_residual:
            raise ValueError(_err(op, f"list_terms apply to metric 'l2' with by_residual=True, got metric {metric!r}, "
                                      f"by_residual={by_residual}"))
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _ivf_op(queries, coarse_centroids, probes, codes.contiguous(), list_offsets, ids, codebooks, k, metric,
                   by_residual, list_terms, backend=chosen)


# ---- IVF 4-bit fast-scan (non-residual) -----------------------------------------------------------------

def pq4_pack_lists(codes: Tensor, list_no: Tensor, ids: Tensor, nlist: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack 4-bit codes list by list for ivfpq4_search: (packed [blocks, ceil(M/2), 32], list_blocks
    [nlist + 1], list_sizes [nlist], row_ids [blocks·32] with −1 for padding rows). Each list starts on
    a fresh block of 32; within a list rows keep their insertion order."""
    n, M = codes.shape
    sizes = torch.bincount(list_no, minlength=nlist)
    blocks = (sizes + 31) // 32
    list_blocks = torch.zeros(nlist + 1, dtype=torch.int64)
    list_blocks[1:] = torch.cumsum(blocks, 0)
    total = int(list_blocks[-1])
    order = torch.argsort(list_no, stable=True)
    starts = torch.zeros(nlist + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(sizes, 0)
    sorted_lists = list_no[order]
    position = torch.arange(n) - starts[sorted_lists]
    row = list_blocks[sorted_lists] * 32 + position
    full = torch.zeros(total * 32, M, dtype=torch.uint8)
    full[row] = codes[order]
    row_ids = torch.full((total * 32,), -1, dtype=torch.int64)
    row_ids[row] = ids[order]
    return _ref.pq4_pack(full) if total else torch.zeros(0, (M + 1) // 2, 32, dtype=torch.uint8), list_blocks, sizes, row_ids


def _ivf4_cpu(queries, probes, packed, list_blocks, list_sizes, row_ids, codebooks, k, metric):
    lut = _native.native().pq_tables(queries.float().contiguous(), codebooks.float(), _METRIC_ID[metric], True, False)[0]
    return tuple(_native.native().pq4_search_ivf(lut, packed, list_blocks, list_sizes, row_ids, probes, k,
                                                 _METRIC_ID[metric]))


def _ivf4_reference(queries, probes, packed, list_blocks, list_sizes, row_ids, codebooks, k, metric):
    """Same quantization and (quantized sum, id) order as the kernel, over the probed lists' rows."""
    nq, M = queries.shape[0], codebooks.shape[0]
    lut = _ref.pq_lut(queries, codebooks, metric).float()
    key = lut if metric == "l2" else -lut
    mins = key.amin(2, keepdim=True)
    span = (key.amax(2) - mins[..., 0]).amax(1)
    a = torch.where(span > 0, 255.0 / span, torch.ones_like(span))
    qlut = torch.floor((key - mins) * a[:, None, None] + 0.5).clamp_(0, 255)
    codes = _ref.pq4_unpack(packed, packed.shape[0] * 32, M).long()
    out_d = torch.empty(nq, k)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    for q in range(nq):
        rows = [torch.arange(int(list_blocks[l]) * 32, int(list_blocks[l]) * 32 + int(list_sizes[l]))
                for l in probes[q].tolist() if l >= 0]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        D = qlut[q][torch.arange(M)[:, None], codes[rows].T].sum(0)[None]
        d, i = _ref.topk_with_ties(D, k, "l2", row_ids[rows])
        dist = d / a[q] + mins[q, :, 0].sum()
        out_d[q] = -dist[0] if metric == "ip" else dist[0]
        out_i[q] = i[0]
    return out_d, out_i


backends.register_op(_table("ivfpq4_search"))


@define_op("ivfpq4_search", impls={"cpu": _ivf4_cpu, "reference": _ivf4_reference})
def _ivf4_op(queries: Tensor, probes: Tensor, packed: Tensor, list_blocks: Tensor, list_sizes: Tensor,
             row_ids: Tensor, codebooks: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def ivfpq4_search(queries: Tensor, probes: Tensor, packed: Tensor, list_blocks: Tensor, list_sizes: Tensor,
                  row_ids: Tensor, codebooks: Tensor, k: int, metric: str = "l2", *,
                  backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """IVF 4-bit fast-scan over non-residual codes (FAISS `IVF…,PQ…x4fs`): the lists packed by
    `pq4_pack_lists`, probes [nq, nprobe] (−1 = none). One quantized table per query (as pq4_search);
    top-k by (quantized sum, id), distances dequantized. Returns (dist [nq, k] float32, ids [nq, k])."""
    op = "ivfpq4_search"
    _check_codebooks(op, codebooks)
    if codebooks.shape[1] != 16 or codebooks.shape[0] > 256:
        raise ValueError(_err(op, f"codebooks must have ksub = 16 and M <= 256, got {_describe(codebooks)}"))
    _check_vectors(op, "queries", queries, codebooks)
    _same_dtype(op, "queries", queries, codebooks)
    check_tensor(op, "probes", probes, ndim=2, dtypes=(torch.int64,), layout="[nq, nprobe]")
    check_tensor(op, "packed", packed, ndim=3, dtypes=(torch.uint8,), layout="[blocks, ceil(M/2), 32]")
    nlist = list_blocks.shape[0] - 1
    if probes.shape[0] != queries.shape[0]:
        raise ValueError(_err(op, f"probes must have nq = {queries.shape[0]} rows, got {_describe(probes)}"))
    _check_probe_range(op, probes, nlist)
    _check_k(op, k)
    check_choice(op, "metric", metric, METRICS)
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _ivf4_op(queries, probes, packed, list_blocks, list_sizes, row_ids, codebooks, k, metric, backend=chosen)


__all__ += ["ivfpq4_search", "pq4_pack_lists", "ivfpq_list_terms"]

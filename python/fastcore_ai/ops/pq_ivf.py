"""The IVF-PQ scans: a coarse quantizer's probe lists, each list's PQ codes scanned against the query's
tables (residual or not), top-k over all probed lists; `ivfpq4_search` does the same over 4-bit
fast-scan lists. Conventions as in ops/pq.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_bool, check_choice, check_int, check_tensor
from ..reference import pq as _ref
from ._define import define_op
from .pq import (
    METRICS,
    _METRIC_ID,
    _check_code_range,
    _check_codebooks,
    _check_codes,
    _check_k,
    _check_probe_range,
    _check_vectors,
    _err,
    _same_dtype,
    _table,
)

__all__ = ["ivfpq_search", "ivfpq4_search", "pq4_pack_lists", "ivfpq_list_terms"]


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
        res = (queries[:, None, :] - coarse[safe]).reshape(nq * nprobe, queries.shape[1])  # nq = 0 too
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


def _ivf_reference(
    queries, coarse, probes, codes, list_offsets, ids, codebooks, k, metric, by_residual, list_terms=None
):
    """Exact: gather the probed lists' rows and compute the float64 distance to the reconstruction."""
    nq = queries.shape[0]
    out_d = torch.empty(nq, k, dtype=torch.float64)
    out_i = torch.empty(nq, k, dtype=torch.int64)
    offsets = list_offsets.tolist()
    for q in range(nq):
        rows = [torch.arange(offsets[l], offsets[l + 1]) for l in probes[q].tolist() if l >= 0]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        lists = (
            torch.cat(
                [torch.full((offsets[l + 1] - offsets[l],), l, dtype=torch.int64) for l in probes[q].tolist() if l >= 0]
            )
            if rows.numel()
            else rows
        )
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
        return tuple(
            _native.native().pq_search_ivf(
                lut.contiguous(), codes, list_offsets, probes, bias.contiguous(), ids, k, _METRIC_ID[metric], terms
            )
        )
    lut, bias = _ivf_tables(queries, coarse, probes, codebooks, metric, by_residual)
    return tuple(
        _native.native().pq_search_ivf(
            lut.contiguous(), codes, list_offsets, probes, bias, ids, k, _METRIC_ID[metric], None
        )
    )


@define_op("ivfpq_search", impls={"cpu": _ivf_cpu, "reference": _ivf_reference})
def _ivf_op(
    queries: Tensor,
    coarse: Tensor,
    probes: Tensor,
    codes: Tensor,
    list_offsets: Tensor,
    ids: Tensor,
    codebooks: Tensor,
    k: int,
    metric: str,
    by_residual: bool,
    list_terms: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def ivfpq_search(
    queries: Tensor,
    coarse_centroids: Tensor,
    probes: Tensor,
    codes: Tensor,
    list_offsets: Tensor,
    ids: Tensor,
    codebooks: Tensor,
    k: int,
    metric: str = "l2",
    by_residual: bool = True,
    *,
    list_terms: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
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
        raise ValueError(
            _err(op, f"list_offsets must have nlist + 1 = {nlist + 1} entries, got {_describe(list_offsets)}")
        )
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
            raise ValueError(
                _err(
                    op, f"list_terms must have shape [nlist, M, ksub] = {(nlist, M, ksub)}, got {_describe(list_terms)}"
                )
            )
        if metric != "l2" or not by_residual:
            raise ValueError(
                _err(
                    op,
                    f"list_terms apply to metric 'l2' with by_residual=True, got metric {metric!r}, "
                    f"by_residual={by_residual}",
                )
            )
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _ivf_op(
        queries,
        coarse_centroids,
        probes,
        codes.contiguous(),
        list_offsets,
        ids,
        codebooks,
        k,
        metric,
        by_residual,
        list_terms,
        backend=chosen,
    )


# ---- IVF 4-bit fast-scan (non-residual) -----------------------------------------------------------------


def pq4_pack_lists(codes: Tensor, list_no: Tensor, ids: Tensor, nlist: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack 4-bit codes list by list for ivfpq4_search: (packed [blocks, ceil(M/2), 32], list_blocks
    [nlist + 1], list_sizes [nlist], row_ids [blocks·32] with −1 for padding rows). Each list starts on
    a fresh block of 32; within a list rows keep their insertion order. codes [n, M] uint8 in [0, 16),
    list_no [n] int64 in [0, nlist), ids [n] int64."""
    op = "pq4_pack_lists"
    check_tensor(op, "codes", codes, ndim=2, dtypes=(torch.uint8,), layout="[n, M]")
    n, M = codes.shape
    check_int(op, "nlist", nlist, 1, 2**31 - 1)
    for name, value in (("list_no", list_no), ("ids", ids)):
        check_tensor(op, name, value, ndim=1, dtypes=(torch.int64,), layout="[n]")
        if value.shape[0] != n:
            raise ValueError(
                f"fastcore_ai.ops.{op}: {name} must have n = codes.shape[0] = {n} entries, got {_describe(value)}"
            )
        if value.device != codes.device:
            raise ValueError(
                f"fastcore_ai.ops.{op}: {name} must be on codes' device {codes.device}, got {value.device}"
            )
    if n:
        if int(codes.max()) >= 16:
            raise ValueError(f"fastcore_ai.ops.{op}: codes must be 4-bit (< 16), got a code {int(codes.max())}")
        low, high = int(list_no.min()), int(list_no.max())
        if low < 0 or high >= nlist:
            bad = low if low < 0 else high
            raise ValueError(f"fastcore_ai.ops.{op}: list_no must lie in [0, nlist) = [0, {nlist}), got {bad}")
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
    return (
        _ref.pq4_pack(full) if total else torch.zeros(0, (M + 1) // 2, 32, dtype=torch.uint8),
        list_blocks,
        sizes,
        row_ids,
    )


def _ivf4_cpu(queries, probes, packed, list_blocks, list_sizes, row_ids, codebooks, k, metric):
    lut = _native.native().pq_tables(queries.float().contiguous(), codebooks.float(), _METRIC_ID[metric], True, False)[
        0
    ]
    return tuple(
        _native.native().pq4_search_ivf(lut, packed, list_blocks, list_sizes, row_ids, probes, k, _METRIC_ID[metric])
    )


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
        rows = [
            torch.arange(int(list_blocks[l]) * 32, int(list_blocks[l]) * 32 + int(list_sizes[l]))
            for l in probes[q].tolist()
            if l >= 0
        ]
        rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
        D = qlut[q][torch.arange(M)[:, None], codes[rows].T].sum(0)[None]
        d, i = _ref.topk_with_ties(D, k, "l2", row_ids[rows])
        dist = d / a[q] + mins[q, :, 0].sum()
        out_d[q] = -dist[0] if metric == "ip" else dist[0]
        out_i[q] = i[0]
    return out_d, out_i


backends.register_op(_table("ivfpq4_search"))


@define_op("ivfpq4_search", impls={"cpu": _ivf4_cpu, "reference": _ivf4_reference})
def _ivf4_op(
    queries: Tensor,
    probes: Tensor,
    packed: Tensor,
    list_blocks: Tensor,
    list_sizes: Tensor,
    row_ids: Tensor,
    codebooks: Tensor,
    k: int,
    metric: str,
) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def _check_fast_scan_lists(op, packed, list_blocks, list_sizes, row_ids, M):
    """The layout pq4_pack_lists returns: every backend reads it by these sizes, so they are checked here
    (the contents on the host: nlist + 1 numbers)."""
    check_tensor(op, "packed", packed, ndim=3, dtypes=(torch.uint8,), layout="[blocks, ceil(M/2), 32]")
    if packed.shape[1:] != ((M + 1) // 2, 32):
        raise ValueError(_err(op, f"packed must be [blocks, ceil(M/2) = {(M + 1) // 2}, 32], got {_describe(packed)}"))
    check_tensor(op, "list_blocks", list_blocks, ndim=1, dtypes=(torch.int64,), layout="[nlist + 1]")
    if list_blocks.shape[0] < 1:
        raise ValueError(_err(op, f"list_blocks must have nlist + 1 >= 1 entries, got {_describe(list_blocks)}"))
    nlist, blocks = list_blocks.shape[0] - 1, packed.shape[0]
    check_tensor(op, "list_sizes", list_sizes, ndim=1, dtypes=(torch.int64,), layout="[nlist]")
    if list_sizes.shape[0] != nlist:
        raise ValueError(_err(op, f"list_sizes must have nlist = {nlist} entries, got {_describe(list_sizes)}"))
    check_tensor(op, "row_ids", row_ids, ndim=1, dtypes=(torch.int64,), layout="[blocks·32]")
    if row_ids.shape[0] != 32 * blocks:
        raise ValueError(_err(op, f"row_ids must have blocks·32 = {32 * blocks} entries, got {_describe(row_ids)}"))
    for name, t in (("list_blocks", list_blocks), ("list_sizes", list_sizes), ("row_ids", row_ids)):
        if t.device != packed.device:
            raise ValueError(_err(op, f"{name} must be on packed's device {packed.device}, got {_describe(t)}"))
    # contents: a traced assertion under torch.compile (as _check_probe_range), else read on the host
    steps = list_blocks[1:] - list_blocks[:-1]
    ok = (list_blocks[0] == 0) & (list_blocks[-1] == blocks) & (steps >= 0).all()
    ok = ok & ((list_sizes >= 0) & (list_sizes <= steps * 32)).all()
    message = _err(
        op,
        f"list_blocks must rise from 0 to the number of blocks {blocks} and list_sizes lie in "
        "[0, 32 · the list's blocks] (as pq4_pack_lists returns them)",
    )
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def ivfpq4_search(
    queries: Tensor,
    probes: Tensor,
    packed: Tensor,
    list_blocks: Tensor,
    list_sizes: Tensor,
    row_ids: Tensor,
    codebooks: Tensor,
    k: int,
    metric: str = "l2",
    *,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
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
    if probes.shape[0] != queries.shape[0]:
        raise ValueError(_err(op, f"probes must have nq = {queries.shape[0]} rows, got {_describe(probes)}"))
    _check_fast_scan_lists(op, packed, list_blocks, list_sizes, row_ids, codebooks.shape[0])
    nlist = list_blocks.shape[0] - 1
    _check_probe_range(op, probes, nlist)
    _check_k(op, k)
    check_choice(op, "metric", metric, METRICS)
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _ivf4_op(queries, probes, packed, list_blocks, list_sizes, row_ids, codebooks, k, metric, backend=chosen)

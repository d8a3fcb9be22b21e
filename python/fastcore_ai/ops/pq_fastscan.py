"""PQ's 4-bit fast-scan: codes packed two to a byte in blocks of 32 rows (FAISS's IndexPQFastScan
layout), an 8-bit quantized LUT scanned with byte shuffles, top-k of the k·k_factor best candidates
reranked exactly. Conventions as in ops/pq.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_choice, check_int, check_tensor
from ..reference import pq as _ref
from ._define import define_op
from .pq import (
    METRICS,
    _FLOATS,
    _METRIC_ID,
    _check_code_range,
    _check_codebooks,
    _check_k,
    _check_vectors,
    _err,
    _same_dtype,
)

__all__ = ["pq4_pack", "pq4_search", "pq4_kernel"]


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
    if n == 0:  # no vectors: every candidate is padding, and there is no row 0 to gather safely
        worst = float("inf") if metric == "l2" else float("-inf")
        return (
            torch.full((nq, k), worst, dtype=torch.float32, device=queries.device),
            torch.full((nq, k), -1, dtype=torch.int64, device=queries.device),
        )
    safe = candidates.clamp_min(0)
    if rerank_vectors is not None:
        # the sizes spelled out: with nq = 0 a -1 cannot be inferred
        vec = rerank_vectors[safe.reshape(-1)].reshape(nq, kk, queries.shape[1]).to(queries.dtype)
    else:
        codes = _ref.pq4_unpack(packed, n, codebooks.shape[0])
        vec = _ref.pq_decode(codes[safe.reshape(-1)], codebooks).reshape(nq, kk, queries.shape[1]).to(queries.dtype)
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
def _pq4_op(
    queries: Tensor,
    packed: Tensor,
    n: int,
    codebooks: Tensor,
    k: int,
    metric: str,
    k_factor: int,
    rerank_vectors: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    nq = queries.shape[0]
    return queries.new_empty((nq, k), dtype=torch.float32), queries.new_empty((nq, k), dtype=torch.int64)


def pq4_search(
    queries: Tensor,
    packed: Tensor,
    n: int,
    codebooks: Tensor,
    k: int,
    metric: str = "l2",
    *,
    k_factor: int = 1,
    rerank_vectors: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
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
        raise ValueError(
            _err(
                op,
                f"packed must have shape [ceil(n/32), ceil(M/2), 32] = "
                f"{((n + 31) // 32, (M + 1) // 2, 32)} for n = {n}, M = {M}, got {_describe(packed)}",
            )
        )
    _check_k(op, k)
    check_int(op, "k_factor", k_factor, 1, 4096)
    check_choice(op, "metric", metric, METRICS)
    if rerank_vectors is not None:
        check_tensor(op, "rerank_vectors", rerank_vectors, ndim=2, dtypes=_FLOATS, layout="[n, d]")
        if tuple(rerank_vectors.shape) != (n, queries.shape[1]):
            raise ValueError(
                _err(
                    op,
                    f"rerank_vectors must have shape [n, d] = {(n, queries.shape[1])}, got {_describe(rerank_vectors)}",
                )
            )
    chosen = backends.select(op, backend, queries.device, queries.dtype, "queries")
    return _pq4_op(queries, packed.contiguous(), n, codebooks, k, metric, k_factor, rerank_vectors, backend=chosen)


def pq4_kernel(force: Optional[str] = None) -> str:
    """The SIMD family the cpu backend's pq kernels use ("avx512bw", "avx2" or "portable"): the fast-scan
    kernel, and for "avx512bw" also the AVX-512 encode and 8-bit scans (the others run their portable
    loops). It is `backends.cpu_isa()` under pq's names: `force` caps that level for every family, the
    whole process ("auto" lifts the cap; a kernel this CPU lacks gives the detected one)."""
    check_choice("pq4_kernel", "force", force, (None, "auto", "portable", "avx2", "avx512bw"))
    level = backends.cpu_isa({"avx512bw": "avx512"}.get(force, force))
    return "avx512bw" if level == "avx512" else level

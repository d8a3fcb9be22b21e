"""Reference product quantization (pure torch, float64 by default): the oracle every backend of the pq
family is tested against, and the `reference` backend.

Notation: x [n, d] database vectors, q [nq, d] queries, M sub-spaces of dsub = d / M dimensions,
ksub = 2^nbits centroids per sub-space, codebooks C [M, ksub, dsub], codes [n, M] (values < ksub).

  encode:   code[i, m] = argmin_j ‖x_i,m − C[m, j]‖²            (ties: the lower j)
  decode:   x̂_i = concat_m C[m, code[i, m]]
  LUT:      l2: lut[q, m, j] = ‖q_m − C[m, j]‖²     ip: lut[q, m, j] = ⟨q_m, C[m, j]⟩
  ADC:      dist(q, i) = Σ_m lut[q, m, code[i, m]]   (l2: squared distance to x̂_i; ip: ⟨q, x̂_i⟩)
  search:   the k best per query, l2 ascending / ip descending, ties broken by the lower id; fewer
            than k candidates are padded with id −1 and distance +inf (l2) / −inf (ip).
These are FAISS's IndexPQ definitions (ProductQuantizer::compute_distance_tables + pq_knn_search).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "kmeans",
    "sinkhorn_balanced_assign",
    "pq_train",
    "pq_encode",
    "pq_decode",
    "pq_lut",
    "pq_adc_distances",
    "pq_search",
    "topk_with_ties",
    "pq4_pack",
    "pq4_unpack",
]

# Relative perturbation when an empty cluster takes half of the largest one (FAISS's EPS = 1/1024).
_SPLIT_EPS = 1.0 / 1024.0


def _pairwise_sqdist(x: Tensor, c: Tensor) -> Tensor:
    """‖x_i − c_j‖² = ‖x_i‖² − 2⟨x_i, c_j⟩ + ‖c_j‖² (the GEMM form), clamped at 0."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def sinkhorn_balanced_assign(dist: Tensor, epsilon: float = 0.003, iters: int = 100) -> Tensor:
    """Balanced assignment of n points to k clusters (RepCONC's uniform-assignment constraint).

    Entropic optimal transport  min_P ⟨P, D⟩ − ε H(P)  with row marginals 1/n and column marginals 1/k,
    on D scaled by its mean (so ε is unit-free), solved by Sinkhorn iterations on the dual potentials
    (log domain, stable for small ε):
        f_i = −ε logsumexp_j((g_j − D_ij)/ε) − ε log n,     g_j = −ε logsumexp_i((f_i − D_ij)/ε) − ε log k,
    with ε annealed geometrically from 1 to `epsilon` over the `iters` iterations (ε-scaling: large ε
    converges fast, each smaller ε starts from the previous potentials). Point i goes to
    argmax_j P_ij = argmax_j (g_j − D_ij) (lower j on ties): the distance minus a per-cluster price, which
    comes out near-equal in cluster sizes. dist [n, k] → assignment [n] int64.
    """
    n, k = dist.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dist.device)
    d = dist.double()
    d = d / d.mean().clamp_min(1e-300)
    f = torch.zeros(n, dtype=torch.float64, device=dist.device)
    g = torch.zeros(k, dtype=torch.float64, device=dist.device)
    log_n, log_k = float(torch.log(torch.tensor(float(n)))), float(torch.log(torch.tensor(float(k))))
    for t in range(iters):
        eps = float(epsilon) ** ((t + 1) / iters)
        f = -eps * torch.logsumexp((g[None, :] - d) / eps, dim=1) - eps * log_n
        g = -eps * torch.logsumexp((f[:, None] - d) / eps, dim=0) - eps * log_k
    return torch.argmax(g[None, :] - d, dim=1)


def _subsample(x: Tensor, k: int, max_points_per_centroid: int, generator: torch.Generator) -> Tensor:
    """At most k · max_points_per_centroid rows, drawn without replacement (FAISS subsamples the same way)."""
    n = x.shape[0]
    limit = k * max_points_per_centroid
    if n <= limit:
        return x
    perm = torch.randperm(n, generator=generator)[:limit]
    return x[perm.to(x.device)]


def kmeans_init(x: Tensor, k: int, seed: int, max_points_per_centroid: int) -> Tuple[Tensor, Tensor]:
    """(training sample, initial centroids = k distinct random sample rows), from `seed` only; shared by
    every backend so they start from the same point."""
    generator = torch.Generator().manual_seed(int(seed))
    sample = _subsample(x, k, max_points_per_centroid, generator)
    init = torch.randperm(sample.shape[0], generator=generator)[:k].to(x.device)
    return sample, sample[init].clone()


def kmeans_update(sample: Tensor, assign: Tensor, k: int, centroids: Tensor) -> Tensor:
    """New centroids = member means; each empty cluster takes half of the currently largest one
    (lowest index on ties): c_empty = c_big·(1 + ε), c_big = c_big·(1 − ε), sizes halved (FAISS's split)."""
    d = sample.shape[1]
    sums = torch.zeros(k, d, dtype=sample.dtype, device=sample.device).index_add_(0, assign, sample)
    counts = torch.bincount(assign, minlength=k).to(sample.dtype)
    new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    counts = counts.clone()
    for j in range(k):
        if counts[j] == 0:
            big = int(torch.argmax(counts))
            new[j] = new[big] * (1.0 + _SPLIT_EPS)
            new[big] = new[big] * (1.0 - _SPLIT_EPS)
            half = torch.floor(counts[big] / 2)
            counts[j] = half
            counts[big] = counts[big] - half
    return new


def kmeans(
    x: Tensor,
    k: int,
    niter: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    constrained: bool = False,
    sinkhorn_epsilon: float = 0.003,
    sinkhorn_iters: int = 100,
) -> Tensor:
    """Lloyd's k-means in float64. x [n, d] with n >= k → centroids [k, d] (x's dtype).

    Init: k distinct rows of a ≤ k·max_points_per_centroid subsample (both drawn from `seed`). Each of
    `niter` iterations assigns every sample point to argmin_j ‖x − c_j‖² (GEMM form, lower j on ties) or,
    with constrained=True, by the Sinkhorn balanced assignment, then moves each centroid to its members'
    mean, re-seeding empty clusters by splitting the largest.
    """
    xd = x.double()
    sample, c = kmeans_init(xd, k, seed, max_points_per_centroid)
    for _ in range(niter):
        dist = _pairwise_sqdist(sample, c)
        assign = sinkhorn_balanced_assign(dist, sinkhorn_epsilon, sinkhorn_iters) if constrained else dist.argmin(1)
        c = kmeans_update(sample, assign, k, c)
    return c.to(x.dtype)


def pq_train(
    x: Tensor,
    M: int,
    nbits: int,
    metric: str = "l2",
    niter: int = 25,
    constrained: bool = False,
    seed: int = 0,
    max_points_per_centroid: int = 256,
) -> Tensor:
    """Codebooks [M, 2^nbits, d/M]: one k-means per sub-space, all with the same seed (so the same
    training rows and initial rows in every sub-space, as FAISS's ProductQuantizer::train). Like FAISS,
    the sub-quantizers are L2 k-means for both metrics (`metric` only changes how they are searched)."""
    n, d = x.shape
    dsub = d // M
    books = [
        kmeans(x[:, m * dsub : (m + 1) * dsub], 2**nbits, niter, seed, max_points_per_centroid, constrained)
        for m in range(M)
    ]
    return torch.stack(books).to(torch.float32 if x.dtype != torch.float64 else torch.float64)


def pq_encode(x: Tensor, codebooks: Tensor) -> Tensor:
    """codes [n, M] uint8: code[i, m] = argmin_j ‖x_i,m − C[m, j]‖² (exact differences, lower j on ties)."""
    M, ksub, dsub = codebooks.shape
    xs = x.double().reshape(x.shape[0], M, 1, dsub)
    dist = ((xs - codebooks.double()[None]) ** 2).sum(-1)  # [n, M, ksub]
    return dist.argmin(-1).to(torch.uint8)


def pq_decode(codes: Tensor, codebooks: Tensor) -> Tensor:
    """x̂ [n, d] = concat_m C[m, code[:, m]] in codebooks' dtype."""
    M, ksub, dsub = codebooks.shape
    idx = codes.long()
    parts = codebooks[torch.arange(M, device=codes.device)[None, :], idx]  # [n, M, dsub]
    return parts.reshape(codes.shape[0], M * dsub)


def pq_lut(queries: Tensor, codebooks: Tensor, metric: str = "l2") -> Tensor:
    """lut [nq, M, ksub] float64: l2 ‖q_m − C[m, j]‖² (exact differences), ip ⟨q_m, C[m, j]⟩."""
    M, ksub, dsub = codebooks.shape
    qs = queries.double().reshape(queries.shape[0], M, 1, dsub)
    cb = codebooks.double()[None]
    if metric == "l2":
        return ((qs - cb) ** 2).sum(-1)
    return (qs * cb).sum(-1)


def pq_adc_distances(queries: Tensor, codes: Tensor, codebooks: Tensor, metric: str = "l2") -> Tensor:
    """dist [nq, n] float64 = Σ_m lut[q, m, code[i, m]]."""
    lut = pq_lut(queries, codebooks, metric)  # [nq, M, ksub]
    M = codebooks.shape[0]
    idx = codes.long().T  # [M, n]
    gathered = lut[:, torch.arange(M)[:, None], idx]  # [nq, M, n]
    return gathered.sum(1)


def topk_with_ties(dist: Tensor, k: int, metric: str = "l2", ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The k best columns of dist [nq, n] (l2 smallest / ip largest), ties broken by the lower id, sorted
    best first; padded with id −1 and +inf (l2) / −inf (ip) when n < k. `ids` [n] maps columns to ids
    (default: the column index). A stable sort on the distance over columns ordered by id does it."""
    nq, n = dist.shape
    if ids is None:
        ids = torch.arange(n, dtype=torch.int64, device=dist.device)
    order_by_id = torch.argsort(ids, stable=True)
    d_sorted_ids = dist[:, order_by_id]
    ids_sorted = ids[order_by_id]
    order = torch.argsort(d_sorted_ids, dim=1, stable=True, descending=(metric == "ip"))[:, :k]
    out_d = torch.gather(d_sorted_ids, 1, order)
    out_i = ids_sorted[order]
    if n < k:
        pad = float("inf") if metric == "l2" else float("-inf")
        out_d = torch.cat([out_d, torch.full((nq, k - n), pad, dtype=dist.dtype, device=dist.device)], 1)
        out_i = torch.cat([out_i, torch.full((nq, k - n), -1, dtype=torch.int64, device=dist.device)], 1)
    return out_d, out_i


def pq_search(queries: Tensor, codes: Tensor, codebooks: Tensor, k: int, metric: str = "l2") -> Tuple[Tensor, Tensor]:
    """(distances [nq, k] float64, ids [nq, k] int64): exact ADC top-k (see the module docstring)."""
    return topk_with_ties(pq_adc_distances(queries, codes, codebooks, metric), k, metric)


# ---- the 4-bit fast-scan layout -------------------------------------------------------------------
#
# Vectors are packed in blocks of 32, sub-quantizers in pairs (M2 = M rounded up to even; the pad
# sub-quantizer has code 0). Block b, pair p holds 32 bytes, one 16-byte half per sub-quantizer of the
# pair (half h = 0 for m = 2p, h = 1 for m = 2p + 1):
#   byte 16·h + t = code[32b + t, m] | code[32b + t + 16, m] << 4           (t = 0..15)
# so one 256-bit register holds both halves and `vpshufb` looks up 16-entry tables per 128-bit lane.
# Padding vectors (rows ≥ n in the last block) have code 0. packed: [ceil(n/32), M2/2, 32] uint8.


def pq4_pack(codes: Tensor) -> Tensor:
    n, M = codes.shape
    M2 = M + (M % 2)
    nb = (n + 31) // 32
    full = torch.zeros(nb * 32, M2, dtype=torch.uint8, device=codes.device)
    full[:n, :M] = codes
    c = full.reshape(nb, 32, M2 // 2, 2).permute(0, 2, 3, 1)  # [nb, pairs, h, 32 vectors]
    packed = c[..., :16] | (c[..., 16:] << 4)  # [nb, pairs, h, 16]
    return packed.reshape(nb, M2 // 2, 32).contiguous()


def pq4_unpack(packed: Tensor, n: int, M: int) -> Tensor:
    nb, pairs, _ = packed.shape
    p = packed.reshape(nb, pairs, 2, 16)
    c = torch.cat([p & 15, p >> 4], dim=-1)  # [nb, pairs, h, 32]
    return c.permute(0, 3, 1, 2).reshape(nb * 32, pairs * 2)[:n, :M].contiguous()

"""ShardedPQIndex: one PQIndex / IVFPQIndex shard per torch.distributed rank.

Training: rank 0 trains and broadcasts the codebooks (and coarse centroids), so every shard encodes
with the same quantizer. add(x, ids): each rank adds its own vectors with global ids. search(q, k):
every rank searches its shard with the same queries, the per-shard top-k lists are all-gathered and
merged under the same (distance, id) order as a single index, so the result equals the single index
holding all vectors (ties to the lower id). Works with any backend torch.distributed supports for
CPU tensors (gloo).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference.pq import topk_with_ties
from .index import IVFPQIndex, PQIndex, _as_matrix

__all__ = ["ShardedPQIndex"]


class ShardedPQIndex:
    def __init__(self, local: PQIndex, group: Optional[dist.ProcessGroup] = None):
        if not isinstance(local, PQIndex):
            raise TypeError(
                f"fastcore_ai.search.ShardedPQIndex: local must be a PQIndex or IVFPQIndex, got {type(local).__name__}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "fastcore_ai.search.ShardedPQIndex: torch.distributed must be initialised "
                "(dist.init_process_group) before building a sharded index"
            )
        self.local, self.group = local, group

    def train(self, x, **kwargs) -> "ShardedPQIndex":
        """Rank 0 trains on its x (other ranks may pass None); the quantizer is broadcast to all."""
        rank = dist.get_rank(self.group)
        if rank == 0:
            self.local.train(x, **kwargs)
        M, ksub, dsub = self.local.M, 2**self.local.nbits, self.local.d // self.local.M
        books = self.local.codebooks if rank == 0 else torch.empty(M, ksub, dsub)
        dist.broadcast(books, src=0, group=self.group)
        self.local.codebooks = books
        if isinstance(self.local, IVFPQIndex):
            coarse = self.local.coarse if rank == 0 else torch.empty(self.local.nlist, self.local.d)
            dist.broadcast(coarse, src=0, group=self.group)
            self.local.coarse = coarse
        return self

    def add(self, x, ids) -> None:
        """Add this rank's vectors under their global ids (ids are required: they must be unique across ranks)."""
        self.local.add(x, ids)

    def __len__(self) -> int:
        n = torch.tensor([len(self.local)], dtype=torch.int64)
        dist.all_reduce(n, group=self.group)
        return int(n)

    def search(self, q, k: int, nprobe: Optional[int] = None, refine: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        q = _as_matrix("ShardedPQIndex", "q", q, self.local.d)
        d, i = self.local.search(q, k, nprobe=nprobe, refine=refine)
        world = dist.get_world_size(self.group)
        ds = [torch.empty_like(d) for _ in range(world)]
        is_ = [torch.empty_like(i) for _ in range(world)]
        dist.all_gather(ds, d.contiguous(), group=self.group)
        dist.all_gather(is_, i.contiguous(), group=self.group)
        all_d, all_i = torch.cat(ds, 1), torch.cat(is_, 1)
        # Padding (id −1) must sort after every real id: map it to a huge id for the merge.
        big = torch.iinfo(torch.int64).max
        merged_d, merged_i = _merge(
            all_d, torch.where(all_i >= 0, all_i, torch.full_like(all_i, big)), k, self.local.metric
        )
        return merged_d, torch.where(merged_i == big, torch.full_like(merged_i, -1), merged_i)


def _merge(dist_: Tensor, ids: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    rows_d, rows_i = [], []
    for row in range(dist_.shape[0]):
        d, i = topk_with_ties(dist_[row : row + 1], k, metric, ids[row])
        rows_d.append(d)
        rows_i.append(i)
    if not rows_d:
        return dist_[:, :k], ids[:, :k]
    return torch.cat(rows_d), torch.cat(rows_i)

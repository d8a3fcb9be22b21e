"""ShardedPQIndex: one PQIndex / IVFPQIndex shard per torch.distributed rank.

Training: rank 0 trains and broadcasts the codebooks (and coarse centroids), so every shard encodes
with the same quantizer. add(x, ids): each rank adds its own vectors with global ids. search(q, k):
every rank searches its shard with the same queries, the per-shard top-k lists are all-gathered and
merged under the same (distance, id) order as a single index, so the result equals the single index
holding all vectors (ties to the lower id). Works with any backend torch.distributed supports for
CPU tensors (gloo).

Threads: train, search and len are collectives, which every rank must enter in the same order. Two
threads of one rank calling them at once could pair one thread's all-gather with another rank's call for
other queries, which would give wrong results or a hang, so a second concurrent call raises a
RuntimeError instead. add is local (the shard's own lock serialises it, see PQIndex).
Saving is per shard: save the local index (sharded.local.save(path)) on every rank.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference.pq import topk_with_ties
from .index import IVFPQIndex, PQIndex, _as_matrix

__all__ = ["ShardedPQIndex"]


class ShardedPQIndex:
    """A PQIndex / IVFPQIndex shard per rank (the module docstring). Not to be shared between threads of one
    rank for its collectives: a call of train, search or len while another is running raises RuntimeError."""

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
        self._collective = threading.Lock()

    @contextmanager
    def _one_collective(self, what: str):
        if not self._collective.acquire(blocking=False):
            raise RuntimeError(
                f"fastcore_ai.search.ShardedPQIndex.{what}: another thread of this rank is running a collective "
                "call of this index; the ranks must enter train, search and len in one order, so call them "
                "from one thread per rank"
            )
        try:
            yield
        finally:
            self._collective.release()

    def train(self, x, **kwargs) -> "ShardedPQIndex":
        """Rank 0 trains on its x (other ranks may pass None); the quantizer is broadcast to all."""
        with self._one_collective("train"):
            rank = dist.get_rank(self.group)
            if rank == 0:
                self.local.train(x, **kwargs)
            M, ksub, dsub = self.local.M, 2**self.local.nbits, self.local.d // self.local.M
            books = self.local.codebooks if rank == 0 else torch.empty(M, ksub, dsub)
            dist.broadcast(books, src=0, group=self.group)
            coarse = None
            if isinstance(self.local, IVFPQIndex):
                coarse = self.local.coarse if rank == 0 else torch.empty(self.local.nlist, self.local.d)
                dist.broadcast(coarse, src=0, group=self.group)
            with self.local._lock:  # the model is installed as the shard's own train does: both halves at once
                self.local.codebooks = books
                if coarse is not None:
                    self.local.coarse, self.local._list_terms = coarse, None
        return self

    def add(self, x, ids) -> None:
        """Add this rank's vectors under their global ids (ids are required: they must be unique across ranks)."""
        self.local.add(x, ids)

    def __len__(self) -> int:
        with self._one_collective("__len__"):
            n = torch.tensor([len(self.local)], dtype=torch.int64)
            dist.all_reduce(n, group=self.group)
        return int(n)

    def search(self, q, k: int, nprobe: Optional[int] = None, refine: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        q = _as_matrix("ShardedPQIndex", "q", q, self.local.d)
        with self._one_collective("search"):
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

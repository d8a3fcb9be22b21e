"""PQIndex (exhaustive ADC; 8-bit exact scan, 4-bit fast-scan) and IVFPQIndex (coarse k-means +
residual PQ, nprobe lists), on fastcore_ai.ops. Inputs: torch tensors or numpy arrays (zero-copy when
already float32 and C-contiguous on the CPU; CUDA tensors are copied to the CPU, where the kernels run,
with a warning the first time: the indexes have no GPU search yet). Vectors given to train and add must
be finite, and the ids of an index unique.
Results: (distances [nq, k] float32, ids [nq, k] int64) as torch tensors, FAISS conventions.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..ops.pq import best_columns, nearest_centroid
from ._format import IndexFileError, read_index_file, write_index_file

__all__ = ["PQIndex", "IVFPQIndex", "IndexFileError", "load_index"]


def _err(cls: str, message: str) -> str:
    return f"fastcore_ai.search.{cls}: {message}"


_warned_cuda_copy = False


def _warn_cuda_copy(cls: str) -> None:
    global _warned_cuda_copy
    if not _warned_cuda_copy:
        _warned_cuda_copy = True
        warnings.warn(
            _err(cls, "CUDA inputs are copied to the CPU: the index kernels run on the CPU (no GPU search yet)"),
            RuntimeWarning,
            stacklevel=4,
        )


def _as_matrix(cls: str, name: str, x, d: int, finite: bool = False) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) if x.dtype != np.float32 else x)
    if not isinstance(x, Tensor):
        raise TypeError(_err(cls, f"{name} must be a torch.Tensor or numpy array [n, {d}], got {type(x).__name__}"))
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(_err(cls, f"{name} must have shape [n, d] with d = {d}, got {tuple(x.shape)}"))
    if not (x.is_floating_point()):
        raise TypeError(_err(cls, f"{name} must hold floating-point values, got {x.dtype}"))
    if x.is_cuda:
        _warn_cuda_copy(cls)
    x = x.detach().to("cpu", torch.float32).contiguous()
    if finite and x.numel() and not bool(torch.isfinite(x).all()):
        rows = torch.nonzero(~torch.isfinite(x).all(1)).flatten()
        raise ValueError(
            _err(cls, f"{name} must be finite: {rows.numel()} row(s) hold NaN or inf (first: row {int(rows[0])})")
        )
    return x


def _as_ids(cls: str, ids, n: int = -1) -> Tensor:
    """ids as a 1-D int64 CPU tensor (of length n unless n = −1)."""
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if not isinstance(ids, Tensor):
        ids = torch.as_tensor(ids, dtype=torch.int64)
    if ids.dim() != 1 or (n >= 0 and ids.shape[0] != n):
        raise ValueError(_err(cls, f"ids must have shape [n] = [{n}] (one per vector), got {tuple(ids.shape)}"))
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(_err(cls, f"ids must be integers, got {ids.dtype}"))
    ids = ids.to("cpu", torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(_err(cls, "ids must be >= 0 (−1 marks a missing result)"))
    return ids


class PQIndex:
    """Exhaustive product-quantization index. nbits = 8: exact ADC scan; nbits = 4: fast-scan
    (search(refine=f) re-ranks the best k·f exactly with the decoded codes)."""

    _kind = "PQIndex"

    def __init__(self, d: int, M: int, nbits: int = 8, metric: str = "l2"):
        cls = type(self).__name__
        if not isinstance(d, int) or not isinstance(M, int) or d < 1 or M < 1:
            raise ValueError(_err(cls, f"d and M must be positive ints, got d = {d!r}, M = {M!r}"))
        if d % M != 0:
            raise ValueError(_err(cls, f"d must be divisible by M, got d = {d}, M = {M}"))
        if nbits not in (4, 8):
            raise ValueError(_err(cls, f"nbits must be 4 or 8, got {nbits!r}"))
        if metric not in ops.METRICS:
            raise ValueError(_err(cls, f"metric must be 'l2' or 'ip', got {metric!r}"))
        self.d, self.M, self.nbits, self.metric = d, M, nbits, metric
        self.codebooks: Optional[Tensor] = None
        self.codes = torch.zeros(0, M, dtype=torch.uint8)
        self.ids = torch.zeros(0, dtype=torch.int64)
        self._next_id = 0
        self._packed: Optional[Tensor] = None

    # ---- state ----
    @property
    def is_trained(self) -> bool:
        return self.codebooks is not None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def len(self) -> int:
        return len(self)

    @property
    def ntotal(self) -> int:
        return len(self)

    def _require_trained(self, what: str) -> None:
        if not self.is_trained:
            raise RuntimeError(_err(type(self).__name__, f"cannot {what} an untrained index; call train(x) first"))

    # ---- build ----
    def train(self, x, niter: int = 25, seed: int = 0, constrained: bool = False) -> "PQIndex":
        x = _as_matrix(type(self).__name__, "x", x, self.d, finite=True)
        self.codebooks = ops.pq_train(
            x, self.M, self.nbits, self.metric, niter=niter, constrained=constrained, seed=seed
        )
        return self

    def _encode(self, x: Tensor) -> Tensor:
        return ops.pq_encode(x, self.codebooks)

    def add(self, x, ids=None) -> None:
        self._require_trained("add to")
        cls = type(self).__name__
        x = _as_matrix(cls, "x", x, self.d, finite=True)
        n = x.shape[0]
        if ids is None:
            ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64)
        else:
            ids = _as_ids(cls, ids, n)
            if torch.unique(ids).numel() != n:
                raise ValueError(_err(cls, "add: ids must be unique, got repeated ids"))
            present = torch.isin(ids, self.ids)
            if bool(present.any()):
                raise ValueError(
                    _err(cls, f"add: id {int(ids[present][0])} is already in the index (remove_ids it first)")
                )
        self._add_encoded(x, ids)
        if n:
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def _add_encoded(self, x: Tensor, ids: Tensor) -> None:
        self.codes = torch.cat([self.codes, self._encode(x)])
        self.ids = torch.cat([self.ids, ids])
        self._packed = None

    def remove_ids(self, ids) -> int:
        """Remove every vector whose id is in `ids`; returns how many were removed."""
        ids = _as_ids(type(self).__name__, ids)
        keep = ~torch.isin(self.ids, ids)
        removed = int((~keep).sum())
        self._keep_rows(keep)
        return removed

    def _keep_rows(self, keep: Tensor) -> None:
        self.codes = self.codes[keep].contiguous()
        self.ids = self.ids[keep].contiguous()
        self._packed = None

    def _rows_of(self, ids) -> Tensor:
        ids = _as_ids(type(self).__name__, ids)
        order = torch.argsort(self.ids)
        pos = torch.searchsorted(self.ids[order], ids).clamp_max(max(len(self) - 1, 0))
        if len(self) == 0 or not torch.equal(self.ids[order][pos], ids):
            raise KeyError(_err(type(self).__name__, "reconstruct: some ids are not in the index"))
        return order[pos]

    def reconstruct(self, ids) -> Tensor:
        """The decoded vectors [len(ids), d] of the given ids (KeyError when one is missing)."""
        self._require_trained("reconstruct from")
        return ops.pq_decode(self.codes[self._rows_of(ids)], self.codebooks)

    # ---- search ----
    def search(self, q, k: int, nprobe: Optional[int] = None, refine: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        self._require_trained("search")
        q = _as_matrix(type(self).__name__, "q", q, self.d)
        if self.nbits == 4:
            if self._packed is None:
                self._packed = ops.pq4_pack(self.codes)
            d, rows = ops.pq4_search(q, self._packed, len(self), self.codebooks, k, self.metric, k_factor=refine or 1)
        else:
            d, rows = ops.pq_search(q, self.codes, self.codebooks, k, self.metric)
        return d, self._map_rows(rows)

    def _map_rows(self, rows: Tensor) -> Tensor:
        if len(self) == 0:
            return rows
        return torch.where(rows >= 0, self.ids[rows.clamp_min(0)], rows)

    # ---- persistence ----
    def _meta(self) -> dict:
        return {
            "kind": self._kind,
            "d": self.d,
            "M": self.M,
            "nbits": self.nbits,
            "metric": self.metric,
            "next_id": self._next_id,
            "trained": self.is_trained,
        }

    def _arrays(self) -> dict:
        arrays = {"codes": self.codes, "ids": self.ids}
        if self.is_trained:
            arrays["codebooks"] = self.codebooks
        return arrays

    def save(self, path: str) -> None:
        """Write the index atomically (temp file, fsync, rename) in the versioned, checksummed format."""
        write_index_file(path, self._meta(), self._arrays())

    @classmethod
    def load(cls, path: str) -> "PQIndex":
        index = load_index(path)
        if not isinstance(index, cls):
            raise IndexFileError(f"fastcore_ai.search: {path!r} holds a {type(index).__name__}, not a {cls.__name__}")
        return index

    def _restore(self, meta: dict, arrays: dict, path: str) -> None:
        def need(name, dtype, shape):
            a = arrays.get(name)
            if a is None or a.dtype != dtype or (shape is not None and tuple(a.shape) != tuple(shape)):
                raise IndexFileError(
                    f"fastcore_ai.search: {path!r}: array {name} is missing or has the wrong dtype/shape"
                )
            return a

        self._next_id = int(meta.get("next_id", 0))
        if meta.get("trained"):
            self.codebooks = need("codebooks", torch.float32, (self.M, 2**self.nbits, self.d // self.M))
        codes = need("codes", torch.uint8, None)
        if codes.dim() != 2 or codes.shape[1] != self.M:
            raise IndexFileError(f"fastcore_ai.search: {path!r}: codes must be [n, {self.M}]")
        self.codes = codes
        self.ids = need("ids", torch.int64, (codes.shape[0],))
        if codes.numel() and int(codes.max()) >= 2**self.nbits:
            raise IndexFileError(f"fastcore_ai.search: {path!r}: codes out of range for nbits = {self.nbits}")


class IVFPQIndex(PQIndex):
    """Inverted-file PQ: a k-means coarse quantizer with nlist centroids; each vector is stored in its
    nearest list (l2; largest inner product for ip) with its residual x − c_l PQ-encoded
    (by_residual=True, FAISS's IndexIVFPQ default). nbits = 4 with by_residual=False is FAISS's
    IVF…,PQ…x4fs and is searched with the fast-scan kernel (one quantized table per query). search(q, k, nprobe) scans the nprobe best lists:
    l2 uses one table per (query, list) on q − c_l; ip uses the decomposition ⟨q, c_l⟩ + ⟨q, y_R⟩ (one
    table per query plus a per-list bias)."""

    _kind = "IVFPQIndex"

    def __init__(self, d: int, nlist: int, M: int, nbits: int = 8, metric: str = "l2", by_residual: bool = True):
        super().__init__(d, M, nbits, metric)
        if not isinstance(nlist, int) or nlist < 1:
            raise ValueError(_err("IVFPQIndex", f"nlist must be a positive int, got {nlist!r}"))
        self.nlist, self.by_residual = nlist, bool(by_residual)
        self.coarse: Optional[Tensor] = None
        self.list_no = torch.zeros(0, dtype=torch.int64)
        self._csr = None
        self._list_terms: Optional[Tensor] = None

    def train(
        self, x, niter: int = 25, seed: int = 0, constrained: bool = False, coarse_niter: int = 10
    ) -> "IVFPQIndex":
        """Coarse k-means (nlist centroids, coarse_niter Lloyd iterations), then the PQ codebooks (niter) on the
        residuals (or on x when by_residual=False). coarse_niter = 10 is FAISS's IndexIVF default: the coarse
        clustering is the large one (nlist up to 2^16 centroids), and extra iterations there buy little recall."""
        x = _as_matrix("IVFPQIndex", "x", x, self.d, finite=True)
        coarse = ops.kmeans(x, self.nlist, niter=coarse_niter, seed=seed)
        target = x - coarse[self._assign(x, coarse)] if self.by_residual else x
        self.codebooks = ops.pq_train(
            target, self.M, self.nbits, self.metric, niter=niter, constrained=constrained, seed=seed + 1
        )
        self.coarse = coarse
        self._list_terms = None
        return self

    def _coarse_scores(self, x: Tensor, coarse: Tensor) -> Tensor:
        """Higher is better: ⟨x, c⟩ (ip), or for l2 2⟨x, c⟩ − ‖c‖² (= ‖x‖² − ‖x − c‖², the same order):
        one GEMM with the scale and the norms folded in (addmm), no [n, nlist] temporaries."""
        if self.metric == "ip":
            return x @ coarse.T
        return torch.addmm((coarse * coarse).sum(1)[None], x, coarse.T, beta=-1.0, alpha=2.0)

    def _assign(self, x: Tensor, coarse: Tensor) -> Tensor:
        # The nearest list (l2) / largest inner product (ip), lower list on ties, by the fused assignment
        # kernel (no [n, nlist] score matrix: a whole database's would be n·nlist·4 bytes).
        return nearest_centroid(x, coarse, self.metric)

    def _add_encoded(self, x: Tensor, ids: Tensor) -> None:
        lists = self._assign(x, self.coarse)
        target = x - self.coarse[lists] if self.by_residual else x
        self.codes = torch.cat([self.codes, ops.pq_encode(target, self.codebooks)])
        self.ids = torch.cat([self.ids, ids])
        self.list_no = torch.cat([self.list_no, lists])
        self._csr = None
        self._packed = None

    def _keep_rows(self, keep: Tensor) -> None:
        super()._keep_rows(keep)
        self.list_no = self.list_no[keep].contiguous()
        self._csr = None

    def reconstruct(self, ids) -> Tensor:
        self._require_trained("reconstruct from")
        rows = self._rows_of(ids)
        out = ops.pq_decode(self.codes[rows], self.codebooks)
        return out + self.coarse[self.list_no[rows]] if self.by_residual else out

    def _lists(self):
        """(codes grouped by list, ids in the same order, list_offsets [nlist + 1]) — a stable sort."""
        if self._csr is None:
            order = torch.argsort(self.list_no, stable=True)
            counts = torch.bincount(self.list_no, minlength=self.nlist)
            offsets = torch.zeros(self.nlist + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
            self._csr = (self.codes[order].contiguous(), self.ids[order].contiguous(), offsets)
        return self._csr

    def search(self, q, k: int, nprobe: Optional[int] = None, refine: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        self._require_trained("search")
        q = _as_matrix("IVFPQIndex", "q", q, self.d)
        nprobe = 1 if nprobe is None else nprobe
        if not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(_err("IVFPQIndex", f"nprobe must be a positive int, got {nprobe!r}"))
        nprobe = min(nprobe, self.nlist)
        # The nprobe best lists: one probe by the fused nearest-centroid kernel (no [nq, nlist] scores in
        # memory), more from the coarse GEMM by the native selection (torch.topk cost ~2.4 µs a query for
        # nlist = 1024, as much as scanning two lists).
        if nprobe == 1:
            probes = nearest_centroid(q, self.coarse, self.metric)[:, None]
        else:
            probes = best_columns(self._coarse_scores(q, self.coarse), nprobe)
        if self.nbits == 4 and not self.by_residual:
            # FAISS's IVF…,PQ…x4fs: non-residual 4-bit codes, fast-scan per list.
            if self._packed is None:
                self._packed = ops.pq4_pack_lists(self.codes, self.list_no, self.ids, self.nlist)
            packed, list_blocks, sizes, row_ids = self._packed
            return ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, self.codebooks, k, self.metric)
        codes, ids, offsets = self._lists()
        return ops.ivfpq_search(
            q,
            self.coarse,
            probes,
            codes,
            offsets,
            ids,
            self.codebooks,
            k,
            self.metric,
            self.by_residual,
            list_terms=self._residual_terms(),
        )

    def _residual_terms(self) -> Optional[Tensor]:
        """The per-list tables of the L2 residual decomposition, built once per trained/loaded model
        (nlist·M·ksub floats); None where the decomposition does not apply (ip, non-residual)."""
        if self.metric != "l2" or not self.by_residual:
            return None
        if self._list_terms is None:
            self._list_terms = ops.ivfpq_list_terms(self.coarse, self.codebooks)
        return self._list_terms

    def _meta(self) -> dict:
        meta = super()._meta()
        meta.update(nlist=self.nlist, by_residual=self.by_residual)
        return meta

    def _arrays(self) -> dict:
        arrays = super()._arrays()
        arrays["list_no"] = self.list_no
        if self.is_trained:
            arrays["coarse"] = self.coarse
        return arrays

    def _restore(self, meta: dict, arrays: dict, path: str) -> None:
        super()._restore(meta, arrays, path)
        list_no = arrays.get("list_no")
        if (
            list_no is None
            or list_no.dtype != torch.int64
            or tuple(list_no.shape) != (self.codes.shape[0],)
            or (list_no.numel() and (int(list_no.min()) < 0 or int(list_no.max()) >= self.nlist))
        ):
            raise IndexFileError(f"fastcore_ai.search: {path!r}: list_no is missing or out of range")
        self.list_no = list_no
        if meta.get("trained"):
            coarse = arrays.get("coarse")
            if coarse is None or coarse.dtype != torch.float32 or tuple(coarse.shape) != (self.nlist, self.d):
                raise IndexFileError(f"fastcore_ai.search: {path!r}: coarse centroids are missing or malformed")
            self.coarse = coarse
            self._list_terms = None


def load_index(path: str):
    """Load a PQIndex or IVFPQIndex written by .save(path); IndexFileError when the file is truncated,
    tampered with, of another format version or inconsistent."""
    meta, arrays = read_index_file(path)
    try:
        kind = meta["kind"]
        d, M, nbits, metric = int(meta["d"]), int(meta["M"]), int(meta["nbits"]), str(meta["metric"])
        if kind == "PQIndex":
            index = PQIndex(d, M, nbits, metric)
        elif kind == "IVFPQIndex":
            index = IVFPQIndex(d, int(meta["nlist"]), M, nbits, metric, bool(meta["by_residual"]))
        else:
            raise IndexFileError(f"fastcore_ai.search: {path!r} holds an unknown index kind {kind!r}")
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, IndexFileError):
            raise
        raise IndexFileError(f"fastcore_ai.search: {path!r} has inconsistent metadata ({error})") from error
    index._restore(meta, arrays, path)
    return index

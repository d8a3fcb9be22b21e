"""PQIndex (exhaustive ADC; 8-bit exact scan, 4-bit fast-scan) and IVFPQIndex (coarse k-means +
residual PQ, nprobe lists), on fastcore_ai.ops. Inputs: torch tensors or numpy arrays (zero-copy when
already float32 and C-contiguous on the CPU; CUDA tensors are copied to the CPU, where the kernels run,
with a warning the first time: the indexes have no GPU search yet). Vectors given to train and add must
be finite, and the ids of an index unique.
Results: (distances [nq, k] float32, ids [nq, k] int64) as torch tensors, FAISS conventions.

Threads: an index may be shared between threads. Each index has a lock (a threading.RLock) that
serialises the calls that change it (train's assignment of the trained model, add, remove_ids) with each
other and with the moment a search, reconstruct or save takes its view of the index. The work of a
search then runs outside the lock on that view: the index's tensors are replaced when it changes, never
written in place, so searches run in parallel with each other, and a search that overlaps an add or a
remove_ids returns exactly the result of the index before it or after it, never a mixture.
Assigning the attributes (codes, ids, codebooks, ...) directly bypasses the lock: do it from one thread.

Files: save writes atomically (a temporary file in the same directory, fsync, rename); load and
load_index check the whole file (size, magic, version, checksum, header, every array's dtype and shape
against the metadata, code ranges, unique ids, list numbers) before an index is built from it, and
raise IndexFileError naming the file and the problem (docs/pq.md, "Index files").
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..ops.pq import best_columns, nearest_centroid
from ._format import IndexFileError, read_index_file, write_index_file

__all__ = ["PQIndex", "IVFPQIndex", "IndexFileError", "load_index", "load_index_and_annotations"]


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


def _map_rows(rows: Tensor, ids: Tensor) -> Tensor:
    """The ids of the result rows (−1 padding kept)."""
    if ids.shape[0] == 0:
        return rows
    return torch.where(rows >= 0, ids[rows.clamp_min(0)], rows)


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
    (search(refine=f) re-ranks the best k·f exactly with the decoded codes).

    Thread-safe (the module docstring, "Threads"): a per-index RLock serialises train's update, add,
    remove_ids and the views that search, reconstruct and save take; searches do not serialise with each
    other, and one that overlaps an add sees the index before or after the add."""

    _kind = "PQIndex"
    _file_arrays = frozenset({"codes", "ids", "codebooks"})

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
        self._lock = threading.RLock()

    # The lock cannot be copied or pickled; a copy gets a fresh one (copy.deepcopy worked before the lock).
    def __getstate__(self) -> dict:
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

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
        # Trained outside the lock (searches go on with the current model meanwhile), installed under it.
        codebooks = ops.pq_train(x, self.M, self.nbits, self.metric, niter=niter, constrained=constrained, seed=seed)
        with self._lock:
            self.codebooks = codebooks
        return self

    def _encode(self, x: Tensor) -> Tensor:
        return ops.pq_encode(x, self.codebooks)

    def add(self, x, ids=None) -> None:
        with self._lock:
            self._add(x, ids)

    def _add(self, x, ids) -> None:
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
        with self._lock:
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
        with self._lock:
            self._require_trained("reconstruct from")
            codes, codebooks = self.codes[self._rows_of(ids)], self.codebooks
        return ops.pq_decode(codes, codebooks)

    # ---- search ----
    def search(self, q, k: int, nprobe: Optional[int] = None, refine: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        with self._lock:
            self._require_trained("search")
            view = self._search_view()
        q = _as_matrix(type(self).__name__, "q", q, self.d)
        return self._search_on(view, q, k, nprobe, refine)

    def _search_view(self) -> tuple:
        """What a search reads, taken under the lock (the fast-scan packing built once per change)."""
        if self.nbits == 4 and self._packed is None:
            self._packed = ops.pq4_pack(self.codes)
        return self.codebooks, self.codes, self.ids, self._packed

    def _search_on(self, view: tuple, q: Tensor, k: int, nprobe, refine) -> Tuple[Tensor, Tensor]:
        codebooks, codes, ids, packed = view
        if self.nbits == 4:
            d, rows = ops.pq4_search(q, packed, codes.shape[0], codebooks, k, self.metric, k_factor=refine or 1)
        else:
            d, rows = ops.pq_search(q, codes, codebooks, k, self.metric)
        return d, _map_rows(rows, ids)

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

    def save(self, path, annotations: Optional[dict] = None) -> None:
        """Write the index atomically (temp file, fsync, rename) in the versioned, checksummed format. On
        failure (an OSError naming the path, e.g. a full disk) the file already at path is left unchanged.

        annotations: optional {str: int | float | str | bool} stored with the index and returned by
        load_index_and_annotations (the FAISS-style API keeps its class and nprobe there)."""
        who = f"{type(self).__name__}.save"
        with self._lock:
            meta, arrays = self._meta(), self._arrays()
        if annotations is not None:
            meta["annotations"] = _checked_annotations(annotations, lambda problem: TypeError(f"{who}: {problem}"))
        write_index_file(path, meta, arrays, who=who)

    @classmethod
    def load(cls, path) -> "PQIndex":
        """The index saved at path; IndexFileError if the file is damaged or holds another kind of index."""
        return _index_from_file(path, expected=cls)[0]

    @classmethod
    def _params_from_meta(cls, meta: dict, where: str) -> dict:
        """The constructor's arguments, from a file's metadata."""
        return {
            "d": _meta_field(meta, "d", int, where),
            "M": _meta_field(meta, "M", int, where),
            "nbits": _meta_field(meta, "nbits", int, where),
            "metric": _meta_field(meta, "metric", str, where),
        }

    def _state_from_file(self, meta: dict, arrays: dict, where: str) -> dict:
        """The attributes a loaded index gets, every one checked against the metadata (self: the empty index
        built with the file's parameters; nothing is assigned here)."""
        unexpected = sorted(set(arrays) - self._file_arrays)
        if unexpected:
            raise IndexFileError(f"fastcore_ai.search: {where} holds arrays {unexpected} that a {self._kind} has not")
        trained = _meta_field(meta, "trained", bool, where)
        next_id = _meta_field(meta, "next_id", int, where)
        codes = _file_array(arrays, "codes", torch.uint8, where)
        if codes.dim() != 2 or codes.shape[1] != self.M:
            raise IndexFileError(
                f"fastcore_ai.search: {where}: codes must be [n, M] with M = {self.M}, got {list(codes.shape)}"
            )
        n = codes.shape[0]
        ids = _file_array(arrays, "ids", torch.int64, where, (n,))
        if n and int(codes.max()) >= 2**self.nbits:
            raise IndexFileError(
                f"fastcore_ai.search: {where}: codes hold {int(codes.max())}, out of range for nbits = {self.nbits}"
            )
        if n and int(ids.min()) < 0:
            raise IndexFileError(f"fastcore_ai.search: {where}: ids hold a negative id {int(ids.min())}")
        if torch.unique(ids).numel() != n:
            raise IndexFileError(f"fastcore_ai.search: {where}: ids are not unique")
        if next_id < 0 or (n and next_id <= int(ids.max())):
            raise IndexFileError(
                f"fastcore_ai.search: {where}: next_id = {next_id} must be >= 0 and above every id"
                + (f" (largest {int(ids.max())})" if n else "")
            )
        codebooks = None
        if trained:
            codebooks = _file_array(
                arrays, "codebooks", torch.float32, where, (self.M, 2**self.nbits, self.d // self.M)
            )
            _require_finite(codebooks, "codebooks", where)
        elif "codebooks" in arrays or n:
            raise IndexFileError(f"fastcore_ai.search: {where}: an untrained index holds codebooks or vectors")
        return {"codebooks": codebooks, "codes": codes, "ids": ids, "_next_id": next_id}


class IVFPQIndex(PQIndex):
    """Inverted-file PQ: a k-means coarse quantizer with nlist centroids; each vector is stored in its
    nearest list (l2; largest inner product for ip) with its residual x − c_l PQ-encoded
    (by_residual=True, FAISS's IndexIVFPQ default). nbits = 4 with by_residual=False is FAISS's
    IVF…,PQ…x4fs and is searched with the fast-scan kernel (one quantized table per query). search(q, k, nprobe) scans the nprobe best lists:
    l2 uses one table per (query, list) on q − c_l; ip uses the decomposition ⟨q, c_l⟩ + ⟨q, y_R⟩ (one
    table per query plus a per-list bias).

    Thread-safe as PQIndex is (the module docstring, "Threads"): the lists, their fast-scan packing and the
    residual tables a search needs are built under the lock, once per change, and the scan runs outside it."""

    _kind = "IVFPQIndex"
    _file_arrays = PQIndex._file_arrays | {"list_no", "coarse"}

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
        codebooks = ops.pq_train(
            target, self.M, self.nbits, self.metric, niter=niter, constrained=constrained, seed=seed + 1
        )
        with self._lock:  # the two halves of the model are installed together
            self.codebooks, self.coarse = codebooks, coarse
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
        with self._lock:
            self._require_trained("reconstruct from")
            rows = self._rows_of(ids)
            codes, codebooks, centroids = self.codes[rows], self.codebooks, self.coarse[self.list_no[rows]]
        out = ops.pq_decode(codes, codebooks)
        return out + centroids if self.by_residual else out

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
        with self._lock:
            self._require_trained("search")
            view = self._search_view()
        q = _as_matrix("IVFPQIndex", "q", q, self.d)
        return self._search_on(view, q, k, nprobe, refine)

    def _search_view(self) -> tuple:
        """(coarse, codebooks, lists or None, residual terms or None, fast-scan packing or None), under the lock."""
        if self.nbits == 4 and not self.by_residual:
            if self._packed is None:
                self._packed = ops.pq4_pack_lists(self.codes, self.list_no, self.ids, self.nlist)
            return self.coarse, self.codebooks, None, None, self._packed
        return self.coarse, self.codebooks, self._lists(), self._residual_terms(), None

    def _search_on(self, view: tuple, q: Tensor, k: int, nprobe, refine) -> Tuple[Tensor, Tensor]:
        coarse, codebooks, lists, list_terms, packed = view
        nprobe = 1 if nprobe is None else nprobe
        if not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(_err("IVFPQIndex", f"nprobe must be a positive int, got {nprobe!r}"))
        nprobe = min(nprobe, self.nlist)
        # The nprobe best lists: one probe by the fused nearest-centroid kernel (no [nq, nlist] scores in
        # memory), more from the coarse GEMM by the native selection (torch.topk cost ~2.4 µs a query for
        # nlist = 1024, as much as scanning two lists).
        if nprobe == 1:
            probes = nearest_centroid(q, coarse, self.metric)[:, None]
        else:
            probes = best_columns(self._coarse_scores(q, coarse), nprobe)
        if packed is not None:
            # FAISS's IVF…,PQ…x4fs: non-residual 4-bit codes, fast-scan per list.
            blocks, list_blocks, sizes, row_ids = packed
            return ops.ivfpq4_search(q, probes, blocks, list_blocks, sizes, row_ids, codebooks, k, self.metric)
        codes, ids, offsets = lists
        return ops.ivfpq_search(
            q, coarse, probes, codes, offsets, ids, codebooks, k, self.metric, self.by_residual, list_terms=list_terms
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

    @classmethod
    def _params_from_meta(cls, meta: dict, where: str) -> dict:
        params = super()._params_from_meta(meta, where)
        params.update(
            nlist=_meta_field(meta, "nlist", int, where), by_residual=_meta_field(meta, "by_residual", bool, where)
        )
        return params

    def _state_from_file(self, meta: dict, arrays: dict, where: str) -> dict:
        state = super()._state_from_file(meta, arrays, where)
        list_no = _file_array(arrays, "list_no", torch.int64, where, (state["codes"].shape[0],))
        if list_no.numel() and (int(list_no.min()) < 0 or int(list_no.max()) >= self.nlist):
            raise IndexFileError(f"fastcore_ai.search: {where}: list_no holds list numbers outside [0, {self.nlist})")
        coarse = None
        if state["codebooks"] is not None:
            coarse = _file_array(arrays, "coarse", torch.float32, where, (self.nlist, self.d))
            _require_finite(coarse, "coarse", where)
        elif "coarse" in arrays:
            raise IndexFileError(f"fastcore_ai.search: {where}: an untrained index holds coarse centroids")
        state.update(list_no=list_no, coarse=coarse)
        return state


_KINDS = {cls._kind: cls for cls in (PQIndex, IVFPQIndex)}


_ANNOTATION_VALUE_TYPES = (bool, int, float, str)


def _checked_annotations(annotations, error) -> dict:
    """A copy of annotations, a dict of str keys to scalar values; error(problem) builds what is raised."""
    if not isinstance(annotations, dict):
        raise error(f"annotations must be a dict, got {type(annotations).__name__}")
    for key, value in annotations.items():
        if not isinstance(key, str) or not isinstance(value, _ANNOTATION_VALUE_TYPES):
            raise error(
                f"annotations must map str keys to bool, int, float or str values, got {key!r}: {type(value).__name__}"
            )
    return dict(annotations)


def _meta_field(meta: dict, key: str, kind: type, where: str):
    """meta[key], which must be of type kind (an int is not a bool, nor a bool an int)."""
    if key not in meta:
        raise IndexFileError(f"fastcore_ai.search: {where} has no {key!r} in its metadata")
    value = meta[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise IndexFileError(f"fastcore_ai.search: {where}: metadata {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _file_array(arrays: dict, name: str, dtype: torch.dtype, where: str, shape: Optional[tuple] = None) -> Tensor:
    array = arrays.get(name)
    if array is None:
        raise IndexFileError(f"fastcore_ai.search: {where} has no array {name!r}")
    if array.dtype != dtype or (shape is not None and tuple(array.shape) != tuple(shape)):
        expected = str(dtype).replace("torch.", "") + ("" if shape is None else f" {list(shape)}")
        raise IndexFileError(
            f"fastcore_ai.search: {where}: array {name!r} is {str(array.dtype).replace('torch.', '')} "
            f"{list(array.shape)}, the metadata implies {expected}"
        )
    return array


def _require_finite(array: Tensor, name: str, where: str) -> None:
    if not bool(torch.isfinite(array).all()):
        raise IndexFileError(f"fastcore_ai.search: {where}: {name} hold NaN or inf")


def _index_from_file(path, expected: Optional[type] = None) -> Tuple[PQIndex, dict]:
    """(the index in the file, its annotations), every check passed before the index's attributes are set
    (so no partly-built index can escape); expected: the class whose load was called, checked against the
    file's kind first."""
    meta, arrays = read_index_file(path)
    where = f"index file {path!r}"
    kind = meta.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise IndexFileError(f"fastcore_ai.search: {where} holds an unknown index kind {kind!r}")
    if expected is not None and cls is not expected:
        raise IndexFileError(
            f"fastcore_ai.search.{expected.__name__}.load: {path!r} holds a {kind}, not a {expected.__name__} "
            f"(load it with {kind}.load or load_index)"
        )
    params = cls._params_from_meta(meta, where)
    try:
        index = cls(**params)
    except (TypeError, ValueError) as error:
        raise IndexFileError(f"fastcore_ai.search: {where} has inconsistent metadata ({error})") from error
    annotations = _checked_annotations(
        meta.get("annotations", {}), lambda problem: IndexFileError(f"fastcore_ai.search: {where}: {problem}")
    )
    for name, value in index._state_from_file(meta, arrays, where).items():
        setattr(index, name, value)
    return index, annotations


def load_index(path) -> PQIndex:
    """Load a PQIndex or IVFPQIndex written by .save(path); IndexFileError when the file is truncated,
    tampered with, of another format version or inconsistent (nothing is built from a file that fails)."""
    return _index_from_file(path)[0]


def load_index_and_annotations(path) -> Tuple[PQIndex, dict]:
    """load_index(path) and the annotations it was saved with ({} when none)."""
    return _index_from_file(path)

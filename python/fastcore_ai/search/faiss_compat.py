"""FAISS-style construction and API over PQIndex / IVFPQIndex, so FAISS code ports by changing its import:

    import fastcore_ai.search as faiss
    index = faiss.index_factory(d, "IVF1024,PQ32x4fs", faiss.METRIC_L2)
    index.train(xt); index.add(xb); index.nprobe = 8
    D, I = index.search(xq, 10)

What is FAISS's and what is ours (the full list is in docs/pq.md, "FAISS-style API (index_factory)"):

* index_factory grammar: PQ{M}[x{4|8}][np], PQ{M}x4fs[_32], IVF{nlist},PQ{M}[x{4|8}][np],
  IVF{nlist},PQ{M}x4fs[_32], each optionally behind IDMap / IDMap2 (a no-op: every index here keeps
  ids). Any other token raises ValueError naming it and what FAISS means by it.
* Index objects carry FAISS's names: d, ntotal, is_trained, metric_type, train, add, add_with_ids,
  search -> (D, I), assign, reset, remove_ids, reconstruct(_n/_batch), nprobe / nlist on IVF indexes;
  FAISS methods and knobs without an equivalent raise NotImplementedError naming them.
* Inputs as FAISS converts them: numpy arrays of any real dtype (np.ascontiguousarray(x, float32):
  no copy when already float32 and C-contiguous, then torch.from_numpy, zero-copy), torch tensors of any
  real dtype. numpy in -> numpy out; torch in -> torch out (on the queries' device).
* Missing results: id -1 with distance +inf (L2) / -inf (IP). FAISS pads with ±FLT_MAX (exact indexes)
  or an unspecified finite value (fast-scan); the ids agree.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import ops
from .index import IndexFileError, IVFPQIndex, PQIndex, load_index_and_annotations

__all__ = [
    "METRIC_INNER_PRODUCT",
    "METRIC_L2",
    "Index",
    "IndexPQ",
    "IndexPQFastScan",
    "IndexIVFPQ",
    "IndexIVFPQFastScan",
    "index_factory",
    "write_index",
    "read_index",
    "clone_index",
    "normalize_L2",
    "omp_get_max_threads",
    "omp_set_num_threads",
]

# FAISS's MetricType enum values (faiss/MetricType.h): METRIC_INNER_PRODUCT = 0, METRIC_L2 = 1.
METRIC_INNER_PRODUCT = 0
METRIC_L2 = 1
_METRIC_TO_NAME = {METRIC_L2: "l2", METRIC_INNER_PRODUCT: "ip"}
_NAME_TO_METRIC = {name: metric for metric, name in _METRIC_TO_NAME.items()}
# The rest of FAISS's enum, named in the error for them.
_OTHER_FAISS_METRICS = {
    2: "METRIC_L1",
    3: "METRIC_Linf",
    4: "METRIC_Lp",
    20: "METRIC_Canberra",
    21: "METRIC_BrayCurtis",
    22: "METRIC_JensenShannon",
    23: "METRIC_Jaccard",
    24: "METRIC_NaNEuclidean",
    25: "METRIC_GOWER",
}
_FASTSCAN_BLOCK = 32  # vectors per fast-scan block (FAISS's bbs default; the only layout ours has)


def _where(owner: str, method: str) -> str:
    return f"fastcore_ai.search.{owner}.{method}" if method else f"fastcore_ai.search.{owner}"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _metric_name(where: str, metric) -> str:
    if not _is_int(metric):
        raise TypeError(
            f"{where}: metric must be METRIC_L2 ({METRIC_L2}) or METRIC_INNER_PRODUCT ({METRIC_INNER_PRODUCT}), "
            f"got {metric!r} ({type(metric).__name__})"
        )
    metric = int(metric)
    if metric in _METRIC_TO_NAME:
        return _METRIC_TO_NAME[metric]
    known = f" ({_OTHER_FAISS_METRICS[metric]})" if metric in _OTHER_FAISS_METRICS else ""
    raise ValueError(
        f"{where}: metric {metric}{known} is not supported; use METRIC_L2 ({METRIC_L2}) or "
        f"METRIC_INNER_PRODUCT ({METRIC_INNER_PRODUCT})"
    )


def _positive_int(where: str, name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{where}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {int(value)}")
    return int(value)


# ---------------------------------------------------------------------------------------------------------
# Input conversion (FAISS's python layer: n, d = x.shape; np.ascontiguousarray(x, dtype="float32"))
# ---------------------------------------------------------------------------------------------------------


def _as_vectors(where: str, name: str, x, d: int) -> Tuple[Tensor, bool]:
    """(float32 CPU-or-device tensor [n, d], came_as_numpy). numpy: integer and floating dtypes are cast to
    float32 as FAISS does, with no copy when x already is float32 and C-contiguous (torch.from_numpy shares
    its memory); torch: any real dtype (cast by the index). Other dtypes and shapes: a clear error."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{where}: {name} must hold real numbers (a float or integer dtype), got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"{where}: {name} must have shape (n, d) with d = {d}, got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:
            # torch.from_numpy warns about read-only memory; nothing here writes to the vectors.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(x), True
        return torch.from_numpy(x), True
    if isinstance(x, Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must hold real numbers, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"{where}: {name} must have shape (n, d) with d = {d}, got {tuple(x.shape)}")
        return (x if x.is_floating_point() else x.to(torch.float32)), False
    raise TypeError(f"{where}: {name} must be a numpy array or torch.Tensor of shape (n, {d}), got {type(x).__name__}")


def _as_ids(where: str, ids, n: int) -> Tensor:
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{where}: ids must hold integers, got dtype {ids.dtype}")
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    elif isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{where}: ids must hold integers, got {ids.dtype}")
        ids = ids.to("cpu", torch.int64)
    else:
        raise TypeError(f"{where}: ids must be a numpy array or torch.Tensor of shape ({n},), got {type(ids).__name__}")
    if tuple(ids.shape) != (n,):
        raise ValueError(f"{where}: ids must have shape ({n},) (one per vector), got {tuple(ids.shape)}")
    if n and int(ids.min()) < 0:
        raise ValueError(f"{where}: ids must be >= 0 (-1 marks a missing result), got {int(ids.min())}")
    return ids


def _id_list(where: str, ids) -> Tensor:
    """A 1-D int64 tensor of ids from a numpy array, tensor, list or single int."""
    if _is_int(ids):
        return torch.tensor([int(ids)], dtype=torch.int64)
    if isinstance(ids, (list, tuple)):
        ids = np.asarray(ids, dtype=np.int64)
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu" and ids.size:
            raise TypeError(f"{where}: ids must hold integers, got dtype {ids.dtype}")
        return torch.from_numpy(np.ascontiguousarray(ids.reshape(-1), dtype=np.int64))
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{where}: ids must hold integers, got {ids.dtype}")
        return ids.reshape(-1).to("cpu", torch.int64)
    raise TypeError(
        f"{where}: ids must be an int, a list, a numpy array or a torch.Tensor of ids, got {type(ids).__name__} "
        "(FAISS's IDSelector objects are not supported)"
    )


def _output(value: Tensor, like_numpy: bool, device: Optional[torch.device]):
    if like_numpy:
        return value.numpy()
    return value if device is None or value.device == device else value.to(device)


def _fill(where: str, name: str, out, value):
    """FAISS's search(x, k, D=..., I=...): write the result into a caller's array of the same shape."""
    if out is None:
        return value
    if type(out) is not type(value) or tuple(out.shape) != tuple(value.shape):
        raise ValueError(
            f"{where}: {name} must be a {type(value).__name__} of shape {tuple(value.shape)}, got "
            f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}"
        )
    if isinstance(out, np.ndarray):
        np.copyto(out, value, casting="same_kind")
    else:
        out.copy_(value)
    return out


# ---------------------------------------------------------------------------------------------------------
# Index classes
# ---------------------------------------------------------------------------------------------------------

# FAISS Index methods and attributes with no equivalent here: reading or calling them raises
# NotImplementedError naming them (instead of an AttributeError that reads like a typo).
_UNSUPPORTED_COMMON = {
    "range_search": "radius search",
    "search_and_reconstruct": "search returning decoded vectors (use search, then reconstruct_batch)",
    "search_and_return_codes": "search returning codes",
    "search_subset": "search restricted to a subset",
    "sa_encode": "standalone codes (FAISS's sa_* byte layout)",
    "sa_decode": "standalone codes (FAISS's sa_* byte layout)",
    "sa_code_size": "standalone codes (FAISS's sa_* byte layout)",
    "add_sa_codes": "adding precomputed standalone codes",
    "compute_residual": "residuals against the coarse quantizer",
    "compute_residual_n": "residuals against the coarse quantizer",
    "merge_from": "merging two indexes",
    "check_compatible_for_merge": "merging two indexes",
    "update_vectors": "overwriting stored vectors",
    "get_distance_computer": "FAISS's DistanceComputer objects",
    "train_with_queries": "query-aware training",
    "codes": "FAISS's flat code array (the index stores codes in its own layout)",
}
_UNSUPPORTED_IVF = {
    "quantizer": "the coarse quantizer as a FAISS IndexFlat (the centroids live inside the index)",
    "invlists": "FAISS's InvertedLists objects",
    "search_preassigned": "search with caller-given probe lists",
    "range_search_preassigned": "radius search",
    "copy_subset_to": "copying a subset to another index",
    "get_list_size": "inverted-list sizes",
    "set_direct_map_type": "direct-map types (reconstruct works by id without one)",
    "replace_invlists": "FAISS's InvertedLists objects",
    "reconstruct_from_offset": "list offsets",
    "train_q1": "training the coarse quantizer alone",
    "max_codes": "capping the codes scanned per query",
    "polysemous_ht": "polysemous (Hamming-filtered) search",
    "use_precomputed_table": "FAISS's precomputed-table switch (ours is always built for by-residual L2)",
    "parallel_mode": "FAISS's OpenMP split (set threads with omp_set_num_threads)",
}


class Index:
    """The FAISS `Index` API over one fastcore_ai.search index (PQIndex or IVFPQIndex). Build one with
    index_factory, a subclass's FAISS-style constructor, or read_index; `native` is the wrapped index."""

    _unsupported = _UNSUPPORTED_COMMON
    _read_only = frozenset({"d", "ntotal", "is_trained", "metric_type", "M", "nbits", "code_size", "pq", "native"})

    def __init__(self, *args, **kwargs):
        raise TypeError(
            "fastcore_ai.search.Index is abstract: build an index with index_factory(d, description, metric) "
            "or IndexPQ / IndexPQFastScan / IndexIVFPQ / IndexIVFPQFastScan"
        )

    def _attach(self, native: PQIndex) -> None:
        object.__setattr__(self, "_native", native)
        object.__setattr__(self, "verbose", False)

    @classmethod
    def _wrap(cls, native: PQIndex) -> "Index":
        index = cls.__new__(cls)
        index._attach(native)
        return index

    def _where(self, method: str = "") -> str:
        return _where(type(self).__name__, method)

    # ---- attributes: FAISS's names ----
    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: FAISS names we do not model get a clear error.
        unsupported = type(self)._unsupported
        if name in unsupported:
            raise NotImplementedError(
                f"{_where(type(self).__name__, name)} is not supported ({unsupported[name]}); "
                "see docs/pq.md, 'FAISS-style API (index_factory)'"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in type(self)._unsupported:
            raise NotImplementedError(
                f"{_where(type(self).__name__, name)} is not supported ({type(self)._unsupported[name]})"
            )
        if name in type(self)._read_only:
            raise AttributeError(
                f"{_where(type(self).__name__, name)} is read-only (fixed when the index is built or trained)"
            )
        object.__setattr__(self, name, value)

    @property
    def native(self) -> PQIndex:
        """The wrapped fastcore_ai.search index (PQIndex / IVFPQIndex) for the library's own API."""
        return self._native

    @property
    def d(self) -> int:
        return self._native.d

    @property
    def ntotal(self) -> int:
        return len(self._native)

    @property
    def is_trained(self) -> bool:
        return self._native.is_trained

    @property
    def metric_type(self) -> int:
        return _NAME_TO_METRIC[self._native.metric]

    @property
    def M(self) -> int:
        return self._native.M

    @property
    def nbits(self) -> int:
        return self._native.nbits

    @property
    def code_size(self) -> int:
        return (self._native.M * self._native.nbits + 7) // 8

    @property
    def pq(self) -> "_ProductQuantizerView":
        return _ProductQuantizerView(self._native)

    def __repr__(self) -> str:
        return f"<fastcore_ai.search.{type(self).__name__} d={self.d} ntotal={self.ntotal} {self._describe()}>"

    def _describe(self) -> str:
        metric = "METRIC_L2" if self._native.metric == "l2" else "METRIC_INNER_PRODUCT"
        return f"M={self.M} nbits={self.nbits} {metric}"

    # ---- build ----
    def train(self, x) -> None:
        """Learn the quantizer(s) from x [n, d]. FAISS lets an index holding vectors be retrained, leaving
        their codes stale; here that raises (reset() first)."""
        where = self._where("train")
        x, _ = _as_vectors(where, "x", x, self.d)
        if self.ntotal:
            raise RuntimeError(
                f"{where}: the index holds {self.ntotal} vectors encoded with the current quantizer; "
                "call reset() before training again"
            )
        self._native.train(x)

    def _require_trained(self, method: str) -> None:
        if not self.is_trained:
            raise RuntimeError(f"{self._where(method)}: the index is not trained; call train(x) first")

    def add(self, x) -> None:
        """Add x [n, d]; ids continue after the largest id so far (FAISS: ntotal, ntotal + 1, ...)."""
        where = self._where("add")
        x, _ = _as_vectors(where, "x", x, self.d)
        self._require_trained("add")
        self._native.add(x)

    def add_with_ids(self, x, ids) -> None:
        """Add x [n, d] under the given int64 ids [n] (unique, >= 0)."""
        where = self._where("add_with_ids")
        x, _ = _as_vectors(where, "x", x, self.d)
        ids = _as_ids(where, ids, int(x.shape[0]))
        self._require_trained("add_with_ids")
        self._native.add(x, ids)

    def reset(self) -> None:
        """Remove every vector, keep the trained quantizer (FAISS's reset); ids restart at 0."""
        old = self._native
        fresh = _empty_like(old)
        if old.is_trained:
            fresh.codebooks = old.codebooks
            if isinstance(old, IVFPQIndex):
                fresh.coarse = old.coarse
        object.__setattr__(self, "_native", fresh)

    def remove_ids(self, ids) -> int:
        """Remove the vectors with these ids (array, tensor, list or int); returns how many were removed.
        FAISS's flat indexes renumber the vectors that remain; here every vector keeps its id."""
        return self._native.remove_ids(_id_list(self._where("remove_ids"), ids))

    # ---- search ----
    def _native_search(self, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        return self._native.search(q, k)

    def search(self, x, k, *, params=None, D=None, I=None):
        """(D [n, k] float32, I [n, k] int64): squared L2 distances ascending, or inner products
        descending; missing results are id -1 with distance +inf (L2) / -inf (IP)."""
        where = self._where("search")
        q, came_as_numpy = _as_vectors(where, "x", x, self.d)
        k = _positive_int(where, "k", k)
        if params is not None:
            raise NotImplementedError(
                f"{where}: params (FAISS's SearchParameters) is not supported; set index.nprobe instead"
            )
        self._require_trained("search")
        distances, ids = self._native_search(q, k)
        device = None if came_as_numpy else q.device
        distances = _fill(where, "D", D, _output(distances, came_as_numpy, device))
        ids = _fill(where, "I", I, _output(ids, came_as_numpy, device))
        return distances, ids

    def assign(self, x, k, labels=None):
        """The ids of the k best matches (FAISS's assign: search without the distances)."""
        return self.search(x, k, I=labels)[1]

    # ---- decode ----
    def reconstruct_batch(self, keys, x=None):
        """The decoded vectors [n, d] of the given ids (KeyError when one is absent); numpy out unless the
        ids came as a torch tensor."""
        where = self._where("reconstruct_batch")
        self._require_trained("reconstruct_batch")
        as_tensor = isinstance(keys, Tensor)
        vectors = self._native.reconstruct(_id_list(where, keys))
        return _fill(where, "x", x, vectors if as_tensor else vectors.numpy())

    def reconstruct(self, key, x=None):
        """The decoded vector [d] of id `key` (by id, with or without make_direct_map on IVF indexes)."""
        where = self._where("reconstruct")
        if not _is_int(key):
            raise TypeError(f"{where}: key must be an int id, got {type(key).__name__}")
        self._require_trained("reconstruct")
        return _fill(where, "x", x, self._native.reconstruct([int(key)])[0].numpy())

    def reconstruct_n(self, i0=0, ni=-1, x=None):
        """The decoded vectors of ids i0 .. i0 + ni − 1 (ni = −1: up to the largest id); KeyError if one
        is absent (FAISS's flat indexes number vectors by position, which equals the id until remove_ids)."""
        where = self._where("reconstruct_n")
        if not _is_int(i0) or not _is_int(ni) or i0 < 0 or ni < -1:
            raise ValueError(f"{where}: i0 must be an int >= 0 and ni an int >= -1, got i0 = {i0!r}, ni = {ni!r}")
        self._require_trained("reconstruct_n")
        if ni == -1:
            ni = max(int(self._native.ids.max()) + 1 - int(i0), 0) if self.ntotal else 0
        ids = torch.arange(int(i0), int(i0) + int(ni), dtype=torch.int64)
        if ni == 0:
            return _fill(where, "x", x, np.zeros((0, self.d), dtype=np.float32))
        return _fill(where, "x", x, self._native.reconstruct(ids).numpy())


class _ProductQuantizerView:
    """index.pq: FAISS's ProductQuantizer sizes (read-only); the codebooks are index.native.codebooks."""

    def __init__(self, native: PQIndex):
        self.d, self.M, self.nbits = native.d, native.M, native.nbits
        self.ksub, self.dsub = 2**native.nbits, native.d // native.M
        self.code_size = (native.M * native.nbits + 7) // 8

    def __repr__(self) -> str:
        return f"ProductQuantizer(d={self.d}, M={self.M}, nbits={self.nbits})"


def _empty_like(native: PQIndex) -> PQIndex:
    if isinstance(native, IVFPQIndex):
        return IVFPQIndex(native.d, native.nlist, native.M, native.nbits, native.metric, native.by_residual)
    return PQIndex(native.d, native.M, native.nbits, native.metric)


def _check_pq_shape(where: str, d, M) -> Tuple[int, int]:
    d, M = _positive_int(where, "d", d), _positive_int(where, "M", M)
    if d % M:
        raise ValueError(f"{where}: d must be a multiple of M (the number of sub-quantizers), got d = {d}, M = {M}")
    return d, M


def _check_bbs(where: str, bbs) -> None:
    if bbs != _FASTSCAN_BLOCK:
        raise ValueError(
            f"{where}: bbs must be {_FASTSCAN_BLOCK} (fastcore_ai's fast-scan block; results do not depend on "
            f"it, so drop FAISS's _{bbs!r} suffix / argument), got {bbs!r}"
        )


def _check_quantizer(where: str, quantizer) -> None:
    if quantizer is not None:
        raise TypeError(
            f"{where}: quantizer must be None: the coarse quantizer (nlist k-means centroids) is built and "
            f"trained inside the index; FAISS's IndexFlatL2/IndexFlatIP are not provided, got "
            f"{type(quantizer).__name__}"
        )


class IndexPQ(Index):
    """FAISS's IndexPQ(d, M, nbits, metric): exhaustive exact ADC over nbits-bit codes (8 or 4)."""

    def __init__(self, d, M, nbits=8, metric=METRIC_L2):
        where = _where("IndexPQ", "")
        d, M = _check_pq_shape(where, d, M)
        if not _is_int(nbits) or int(nbits) not in (4, 8):
            raise ValueError(f"{where}: nbits must be 8 or 4 (the code widths fastcore_ai stores), got {nbits!r}")
        self._attach(PQIndex(d, M, int(nbits), _metric_name(where, metric)))

    def _native_search(self, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        native = self._native
        if native.nbits == 8:
            return native.search(q, k)
        # FAISS's IndexPQ with 4-bit codes scans them with exact float tables; PQIndex(nbits=4) is the
        # fast-scan, so scan its codes with the exact ADC op (any ksub <= 256) and map rows to ids.
        q = q.detach().to("cpu", torch.float32).contiguous()
        distances, rows = ops.pq_search(q, native.codes, native.codebooks, k, native.metric)
        if len(native):
            rows = torch.where(rows >= 0, native.ids[rows.clamp_min(0)], rows)
        return distances, rows


class IndexPQFastScan(Index):
    """FAISS's IndexPQFastScan(d, M, nbits=4, metric, bbs=32): 4-bit codes scanned with quantized
    tables (SIMD shuffles), FAISS's PQ{M}x4fs."""

    _read_only = Index._read_only | {"bbs"}

    def __init__(self, d, M, nbits=4, metric=METRIC_L2, bbs=_FASTSCAN_BLOCK):
        where = _where("IndexPQFastScan", "")
        d, M = _check_pq_shape(where, d, M)
        if nbits != 4:
            raise ValueError(f"{where}: nbits must be 4 (fast-scan codes are 4-bit), got {nbits!r}")
        _check_bbs(where, bbs)
        self._attach(PQIndex(d, M, 4, _metric_name(where, metric)))

    @property
    def bbs(self) -> int:
        return _FASTSCAN_BLOCK


class _IVFIndex(Index):
    """What IndexIVFPQ and IndexIVFPQFastScan share: nlist, nprobe (a plain attribute, default 1 as in
    FAISS; values above nlist scan every list), make_direct_map (a no-op: reconstruct works by id)."""

    _unsupported = {**_UNSUPPORTED_COMMON, **_UNSUPPORTED_IVF}
    _read_only = Index._read_only | {"nlist", "by_residual"}

    def _attach(self, native: PQIndex) -> None:
        super()._attach(native)
        object.__setattr__(self, "_nprobe", 1)

    @property
    def nlist(self) -> int:
        return self._native.nlist

    @property
    def by_residual(self) -> bool:
        return self._native.by_residual

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value) -> None:
        object.__setattr__(self, "_nprobe", _positive_int(self._where("nprobe"), "nprobe", value))

    def make_direct_map(self, new_maintain=True) -> None:
        """A no-op kept for ported code: reconstruct finds vectors by id without a direct map."""

    def _native_search(self, q: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        return self._native.search(q, k, nprobe=self._nprobe)

    def _describe(self) -> str:
        return f"nlist={self.nlist} nprobe={self.nprobe} {super()._describe()}"


class IndexIVFPQ(_IVFIndex):
    """FAISS's IndexIVFPQ(quantizer, d, nlist, M, nbits, metric): coarse k-means + residual PQ
    (by_residual=True), IVF{nlist},PQ{M}[x{nbits}]. quantizer must be None (built inside)."""

    def __init__(self, quantizer, d, nlist, M, nbits=8, metric=METRIC_L2):
        where = _where("IndexIVFPQ", "")
        _check_quantizer(where, quantizer)
        d, M = _check_pq_shape(where, d, M)
        nlist = _positive_int(where, "nlist", nlist)
        if not _is_int(nbits) or int(nbits) not in (4, 8):
            raise ValueError(f"{where}: nbits must be 8 or 4 (the code widths fastcore_ai stores), got {nbits!r}")
        self._attach(IVFPQIndex(d, nlist, M, int(nbits), _metric_name(where, metric), by_residual=True))


class IndexIVFPQFastScan(_IVFIndex):
    """FAISS's IndexIVFPQFastScan(quantizer, d, nlist, M, nbits=4, metric, bbs=32): coarse k-means +
    non-residual 4-bit fast-scan codes, IVF{nlist},PQ{M}x4fs. quantizer must be None (built inside)."""

    _read_only = _IVFIndex._read_only | {"bbs"}

    def __init__(self, quantizer, d, nlist, M, nbits=4, metric=METRIC_L2, bbs=_FASTSCAN_BLOCK):
        where = _where("IndexIVFPQFastScan", "")
        _check_quantizer(where, quantizer)
        d, M = _check_pq_shape(where, d, M)
        nlist = _positive_int(where, "nlist", nlist)
        if nbits != 4:
            raise ValueError(f"{where}: nbits must be 4 (fast-scan codes are 4-bit), got {nbits!r}")
        _check_bbs(where, bbs)
        self._attach(IVFPQIndex(d, nlist, M, 4, _metric_name(where, metric), by_residual=False))

    @property
    def bbs(self) -> int:
        return _FASTSCAN_BLOCK


# ---------------------------------------------------------------------------------------------------------
# index_factory: FAISS's grammar (faiss/index_factory.cpp) for the indexes above
# ---------------------------------------------------------------------------------------------------------

SUPPORTED_DESCRIPTIONS = (
    "PQ{M}",
    "PQ{M}x{nbits} (nbits 8 or 4)",
    "PQ{M}x4fs",
    "IVF{nlist},PQ{M}",
    "IVF{nlist},PQ{M}x{nbits}",
    "IVF{nlist},PQ{M}x4fs",
)
_PQ_EXACT = re.compile(r"PQ([0-9]+)(?:x([0-9]+))?(np)?")
_PQ_FASTSCAN = re.compile(r"PQ([0-9]+)x4fs(?:_([0-9]+))?")
_IVF = re.compile(r"IVF([0-9]+)")
_IDMAP = ("IDMap", "IDMap2")

# What FAISS builds for the tokens we do not: (pattern, meaning). First match wins.
_FAISS_MEANINGS = (
    (r"PQ[0-9]+x4fsr(_[0-9]+)?", "by-residual fast-scan, IndexIVFPQFastScan with by_residual (after IVF only)"),
    (r"PQ[0-9]+x4fs_[0-9]+", "a fast-scan PQ laid out in blocks of bbs vectors, the number after '_'"),
    (r"PQ[0-9]+(x[0-9]+)?fs.*", "a fast-scan PQ, which needs 4-bit codes: PQ{M}x4fs"),
    (r"PQ[0-9]+(x[0-9]+)?\+[0-9]+", "IndexIVFPQR (PQ codes refined by a second PQ)"),
    (r"PQ[0-9]+x[0-9]+(np)?", "IndexPQ / IndexIVFPQ with that many bits per sub-quantizer code"),
    (r"IVF[0-9]+_HNSW[0-9]*.*", "an IVF whose coarse quantizer is an HNSW graph over the centroids"),
    (r"IVF[0-9]+_NSG[0-9]*.*", "an IVF whose coarse quantizer is an NSG graph over the centroids"),
    (r"IVF[0-9]+\(.*\)", "an IVF with an explicitly described coarse quantizer"),
    (r"IVF[0-9]+_.*", "an IVF with a non-flat coarse quantizer"),
    (r"IMI[0-9]+x[0-9]+", "a multi-index (IMI) coarse quantizer"),
    (r"(?i:pq|ivf|imi)[0-9].*", "no index: the grammar is case-sensitive, e.g. PQ16, IVF1024,PQ16"),
    (r"Flat", "IndexFlat: exact search over the raw vectors (after IVF: IndexIVFFlat, raw vectors in the lists)"),
    (r"RFlat", "IndexRefineFlat: re-ranking with exact distances to the stored raw vectors"),
    (r"Refine\(.*\)", "IndexRefine: re-ranking with a second index"),
    (r"HNSW[0-9]*(_.*)?", "an HNSW graph index (IndexHNSW)"),
    (r"NSG[0-9]*(_.*)?", "an NSG graph index (IndexNSG)"),
    (r"OPQ[0-9]+(_[0-9]+)?", "an OPQ rotation pre-transform (IndexPreTransform with an OPQMatrix)"),
    (r"PCAW?R?[0-9]+", "a PCA pre-transform (IndexPreTransform)"),
    (r"RR[0-9]+", "a random-rotation pre-transform (IndexPreTransform)"),
    (r"ITQ.*", "an ITQ rotation pre-transform (IndexPreTransform)"),
    (r"L2norm", "an L2-normalization pre-transform (use normalize_L2(x) on the vectors instead)"),
    (r"Pad[0-9]+", "a zero-padding pre-transform (IndexPreTransform)"),
    (r"SQ.*", "a scalar quantizer (IndexScalarQuantizer)"),
    (r"LSH.*", "IndexLSH (binary codes from random projections)"),
    (r"P?RQ.*|P?LSQ.*", "an additive quantizer (residual / local-search quantization)"),
    (r"IDMap2?", "an id-mapping wrapper, which needs an index after it, e.g. IDMap,PQ16"),
)


def _unsupported_token(token: str, description: str, note: str = "") -> ValueError:
    meaning = next((m for pattern, m in _FAISS_MEANINGS if re.fullmatch(pattern, token)), None)
    what = f" (FAISS: {meaning})" if meaning else ""
    return ValueError(
        f"fastcore_ai.search.index_factory: unsupported token {token!r} in {description!r}{what}{note}; "
        f"supported: {', '.join(SUPPORTED_DESCRIPTIONS)}"
    )


def _encoding(token: str, description: str):
    """(kind, M, nbits) of a PQ encoding token, kind 'exact' or 'fastscan'; ValueError for anything else."""
    exact = _PQ_EXACT.fullmatch(token)
    if exact:
        nbits = int(exact.group(2)) if exact.group(2) else 8
        if nbits not in (4, 8):
            raise _unsupported_token(token, description, f": nbits = {nbits}, fastcore_ai stores 8- and 4-bit codes")
        # "np" = no polysemous training. FAISS's polysemous training only permutes the centroids (for a
        # Hamming filter that is off unless polysemous_ht is set); ADC results are the same, and this
        # library never does it, so PQ{M}np is PQ{M}.
        return "exact", int(exact.group(1)), nbits
    fastscan = _PQ_FASTSCAN.fullmatch(token)
    if fastscan:
        if fastscan.group(2) is not None and int(fastscan.group(2)) != _FASTSCAN_BLOCK:
            raise _unsupported_token(
                token,
                description,
                f": bbs = {int(fastscan.group(2))}; fastcore_ai's fast-scan blocks hold {_FASTSCAN_BLOCK} vectors "
                "(results do not depend on it: drop the suffix)",
            )
        return "fastscan", int(fastscan.group(1)), 4
    raise _unsupported_token(token, description)


def index_factory(d, description, metric=METRIC_L2) -> Index:
    """FAISS's index_factory for the product-quantization indexes fastcore_ai provides:

    PQ{M}, PQ{M}x8, PQ{M}x4          -> IndexPQ (exact ADC; "np" suffix accepted, a no-op here)
    PQ{M}x4fs                        -> IndexPQFastScan
    IVF{nlist},PQ{M}[x8|x4]          -> IndexIVFPQ (by residual)
    IVF{nlist},PQ{M}x4fs             -> IndexIVFPQFastScan (not by residual, FAISS's default)

    A leading "IDMap," / "IDMap2," is accepted (every index here keeps ids). Anything else raises a
    ValueError naming the unsupported token and what FAISS would build for it."""
    where = "fastcore_ai.search.index_factory"
    d = _positive_int(where, "d", d)
    if not isinstance(description, str):
        raise TypeError(f"{where}: description must be a str such as 'IVF256,PQ16', got {type(description).__name__}")
    _metric_name(where, metric)
    tokens = description.split(",")
    while tokens and tokens[0] in _IDMAP and len(tokens) > 1:
        tokens = tokens[1:]
    nlist = None
    ivf = _IVF.fullmatch(tokens[0])
    if ivf:
        nlist = int(ivf.group(1))
        if nlist < 1:
            raise ValueError(f"{where}: {tokens[0]!r} in {description!r}: nlist must be >= 1")
        if len(tokens) == 1:
            raise ValueError(
                f"{where}: {description!r} has no encoding after {tokens[0]!r}; write e.g. '{tokens[0]},PQ16'"
            )
        tokens = tokens[1:]
    elif re.fullmatch(r"(IVF|IMI).*", tokens[0]):
        raise _unsupported_token(tokens[0], description)
    kind, M, nbits = _encoding(tokens[0], description)
    if len(tokens) > 1:
        raise _unsupported_token(tokens[1], description, f" (after {tokens[0]!r})")
    if M < 1:
        raise ValueError(f"{where}: {tokens[0]!r} in {description!r}: M must be >= 1")
    if d % M:
        raise ValueError(f"{where}: d = {d} must be a multiple of M = {M} (in {description!r})")
    if nlist is None:
        return IndexPQFastScan(d, M, 4, metric) if kind == "fastscan" else IndexPQ(d, M, nbits, metric)
    if kind == "fastscan":
        return IndexIVFPQFastScan(None, d, nlist, M, 4, metric)
    return IndexIVFPQ(None, d, nlist, M, nbits, metric)


# ---------------------------------------------------------------------------------------------------------
# Files and module helpers
# ---------------------------------------------------------------------------------------------------------


# The classes a file can name, with the native indexes each can hold (a file naming another pairing was
# tampered with). Without an annotation (a file from PQIndex.save) the first class that holds the native
# index is read: 4-bit codes are fast-scan codes unless the file says IndexPQ.
_FILE_CLASSES = {
    "IndexIVFPQFastScan": (
        IndexIVFPQFastScan,
        lambda native: isinstance(native, IVFPQIndex) and native.nbits == 4 and not native.by_residual,
    ),
    "IndexIVFPQ": (IndexIVFPQ, lambda native: isinstance(native, IVFPQIndex)),
    "IndexPQFastScan": (IndexPQFastScan, lambda native: type(native) is PQIndex and native.nbits == 4),
    "IndexPQ": (IndexPQ, lambda native: type(native) is PQIndex),
}


def _check_path(where: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__} (no FAISS IOWriter)")
    return os.fspath(path)


def write_index(index: Index, path) -> None:
    """Write the index in fastcore_ai's own format (versioned header, checksum, atomic rename; not
    FAISS's binary format: FAISS cannot read it, and read_index cannot read FAISS files)."""
    where = "fastcore_ai.search.write_index"
    if not isinstance(index, Index):
        raise TypeError(
            f"{where}: index must be a fastcore_ai.search index (from index_factory or read_index), "
            f"got {type(index).__name__}"
        )
    path = _check_path(where, path)
    # the class (IndexPQ and IndexPQFastScan both hold a 4-bit PQIndex; they differ in the scan) and the
    # search-time nprobe travel as annotations, so read_index gives back the index that was written
    annotations = {"faiss_class": type(index).__name__}
    if isinstance(index, _IVFIndex):
        annotations["nprobe"] = index.nprobe
    index.native.save(path, annotations=annotations)


def read_index(path, io_flags=0) -> Index:
    """Read a file written by write_index (or by PQIndex / IVFPQIndex.save). IndexFileError (a ValueError)
    when it is truncated, tampered with or not a fastcore_ai index file."""
    where = "fastcore_ai.search.read_index"
    path = _check_path(where, path)
    if io_flags != 0:
        raise NotImplementedError(
            f"{where}: io_flags (FAISS's mmap / read-only flags) is not supported, got {io_flags!r}"
        )
    native, annotations = load_index_and_annotations(path)
    default = next(name for name, (_, holds) in _FILE_CLASSES.items() if holds(native))
    name = annotations.get("faiss_class", default)
    cls, holds = _FILE_CLASSES.get(name, (None, None)) if isinstance(name, str) else (None, None)
    if cls is None or not holds(native):
        raise IndexFileError(
            f"{where}: {path!r} records class {name!r}, which cannot hold its {type(native).__name__} (nbits={native.nbits})"
        )
    index = cls._wrap(native)
    if "nprobe" in annotations:
        try:
            if not isinstance(index, _IVFIndex):
                raise ValueError("only IVF indexes have an nprobe")
            index.nprobe = annotations["nprobe"]  # the setter's own checks
        except (TypeError, ValueError) as error:
            raise IndexFileError(
                f"{where}: {path!r} records nprobe={annotations['nprobe']!r} for a {name} ({error})"
            ) from error
    return index


def clone_index(index: Index) -> Index:
    """An independent deep copy (FAISS's clone_index)."""
    if not isinstance(index, Index):
        raise TypeError(
            f"fastcore_ai.search.clone_index: index must be a fastcore_ai.search index, got {type(index).__name__}"
        )
    return copy.deepcopy(index)


def normalize_L2(x) -> None:
    """Scale each row of x to unit L2 norm in place (FAISS's normalize_L2; zero rows stay zero). x: a
    float32 C-contiguous numpy array (as FAISS requires) or a floating torch tensor."""
    where = "fastcore_ai.search.normalize_L2"
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2:
            raise TypeError(f"{where}: x must be a 2-D float32 C-contiguous array, got {x.dtype} {x.shape}")
        if not x.flags.writeable:
            raise ValueError(f"{where}: x is read-only; normalize_L2 works in place")
        norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
        np.divide(x, norms[:, None], out=x, where=norms[:, None] > 0)
        return None
    if isinstance(x, Tensor):
        if not x.is_floating_point() or x.dim() != 2:
            raise TypeError(f"{where}: x must be a 2-D floating tensor, got {x.dtype} {tuple(x.shape)}")
        with torch.no_grad():
            norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            x.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        return None
    raise TypeError(f"{where}: x must be a numpy array or torch.Tensor, got {type(x).__name__}")


def omp_set_num_threads(n) -> None:
    """FAISS's omp_set_num_threads: here torch.set_num_threads (the kernels use torch's thread pool)."""
    torch.set_num_threads(_positive_int("fastcore_ai.search.omp_set_num_threads", "n", n))


def omp_get_max_threads() -> int:
    return torch.get_num_threads()

"""Product-quantization indexes (PQIndex, IVFPQIndex, ShardedPQIndex) built on fastcore_ai.ops, and their
FAISS-style API (index_factory, IndexPQ, ..., write_index / read_index): `import fastcore_ai.search as faiss`."""

from . import faiss_compat as _faiss_compat
from .faiss_compat import *  # noqa: F401,F403  (the FAISS-style names, listed once in faiss_compat.__all__)
from .index import IndexFileError, IVFPQIndex, PQIndex, load_index, load_index_and_annotations
from .sharded import ShardedPQIndex

__all__ = [
    "PQIndex",
    "IVFPQIndex",
    "ShardedPQIndex",
    "IndexFileError",
    "load_index",
    "load_index_and_annotations",
] + _faiss_compat.__all__

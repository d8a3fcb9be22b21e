"""Product-quantization indexes (PQIndex, IVFPQIndex, ShardedPQIndex) built on fastcore_ai.ops, and their
FAISS-style API (index_factory, IndexPQ, ..., write_index / read_index): `import fastcore_ai.search as faiss`."""

from .faiss_compat import (
    METRIC_INNER_PRODUCT,
    METRIC_L2,
    Index,
    IndexIVFPQ,
    IndexIVFPQFastScan,
    IndexPQ,
    IndexPQFastScan,
    clone_index,
    index_factory,
    normalize_L2,
    omp_get_max_threads,
    omp_set_num_threads,
    read_index,
    write_index,
)
from .index import IndexFileError, IVFPQIndex, PQIndex, load_index
from .sharded import ShardedPQIndex

__all__ = [
    "PQIndex",
    "IVFPQIndex",
    "ShardedPQIndex",
    "IndexFileError",
    "load_index",
    "METRIC_L2",
    "METRIC_INNER_PRODUCT",
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
    "omp_set_num_threads",
    "omp_get_max_threads",
]

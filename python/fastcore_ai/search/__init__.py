"""Product-quantization indexes (PQIndex, IVFPQIndex, ShardedPQIndex) built on fastcore_ai.ops."""

from .index import IndexFileError, IVFPQIndex, PQIndex, load_index
from .sharded import ShardedPQIndex

__all__ = ["PQIndex", "IVFPQIndex", "ShardedPQIndex", "IndexFileError", "load_index"]

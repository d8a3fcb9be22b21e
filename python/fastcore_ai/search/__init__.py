"""Product-quantization indexes (PQIndex, IVFPQIndex, ShardedPQIndex) built on fastcore_ai.ops."""
__all__: list = []

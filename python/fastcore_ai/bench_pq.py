"""Benchmark cases of the pq family (product-quantization search) for fastcore_ai.bench: family name -> cases(device, quick)."""
FAMILIES: dict = {}

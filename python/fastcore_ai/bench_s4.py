"""Benchmark cases of the s4 family (S4/S4D state-space kernels) for fastcore_ai.bench: family name -> cases(device, quick)."""
FAMILIES: dict = {}

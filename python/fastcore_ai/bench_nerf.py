"""Benchmark cases of the nerf family (NeRF ray marching and rendering) for fastcore_ai.bench: family name -> cases(device, quick)."""
FAMILIES: dict = {}

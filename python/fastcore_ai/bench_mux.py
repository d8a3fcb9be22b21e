"""Benchmark cases of the mux family (DataMUX multiplexing and attention) for fastcore_ai.bench: family name -> cases(device, quick)."""
FAMILIES: dict = {}

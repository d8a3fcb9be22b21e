"""product-quantization search: float64 pure-torch references."""
__all__: list = []

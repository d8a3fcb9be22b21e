"""product-quantization search: functional ops."""
__all__: list = []

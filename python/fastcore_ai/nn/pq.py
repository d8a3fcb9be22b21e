"""product-quantization search: layers."""

__all__: list = []

"""DataMUX multiplexing and attention: layers."""
__all__: list = []

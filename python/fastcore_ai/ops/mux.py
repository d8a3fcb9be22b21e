"""DataMUX multiplexing and attention: functional ops."""
__all__: list = []

"""DataMUX multiplexing and attention: float64 pure-torch references."""
__all__: list = []

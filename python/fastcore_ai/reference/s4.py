"""S4/S4D state-space kernels: float64 pure-torch references."""
__all__: list = []

"""NeRF ray marching and rendering: float64 pure-torch references."""
__all__: list = []

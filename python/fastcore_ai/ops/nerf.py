"""NeRF ray marching and rendering: functional ops."""
__all__: list = []

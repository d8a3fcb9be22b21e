"""NeRF ray marching and rendering: layers."""
__all__: list = []

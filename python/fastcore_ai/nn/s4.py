"""S4/S4D state-space kernels: layers."""
__all__: list = []

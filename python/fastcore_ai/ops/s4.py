"""S4/S4D state-space kernels: functional ops."""
__all__: list = []

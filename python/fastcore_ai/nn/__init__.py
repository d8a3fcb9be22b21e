"""Drop-in torch.nn layers built on fastcore_ai.ops."""
from .moe import TopKRouter

__all__ = ["TopKRouter"]

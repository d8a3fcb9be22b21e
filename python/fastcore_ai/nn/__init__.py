"""Drop-in torch.nn layers built on fastcore_ai.ops."""
from .moe import MoE, MoEExperts, TopKRouter

__all__ = ["TopKRouter", "MoEExperts", "MoE"]

"""Drop-in torch.nn layers built on fastcore_ai.ops."""
from .moe import MoE, MoEExperts, TopKRouter
from .moe_parallel import ExpertParallelMoE

__all__ = ["TopKRouter", "MoEExperts", "MoE", "ExpertParallelMoE"]

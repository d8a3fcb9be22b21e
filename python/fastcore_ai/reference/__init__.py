"""Pure-PyTorch references: readable, any dtype including float64, the oracle every backend is
tested against. They are also the `reference` backend."""
from .moe import moe_topk_route, moe_topk_route_backward

__all__ = ["moe_topk_route", "moe_topk_route_backward"]

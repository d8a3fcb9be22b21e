"""Pure-PyTorch references: readable, any dtype including float64, the oracle every backend is
tested against. They are also the `reference` backend."""
from .moe import moe_topk_route, moe_topk_route_backward
from .moe_permute import dispatch_plan, moe_combine, moe_combine_backward, moe_dispatch

__all__ = ["moe_topk_route", "moe_topk_route_backward", "moe_dispatch", "moe_combine", "moe_combine_backward",
           "dispatch_plan"]

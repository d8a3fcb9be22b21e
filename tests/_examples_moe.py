"""Sample calls of the moe ops (format: tests/_examples.py)."""
import torch

from fastcore_ai import ops


def _route():
    logits = torch.randn(17, 9, requires_grad=True)
    return [(logits, 3, True), (logits.detach()[:, 1:8], 2, False)]


def _route_backward():
    logits = torch.randn(17, 9)
    weights, ids, _, _, _, lse = torch.ops.fastcore_ai.moe_topk_route(logits, 3, True, "cpu")
    return [(logits, ids, weights, lse, torch.randn(17, 3), torch.randn(()), torch.randn(9), True)]


REGISTERED = {
    "moe_topk_route": _route,
    "moe_topk_route_backward": _route_backward,
}

PUBLIC = {
    "moe_topk_route": lambda: (lambda x: tuple(ops.moe_topk_route(x, 3, capacity_factor=1.0)), (torch.randn(33, 12),)),
}

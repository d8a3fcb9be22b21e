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


# ---- dispatch / combine / grouped MLP / experts ---------------------------------------------------


def _experts_inputs(T=11, H=6, I=4, E=3, k=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=generator)
    ids = torch.randint(0, E, (T, k), generator=generator)
    weights = torch.rand(T, k, generator=generator)
    kept = torch.rand(T, k, generator=generator) > 0.25
    w1 = torch.randn(E, 2 * I, H, generator=generator) / H**0.5
    w2 = torch.randn(E, H, I, generator=generator) / I**0.5
    return x, ids, weights, kept, w1, w2


def _plan(x, ids, kept, E):
    return torch.ops.fastcore_ai.moe_dispatch(x, ids, kept, E, "cpu")


def _dispatch():
    x, ids, _, kept, _, w2 = _experts_inputs()
    return [(x.requires_grad_(), ids, kept, w2.shape[0]), (x.detach()[:, 1:5], ids, None, w2.shape[0])]


def _dispatch_backward():
    x, ids, _, kept, _, w2 = _experts_inputs()
    x_sorted, _, _, token_slot = _plan(x, ids, kept, w2.shape[0])
    return [(torch.randn_like(x_sorted), token_slot)]


def _combine():
    x, ids, weights, kept, _, w2 = _experts_inputs()
    x_sorted, _, slot_to_token, token_slot = _plan(x, ids, kept, w2.shape[0])
    return [
        (x_sorted.requires_grad_(), slot_to_token, token_slot, weights.requires_grad_()),
        (x_sorted.detach(), slot_to_token, token_slot, weights.detach()),
    ]


def _combine_backward():
    x, ids, weights, kept, _, w2 = _experts_inputs()
    x_sorted, _, slot_to_token, token_slot = _plan(x, ids, kept, w2.shape[0])
    grad_out = torch.randn_like(x)
    return [
        (grad_out, x_sorted, slot_to_token, token_slot, weights, True),
        (grad_out, x_sorted, slot_to_token, token_slot, weights, False),
    ]


def _grouped_mlp():
    x, ids, _, kept, w1, w2 = _experts_inputs()
    x_sorted, offsets, _, _ = _plan(x, ids, kept, w2.shape[0])
    return [
        (x_sorted.requires_grad_(), offsets, w1.requires_grad_(), w2.requires_grad_(), "silu", True),
        (x_sorted.detach(), offsets, w1.detach()[:, :4], w2.detach(), "gelu", False),
    ]


def _grouped_mlp_backward():
    x, ids, _, kept, w1, w2 = _experts_inputs()
    x_sorted, offsets, _, _ = _plan(x, ids, kept, w2.shape[0])
    y, gate_up = torch.ops.fastcore_ai.moe_grouped_mlp(x_sorted, offsets, w1, w2, "silu", True, "cpu")
    return [(torch.randn_like(y), x_sorted, offsets, w1, w2, gate_up, "silu", True)]


def _experts():
    x, ids, weights, kept, w1, w2 = _experts_inputs()
    return [
        (x.requires_grad_(), ids, weights.requires_grad_(), kept, w1.requires_grad_(), w2, "silu", True),
        (x.detach(), ids, weights.detach(), None, w1.detach(), w2, "relu", True),
    ]


def _experts_train():
    x, ids, weights, kept, w1, w2 = _experts_inputs()
    return [(x.requires_grad_(), ids, weights.requires_grad_(), kept, w1.requires_grad_(), w2, "silu", True)]


def _experts_backward():
    x, ids, weights, kept, w1, w2 = _experts_inputs()
    out, gate_up, offsets, slot_to_token, token_slot = torch.ops.fastcore_ai.moe_experts_train(
        x, ids, weights, kept, w1, w2, "silu", True, "cpu"
    )
    grad_out = torch.randn_like(out)
    return [
        (grad_out, x, offsets, slot_to_token, token_slot, weights, gate_up, w1, w2, "silu", True, True, True, True),
        (grad_out, x, offsets, slot_to_token, token_slot, weights, gate_up, w1, w2, "silu", True, False, True, False),
    ]


REGISTERED.update(
    {
        "moe_dispatch": _dispatch,
        "moe_dispatch_backward": _dispatch_backward,
        "moe_combine": _combine,
        "moe_combine_backward": _combine_backward,
        "moe_grouped_mlp": _grouped_mlp,
        "moe_grouped_mlp_backward": _grouped_mlp_backward,
        "moe_experts": _experts,
        "moe_experts_train": _experts_train,
        "moe_experts_backward": _experts_backward,
    }
)


def _public_dispatch():
    x, ids, _, kept, _, w2 = _experts_inputs()

    def fn(x, ids, kept):
        x_sorted, plan = ops.moe_dispatch(x, ids, kept, 3)
        return (x_sorted, *plan)

    return fn, (x, ids, kept)


def _public_combine():
    x, ids, weights, kept, _, w2 = _experts_inputs()
    y_sorted, plan = ops.moe_dispatch(x, ids, kept, 3)
    return (
        lambda y, offsets, slot_to_token, token_slot, w: ops.moe_combine(
            y, ops.DispatchPlan(offsets, slot_to_token, token_slot), w
        )
    ), (y_sorted, *plan, weights)


def _public_grouped_mlp():
    x, ids, _, kept, w1, w2 = _experts_inputs()
    x_sorted, plan = ops.moe_dispatch(x, ids, kept, 3)
    return (lambda x_sorted, offsets, w1, w2: ops.moe_grouped_mlp(x_sorted, offsets, w1, w2)), (
        x_sorted,
        plan.expert_offsets,
        w1,
        w2,
    )


def _public_experts():
    x, ids, weights, kept, w1, w2 = _experts_inputs()
    return (lambda x, ids, weights, kept, w1, w2: ops.moe_experts(x, ids, weights, w1, w2, kept=kept)), (
        x,
        ids,
        weights,
        kept,
        w1,
        w2,
    )


PUBLIC.update(
    {
        "moe_dispatch": _public_dispatch,
        "moe_combine": _public_combine,
        "moe_grouped_mlp": _public_grouped_mlp,
        "moe_experts": _public_experts,
    }
)

"""Sample calls of the mux ops (format: tests/_examples.py)."""

import torch

from fastcore_ai import ops


def _qkv(B=2, H=2, Lq=5, Lk=7, D=8, requires_grad=True):
    return tuple(torch.randn(B, H, L, D, requires_grad=requires_grad) for L in (Lq, Lk, Lk))


def _attention():
    q, k, v = _qkv()
    bool_mask = torch.rand(5, 7) > 0.3
    bool_mask[:, 0] = True
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    additive = torch.randn(2, 1, 5, 7, requires_grad=True)  # differentiable, broadcast over heads
    return [
        (q, k, v, None, None, False, 0.35),
        (q, k, v, bool_mask, padding, True, 0.5),
        (q, k, v, additive, None, False, 0.35),
        (q.detach()[:, :, :1], k.detach(), v.detach(), None, padding, False, 0.25),  # one decode query
        # grouped-query attention: one kv head for both query heads
        (
            q,
            k.detach()[:, :1].clone().requires_grad_(),
            v.detach()[:, :1].clone().requires_grad_(),
            None,
            padding,
            True,
            0.35,
        ),
        (q.detach()[:, :, :3], k.detach()[:, 1:], v.detach()[:, 1:], bool_mask[:3], None, False, 0.3),
    ]


def _attention_backward():
    q, k, v = _qkv(requires_grad=False)
    bool_mask = torch.rand(5, 7) > 0.3
    bool_mask[:, 0] = True
    additive = torch.randn(1, 2, 5, 7)
    cases = []
    for mask, padding, causal, need_mask_grad in (
        (None, None, False, False),
        (bool_mask, None, True, False),
        (additive, torch.zeros(2, 7, dtype=torch.bool), False, True),
    ):
        out, lse = torch.ops.fastcore_ai.mux_attention(q, k, v, mask, padding, causal, 0.35, "cpu")
        cases.append((torch.randn_like(out), q, k, v, out, lse, mask, padding, causal, 0.35, need_mask_grad))
    kg, vg = k[:, :1].contiguous(), v[:, :1].contiguous()  # grouped-query: one kv head for both query heads
    out, lse = torch.ops.fastcore_ai.mux_attention(q, kg, vg, additive, None, True, 0.35, "cpu")
    cases.append((torch.randn_like(out), q, kg, vg, out, lse, additive, None, True, 0.35, True))
    return cases


def _mux():
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    return [
        (x, torch.randn(3, 8, requires_grad=True), 0),  # hadamard
        (x, torch.randn(3, 8, 8, requires_grad=True), 1),
    ]  # ortho


def _mux_backward():
    x, grad_out = torch.randn(2, 3, 4, 8), torch.randn(2, 4, 8)
    return [
        (grad_out, x, torch.randn(3, 8), 0, True),
        (grad_out, x, torch.randn(3, 8), 0, False),
        (grad_out, x, torch.randn(3, 8, 8), 1, True),
        (grad_out, x, torch.randn(3, 8, 8), 1, False),
    ]


def _demux_params(d=8, e=6, requires_grad=True):
    return (
        torch.randn(e, 2 * d, requires_grad=requires_grad),
        torch.randn(e, requires_grad=requires_grad),
        torch.randn(e, requires_grad=requires_grad),
        torch.randn(e, requires_grad=requires_grad),
    )


def _demux():
    h = torch.randn(2, 4, 8, requires_grad=True)
    return [
        (h, torch.randn(3, 8, requires_grad=True), *_demux_params(), 1e-5),  # shared keys [N, d]
        (h, torch.randn(2, 3, 8, requires_grad=True), *_demux_params(), 1e-3),
    ]  # per-sequence [B, N, d]


def _demux_backward():
    h = torch.randn(2, 4, 8)
    return [
        (torch.randn(6, 4, 6), h, torch.randn(3, 8), *_demux_params(requires_grad=False), 1e-5),
        (torch.randn(6, 4, 6), h, torch.randn(2, 3, 8), *_demux_params(requires_grad=False), 1e-5),
    ]


REGISTERED = {
    "mux_attention": _attention,
    "mux_attention_backward": _attention_backward,
    "mux_mux": _mux,
    "mux_mux_backward": _mux_backward,
    "mux_demux": _demux,
    "mux_demux_backward": _demux_backward,
}


def _public_attention():
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    return (lambda q, k, v, m: ops.attention(q, k, v, attn_mask=m, causal=True), (*_qkv(requires_grad=False), mask))


def _public_attention_with_lse():
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[0, 4:] = True
    return (
        lambda q, k, v, m, p: ops.attention_with_lse(q, k, v, attn_mask=m, key_padding_mask=p, scale=0.3),
        (*_qkv(requires_grad=False), torch.randn(5, 7), padding),
    )


PUBLIC = {
    "attention": _public_attention,
    "attention_with_lse": _public_attention_with_lse,
    "mux": lambda: (
        lambda x, keys: ops.mux(x, keys, "ortho", num_instances=3),
        (torch.randn(6, 4, 8), torch.linalg.qr(torch.randn(3, 8, 8))[0]),
    ),
    "demux": lambda: (
        lambda h, keys, w, b, nw, nb: ops.demux(h, keys, w, b, nw, nb),
        (torch.randn(2, 4, 8), torch.randn(3, 8), *_demux_params(requires_grad=False)),
    ),
}

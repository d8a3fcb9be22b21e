"""Per-call overhead (`bench --family overhead`): ops on tiny inputs, where the time is the Python and
dispatch cost of a call, not the kernel. A decode step pays it per layer per token, so the target is a
call within 1.5x of the torch code a user would write for the same tiny input (issue 16).

Each provider makes CALLS calls per timed sample, so `median ms` is CALLS calls; the shape column says so.
Peers: the torch composition a user writes (topk of softmax for the router, SDPA for attention, the
torch.fft composition for fft_conv, the elementwise step for ssm_step).
"""

from __future__ import annotations

import torch

from .. import ops
from .harness import Case
from .moe import torch_composition_router
from .s4 import torch_fft_conv, torch_ssm_step

CALLS = 100


def _loop(fn):
    def run(*inputs):
        out = None
        for _ in range(CALLS):
            out = fn(*inputs)
        return out

    return run


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _router_case() -> Case:
    def setup():
        return (torch.randn(4, 8),)

    def error(output, inputs):
        expected = ops.moe_topk_route(inputs[0].double(), 2, backend="reference").weights
        weights = output[0] if isinstance(output, tuple) else output
        return _rel(weights, expected)

    return Case(
        "overhead",
        f"moe_topk_route [4, 8] k=2, x{CALLS} calls",
        setup,
        {
            "fastcore_ai": _loop(lambda x: ops.moe_topk_route(x, 2)),
            "reference": _loop(lambda x: ops.moe_topk_route(x, 2, backend="reference")),
            "torch-composition": _loop(lambda x: torch_composition_router(x, 2)),
        },
        error,
        peer="torch-composition",
    )


def _attention_case(shape_q, length_k) -> Case:
    B, H, Lq, D = shape_q

    def setup():
        return (torch.randn(B, H, Lq, D), torch.randn(B, H, length_k, D), torch.randn(B, H, length_k, D))

    def error(output, inputs):
        q, k, v = (t.double() for t in inputs)
        return _rel(output, torch.nn.functional.scaled_dot_product_attention(q, k, v))

    sdpa = torch.nn.functional.scaled_dot_product_attention
    return Case(
        "overhead",
        f"attention q {list(shape_q)} k/v length {length_k}, x{CALLS} calls",
        setup,
        {
            "fastcore_ai": _loop(lambda q, k, v: ops.attention(q, k, v)),
            "reference": _loop(lambda q, k, v: ops.attention(q, k, v, backend="reference")),
            "sdpa": _loop(lambda q, k, v: sdpa(q, k, v)),
        },
        error,
        peer="sdpa",
    )


def _fft_conv_case() -> Case:
    def setup():
        return torch.randn(1, 4, 64), torch.randn(4, 64), torch.randn(4)

    def error(output, inputs):
        u, k, D = (t.double() for t in inputs)
        return _rel(output, torch_fft_conv(u, k, D))

    return Case(
        "overhead",
        f"fft_conv (1, 4, 64), x{CALLS} calls",
        setup,
        {
            "fastcore_ai": _loop(lambda u, k, D: ops.fft_conv(u, k, D)),
            "reference": _loop(lambda u, k, D: ops.fft_conv(u, k, D, backend="reference")),
            "torch-fft": _loop(torch_fft_conv),
        },
        error,
        peer="torch-fft",
    )


def _ssm_step_case() -> Case:
    B, H, N = 1, 4, 8

    def setup():
        cplx = torch.complex64
        return (
            torch.randn(B, H, N, dtype=cplx),
            torch.randn(B, H),
            0.9 * torch.randn(H, N, dtype=cplx),
            torch.randn(H, N, dtype=cplx),
            torch.randn(H, N, dtype=cplx),
            torch.randn(H),
        )

    def error(output, inputs):
        expected = torch_ssm_step(*(t.to(torch.complex128) if t.is_complex() else t.double() for t in inputs))
        return _rel(output[0], expected[0])

    return Case(
        "overhead",
        f"ssm_step B={B} H={H} N={N}, x{CALLS} calls",
        setup,
        {
            "fastcore_ai": _loop(lambda *a: ops.ssm_step(*a)),
            "reference": _loop(lambda *a: ops.ssm_step(*a, backend="reference")),
            "torch-composition": _loop(torch_ssm_step),
        },
        error,
        peer="torch-composition",
    )


def overhead_cases(device: str, quick: bool = False):
    if device != "cpu":
        return []  # GPU launch overhead is measured by make gpu-check's CUDA-event timings
    return [
        _router_case(),
        _attention_case((1, 1, 4, 8), 4),
        _attention_case((1, 8, 1, 64), 256),
        _fft_conv_case(),
        _ssm_step_case(),
    ]


FAMILIES = {"overhead": overhead_cases}

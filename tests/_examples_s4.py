"""Sample calls of the s4 ops (format: tests/_examples.py)."""

import math

import torch

from fastcore_ai import ops


def _poles(B, N, dtype=torch.complex64):
    """S4-like residues v and stable poles w (Re w < 0)."""
    v = torch.randn(B, N, dtype=dtype)
    w = torch.complex(-0.5 * torch.rand(B, N) - 0.05, math.pi * torch.arange(N) * (0.5 + torch.rand(B, N))).to(dtype)
    return v, w


def _nodes(L, dtype=torch.complex64):
    return torch.complex(torch.rand(L), 4 * torch.randn(L)).to(dtype)


def _cauchy():
    v, w = _poles(3, 5)
    v128, w128 = _poles(2, 4, torch.complex128)
    return [
        (v.requires_grad_(), _nodes(7), w.requires_grad_(), True),
        (v.detach(), _nodes(7), w.detach(), False),
        (v128.requires_grad_(), _nodes(3, torch.complex128), w128.requires_grad_(), True),
    ]


def _cauchy_backward():
    v, w = _poles(3, 5)
    return [
        (torch.randn(3, 7, dtype=torch.complex64), v, _nodes(7), w, True),
        (torch.randn(3, 7, dtype=torch.complex64), v, _nodes(7), w, False),
    ]


def _vandermonde():
    v, x = _poles(3, 5)
    x = x * 0.1
    return [
        (v.requires_grad_(), x.requires_grad_(), 9),
        (v.detach(), x.detach(), 0),
        (v.detach().to(torch.complex128), x.detach().to(torch.complex128), 4),
    ]


def _vandermonde_backward():
    v, x = _poles(3, 5)
    return [(torch.randn(3, 9), v, x * 0.1), (torch.randn(9, 3).t(), v, x * 0.1)]


def _fft_conv():
    u, k, D = torch.randn(2, 3, 10), torch.randn(3, 4), torch.randn(3)
    n = ops.fft_conv_size(10, 4)
    return [
        (u.requires_grad_(), k.requires_grad_(), D.requires_grad_(), n),
        (u.detach(), k.detach(), None, n),
        (u.detach().double(), k.detach().double(), D.detach().double(), n),
    ]


def _fft_conv_backward():
    u, k, D = torch.randn(2, 3, 10), torch.randn(3, 4), torch.randn(3)
    n = ops.fft_conv_size(10, 4)
    return [
        (torch.randn(2, 3, 10), u, k, D, n, True, True, True),
        (torch.randn(2, 3, 10), u, k, None, n, True, False, False),
        (torch.randn(10, 3, 2).permute(2, 1, 0), u, k, D, n, False, True, True),
    ]  # a strided grad


def _step_inputs(B=2, H=3, N=4, dtype=torch.complex64):
    dA = torch.exp(torch.complex(-0.1 * torch.rand(H, N), torch.randn(H, N))).to(dtype)
    dB, C = torch.randn(H, N, dtype=dtype), torch.randn(H, N, dtype=dtype)
    state = torch.randn(B, H, N, dtype=dtype)
    u = torch.randn(B, H, dtype=torch.float32 if dtype == torch.complex64 else torch.float64)
    return state, u, dA, dB, C, torch.randn(H)


def _ssm_step():
    state, u, dA, dB, C, D = _step_inputs()
    grads = [t.clone().requires_grad_() for t in (state, u, dA, dB, C, D)]
    return [tuple(grads), (state, u, dA, dB, C, None), _step_inputs(dtype=torch.complex128)]


def _ssm_step_backward():
    state, u, dA, dB, C, D = _step_inputs()
    return [
        (torch.randn(u.shape), torch.randn(state.shape, dtype=state.dtype), state, u, dA, dB, C, D),
        (torch.randn(u.shape), None, state, u, dA, dB, C, None),
    ]


def _ssm_step_inplace():
    state, u, dA, dB, C, D = _step_inputs()
    return [(state, u, dA, dB, C, D), (state.clone(), u, dA, dB, C, None)]


REGISTERED = {
    "s4_cauchy": _cauchy,
    "s4_cauchy_backward": _cauchy_backward,
    "s4_vandermonde": _vandermonde,
    "s4_vandermonde_backward": _vandermonde_backward,
    "s4_fft_conv": _fft_conv,
    "s4_fft_conv_backward": _fft_conv_backward,
    "s4_ssm_step": _ssm_step,
    "s4_ssm_step_backward": _ssm_step_backward,
    "s4_ssm_step_": _ssm_step_inplace,
}


def _public_cauchy():
    v, w = _poles(3, 5)
    return (lambda v, z, w: ops.cauchy(v, z, w)), (v, _nodes(7), w)


def _public_vandermonde():
    v, x = _poles(3, 5)
    return (lambda v, x: ops.vandermonde(v, x, 9)), (v, x * 0.1)


def _public_fft_conv():
    return (lambda u, k, D: ops.fft_conv(u, k, D)), (torch.randn(2, 3, 10), torch.randn(3, 4), torch.randn(3))


def _public_ssm_step():
    return (lambda *args: ops.ssm_step(*args)), _step_inputs()


PUBLIC = {
    "cauchy": _public_cauchy,
    "vandermonde": _public_vandermonde,
    "fft_conv": _public_fft_conv,
    "ssm_step": _public_ssm_step,
}

# ssm_step itself compiles (PUBLIC above); its in-place form does not. Listed under its own key so the test
# keeps checking that the limit still holds (the coverage test only asks that every public name be somewhere).
NOT_COMPILABLE = {
    "ssm_step(inplace=True)": (
        "the in-place rule checks state.is_conj(), which dynamo cannot trace (a torch.* "
        "call returning a bool); compile the functional step and rebind the state",
        lambda: ((lambda state, *args: ops.ssm_step(state, *args, inplace=True)), _step_inputs()),
    ),
}

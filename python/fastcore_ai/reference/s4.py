"""S4/S4D state-space kernels: pure-torch references (the oracles of the tests; run them in float64 /
complex128). Readable, materialising formulas; every backend is compared against these.

Conjugates are taken with conj_physical (lazy conj views trip functionalization under
torch.compile). Complex-gradient convention: PyTorch's (the gradient of a real loss w.r.t. a complex input z is
∂L/∂Re z + i ∂L/∂Im z), which autograd applies to these formulas automatically.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "cauchy",
    "vandermonde",
    "fft_conv",
    "fft_conv_size",
    "ssm_step",
    "cauchy_backward",
    "vandermonde_backward",
    "fft_conv_backward",
    "ssm_step_backward",
]


def cauchy(v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool = True) -> Tensor:
    """out[b, l] = Σ_n v[b, n] / (z[l] − w[b, n])  (+ conj(v[b, n]) / (z[l] − conj(w[b, n])) when
    conj_symmetric: the hidden conjugate half of a real system's N states).

    v, w: [B, N] complex; z: [L] complex -> out [B, L] complex. Materialises [B, N, L] (oracle only).
    """
    diff = z[None, None, :] - w[:, :, None]
    out = (v[:, :, None] / diff).sum(dim=1)
    if conj_symmetric:
        out = out + (v.conj_physical()[:, :, None] / (z[None, None, :] - w.conj_physical()[:, :, None])).sum(dim=1)
    return out


def vandermonde(v: Tensor, x: Tensor, L: int) -> Tensor:
    """The S4D kernel K[b, l] = 2 · Re Σ_n v[b, n] · exp(x[b, n] · l), l = 0..L−1.

    v, x: [B, N] complex -> K [B, L] real (float64 for complex128). exp(x·l) is evaluated directly for
    every l (no repeated multiplication), so in complex128 it is accurate to ~1e-16·|x·l| in phase.
    """
    steps = torch.arange(L, device=x.device, dtype=x.real.dtype)
    powers = torch.exp(x[:, :, None] * steps)  # [B, N, L]
    return 2 * (v[:, :, None] * powers).sum(dim=1).real


def fft_conv_size(L: int, Lk: int) -> int:
    """The FFT length every backend uses: a fast length >= L + Lk − 1 (at least 1). Of the 2^a·3^b·5^c sizes
    (the fast ones of pocketfft, MKL and cuFFT) the smallest, s, unless the next power of two p costs less:
    p·log2 p <= 1.3·s·log2 s. Power-of-two transforms run ~25-30% faster per n·log n (measured with MKL on the
    CPU, docs/s4.md "fft_conv details"): 2048 rather than 2000 for L = Lk = 1000, 3000 rather than 4096 for 1500."""
    need = max(L + Lk - 1, 1)
    best = None
    p2 = 1
    while True:
        p3 = p2
        while True:
            p5 = p3
            while p5 < need:
                p5 *= 5
            if best is None or p5 < best:
                best = p5
            if p3 >= need:
                break
            p3 *= 3
        if p2 >= need:
            break
        p2 *= 2
    if p2 != best and p2 * math.log2(p2) <= 1.3 * best * math.log2(best):
        return p2
    return best


def fft_conv(u: Tensor, k: Tensor, D: Optional[Tensor] = None) -> Tensor:
    """Causal long convolution y[b, h, l] = Σ_{j ≤ l, j < Lk} k[h, j] · u[b, h, l − j] + D[h] · u[b, h, l].

    u: [B, H, L] real, k: [H, Lk] real (Lk ≤ L), D: [H] or None -> y [B, H, L] in u's dtype.
    Computed as irfft(rfft(u, n) · rfft(k, n), n)[..., :L] with n = fft_conv_size(L, Lk) ≥ L + Lk − 1
    (so the circular convolution has no wrap-around), in u's dtype promoted with k's.
    """
    L, Lk = u.shape[-1], k.shape[-1]
    n = fft_conv_size(L, Lk)
    dtype = torch.promote_types(torch.promote_types(u.dtype, k.dtype), torch.float32)
    uf = torch.fft.rfft(u.to(dtype), n=n)
    kf = torch.fft.rfft(k.to(dtype), n=n)
    y = torch.fft.irfft(uf * kf, n=n)[..., :L]
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    return y.to(u.dtype)


def ssm_step(
    state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """One step of a diagonal (complex) SSM, the conjugate half stored:
        state' = dA ∘ state + dB · u[..., None]
        y      = 2 · Re Σ_n C · state' + D · u
    state [B, H, N] complex, u [B, H] real, dA, dB, C [H, N] complex, D [H] real or None.
    Returns (y [B, H] real in u's dtype, state' [B, H, N]) — functional, state is not modified.
    """
    new_state = dA * state + dB * u.to(state.real.dtype)[..., None]
    y = 2 * (C * new_state).sum(dim=-1).real
    if D is not None:
        y = y + D.to(y.dtype) * u.to(y.dtype)
    return y.to(u.dtype), new_state


# ---- backward formulas (PyTorch's complex convention: grad_x = conj(∂y/∂x)·g + (∂y/∂conj x)·conj(g)).
# The tests check these against autograd through the forward formulas above.


def cauchy_backward(
    grad: Tensor, v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool = True
) -> Tuple[Tensor, Tensor]:
    """r1 = conj(1/(z − w)), r2 = 1/(z − conj(w)) ([B, N, L]):
    grad_v = Σ_l g r1 (+ conj(g) r2),  grad_w = conj(v) · Σ_l (g r1² (+ conj(g) r2²))."""
    g = grad[:, None, :]
    r1 = (1 / (z[None, None, :] - w[:, :, None])).conj_physical()
    grad_v = (g * r1).sum(-1)
    grad_w = (g * r1 * r1).sum(-1)
    if conj_symmetric:
        r2 = 1 / (z[None, None, :] - w.conj_physical()[:, :, None])
        grad_v = grad_v + (g.conj_physical() * r2).sum(-1)
        grad_w = grad_w + (g.conj_physical() * r2 * r2).sum(-1)
    return grad_v, v.conj_physical() * grad_w


def vandermonde_backward(grad: Tensor, v: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """E = exp(x l): grad_v = 2 Σ_l g conj(E),  grad_x = 2 conj(v) Σ_l l g conj(E)."""
    L = grad.shape[-1]
    steps = torch.arange(L, device=x.device, dtype=x.real.dtype)
    E = torch.exp(x[:, :, None] * steps).conj_physical()
    g = grad.to(x.real.dtype)[:, None, :]
    return 2 * (g * E).sum(-1), 2 * v.conj_physical() * (g * steps * E).sum(-1)


def fft_conv_backward(
    grad: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """grad_u = irfft(rfft(G, n) conj(rfft(k, n)))[..., :L] + D G   (a correlation with k),
    grad_k = irfft(Σ_b rfft(G, n) conj(rfft(u, n)))[:, :Lk],  grad_D = Σ_{b, l} G u."""
    L, Lk = u.shape[-1], k.shape[-1]
    n = fft_conv_size(L, Lk)
    dtype = torch.promote_types(torch.promote_types(u.dtype, k.dtype), torch.float32)
    G, uu = grad.to(dtype), u.to(dtype)
    Gf = torch.fft.rfft(G, n=n)
    grad_u = torch.fft.irfft(Gf * torch.fft.rfft(k.to(dtype), n=n).conj_physical(), n=n)[..., :L]
    grad_D = None
    if D is not None:
        grad_u = grad_u + D.to(dtype)[:, None] * G
        grad_D = (G * uu).sum(dim=(0, 2)).to(D.dtype)
    grad_k = torch.fft.irfft((Gf * torch.fft.rfft(uu, n=n).conj_physical()).sum(0), n=n)[:, :Lk]
    return grad_u.to(u.dtype), grad_k.to(k.dtype), grad_D


def ssm_step_backward(
    grad_y: Tensor,
    grad_state: Optional[Tensor],
    state: Tensor,
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
):
    """With G = grad_state' + 2 g_y conj(C):  grad_state = conj(dA) G,  grad_u = Σ_n Re(conj(dB) G) + D g_y,
    grad_dA = Σ_b G conj(state), grad_dB = Σ_b G u, grad_C = Σ_b 2 g_y conj(state'), grad_D = Σ_b g_y u."""
    real = state.real.dtype
    uu, gy = u.to(real), grad_y.to(real)
    new_state = dA * state + dB * uu[..., None]
    G = 2 * gy[..., None] * C.conj_physical()
    if grad_state is not None:
        G = G + grad_state
    grad_u = (dB.conj_physical() * G).real.sum(-1)
    grad_D = None
    if D is not None:
        grad_u = grad_u + D.to(real) * gy
        grad_D = (gy * uu).sum(0).to(D.dtype)
    return (
        dA.conj_physical() * G,
        grad_u.to(u.dtype),
        (G * state.conj_physical()).sum(0),
        (G * uu[..., None]).sum(0),
        (2 * gy[..., None] * new_state.conj_physical()).sum(0),
        grad_D,
    )

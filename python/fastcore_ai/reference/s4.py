"""S4/S4D state-space kernels: pure-torch references (the oracles of the tests; run them in float64 /
complex128). Readable, materialising formulas; every backend is compared against these.

Complex-gradient convention: PyTorch's (the gradient of a real loss w.r.t. a complex input z is
∂L/∂Re z + i ∂L/∂Im z), which autograd applies to these formulas automatically.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["cauchy", "vandermonde", "fft_conv", "fft_conv_size", "ssm_step"]


def cauchy(v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool = True) -> Tensor:
    """out[b, l] = Σ_n v[b, n] / (z[l] − w[b, n])  (+ conj(v[b, n]) / (z[l] − conj(w[b, n])) when
    conj_symmetric: the hidden conjugate half of a real system's N states).

    v, w: [B, N] complex; z: [L] complex -> out [B, L] complex. Materialises [B, N, L] (oracle only).
    """
    diff = z[None, None, :] - w[:, :, None]
    out = (v[:, :, None] / diff).sum(dim=1)
    if conj_symmetric:
        out = out + (v.conj()[:, :, None] / (z[None, None, :] - w.conj()[:, :, None])).sum(dim=1)
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
    """The FFT length every backend uses: the smallest 2^a·3^b·5^c ≥ L + Lk − 1 (a fast size for
    pocketfft, MKL and cuFFT); at least 1."""
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


def ssm_step(state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor] = None
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

"""Triton kernels of the s4 family (backend="triton" of fastcore_ai.ops.cauchy / vandermonde /
fft_conv / ssm_step). Same math as csrc/kernels/s4/s4.h (see it for the formulas and gradients).

Complex tensors arrive as interleaved (re, im) float32 pairs (Triton has no complex dtype).
- cauchy: one program per (row b, tile of BL nodes), looping over the states in BN chunks with the
  [BN, BL] terms in registers (never [B, N, L] in memory); backward one program per (b, tile of BN
  states) looping over the nodes.
- vandermonde: l = l_block_start + j. A program owns NB blocks of TB = 64 nodes; per chunk of BN states
  it evaluates the in-block powers p[n, j] = exp(x_n j) and the block starts s[kb, n] = exp(x_n l_kb)
  directly (phase Im(x)·l in float64, reduced mod 2π), then K = 2 Re(C @ P) with C = v·s as two
  float32 `tl.dot`s in IEEE precision (no TF32). Same accuracy argument as the CPU kernel.
- fft_conv: torch.fft for the transforms; Triton for pad+cast, the spectral product, crop+skip+cast,
  the fused backward spectra (grad_kf += G·conj(U), G *= conj(K)) and the D-gradient row dots.
- ssm_step: one program per tile of (b, h) rows; backward one program per head h looping over b in order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

TB = 64  # Vandermonde in-block powers (as kVandBlock in s4.h)
_TWO_PI = 6.283185307179586


def _interleaved(t: Tensor) -> Tensor:
    return torch.view_as_real(t.resolve_conj().contiguous())


# ---- cauchy --------------------------------------------------------------------------------------


@triton.jit
def _cauchy_fwd_kernel(v_ptr, w_ptr, z_ptr, out_ptr, N, L, CONJ: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    l = tl.program_id(1).to(tl.int64) * BL + tl.arange(0, BL)
    lm = l < L
    zr = tl.load(z_ptr + 2 * l, mask=lm, other=0.0)
    zi = tl.load(z_ptr + 2 * l + 1, mask=lm, other=0.0)
    acc_r = tl.zeros((BL,), dtype=tl.float32)
    acc_i = tl.zeros((BL,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < N
        base = 2 * (b * N + n)
        vr = tl.load(v_ptr + base, mask=nm, other=0.0)[:, None]
        vi = tl.load(v_ptr + base + 1, mask=nm, other=0.0)[:, None]
        wr = tl.load(w_ptr + base, mask=nm, other=0.0)[:, None]
        wi = tl.load(w_ptr + base + 1, mask=nm, other=0.0)[:, None]
        dr = zr[None, :] - wr
        di = zi[None, :] - wi
        inv = 1.0 / (dr * dr + di * di)
        tr = (vr * dr + vi * di) * inv
        ti = (vi * dr - vr * di) * inv
        if CONJ:
            di2 = zi[None, :] + wi
            inv2 = 1.0 / (dr * dr + di2 * di2)
            tr += (vr * dr - vi * di2) * inv2
            ti += (-vi * dr - vr * di2) * inv2
        keep = nm[:, None] & lm[None, :]
        acc_r += tl.sum(tl.where(keep, tr, 0.0), axis=0)
        acc_i += tl.sum(tl.where(keep, ti, 0.0), axis=0)
    tl.store(out_ptr + 2 * (b * L + l), acc_r, mask=lm)
    tl.store(out_ptr + 2 * (b * L + l) + 1, acc_i, mask=lm)


@triton.jit
def _cauchy_bwd_kernel(
    v_ptr, w_ptr, z_ptr, g_ptr, gv_ptr, gw_ptr, N, L, CONJ: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    nm = n < N
    base = 2 * (b * N + n)
    vr = tl.load(v_ptr + base, mask=nm, other=0.0)
    vi = tl.load(v_ptr + base + 1, mask=nm, other=0.0)
    wr = tl.load(w_ptr + base, mask=nm, other=0.0)[:, None]
    wi = tl.load(w_ptr + base + 1, mask=nm, other=0.0)[:, None]
    sv_r = tl.zeros((BN,), dtype=tl.float32)
    sv_i = tl.zeros((BN,), dtype=tl.float32)
    sw_r = tl.zeros((BN,), dtype=tl.float32)
    sw_i = tl.zeros((BN,), dtype=tl.float32)
    for l0 in range(0, L, BL):
        l = l0 + tl.arange(0, BL)
        lm = l < L
        zr = tl.load(z_ptr + 2 * l, mask=lm, other=0.0)[None, :]
        zi = tl.load(z_ptr + 2 * l + 1, mask=lm, other=0.0)[None, :]
        gr = tl.load(g_ptr + 2 * (b * L + l), mask=lm, other=0.0)[None, :]
        gi = tl.load(g_ptr + 2 * (b * L + l) + 1, mask=lm, other=0.0)[None, :]
        dr = zr - wr
        di = zi - wi
        inv = 1.0 / (dr * dr + di * di)
        r1r = dr * inv
        r1i = di * inv
        t1r = gr * r1r - gi * r1i
        t1i = gr * r1i + gi * r1r
        a_r = t1r
        a_i = t1i
        c_r = t1r * r1r - t1i * r1i
        c_i = t1r * r1i + t1i * r1r
        if CONJ:
            di2 = zi + wi
            inv2 = 1.0 / (dr * dr + di2 * di2)
            r2r = dr * inv2
            r2i = -di2 * inv2
            t2r = gr * r2r + gi * r2i
            t2i = gr * r2i - gi * r2r
            a_r += t2r
            a_i += t2i
            c_r += t2r * r2r - t2i * r2i
            c_i += t2r * r2i + t2i * r2r
        keep = nm[:, None] & lm[None, :]
        sv_r += tl.sum(tl.where(keep, a_r, 0.0), axis=1)
        sv_i += tl.sum(tl.where(keep, a_i, 0.0), axis=1)
        sw_r += tl.sum(tl.where(keep, c_r, 0.0), axis=1)
        sw_i += tl.sum(tl.where(keep, c_i, 0.0), axis=1)
    tl.store(gv_ptr + base, sv_r, mask=nm)
    tl.store(gv_ptr + base + 1, sv_i, mask=nm)
    tl.store(gw_ptr + base, vr * sw_r + vi * sw_i, mask=nm)  # conj(v) · Σ
    tl.store(gw_ptr + base + 1, vr * sw_i - vi * sw_r, mask=nm)


def _cauchy_blocks(N: int):
    BN = min(64, max(16, triton.next_power_of_2(N)))
    return BN, 64


def cauchy(v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool) -> Tensor:
    B, N = v.shape
    L = z.shape[0]
    out = torch.empty((B, L), dtype=v.dtype, device=v.device)
    if B == 0 or L == 0:
        return out
    BN, BL = _cauchy_blocks(N)
    _cauchy_fwd_kernel[(B, triton.cdiv(L, BL))](
        _interleaved(v),
        _interleaved(w),
        _interleaved(z),
        torch.view_as_real(out),
        N,
        L,
        CONJ=conj_symmetric,
        BN=BN,
        BL=BL,
    )
    return out


def cauchy_backward(grad: Tensor, v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool):
    B, N = v.shape
    L = z.shape[0]
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    grad_w = torch.empty_like(v, memory_format=torch.contiguous_format)
    if B == 0:
        return grad_v, grad_w
    if L == 0:
        return grad_v.zero_(), grad_w.zero_()
    BN, BL = _cauchy_blocks(N)
    _cauchy_bwd_kernel[(B, triton.cdiv(N, BN))](
        _interleaved(v),
        _interleaved(w),
        _interleaved(z),
        _interleaved(grad),
        torch.view_as_real(grad_v),
        torch.view_as_real(grad_w),
        N,
        L,
        CONJ=conj_symmetric,
        BN=BN,
        BL=BL,
    )
    return grad_v, grad_w


# ---- vandermonde ---------------------------------------------------------------------------------


@triton.jit
def _exp_times(xr, xi, steps):
    """exp(x · l) with the phase Im(x)·l in float64 reduced mod 2π (as exp_times in s4.h), rounded to float32."""
    dl = steps.to(tl.float64)
    magnitude = tl.exp(xr.to(tl.float64) * dl)
    phase = xi.to(tl.float64) * dl
    phase = phase - 6.283185307179586 * tl.floor(phase / 6.283185307179586 + 0.5)
    return (magnitude * tl.cos(phase)).to(tl.float32), (magnitude * tl.sin(phase)).to(tl.float32)


@triton.jit
def _vand_fwd_kernel(v_ptr, x_ptr, out_ptr, N, L, BN: tl.constexpr, NB: tl.constexpr, TBC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    l_base = tl.program_id(1).to(tl.int64) * NB * TBC
    kb = tl.arange(0, NB)
    j = tl.arange(0, TBC)
    starts = l_base + kb.to(tl.int64) * TBC  # [NB]
    acc = tl.zeros((NB, TBC), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < N
        base = 2 * (b * N + n)
        vr = tl.load(v_ptr + base, mask=nm, other=0.0)
        vi = tl.load(v_ptr + base + 1, mask=nm, other=0.0)
        xr = tl.load(x_ptr + base, mask=nm, other=0.0)
        xi = tl.load(x_ptr + base + 1, mask=nm, other=0.0)
        pr, pi = _exp_times(xr[:, None], xi[:, None], j[None, :])  # [BN, TB] in-block powers
        sr, si = _exp_times(xr[None, :], xi[None, :], starts[:, None])  # [NB, BN] block starts
        cr = vr[None, :] * sr - vi[None, :] * si
        ci = vr[None, :] * si + vi[None, :] * sr
        acc += tl.dot(cr, pr, input_precision="ieee") - tl.dot(ci, pi, input_precision="ieee")
    l = starts[:, None] + j[None, :]
    tl.store(out_ptr + b * L + l, 2.0 * acc, mask=l < L)


@triton.jit
def _vand_bwd_kernel(v_ptr, x_ptr, g_ptr, gv_ptr, gx_ptr, N, L, BN: tl.constexpr, NB: tl.constexpr, TBC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    nm = n < N
    base = 2 * (b * N + n)
    vr = tl.load(v_ptr + base, mask=nm, other=0.0)
    vi = tl.load(v_ptr + base + 1, mask=nm, other=0.0)
    xr = tl.load(x_ptr + base, mask=nm, other=0.0)
    xi = tl.load(x_ptr + base + 1, mask=nm, other=0.0)
    j = tl.arange(0, TBC)
    kb = tl.arange(0, NB)
    pr, pi = _exp_times(xr[:, None], xi[:, None], j[None, :])  # [BN, TB]
    s0r = tl.zeros((BN,), dtype=tl.float32)
    s0i = tl.zeros((BN,), dtype=tl.float32)
    s1r = tl.zeros((BN,), dtype=tl.float32)
    s1i = tl.zeros((BN,), dtype=tl.float32)
    jw = j.to(tl.float32)[None, :]
    for l0 in range(0, L, NB * TBC):
        starts = l0 + kb.to(tl.int64) * TBC
        l = starts[:, None] + j[None, :]
        g = tl.load(g_ptr + b * L + l, mask=l < L, other=0.0)  # [NB, TB]
        gj = g * jw
        # A[kb, n] = Σ_j g conj(p),  Bm[kb, n] = Σ_j j g conj(p)
        a_r = tl.dot(g, tl.trans(pr), input_precision="ieee")
        a_i = -tl.dot(g, tl.trans(pi), input_precision="ieee")
        b_r = tl.dot(gj, tl.trans(pr), input_precision="ieee")
        b_i = -tl.dot(gj, tl.trans(pi), input_precision="ieee")
        sr, si = _exp_times(xr[None, :], xi[None, :], starts[:, None])  # [NB, BN]
        si = -si
        s0r += tl.sum(sr * a_r - si * a_i, axis=0)
        s0i += tl.sum(sr * a_i + si * a_r, axis=0)
        lf = starts.to(tl.float32)[:, None]
        c_r = lf * a_r + b_r
        c_i = lf * a_i + b_i
        s1r += tl.sum(sr * c_r - si * c_i, axis=0)
        s1i += tl.sum(sr * c_i + si * c_r, axis=0)
    tl.store(gv_ptr + base, 2.0 * s0r, mask=nm)
    tl.store(gv_ptr + base + 1, 2.0 * s0i, mask=nm)
    tl.store(gx_ptr + base, 2.0 * (vr * s1r + vi * s1i), mask=nm)
    tl.store(gx_ptr + base + 1, 2.0 * (vr * s1i - vi * s1r), mask=nm)


_VAND_BN, _VAND_NB = 16, 16


def vandermonde(v: Tensor, x: Tensor, L: int) -> Tensor:
    B, N = v.shape
    out = torch.empty((B, L), dtype=torch.float32, device=v.device)
    if B == 0 or L == 0:
        return out
    grid = (B, triton.cdiv(L, _VAND_NB * TB))
    _vand_fwd_kernel[grid](_interleaved(v), _interleaved(x), out, N, L, BN=_VAND_BN, NB=_VAND_NB, TBC=TB)
    return out


def vandermonde_backward(grad: Tensor, v: Tensor, x: Tensor):
    B, N = v.shape
    L = grad.shape[1]
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    grad_x = torch.empty_like(v, memory_format=torch.contiguous_format)
    if B == 0:
        return grad_v, grad_x
    if L == 0:
        return grad_v.zero_(), grad_x.zero_()
    _vand_bwd_kernel[(B, triton.cdiv(N, _VAND_BN))](
        _interleaved(v),
        _interleaved(x),
        grad.float().contiguous(),
        torch.view_as_real(grad_v),
        torch.view_as_real(grad_x),
        N,
        L,
        BN=_VAND_BN,
        NB=_VAND_NB,
        TBC=TB,
    )
    return grad_v, grad_x


# ---- fft_conv ------------------------------------------------------------------------------------

_BLOCK = 1024


@triton.jit
def _pad_cast_kernel(in_ptr, buf_ptr, row_begin, L, n, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < L
    value = tl.load(in_ptr + (row_begin + r) * L + i, mask=inside, other=0.0).to(buf_ptr.dtype.element_ty)
    tl.store(buf_ptr + r * n + i, tl.where(inside, value, 0.0), mask=i < n)


@triton.jit
def _cmul_kernel(spec_ptr, k_ptr, row_begin, H, F, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = f < F
    h = (row_begin + r) % H
    xr = tl.load(spec_ptr + 2 * (r * F + f), mask=m)
    xi = tl.load(spec_ptr + 2 * (r * F + f) + 1, mask=m)
    kr = tl.load(k_ptr + 2 * (h * F + f), mask=m)
    ki = tl.load(k_ptr + 2 * (h * F + f) + 1, mask=m)
    tl.store(spec_ptr + 2 * (r * F + f), xr * kr - xi * ki, mask=m)
    tl.store(spec_ptr + 2 * (r * F + f) + 1, xr * ki + xi * kr, mask=m)


@triton.jit
def _crop_skip_kernel(buf_ptr, skip_ptr, d_ptr, out_ptr, row_begin, H, L, n, HAS_D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < L
    row = row_begin + r
    y = tl.load(buf_ptr + r * n + i, mask=m)
    if HAS_D:
        d = tl.load(d_ptr + row % H)
        y += d * tl.load(skip_ptr + row * L + i, mask=m).to(y.dtype)
    tl.store(out_ptr + row * L + i, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grad_spectra_kernel(g_ptr, u_ptr, k_ptr, gk_ptr, rows, row_begin, H, F, NEED_K: tl.constexpr, BLOCK: tl.constexpr):
    """For head h: grad_kf[h] += Σ_{chunk rows of h, in order} G conj(U); G *= conj(K)."""
    h = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = f < F
    kr = tl.load(k_ptr + 2 * (h * F + f), mask=m)
    ki = -tl.load(k_ptr + 2 * (h * F + f) + 1, mask=m)
    ar = tl.zeros((BLOCK,), dtype=tl.float32)
    ai = tl.zeros((BLOCK,), dtype=tl.float32)
    if NEED_K:
        ar = tl.load(gk_ptr + 2 * (h * F + f), mask=m, other=0.0)
        ai = tl.load(gk_ptr + 2 * (h * F + f) + 1, mask=m, other=0.0)
    first = (h - row_begin % H + H) % H
    for r in range(first, rows, H):
        gr = tl.load(g_ptr + 2 * (r * F + f), mask=m)
        gi = tl.load(g_ptr + 2 * (r * F + f) + 1, mask=m)
        if NEED_K:
            ur = tl.load(u_ptr + 2 * (r * F + f), mask=m)
            ui = tl.load(u_ptr + 2 * (r * F + f) + 1, mask=m)
            ar += gr * ur + gi * ui
            ai += gi * ur - gr * ui
        tl.store(g_ptr + 2 * (r * F + f), gr * kr - gi * ki, mask=m)
        tl.store(g_ptr + 2 * (r * F + f) + 1, gr * ki + gi * kr, mask=m)
    if NEED_K:
        tl.store(gk_ptr + 2 * (h * F + f), ar, mask=m)
        tl.store(gk_ptr + 2 * (h * F + f) + 1, ai, mask=m)


@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, out_ptr, L, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for l0 in range(0, L, BLOCK):
        i = l0 + tl.arange(0, BLOCK)
        m = i < L
        acc += tl.load(a_ptr + r * L + i, mask=m, other=0.0).to(tl.float32) * tl.load(
            b_ptr + r * L + i, mask=m, other=0.0
        ).to(tl.float32)
    tl.store(out_ptr + r, tl.sum(acc, axis=0))


def _chunk_rows(rows: int, n: int, device: torch.device) -> int:
    budget = (1 << 26) if device.type == "cuda" else (1 << 16)
    return max(1, min(rows, budget // max(n, 1)))


def fft_conv(u: Tensor, k: Tensor, D: Optional[Tensor], n: int) -> Tensor:
    B, H, L = u.shape
    rows, F = B * H, n // 2 + 1
    out = torch.empty((B, H, L), dtype=u.dtype, device=u.device)
    if rows == 0 or L == 0:
        return out
    uc = u.contiguous()
    Kf = torch.view_as_real(torch.fft.rfft(k.float(), n=n).contiguous())
    Dc = D.float().contiguous() if D is not None else Kf  # dummy pointer when absent
    chunk = _chunk_rows(rows, n, u.device)
    real_buf = torch.empty((chunk, n), dtype=torch.float32, device=u.device)
    spec = torch.empty((chunk, F), dtype=torch.complex64, device=u.device)
    for r0 in range(0, rows, chunk):
        count = min(chunk, rows - r0)
        rb, sp = real_buf[:count], spec[:count]
        _pad_cast_kernel[(count, triton.cdiv(n, _BLOCK))](uc, rb, r0, L, n, BLOCK=_BLOCK)
        torch.fft.rfft(rb, n=n, out=sp)
        _cmul_kernel[(count, triton.cdiv(F, _BLOCK))](torch.view_as_real(sp), Kf, r0, H, F, BLOCK=_BLOCK)
        torch.fft.irfft(sp, n=n, out=rb)
        _crop_skip_kernel[(count, triton.cdiv(L, _BLOCK))](
            rb, uc, Dc, out, r0, H, L, n, HAS_D=D is not None, BLOCK=_BLOCK
        )
    return out


def fft_conv_backward(
    grad: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor], n: int, need_u: bool, need_k: bool, need_D: bool
):
    B, H, L = u.shape
    Lk = k.shape[1]
    rows, F = B * H, n // 2 + 1
    G = grad.to(u.dtype).contiguous()
    uc = u.contiguous()
    grad_u = torch.empty((B, H, L), dtype=u.dtype, device=u.device) if need_u else u.new_empty((0,))
    grad_D = u.new_empty((0,))
    if need_D and D is not None:
        dots = torch.empty((rows,), dtype=torch.float32, device=u.device)
        if rows > 0:
            _row_dot_kernel[(rows,)](G, uc, dots, L, BLOCK=_BLOCK)
        grad_D = dots.view(B, H).sum(0).to(D.dtype)
    grad_kf = torch.zeros((H, F), dtype=torch.complex64, device=u.device) if need_k else None
    if (need_u or need_k) and rows > 0 and L > 0:
        Kf = torch.view_as_real(torch.fft.rfft(k.float(), n=n).contiguous())
        Dc = D.float().contiguous() if D is not None else Kf
        chunk = _chunk_rows(rows, n, u.device)
        real_buf = torch.empty((chunk, n), dtype=torch.float32, device=u.device)
        spec = torch.empty((chunk, F), dtype=torch.complex64, device=u.device)
        spec_u = torch.empty((chunk, F), dtype=torch.complex64, device=u.device) if need_k else spec
        gk = torch.view_as_real(grad_kf) if need_k else Kf
        for r0 in range(0, rows, chunk):
            count = min(chunk, rows - r0)
            rb, sp, su = real_buf[:count], spec[:count], spec_u[:count]
            if need_k:
                _pad_cast_kernel[(count, triton.cdiv(n, _BLOCK))](uc, rb, r0, L, n, BLOCK=_BLOCK)
                torch.fft.rfft(rb, n=n, out=su)
            _pad_cast_kernel[(count, triton.cdiv(n, _BLOCK))](G, rb, r0, L, n, BLOCK=_BLOCK)
            torch.fft.rfft(rb, n=n, out=sp)
            _grad_spectra_kernel[(H, triton.cdiv(F, _BLOCK))](
                torch.view_as_real(sp), torch.view_as_real(su), Kf, gk, count, r0, H, F, NEED_K=need_k, BLOCK=_BLOCK
            )
            if need_u:
                torch.fft.irfft(sp, n=n, out=rb)
                _crop_skip_kernel[(count, triton.cdiv(L, _BLOCK))](
                    rb, G, Dc, grad_u, r0, H, L, n, HAS_D=D is not None, BLOCK=_BLOCK
                )
    elif need_u:
        grad_u.zero_()
    grad_k = k.new_empty((0,))
    if need_k:
        grad_k = (
            torch.fft.irfft(grad_kf, n=n)[:, :Lk].to(k.dtype).contiguous()
            if rows > 0 and L > 0
            else torch.zeros_like(k)
        )
    return grad_u, grad_k, grad_D


# ---- ssm_step ------------------------------------------------------------------------------------


@triton.jit
def _step_kernel(
    s_ptr,
    u_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    y_ptr,
    ns_ptr,
    rows,
    H,
    N,
    HAS_D: tl.constexpr,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rm = row < rows
    h = row % H
    u = tl.load(u_ptr + row, mask=rm, other=0.0).to(tl.float32)
    acc = tl.zeros((BR,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        m = rm[:, None] & (n < N)[None, :]
        si = 2 * (row[:, None] * N + n[None, :])
        pi = 2 * (h[:, None] * N + n[None, :])
        sr = tl.load(s_ptr + si, mask=m, other=0.0)
        sim = tl.load(s_ptr + si + 1, mask=m, other=0.0)
        ar = tl.load(a_ptr + pi, mask=m, other=0.0)
        ai = tl.load(a_ptr + pi + 1, mask=m, other=0.0)
        br = tl.load(b_ptr + pi, mask=m, other=0.0)
        bi = tl.load(b_ptr + pi + 1, mask=m, other=0.0)
        cr = tl.load(c_ptr + pi, mask=m, other=0.0)
        ci = tl.load(c_ptr + pi + 1, mask=m, other=0.0)
        nr = ar * sr - ai * sim + br * u[:, None]
        ni = ar * sim + ai * sr + bi * u[:, None]
        tl.store(ns_ptr + si, nr, mask=m)
        tl.store(ns_ptr + si + 1, ni, mask=m)
        acc += tl.sum(tl.where(m, cr * nr - ci * ni, 0.0), axis=1)
    y = 2.0 * acc
    if HAS_D:
        y += tl.load(d_ptr + h, mask=rm, other=0.0) * u
    tl.store(y_ptr + row, y.to(y_ptr.dtype.element_ty), mask=rm)


@triton.jit
def _step_bwd_kernel(
    s_ptr,
    u_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    gy_ptr,
    gns_ptr,
    gs_ptr,
    gu_ptr,
    ga_ptr,
    gb_ptr,
    gc_ptr,
    gd_ptr,
    B,
    H,
    N,
    HAS_D: tl.constexpr,
    HAS_GNS: tl.constexpr,
    BN: tl.constexpr,
):
    """Head h: every b in increasing order (fixed-order sums over b). BN ≥ N (one chunk)."""
    h = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BN)
    m = n < N
    pi = 2 * (h * N + n)
    ar = tl.load(a_ptr + pi, mask=m, other=0.0)
    ai = tl.load(a_ptr + pi + 1, mask=m, other=0.0)
    br = tl.load(b_ptr + pi, mask=m, other=0.0)
    bi = tl.load(b_ptr + pi + 1, mask=m, other=0.0)
    cr = tl.load(c_ptr + pi, mask=m, other=0.0)
    ci = tl.load(c_ptr + pi + 1, mask=m, other=0.0)
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h)
    gar = tl.zeros((BN,), dtype=tl.float32)
    gai = tl.zeros((BN,), dtype=tl.float32)
    gbr = tl.zeros((BN,), dtype=tl.float32)
    gbi = tl.zeros((BN,), dtype=tl.float32)
    gcr = tl.zeros((BN,), dtype=tl.float32)
    gci = tl.zeros((BN,), dtype=tl.float32)
    gd = 0.0
    for b in range(0, B):
        row = b * H + h
        u = tl.load(u_ptr + row).to(tl.float32)
        gy = tl.load(gy_ptr + row)
        si = 2 * (row * N + n)
        sr = tl.load(s_ptr + si, mask=m, other=0.0)
        sim = tl.load(s_ptr + si + 1, mask=m, other=0.0)
        nr = ar * sr - ai * sim + br * u
        ni = ar * sim + ai * sr + bi * u
        Gr = 2.0 * gy * cr
        Gi = -2.0 * gy * ci
        if HAS_GNS:
            Gr += tl.load(gns_ptr + si, mask=m, other=0.0)
            Gi += tl.load(gns_ptr + si + 1, mask=m, other=0.0)
        tl.store(gs_ptr + si, ar * Gr + ai * Gi, mask=m)
        tl.store(gs_ptr + si + 1, ar * Gi - ai * Gr, mask=m)
        gu = tl.sum(tl.where(m, br * Gr + bi * Gi, 0.0), axis=0) + d * gy
        tl.store(gu_ptr + row, gu)
        gar += Gr * sr + Gi * sim
        gai += Gi * sr - Gr * sim
        gbr += Gr * u
        gbi += Gi * u
        gcr += 2.0 * gy * nr
        gci -= 2.0 * gy * ni
        gd += gy * u
    tl.store(ga_ptr + pi, gar, mask=m)
    tl.store(ga_ptr + pi + 1, gai, mask=m)
    tl.store(gb_ptr + pi, gbr, mask=m)
    tl.store(gb_ptr + pi + 1, gbi, mask=m)
    tl.store(gc_ptr + pi, gcr, mask=m)
    tl.store(gc_ptr + pi + 1, gci, mask=m)
    if HAS_D:
        tl.store(gd_ptr + h, gd)


def ssm_step(
    state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor], out: Optional[Tensor] = None
):
    """out: write the new state there (may be `state` itself: each element is loaded before it is stored)."""
    B, H, N = state.shape
    y = torch.empty((B, H), dtype=u.dtype, device=u.device)
    new_state = out if out is not None else torch.empty_like(state, memory_format=torch.contiguous_format)
    rows = B * H
    if rows == 0:
        return y, new_state
    BN = min(128, max(16, triton.next_power_of_2(N)))
    BR = max(1, 1024 // BN)
    s = torch.view_as_real(state) if out is state else _interleaved(state)
    Dc = D.float().contiguous() if D is not None else s
    _step_kernel[(triton.cdiv(rows, BR),)](
        s,
        u.contiguous(),
        _interleaved(dA),
        _interleaved(dB),
        _interleaved(C),
        Dc,
        y,
        torch.view_as_real(new_state),
        rows,
        H,
        N,
        HAS_D=D is not None,
        BR=BR,
        BN=BN,
    )
    return y, new_state


def ssm_step_backward(
    grad_y: Tensor,
    grad_state: Optional[Tensor],
    state: Tensor,
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Optional[Tensor],
):
    B, H, N = state.shape
    grad_s = torch.empty_like(state, memory_format=torch.contiguous_format)
    grad_u = torch.empty((B, H), dtype=torch.float32, device=u.device)
    gA, gB, gC = (torch.zeros_like(dA, memory_format=torch.contiguous_format) for _ in range(3))
    gD = torch.zeros((H,), dtype=torch.float32, device=u.device) if D is not None else u.new_empty((0,))
    if H > 0:
        s = _interleaved(state)
        Dc = D.float().contiguous() if D is not None else s
        gns = _interleaved(grad_state) if grad_state is not None else s
        _step_bwd_kernel[(H,)](
            s,
            u.contiguous(),
            _interleaved(dA),
            _interleaved(dB),
            _interleaved(C),
            Dc,
            grad_y.float().contiguous(),
            gns,
            torch.view_as_real(grad_s),
            grad_u,
            torch.view_as_real(gA),
            torch.view_as_real(gB),
            torch.view_as_real(gC),
            gD,
            B,
            H,
            N,
            HAS_D=D is not None,
            HAS_GNS=grad_state is not None,
            BN=max(16, triton.next_power_of_2(N)),
        )
    return grad_s, grad_u.to(u.dtype), gA, gB, gC, (gD.to(D.dtype) if D is not None else gD)

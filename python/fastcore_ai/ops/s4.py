"""S4/S4D state-space kernels: functional ops.

  cauchy(v, z, w)         S4's DPLR generating function:  out[b, l] = Σ_n v/(z_l − w) (+ conj pair)
  vandermonde(v, x, L)    S4D's kernel:                    K[b, l] = 2 Re Σ_n v exp(x l)
  fft_conv(u, k, D)       causal long convolution:         y = irfft(rfft(u, n) rfft(k, n))[:L] + D u
  ssm_step(state, u, ...) one recurrent step of a diagonal SSM (autoregressive generation)

Layering (DESIGN): validate -> choose backend -> registered torch ops `fastcore_ai::s4_*` (fake impls,
autograd through registered backward ops, opcheck, torch.compile) -> backend implementation (`_C`
CPU/CUDA kernels, Triton launchers, or the pure-torch reference in fastcore_ai.reference.s4).

Complex tensors go to the kernels as interleaved (re, im) float pairs (torch.view_as_real). Gradients
follow PyTorch's complex convention. The nodes z of `cauchy` are constants (no gradient).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_bool, check_int, check_size, check_tensor
from ..reference import s4 as _ref

__all__ = ["cauchy", "vandermonde", "fft_conv", "fft_conv_size", "ssm_step", "MAX_STATES"]

MAX_STATES = 4096
MAX_VANDERMONDE_LENGTH = 2**29 - 1  # the phase Im(x)·l is exact in double below 2^29 (see s4.h)
_COMPLEX = (torch.complex64, torch.complex128)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

fft_conv_size = _ref.fft_conv_size


def _complex_table(op: str) -> backends.OpTable:
    """complex64 everywhere, complex128 on the cpu and reference backends (gradcheck, oracle)."""
    both = frozenset(_COMPLEX)
    return backends.OpTable(op, ("cuda", "triton", "cpu", "reference"), {
        "cuda": backends.Support(frozenset({torch.complex64})),
        "triton": backends.Support(frozenset({torch.complex64})),
        "cpu": backends.Support(both), "reference": backends.Support(both)})


_CAUCHY, _VAND, _FFT, _STEP = "cauchy", "vandermonde", "fft_conv", "ssm_step"
backends.register_op(_complex_table(_CAUCHY))
backends.register_op(_complex_table(_VAND))
backends.register_op(backends.standard_table(_FFT))
backends.register_op(_complex_table(_STEP))


_NATIVE = None


def _native_module():
    """fastcore_ai._C (raises the build hint when missing); kept once loaded, as the per-step path calls it."""
    global _NATIVE
    if _NATIVE is None:
        _NATIVE = _native.native()
    return _NATIVE


def _triton():
    from ..triton_kernels import s4 as triton_s4
    return triton_s4


# ---- cauchy --------------------------------------------------------------------------------------

def _cauchy_impl(backend: str, v, z, w, conj_symmetric):
    if backend in ("cpu", "cuda"):
        return _native_module().s4_cauchy(v, z, w, conj_symmetric)
    if backend == "triton":
        return _triton().cauchy(v, z, w, conj_symmetric)
    return _ref.cauchy(v, z, w, conj_symmetric)


def _cauchy_backward_impl(backend: str, grad, v, z, w, conj_symmetric):
    if backend in ("cpu", "cuda"):
        return tuple(_native_module().s4_cauchy_backward(grad, v, z, w, conj_symmetric))
    if backend == "triton":
        return _triton().cauchy_backward(grad, v, z, w, conj_symmetric)
    return _ref.cauchy_backward(grad, v, z, w, conj_symmetric)


@torch.library.custom_op("fastcore_ai::s4_cauchy", mutates_args=())
def _cauchy_op(v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool, backend: str) -> Tensor:
    return _cauchy_impl(backend, v, z, w, conj_symmetric)


@_cauchy_op.register_fake
def _cauchy_fake(v, z, w, conj_symmetric, backend):
    return v.new_empty((v.shape[0], z.shape[0]))


@torch.library.custom_op("fastcore_ai::s4_cauchy_backward", mutates_args=())
def _cauchy_backward_op(grad: Tensor, v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool,
                        backend: str) -> Tuple[Tensor, Tensor]:
    gv, gw = _cauchy_backward_impl(backend, grad.contiguous(), v, z, w, conj_symmetric)
    return gv, gw


@_cauchy_backward_op.register_fake
def _cauchy_backward_fake(grad, v, z, w, conj_symmetric, backend):
    return v.new_empty(v.shape), v.new_empty(v.shape)


def _cauchy_setup(ctx, inputs, output):
    v, z, w, conj_symmetric, backend = inputs
    ctx.save_for_backward(v, z, w)
    ctx.conj_symmetric, ctx.backend = conj_symmetric, backend


def _cauchy_backward(ctx, grad):
    v, z, w = ctx.saved_tensors
    gv, gw = _cauchy_backward_op(grad, v, z, w, ctx.conj_symmetric, ctx.backend)
    return gv, None, gw, None, None


_cauchy_op.register_autograd(_cauchy_backward, setup_context=_cauchy_setup)


def _same_device(op, name, value, ref_name, ref):
    if value.device != ref.device:
        raise ValueError(f"fastcore_ai.ops.{op}: {name} must be on {ref_name}'s device {ref.device}, got {_describe(value)}")


def cauchy(v: Tensor, z: Tensor, w: Tensor, *, conj_symmetric: bool = True, backend: str = "auto") -> Tensor:
    """S4's Cauchy kernel: out[b, l] = Σ_n v[b, n] / (z[l] − w[b, n]), plus
    conj(v[b, n]) / (z[l] − conj(w[b, n])) when conj_symmetric (the conjugate half of a real system).

    Args:
      v, w: [B, N] complex64 (complex128 on cpu/reference), 1 <= N <= 4096, same dtype and device.
      z: [L] complex, v's dtype (e.g. the bilinear-mapped roots of unity); a constant (no gradient).
    Returns out [B, L] in v's dtype. Memory O(B·(N + L)) on cpu/cuda/triton (never [B, N, L]).
    Differentiable w.r.t. v and w. float32 error (complex64): relative ≤ ~N·2^-24·cond, see docs/s4.md.
    """
    check_tensor(_CAUCHY, "v", v, ndim=2, dtypes=_COMPLEX, layout="[B, N]")
    check_tensor(_CAUCHY, "w", w, ndim=2, dtypes=_COMPLEX, layout="[B, N]")
    check_tensor(_CAUCHY, "z", z, ndim=1, dtypes=_COMPLEX, layout="[L]")
    check_bool(_CAUCHY, "conj_symmetric", conj_symmetric)
    if w.shape != v.shape or w.dtype != v.dtype:
        raise ValueError(f"fastcore_ai.ops.{_CAUCHY}: w must have v's shape {tuple(v.shape)} and dtype, got {_describe(w)}")
    if z.dtype != v.dtype:
        raise TypeError(f"fastcore_ai.ops.{_CAUCHY}: z must have v's dtype {v.dtype}, got {_describe(z)}")
    check_size(_CAUCHY, "N (v.shape[1])", v.shape[1], 1, MAX_STATES, v)
    _same_device(_CAUCHY, "w", w, "v", v)
    _same_device(_CAUCHY, "z", z, "v", v)
    if z.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"fastcore_ai.ops.{_CAUCHY}: z must not require grad (the nodes are constants; gradients "
                         "flow to v and w only), got z.requires_grad=True")
    chosen = backends.select(_CAUCHY, backend, v.device, v.dtype, "v")
    return _cauchy_op(v, z, w, conj_symmetric, chosen)


# ---- vandermonde ---------------------------------------------------------------------------------

def _vand_impl(backend, v, x, L):
    if backend in ("cpu", "cuda"):
        return _native_module().s4_vandermonde(v, x, L)
    if backend == "triton":
        return _triton().vandermonde(v, x, L)
    return _ref.vandermonde(v, x, L)


def _vand_backward_impl(backend, grad, v, x):
    if backend in ("cpu", "cuda"):
        return tuple(_native_module().s4_vandermonde_backward(grad, v, x))
    if backend == "triton":
        return _triton().vandermonde_backward(grad, v, x)
    return _ref.vandermonde_backward(grad, v, x)


@torch.library.custom_op("fastcore_ai::s4_vandermonde", mutates_args=())
def _vand_op(v: Tensor, x: Tensor, L: int, backend: str) -> Tensor:
    return _vand_impl(backend, v, x, L)


@_vand_op.register_fake
def _vand_fake(v, x, L, backend):
    return v.new_empty((v.shape[0], L), dtype=v.real.dtype if v.is_complex() else v.dtype)


@torch.library.custom_op("fastcore_ai::s4_vandermonde_backward", mutates_args=())
def _vand_backward_op(grad: Tensor, v: Tensor, x: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    gv, gx = _vand_backward_impl(backend, grad.contiguous(), v, x)
    return gv, gx


@_vand_backward_op.register_fake
def _vand_backward_fake(grad, v, x, backend):
    return v.new_empty(v.shape), v.new_empty(v.shape)


def _vand_setup(ctx, inputs, output):
    v, x, L, backend = inputs
    ctx.save_for_backward(v, x)
    ctx.backend = backend


def _vand_backward(ctx, grad):
    v, x = ctx.saved_tensors
    gv, gx = _vand_backward_op(grad, v, x, ctx.backend)
    return gv, gx, None, None


_vand_op.register_autograd(_vand_backward, setup_context=_vand_setup)


def vandermonde(v: Tensor, x: Tensor, L: int, *, backend: str = "auto") -> Tensor:
    """S4D's (log-)Vandermonde kernel K[b, l] = 2 · Re Σ_n v[b, n] · exp(x[b, n] · l), l < L.

    Args:
      v, x: [B, N] complex64 (complex128 on cpu/reference), 1 <= N <= 4096 (x = Δ·A, Re x ≤ 0 for a
        stable system; Re x > 0 overflows like the exact value does).
      L: 0 <= L < 2^29.
    Returns K [B, L] float32 (float64 for complex128). Differentiable w.r.t. v and x.
    Accuracy (cpu/cuda/triton): every exp(x·l) is a block start exp(x·l0) and an in-block power, both
    evaluated directly with the phase formed in double, so the error does not grow with l:
    |K − K_exact| ≤ (N + 6)·2^-24 · 2 Σ_n |v_n exp(x_n l)| per element (docs/s4.md; tested at L = 2^20).
    """
    check_tensor(_VAND, "v", v, ndim=2, dtypes=_COMPLEX, layout="[B, N]")
    check_tensor(_VAND, "x", x, ndim=2, dtypes=_COMPLEX, layout="[B, N]")
    if x.shape != v.shape or x.dtype != v.dtype:
        raise ValueError(f"fastcore_ai.ops.{_VAND}: x must have v's shape {tuple(v.shape)} and dtype, got {_describe(x)}")
    check_size(_VAND, "N (v.shape[1])", v.shape[1], 1, MAX_STATES, v)
    check_int(_VAND, "L", L, 0, MAX_VANDERMONDE_LENGTH, "the phase Im(x)·l is formed exactly in double below 2^29")
    _same_device(_VAND, "x", x, "v", v)
    chosen = backends.select(_VAND, backend, v.device, v.dtype, "v")
    return _vand_op(v, x, L, chosen)


# ---- fft_conv ------------------------------------------------------------------------------------

def _fft_impl(backend, u, k, D, n):
    if backend in ("cpu", "cuda"):
        return _native_module().s4_fft_conv(u, k, D, n)
    if backend == "triton":
        return _triton().fft_conv(u, k, D, n)
    return _ref.fft_conv(u, k, D)


def _fft_backward_impl(backend, grad, u, k, D, n, need_u, need_k, need_D):
    if backend in ("cpu", "cuda"):
        return tuple(_native_module().s4_fft_conv_backward(grad, u, k, D, n, need_u, need_k, need_D))
    if backend == "triton":
        return _triton().fft_conv_backward(grad, u, k, D, n, need_u, need_k, need_D)
    gu, gk, gD = _ref.fft_conv_backward(grad, u, k, D)
    empty = u.new_empty((0,))
    return (gu if need_u else empty, gk if need_k else empty, gD if (need_D and D is not None) else empty)


@torch.library.custom_op("fastcore_ai::s4_fft_conv", mutates_args=())
def _fft_op(u: Tensor, k: Tensor, D: Optional[Tensor], n: int, backend: str) -> Tensor:
    return _fft_impl(backend, u, k, D, n)


@_fft_op.register_fake
def _fft_fake(u, k, D, n, backend):
    return torch.empty_like(u, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastcore_ai::s4_fft_conv_backward", mutates_args=())
def _fft_backward_op(grad: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor], n: int, need_u: bool, need_k: bool,
                     need_D: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    gu, gk, gD = _fft_backward_impl(backend, grad.contiguous(), u, k, D, n, need_u, need_k, need_D)
    return gu.contiguous(), gk.contiguous(), gD.contiguous()


@_fft_backward_op.register_fake
def _fft_backward_fake(grad, u, k, D, n, need_u, need_k, need_D, backend):
    gu = torch.empty_like(u, memory_format=torch.contiguous_format) if need_u else u.new_empty((0,))
    gk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_k else k.new_empty((0,))
    gD = torch.empty_like(D) if (need_D and D is not None) else u.new_empty((0,))
    return gu, gk, gD


def _fft_setup(ctx, inputs, output):
    u, k, D, n, backend = inputs
    ctx.save_for_backward(u, k, D)
    ctx.n, ctx.backend = n, backend


def _fft_backward(ctx, grad):
    u, k, D = ctx.saved_tensors
    need_u, need_k, need_D = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    gu, gk, gD = _fft_backward_op(grad, u, k, D, ctx.n, need_u, need_k, need_D and D is not None, ctx.backend)
    return (gu if need_u else None, gk if need_k else None, gD if (need_D and D is not None) else None, None, None)


_fft_op.register_autograd(_fft_backward, setup_context=_fft_setup)


def fft_conv(u: Tensor, k: Tensor, D: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Causal long convolution with skip: y[b, h, l] = Σ_{j ≤ l} k[h, j] u[b, h, l − j] + D[h] u[b, h, l].

    Computed as irfft(rfft(u, n) · rfft(k, n), n)[..., :L] + D·u with n = fft_conv_size(L, Lk), the
    smallest 2^a 3^b 5^c ≥ L + Lk − 1 (no wrap-around). The transforms are torch's (pocketfft/MKL,
    cuFFT); the cpu/cuda/triton backends fuse the zero padding and input cast, the spectral product,
    and the crop + skip + output cast, chunked over rows so only one chunk's spectra exist at a time.

    Args:
      u: [B, H, L] float32, bfloat16 or float16 (float64 on cpu/reference); float32 math.
      k: [H, Lk] float (any of those dtypes), 1 <= Lk <= L.
      D: optional [H] float skip weights.
    Returns y [B, H, L] in u's dtype. Differentiable w.r.t. u, k and D.
    """
    check_tensor(_FFT, "u", u, ndim=3, dtypes=_FLOATS, layout="[B, H, L]")
    check_tensor(_FFT, "k", k, ndim=2, dtypes=_FLOATS, layout="[H, Lk]")
    B, H, L = u.shape
    if k.shape[0] != H:
        raise ValueError(f"fastcore_ai.ops.{_FFT}: k must have H = u.shape[1] = {H} rows, got {_describe(k)}")
    if L > 0:
        check_size(_FFT, "Lk (k.shape[1])", k.shape[1], 1, L, k)
    _same_device(_FFT, "k", k, "u", u)
    if D is not None:
        check_tensor(_FFT, "D", D, ndim=1, dtypes=_FLOATS, layout="[H]")
        if D.shape[0] != H:
            raise ValueError(f"fastcore_ai.ops.{_FFT}: D must have H = {H} entries, got {_describe(D)}")
        _same_device(_FFT, "D", D, "u", u)
    chosen = backends.select(_FFT, backend, u.device, u.dtype, "u")
    n = fft_conv_size(L, max(k.shape[1], 1))
    return _fft_op(u, k, D, n, chosen)


# ---- ssm_step ------------------------------------------------------------------------------------

def _step_impl(backend, state, u, dA, dB, C, D):
    if backend in ("cpu", "cuda"):
        return tuple(_native_module().s4_ssm_step(state, u, dA, dB, C, D))
    if backend == "triton":
        return _triton().ssm_step(state, u, dA, dB, C, D)
    return _ref.ssm_step(state, u, dA, dB, C, D)


def _step_backward_impl(backend, grad_y, grad_state, state, u, dA, dB, C, D):
    if backend in ("cpu", "cuda"):
        return tuple(_native_module().s4_ssm_step_backward(grad_y, grad_state, state, u, dA, dB, C, D))
    if backend == "triton":
        return _triton().ssm_step_backward(grad_y, grad_state, state, u, dA, dB, C, D)
    grads = list(_ref.ssm_step_backward(grad_y, grad_state, state, u, dA, dB, C, D))
    if D is None:
        grads[5] = u.new_empty((0,))
    return tuple(grads)


@torch.library.custom_op("fastcore_ai::s4_ssm_step", mutates_args=())
def _step_op(state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor],
             backend: str) -> Tuple[Tensor, Tensor]:
    y, new_state = _step_impl(backend, state, u, dA, dB, C, D)
    return y, new_state


@_step_op.register_fake
def _step_fake(state, u, dA, dB, C, D, backend):
    return u.new_empty(u.shape), state.new_empty(state.shape)


@torch.library.custom_op("fastcore_ai::s4_ssm_step_backward", mutates_args=())
def _step_backward_op(grad_y: Tensor, grad_state: Optional[Tensor], state: Tensor, u: Tensor, dA: Tensor, dB: Tensor,
                      C: Tensor, D: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                              Tensor]:
    out = _step_backward_impl(backend, grad_y.contiguous(), grad_state, state, u, dA, dB, C, D)
    return tuple(t.contiguous() for t in out)


@_step_backward_op.register_fake
def _step_backward_fake(grad_y, grad_state, state, u, dA, dB, C, D, backend):
    gD = D.new_empty(D.shape) if D is not None else u.new_empty((0,))
    return (state.new_empty(state.shape), u.new_empty(u.shape), dA.new_empty(dA.shape), dB.new_empty(dB.shape),
            C.new_empty(C.shape), gD)


def _step_setup(ctx, inputs, output):
    state, u, dA, dB, C, D, backend = inputs
    ctx.save_for_backward(state, u, dA, dB, C, D)
    ctx.backend = backend


def _step_backward(ctx, grad_y, grad_state):
    state, u, dA, dB, C, D = ctx.saved_tensors
    if grad_y is None:
        grad_y = u.new_zeros(u.shape)
    gs, gu, gA, gB, gC, gD = _step_backward_op(grad_y, grad_state, state, u, dA, dB, C, D, ctx.backend)
    return gs, gu, gA, gB, gC, (gD if D is not None else None), None


_step_op.register_autograd(_step_backward, setup_context=_step_setup)


def _step_inplace_impl(backend, state, u, dA, dB, C, D):
    if backend in ("cpu", "cuda"):
        return _native_module().s4_ssm_step(state, u, dA, dB, C, D, True)[0]
    if backend == "triton":
        return _triton().ssm_step(state, u, dA, dB, C, D, out=state)[0]
    y, new_state = _ref.ssm_step(state, u, dA, dB, C, D)
    state.copy_(new_state)
    return y


@torch.library.custom_op("fastcore_ai::s4_ssm_step_", mutates_args=("state",))
def _step_inplace_op(state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor],
                     backend: str) -> Tensor:
    return _step_inplace_impl(backend, state, u, dA, dB, C, D)


@_step_inplace_op.register_fake
def _step_inplace_fake(state, u, dA, dB, C, D, backend):
    return u.new_empty(u.shape)


def _step_validate(state, u, dA, dB, C, D, inplace, backend) -> str:
    """Every check of ssm_step (shapes, dtypes, devices, N range, inplace rules) and the backend choice;
    raises the documented errors, returns the chosen backend."""
    check_tensor(_STEP, "state", state, ndim=3, dtypes=_COMPLEX, layout="[B, H, N]")
    B, H, N = state.shape
    check_size(_STEP, "N (state.shape[2])", N, 1, MAX_STATES, state)
    check_tensor(_STEP, "u", u, ndim=2, dtypes=_FLOATS, layout="[B, H]")
    if tuple(u.shape) != (B, H):
        raise ValueError(f"fastcore_ai.ops.{_STEP}: u must have shape [B, H] = {(B, H)}, got {_describe(u)}")
    for name, t in (("dA", dA), ("dB", dB), ("C", C)):
        check_tensor(_STEP, name, t, ndim=2, dtypes=_COMPLEX, layout="[H, N]")
        if tuple(t.shape) != (H, N) or t.dtype != state.dtype:
            raise ValueError(f"fastcore_ai.ops.{_STEP}: {name} must be [H, N] = {(H, N)} in state's dtype "
                             f"{state.dtype}, got {_describe(t)}")
        _same_device(_STEP, name, t, "state", state)
    _same_device(_STEP, "u", u, "state", state)
    if D is not None:
        check_tensor(_STEP, "D", D, ndim=1, dtypes=_FLOATS, layout="[H]")
        if D.shape[0] != H:
            raise ValueError(f"fastcore_ai.ops.{_STEP}: D must have H = {H} entries, got {_describe(D)}")
        _same_device(_STEP, "D", D, "state", state)
    check_bool(_STEP, "inplace", inplace)
    chosen = backends.select(_STEP, backend, state.device, state.dtype, "state")
    if inplace:
        if not state.is_contiguous() or state.is_conj():
            raise ValueError(f"fastcore_ai.ops.{_STEP}: inplace=True needs a contiguous, non-conjugated state, "
                             f"got {_describe(state)} with strides {state.stride()}")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (state, u, dA, dB, C, D)):
            raise ValueError(f"fastcore_ai.ops.{_STEP}: inplace=True has no autograd; use inplace=False to "
                             "differentiate (or run under torch.no_grad())")
    return chosen


# The per-step fast path. At the generation shape (B=16, H=256, N=32) the kernel is tens of µs and the
# generic path (validation, backend selection, torch.library dispatch) adds ~25 µs, so a step is dispatched
# lean when that changes nothing observable:
#   - no input requires grad under grad mode (the registered op's autograd is then a no-op),
#   - nothing intercepts calls: not compiling (torch.compiler), not jit-tracing, no functorch transform,
#     no torch function / dispatch mode, and every tensor is a plain torch.Tensor (no subclass, no
#     FakeTensor), so the registered op would run the very same native call;
#   - the chosen backend is the native one (cpu/cuda): then the native kernel is called directly, so the
#     result is bitwise the one the registered op gives (tests/test_s4_step_fast.py).
# Validation is split so that nothing is skipped and little is paid per step:
#   - the backend selection is cached per (backend argument, use_backend, FASTCORE_AI_BACKEND, device,
#     dtype), everything it depends on; a selection is cached only after a full _step_validate passed;
#   - every tensor check of _step_validate (ranks, dtypes, shapes, N range, devices, D, the in-place
#     contiguity and conjugate bit) runs in C++ on every call (`s4_ssm_step_if_valid`, ~50 ns); if one
#     fails nothing is computed and the call takes the validating path, which raises the documented error.
# An in-place step bumps the state's version counter, as the registered mutating op does, so autograd
# still detects a state that another graph saved.
_STEP_FAST_BACKENDS: Dict[tuple, str] = {}
_STEP_FAST_CACHE_SIZE = 64
_NATIVE_BACKENDS = ("cpu", "cuda")
# nn.Parameter adds no __torch_function__ / __torch_dispatch__ behaviour (S4Conv passes its D)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


# FASTCORE_AI_BACKEND as the fast path's key reads it: os.environ.get costs ~1 µs per call when the variable
# is unset (a KeyError raised and caught inside os._Environ), a quarter of the fast path's Python time, so
# the raw value is read from os.environ's own mapping where CPython has one (os.environ.__setitem__/putenv,
# and so monkeypatch.setenv, update it). Any value change still changes the key.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_BACKEND_ENV_KEY = os.environ.encodekey(backends._ENV_VAR) if hasattr(os.environ, "encodekey") else None


def _backend_env_value():
    if _ENVIRON_DATA is not None and _BACKEND_ENV_KEY is not None:
        return _ENVIRON_DATA.get(_BACKEND_ENV_KEY)
    return os.environ.get(backends._ENV_VAR)


def _step_fast_eligible(state, u, dA, dB, C, D, inplace, backend) -> bool:
    if torch.compiler.is_compiling():  # first: under dynamo the rest is never traced
        return False
    if type(inplace) is not bool or type(backend) is not str:
        return False
    plain = _PLAIN_TENSORS
    if not (type(state) in plain and type(u) in plain and type(dA) in plain and type(dB) in plain
            and type(C) in plain and (D is None or type(D) in plain)):
        return False
    if torch.is_grad_enabled() and (state.requires_grad or u.requires_grad or dA.requires_grad or dB.requires_grad
                                    or C.requires_grad or (D is not None and D.requires_grad)):
        return False
    _C = torch._C
    return not (_C._get_tracing_state() is not None or _C._are_functorch_transforms_active()
                or _C._is_torch_function_mode_enabled() or _C._len_torch_dispatch_stack() > 0)


def _step_fast(state, u, dA, dB, C, D, inplace, backend):
    """(y, new_state) through the lean path, or None when the call must take the validating registered op."""
    if not _step_fast_eligible(state, u, dA, dB, C, D, inplace, backend):
        return None
    key = (backend, backends._context_backend.get(), _backend_env_value(), state.device, state.dtype)
    chosen = _STEP_FAST_BACKENDS.get(key)
    if chosen is None:
        chosen = _step_validate(state, u, dA, dB, C, D, inplace, backend)  # raises exactly as the slow path
        if chosen not in _NATIVE_BACKENDS:
            return None
        if len(_STEP_FAST_BACKENDS) >= _STEP_FAST_CACHE_SIZE:
            _STEP_FAST_BACKENDS.clear()
        _STEP_FAST_BACKENDS[key] = chosen
    result = _native_module().s4_ssm_step_if_valid(state, u, dA, dB, C, D, inplace, MAX_STATES)
    if not result:  # a check failed: the validating path raises the documented error
        return None
    if inplace:
        torch._C._increment_version((state,))
        return result[0], state
    return result[0], result[1]


def step_fast_path_cache_clear() -> None:
    """Forget the cached backend selections of ssm_step's fast path (tests; never needed for correctness)."""
    _STEP_FAST_BACKENDS.clear()


def ssm_step(state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor] = None, *,
             inplace: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """One recurrent step of a diagonal SSM (S4D, or S4 after diagonalisation), conjugate half stored:
        state' = dA ∘ state + dB · u,   y = 2 · Re Σ_n C · state' + D · u.

    Args:
      state: [B, H, N] complex64 (complex128 on cpu/reference), 1 <= N <= 4096.
      u: [B, H] float (float32/bfloat16/float16/float64); dA, dB, C: [H, N] in state's dtype; D: [H] float or None.
    Returns (y [B, H] in u's dtype, new_state [B, H, N]). By default functional: `state` is NOT modified
    (so the step is differentiable w.r.t. every input and safe under torch.compile); rebind it:
    `y, state = ssm_step(state, u, ...)`. With inplace=True the new state is written into `state` (which
    must be contiguous and not require grad; no autograd) and returned as new_state: no allocation per
    step, the generation fast path.
    """
    fast = _step_fast(state, u, dA, dB, C, D, inplace, backend)
    if fast is not None:
        return fast
    chosen = _step_validate(state, u, dA, dB, C, D, inplace, backend)
    if inplace:
        return _step_inplace_op(state, u, dA, dB, C, D, chosen), state
    return _step_op(state, u, dA, dB, C, D, chosen)

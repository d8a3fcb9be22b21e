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

import functools

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _native, backends
from .._validation import _describe, check_bool, check_int, check_size, check_tensor
from ..reference import s4 as _ref
from ._define import NATIVE_BACKENDS, define_op, native, native_impls, triton

__all__ = ["cauchy", "vandermonde", "fft_conv", "fft_conv_size", "ssm_step", "MAX_STATES"]

MAX_STATES = 4096
MAX_VANDERMONDE_LENGTH = 2**29 - 1  # the phase Im(x)·l is exact in double below 2^29 (see s4.h)
_COMPLEX = (torch.complex64, torch.complex128)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def fft_conv_size(L: int, Lk: int) -> int:
    """The FFT length fft_conv uses for inputs of length L and a kernel of length Lk (1 <= Lk <= L): a fast
    2^a 3^b 5^c >= L + Lk - 1, or the next power of two when it is about as cheap
    (fastcore_ai.reference.s4.fft_conv_size)."""
    check_int(_FFT_SIZE, "L", L, 1, 2**62)
    check_int(_FFT_SIZE, "Lk", Lk, 1, L, "fft_conv takes kernels at most as long as the input")
    return _ref.fft_conv_size(L, Lk)


def _complex_table(op: str) -> backends.OpTable:
    """complex64 everywhere, complex128 on the cpu and reference backends (gradcheck, oracle)."""
    both = frozenset(_COMPLEX)
    return backends.OpTable(
        op,
        ("cuda", "triton", "cpu", "reference"),
        {
            "cuda": backends.Support(frozenset({torch.complex64})),
            "triton": backends.Support(frozenset({torch.complex64})),
            "cpu": backends.Support(both),
            "reference": backends.Support(both),
        },
    )


_CAUCHY, _VAND, _FFT, _STEP = "cauchy", "vandermonde", "fft_conv", "ssm_step"
_FFT_SIZE = "fft_conv_size"
backends.register_op(_complex_table(_CAUCHY))
backends.register_op(_complex_table(_VAND))
backends.register_op(backends.standard_table(_FFT))
backends.register_op(_complex_table(_STEP))


# ---- cauchy --------------------------------------------------------------------------------------


@define_op(
    "s4_cauchy_backward",
    impls=native_impls("s4_cauchy_backward", triton_launcher=("s4", "cauchy_backward"), reference=_ref.cauchy_backward),
    contiguous_args=("grad",),
)
def _cauchy_backward_op(grad: Tensor, v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool) -> Tuple[Tensor, Tensor]:
    return v.new_empty(v.shape), v.new_empty(v.shape)


def _cauchy_setup(ctx, inputs, output):
    v, z, w, conj_symmetric, backend = inputs
    ctx.save_for_backward(v, z, w)
    ctx.conj_symmetric, ctx.backend = conj_symmetric, backend


def _cauchy_backward(ctx, grad):
    v, z, w = ctx.saved_tensors
    gv, gw = _cauchy_backward_op(grad, v, z, w, ctx.conj_symmetric, backend=ctx.backend)
    return gv, None, gw, None, None


@define_op(
    "s4_cauchy",
    impls=native_impls("s4_cauchy", triton_launcher=("s4", "cauchy"), reference=_ref.cauchy),
    autograd=(_cauchy_setup, _cauchy_backward),
)
def _cauchy_op(v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool) -> Tensor:
    return v.new_empty((v.shape[0], z.shape[0]))


def _same_device(op, name, value, ref_name, ref):
    if value.device != ref.device:
        raise ValueError(
            f"fastcore_ai.ops.{op}: {name} must be on {ref_name}'s device {ref.device}, got {_describe(value)}"
        )


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
        raise ValueError(
            f"fastcore_ai.ops.{_CAUCHY}: w must have v's shape {tuple(v.shape)} and dtype, got {_describe(w)}"
        )
    if z.dtype != v.dtype:
        raise TypeError(f"fastcore_ai.ops.{_CAUCHY}: z must have v's dtype {v.dtype}, got {_describe(z)}")
    check_size(_CAUCHY, "N (v.shape[1])", v.shape[1], 1, MAX_STATES, v)
    _same_device(_CAUCHY, "w", w, "v", v)
    _same_device(_CAUCHY, "z", z, "v", v)
    if z.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"fastcore_ai.ops.{_CAUCHY}: z must not require grad (the nodes are constants; gradients "
            "flow to v and w only), got z.requires_grad=True"
        )
    chosen = backends.select(_CAUCHY, backend, v.device, v.dtype, "v")
    return _cauchy_op(v, z, w, conj_symmetric, backend=chosen)


# ---- vandermonde ---------------------------------------------------------------------------------


@define_op(
    "s4_vandermonde_backward",
    impls=native_impls(
        "s4_vandermonde_backward", triton_launcher=("s4", "vandermonde_backward"), reference=_ref.vandermonde_backward
    ),
    contiguous_args=("grad",),
)
def _vand_backward_op(grad: Tensor, v: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    return v.new_empty(v.shape), v.new_empty(v.shape)


def _vand_setup(ctx, inputs, output):
    v, x, L, backend = inputs
    ctx.save_for_backward(v, x)
    ctx.backend = backend


def _vand_backward(ctx, grad):
    v, x = ctx.saved_tensors
    gv, gx = _vand_backward_op(grad, v, x, backend=ctx.backend)
    return gv, gx, None, None


@define_op(
    "s4_vandermonde",
    impls=native_impls("s4_vandermonde", triton_launcher=("s4", "vandermonde"), reference=_ref.vandermonde),
    autograd=(_vand_setup, _vand_backward),
)
def _vand_op(v: Tensor, x: Tensor, L: int) -> Tensor:
    return v.new_empty((v.shape[0], L), dtype=v.real.dtype if v.is_complex() else v.dtype)


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
        raise ValueError(
            f"fastcore_ai.ops.{_VAND}: x must have v's shape {tuple(v.shape)} and dtype, got {_describe(x)}"
        )
    check_size(_VAND, "N (v.shape[1])", v.shape[1], 1, MAX_STATES, v)
    check_int(_VAND, "L", L, 0, MAX_VANDERMONDE_LENGTH, "the phase Im(x)·l is formed exactly in double below 2^29")
    _same_device(_VAND, "x", x, "v", v)
    chosen = backends.select(_VAND, backend, v.device, v.dtype, "v")
    return _vand_op(v, x, L, backend=chosen)


# ---- fft_conv ------------------------------------------------------------------------------------


def _empty_forward(impl):
    """fft_conv's impl with the empty case done first (DESIGN rule 7: an empty input gives an empty output
    without a launch; the kernels and MKL reject a zero-length transform or an empty batch)."""

    def run(u, k, D, n):
        if u.numel() == 0:
            return torch.empty(u.shape, dtype=u.dtype, device=u.device)
        return impl(u, k, D, n)

    run.__name__ = run.__qualname__ = f"{impl.__name__}_or_empty"
    return run


def _empty_backward(impl):
    """fft_conv_backward's impl with the empty case first: nothing reaches k or D from an empty u."""

    def run(grad, u, k, D, n, need_u, need_k, need_D):
        if u.numel() == 0:
            empty = u.new_empty((0,))
            return (
                torch.zeros(u.shape, dtype=u.dtype, device=u.device) if need_u else empty,
                torch.zeros(k.shape, dtype=k.dtype, device=k.device) if need_k else u.new_empty((0,)),
                torch.zeros(D.shape, dtype=D.dtype, device=D.device)
                if (need_D and D is not None)
                else u.new_empty((0,)),
            )
        return impl(grad, u, k, D, n, need_u, need_k, need_D)

    run.__name__ = run.__qualname__ = f"{impl.__name__}_or_empty"
    return run


def _fft_reference(u, k, D, n):
    # it derives n = fft_conv_size(L, Lk) itself; without D its result is a crop of the irfft (strided)
    return _ref.fft_conv(u, k, D).contiguous()


def _fft_backward_reference(grad, u, k, D, n, need_u, need_k, need_D):
    gu, gk, gD = _ref.fft_conv_backward(grad, u, k, D)
    # one empty tensor per gradient not asked for (outputs of a registered op must not alias each other)
    return (
        gu if need_u else u.new_empty((0,)),
        gk if need_k else u.new_empty((0,)),
        gD if (need_D and D is not None) else u.new_empty((0,)),
    )


@define_op(
    "s4_fft_conv_backward",
    impls={
        backend: _empty_backward(impl)
        for backend, impl in native_impls(
            "s4_fft_conv_backward", triton_launcher=("s4", "fft_conv_backward"), reference=_fft_backward_reference
        ).items()
    },
    contiguous_args=("grad",),
    contiguous_outputs=True,
)
def _fft_backward_op(
    grad: Tensor, u: Tensor, k: Tensor, D: Optional[Tensor], n: int, need_u: bool, need_k: bool, need_D: bool
) -> Tuple[Tensor, Tensor, Tensor]:
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
    gu, gk, gD = _fft_backward_op(grad, u, k, D, ctx.n, need_u, need_k, need_D and D is not None, backend=ctx.backend)
    return (gu if need_u else None, gk if need_k else None, gD if (need_D and D is not None) else None, None, None)


@define_op(
    "s4_fft_conv",
    impls={
        backend: _empty_forward(impl)
        for backend, impl in native_impls(
            "s4_fft_conv", triton_launcher=("s4", "fft_conv"), reference=_fft_reference
        ).items()
    },
    autograd=(_fft_setup, _fft_backward),
)
def _fft_op(u: Tensor, k: Tensor, D: Optional[Tensor], n: int) -> Tensor:
    return torch.empty_like(u, memory_format=torch.contiguous_format)


# fft_conv_size is ~5 µs of Python loops, as much as the rest of fft_conv's wrapper: memoised outside
# torch.compile (dynamo traces the plain function).
_cached_fft_conv_size = functools.lru_cache(maxsize=4096)(_ref.fft_conv_size)


def fft_conv(u: Tensor, k: Tensor, D: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Causal long convolution with skip: y[b, h, l] = Σ_{j ≤ l} k[h, j] u[b, h, l − j] + D[h] u[b, h, l].

    Computed as irfft(rfft(u, n) · rfft(k, n), n)[..., :L] + D·u with n = fft_conv_size(L, Lk), a fast
    2^a 3^b 5^c ≥ L + Lk − 1 (no wrap-around; the next power of two when it is about as cheap). The
    transforms are MKL's on the CPU (called directly with cached descriptors where torch links MKL, else
    torch's), cuFFT on CUDA; the cpu/cuda/triton backends fuse the zero padding and input cast, the
    spectral product, and the crop + skip + output cast, in row blocks so only one block's spectra exist
    at a time.

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
    Lk = max(k.shape[1], 1)
    # the unchecked size: L = 0 (an empty result, no transform) is valid here and Lk <= L was checked above
    n = _ref.fft_conv_size(L, Lk) if torch.compiler.is_compiling() else _cached_fft_conv_size(L, Lk)
    return _fft_op(u, k, D, n, backend=chosen)


# ---- ssm_step ------------------------------------------------------------------------------------


def _step_backward_reference(grad_y, grad_state, state, u, dA, dB, C, D):
    grads = list(_ref.ssm_step_backward(grad_y, grad_state, state, u, dA, dB, C, D))
    if D is None:
        grads[5] = u.new_empty((0,))
    return tuple(grads)


@define_op(
    "s4_ssm_step_backward",
    impls=native_impls(
        "s4_ssm_step_backward", triton_launcher=("s4", "ssm_step_backward"), reference=_step_backward_reference
    ),
    contiguous_args=("grad_y",),
    contiguous_outputs=True,
)
def _step_backward_op(
    grad_y: Tensor,
    grad_state: Optional[Tensor],
    state: Tensor,
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gD = D.new_empty(D.shape) if D is not None else u.new_empty((0,))
    return (
        state.new_empty(state.shape),
        u.new_empty(u.shape),
        dA.new_empty(dA.shape),
        dB.new_empty(dB.shape),
        C.new_empty(C.shape),
        gD,
    )


def _step_setup(ctx, inputs, output):
    state, u, dA, dB, C, D, backend = inputs
    ctx.save_for_backward(state, u, dA, dB, C, D)
    ctx.backend = backend


def _step_backward(ctx, grad_y, grad_state):
    state, u, dA, dB, C, D = ctx.saved_tensors
    if grad_y is None:
        grad_y = u.new_zeros(u.shape)
    gs, gu, gA, gB, gC, gD = _step_backward_op(grad_y, grad_state, state, u, dA, dB, C, D, backend=ctx.backend)
    return gs, gu, gA, gB, gC, (gD if D is not None else None), None


@define_op(
    "s4_ssm_step",
    impls=native_impls("s4_ssm_step", triton_launcher=("s4", "ssm_step"), reference=_ref.ssm_step),
    autograd=(_step_setup, _step_backward),
)
def _step_op(state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return u.new_empty(u.shape), state.new_empty(state.shape)


# the in-place step: y, with the new state written into `state`
_native_step, _triton_step = native("s4_ssm_step"), triton("s4", "ssm_step")


def _step_inplace_native(state, u, dA, dB, C, D):
    return _native_step(state, u, dA, dB, C, D, True)[0]


def _step_inplace_triton(state, u, dA, dB, C, D):
    return _triton_step(state, u, dA, dB, C, D, state)[0]  # out=state


def _step_inplace_reference(state, u, dA, dB, C, D):
    y, new_state = _ref.ssm_step(state, u, dA, dB, C, D)
    state.copy_(new_state)
    return y


@define_op(
    "s4_ssm_step_",
    mutates_args=("state",),
    impls={
        "cpu": _step_inplace_native,
        "cuda": _step_inplace_native,
        "triton": _step_inplace_triton,
        "reference": _step_inplace_reference,
    },
)
def _step_inplace_op(state: Tensor, u: Tensor, dA: Tensor, dB: Tensor, C: Tensor, D: Optional[Tensor]) -> Tensor:
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
            raise ValueError(
                f"fastcore_ai.ops.{_STEP}: {name} must be [H, N] = {(H, N)} in state's dtype "
                f"{state.dtype}, got {_describe(t)}"
            )
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
            raise ValueError(
                f"fastcore_ai.ops.{_STEP}: inplace=True needs a contiguous, non-conjugated state, "
                f"got {_describe(state)} with strides {state.stride()}"
            )
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (state, u, dA, dB, C, D)):
            raise ValueError(
                f"fastcore_ai.ops.{_STEP}: inplace=True has no autograd; use inplace=False to "
                "differentiate (or run under torch.no_grad())"
            )
    return chosen


# The per-step fast path. A generation step's kernel is short, and the validating path (the Python checks of
# _step_validate, then the op) would add more than the kernel's own variation (benchmarks/RESULTS.md, per-call
# overhead), so a step that nothing can observe goes straight to the native kernel:
#   - _step_op.direct_call_allowed: every tensor argument is a plain torch.Tensor, none requires grad under
#     grad mode, and nothing intercepts (not compiling or jit-tracing, no functorch transform, no torch
#     function / dispatch mode), so the registered op would run the very same native call;
#   - backends.select (cached per call signature) picks a native backend (cpu/cuda), so the result is
#     bitwise the registered op's (tests/test_s4_step_fast.py);
#   - every tensor check of _step_validate (ranks, dtypes, shapes, N range, devices, D, the in-place
#     contiguity and conjugate bit) runs in C++ with the kernel (`s4_ssm_step_if_valid`); if one
#     fails nothing is computed. Whenever a step cannot go this way (including a selection that raises), it
#     takes the validating path, which raises the documented errors in the documented order.
# An in-place step bumps the state's version counter, as the registered mutating op does, so autograd
# still detects a state that another graph saved.
# The kernel is bound once (the extension loads at import; without it no native backend is ever selected), and
# the path is inlined in ssm_step: a lookup or a call frame is a measurable share of what it costs.
_step_if_valid = _native.native().s4_ssm_step_if_valid if _native.load_error() is None else None


def step_fast_path_cache_clear() -> None:
    """Forget the cached backend selections (ssm_step's fast path shares backends.select's cache; tests)."""
    backends.clear_selection_cache()


def ssm_step(
    state: Tensor,
    u: Tensor,
    dA: Tensor,
    dB: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
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
    if type(inplace) is bool and _step_op.direct_call_allowed((state, u, dA, dB, C, D)):
        try:
            chosen = backends.select(_STEP, backend, state.device, state.dtype, "state")
        except Exception:  # e.g. state is None, or no backend serves it: the validating path says why
            chosen = None
        result = None
        if chosen in NATIVE_BACKENDS:
            try:
                result = _step_if_valid(state, u, dA, dB, C, D, inplace, MAX_STATES)
            except TypeError:  # None for a required tensor: refused by the binding before anything runs
                pass
        if result:  # else not native, or a check failed: the validating path runs (and raises the documented error)
            if inplace:
                torch._C._increment_version((state,))
                return result[0], state
            return result[0], result[1]
    chosen = _step_validate(state, u, dA, dB, C, D, inplace, backend)
    if inplace:
        return _step_inplace_op(state, u, dA, dB, C, D, backend=chosen), state
    return _step_op(state, u, dA, dB, C, D, backend=chosen)

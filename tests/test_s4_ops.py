"""fastcore_ai.ops.{cauchy, vandermonde, fft_conv, ssm_step}: forward and backward parity of every
backend with the float64/complex128 reference, Vandermonde accuracy at L = 2^20, gradcheck,
registration (opcheck, torch.compile), empty inputs, error paths."""

import math
import subprocess
import sys

import pytest
import torch

from fastcore_ai import _native, ops
from fastcore_ai.reference import s4 as ref
from _helpers import BACKEND_DEVICES, backend_dtype_cases, relative_error, require_backend

# complex64 / float32 bounds on the relative Frobenius error against the complex128 oracle. The sums
# have N (Cauchy/Vandermonde forward, step) or L (backward) terms of well-conditioned S4-like inputs.
FWD_BOUND = 2e-6
BWD_BOUND = 2e-5


def s4_like(B, N, generator=None, dtype=torch.complex64):
    """Residues v and poles w like S4's (Re w < 0, Im w spread as in S4D-Lin)."""
    v = torch.randn(B, N, dtype=torch.complex128, generator=generator)
    w = (
        -0.5 * torch.rand(B, N, generator=generator, dtype=torch.float64)
        - 0.05
        + 1j
        * math.pi
        * torch.arange(N, dtype=torch.float64)
        * (0.5 + torch.rand(B, N, dtype=torch.float64, generator=generator))
    )
    return v.to(dtype), w.to(dtype)


def bilinear_nodes(L, dtype=torch.complex64, dt=0.1):
    """S4's nodes: z = (2/Δ)(1 − ω)/(1 + ω), ω the rfft grid of a length-2(L−1) signal (rows of a kernel)."""
    omega = torch.exp(-2j * math.pi * torch.arange(L, dtype=torch.float64) / max(2 * (L - 1), 1))
    omega = torch.where((omega + 1).abs() < 1e-9, omega * (1 - 1e-6), omega)
    return ((2 / dt) * (1 - omega) / (1 + omega)).to(dtype)


def cast_case(backend, device, *tensors):
    return [t.to(device) for t in tensors]


def grads_of(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    torch.autograd.backward(out, grad_out)
    return out, [t.grad for t in leaves]


# ---- cauchy --------------------------------------------------------------------------------------

CAUCHY_SHAPES = [(1, 1, 1), (3, 7, 33), (2, 33, 100), (2, 64, 17)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("B,N,L", CAUCHY_SHAPES)
@pytest.mark.parametrize("conj_symmetric", [True, False])
def test_cauchy_parity(backend, device, B, N, L, conj_symmetric, poisoned_outputs):
    require_backend("cauchy", backend, device, torch.complex64)
    v, w = s4_like(B, N)
    z = bilinear_nodes(L)
    g = torch.randn(B, L, dtype=torch.complex64)
    out, (gv, gw) = grads_of(
        lambda a, c: ops.cauchy(a, z.to(device), c, conj_symmetric=conj_symmetric, backend=backend),
        cast_case(backend, device, v, w),
        g.to(device),
    )
    ref_out, (rv, rw) = grads_of(
        lambda a, c: ref.cauchy(a, z.to(torch.complex128), c, conj_symmetric),
        [v.to(torch.complex128), w.to(torch.complex128)],
        g.to(torch.complex128),
    )
    assert out.shape == (B, L) and out.dtype == torch.complex64
    assert relative_error(torch.view_as_real(out), torch.view_as_real(ref_out)) < FWD_BOUND
    assert relative_error(torch.view_as_real(gv), torch.view_as_real(rv)) < BWD_BOUND
    assert relative_error(torch.view_as_real(gw), torch.view_as_real(rw)) < BWD_BOUND


def test_cauchy_large_n_and_odd_l_cpu():
    """N up to 4096 (not only powers of two) and an rfft-sized L, cpu backend."""
    for N, L in ((4096, 9), (1000, 8193 // 64)):
        v, w = s4_like(2, N)
        z = bilinear_nodes(L)
        out = ops.cauchy(v, z, w, backend="cpu")
        expected = ref.cauchy(v.to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128))
        assert relative_error(torch.view_as_real(out), torch.view_as_real(expected)) < 1e-5


def test_cauchy_complex128_cpu_matches_reference_tightly():
    v, w = s4_like(3, 13, dtype=torch.complex128)
    z = bilinear_nodes(50, torch.complex128)
    out = ops.cauchy(v, z, w, backend="cpu")
    assert relative_error(torch.view_as_real(out), torch.view_as_real(ref.cauchy(v, z, w))) < 1e-13


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cauchy_gradcheck(backend):
    v, w = s4_like(2, 5, dtype=torch.complex128)
    z = bilinear_nodes(7, torch.complex128)
    v.requires_grad_(True)
    w.requires_grad_(True)
    for conj in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, c: ops.cauchy(a, z, c, conj_symmetric=conj, backend=backend), (v, w), eps=1e-6, atol=1e-7
        )


def test_cauchy_empty():
    v, w = s4_like(0, 3)
    assert ops.cauchy(v, bilinear_nodes(4), w, backend="cpu").shape == (0, 4)
    v, w = s4_like(2, 3)
    assert ops.cauchy(v, bilinear_nodes(0), w, backend="cpu").shape == (2, 0)


def test_cauchy_conjugate_input_is_resolved():
    """A lazily conjugated view (conj bit) must give conj-input results, not the un-conjugated ones."""
    v, w = s4_like(2, 6)
    z = bilinear_nodes(9)
    out = ops.cauchy(v.conj(), z, w, backend="cpu")
    expected = ref.cauchy(v.conj().resolve_conj().to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128))
    assert relative_error(torch.view_as_real(out), torch.view_as_real(expected)) < 1e-5


# ---- vandermonde ---------------------------------------------------------------------------------

VAND_SHAPES = [(1, 1, 1), (3, 7, 100), (2, 32, 257), (2, 5, 64)]


def s4d_like(B, N, dt=0.05, dtype=torch.complex64):
    """x = Δ·A with S4D-Lin A = −1/2 + iπn, and v = C·B̄ random."""
    A = -0.5 + 1j * math.pi * torch.arange(N, dtype=torch.float64)
    dts = dt * (0.5 + torch.rand(B, 1, dtype=torch.float64))
    x = (dts * A).to(dtype)
    v = torch.randn(B, N, dtype=torch.complex128).to(dtype)
    return v, x


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("B,N,L", VAND_SHAPES)
def test_vandermonde_parity(backend, device, B, N, L, poisoned_outputs):
    require_backend("vandermonde", backend, device, torch.complex64)
    v, x = s4d_like(B, N)
    g = torch.randn(B, L)
    out, (gv, gx) = grads_of(
        lambda a, b: ops.vandermonde(a, b, L, backend=backend), cast_case(backend, device, v, x), g.to(device)
    )
    ref_out, (rv, rx) = grads_of(
        lambda a, b: ref.vandermonde(a, b, L), [v.to(torch.complex128), x.to(torch.complex128)], g.double()
    )
    assert out.shape == (B, L) and out.dtype == torch.float32
    # the reference backend in complex64 forms x·l in float32 (phase error ~|x·l|·2^-24): looser
    assert relative_error(out, ref_out) < (1e-5 if backend == "reference" else FWD_BOUND)
    assert relative_error(torch.view_as_real(gv), torch.view_as_real(rv)) < BWD_BOUND
    assert relative_error(torch.view_as_real(gx), torch.view_as_real(rx)) < BWD_BOUND


def _vandermonde_oracle_chunked(v, x, L, chunk=1 << 16):
    """complex128 K for long L without materialising [B, N, L] at once."""
    v, x = v.to(torch.complex128), x.to(torch.complex128)
    parts = []
    for start in range(0, L, chunk):
        steps = torch.arange(start, min(start + chunk, L), dtype=torch.float64)
        parts.append(2 * (v[:, :, None] * torch.exp(x[:, :, None] * steps)).sum(1).real)
    return torch.cat(parts, dim=1)


def test_vandermonde_accuracy_at_2_pow_20():
    """L = 2^20: the stated per-element bound (N + 6)·2^-24·2Σ|v e^{xl}| holds against complex128, and
    the kernel is far more accurate than repeated multiplication in complex64 (which drifts with l)."""
    L, N = 1 << 20, 16
    A = -1e-5 + 1j * math.pi * torch.arange(1, N + 1, dtype=torch.float64) / 7  # slow decay: long memory
    x = (0.01 * A[None, :]).to(torch.complex64)
    v = torch.randn(1, N, dtype=torch.complex128).to(torch.complex64)
    out = ops.vandermonde(v, x, L, backend="cpu").double()
    expected = _vandermonde_oracle_chunked(v, x, L)
    steps = torch.arange(L, dtype=torch.float64)
    magnitude = 2 * (v.abs().double()[:, :, None] * torch.exp(x.real.double()[:, :, None] * steps)).sum(1)
    bound = (N + 6) * 2.0**-24 * magnitude
    assert bool(((out - expected).abs() <= bound).all())
    # naive: e_{l+1} = e_l · exp(x), complex64, over the first 2^16 steps (already visible drift).
    M = 1 << 16
    step = torch.exp(x)
    e = torch.ones_like(x)
    naive = torch.empty(1, M)
    for l in range(0, M):
        naive[:, l] = 2 * (v * e).sum(1).real
        e = e * step
    naive_error = relative_error(naive, expected[:, :M])
    ours_error = relative_error(out[:, :M], expected[:, :M])
    assert ours_error * 20 < naive_error


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_vandermonde_gradcheck(backend):
    v, x = s4d_like(2, 4, dtype=torch.complex128)
    v.requires_grad_(True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: ops.vandermonde(a, b, 70, backend=backend), (v, x), eps=1e-6, atol=1e-6
    )


def test_vandermonde_complex128_cpu_tight():
    v, x = s4d_like(2, 9, dtype=torch.complex128)
    assert relative_error(ops.vandermonde(v, x, 300, backend="cpu"), ref.vandermonde(v, x, 300)) < 1e-12


def test_vandermonde_empty():
    v, x = s4d_like(0, 3)
    assert ops.vandermonde(v, x, 5, backend="cpu").shape == (0, 5)
    v, x = s4d_like(2, 3)
    assert ops.vandermonde(v, x, 0, backend="cpu").shape == (2, 0)


# ---- fft_conv ------------------------------------------------------------------------------------

FFT_SHAPES = [(1, 1, 1, 1), (2, 3, 17, 17), (2, 4, 100, 33), (1, 2, 64, 64)]
FFT_BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("B,H,L,Lk", FFT_SHAPES)
@pytest.mark.parametrize("with_D", [True, False])
def test_fft_conv_parity(backend, device, B, H, L, Lk, with_D, poisoned_outputs):
    require_backend("fft_conv", backend, device)
    u, k = torch.randn(B, H, L), torch.randn(H, Lk) / math.sqrt(Lk)
    D = torch.randn(H) if with_D else None
    g = torch.randn(B, H, L)
    inputs = [u, k] + ([D] if with_D else [])
    out, grads = grads_of(
        lambda *a: ops.fft_conv(a[0], a[1], a[2] if with_D else None, backend=backend),
        [t.to(device) for t in inputs],
        g.to(device),
    )
    ref_out, ref_grads = grads_of(
        lambda *a: ref.fft_conv(a[0], a[1], a[2] if with_D else None), [t.double() for t in inputs], g.double()
    )
    assert out.shape == (B, H, L) and out.dtype == torch.float32
    assert relative_error(out, ref_out) < 1e-5
    for actual, expected in zip(grads, ref_grads):
        assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize(
    "backend,device,dtype", backend_dtype_cases("fft_conv", [torch.bfloat16, torch.float16, torch.float64])
)
def test_fft_conv_dtypes_non_contiguous(backend, device, dtype, poisoned_outputs):
    require_backend("fft_conv", backend, device, dtype)
    base = torch.randn(2, 40, 3).to(dtype)
    u = base.transpose(1, 2)  # [2, 3, 40], non-contiguous
    k = torch.randn(3, 25) / 5
    D = torch.randn(3)
    out = ops.fft_conv(u.to(device), k.to(device), D.to(device), backend=backend)
    expected = ref.fft_conv(u.double(), k.double(), D.double())
    assert out.dtype == dtype and out.shape == u.shape
    # the low-precision bound is the rounding of the output (the math is float32)
    assert relative_error(out, expected) < FFT_BOUNDS[dtype]


def test_fft_conv_chunked_equals_unchunked_cpu():
    """Row chunking (a memory bound) must not change a bit of the result, forward or backward."""
    native = _native.native()
    u, k, D, g = torch.randn(3, 5, 50), torch.randn(5, 20), torch.randn(5), torch.randn(3, 5, 50)
    n = ops.fft_conv_size(50, 20)
    whole = native.s4_fft_conv(u, k, D, n, 0)
    for chunk in (1, 2, 7):
        assert torch.equal(native.s4_fft_conv(u, k, D, n, chunk), whole)
        for a, b in zip(
            native.s4_fft_conv_backward(g, u, k, D, n, True, True, True, chunk),
            native.s4_fft_conv_backward(g, u, k, D, n, True, True, True, 0),
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fft_conv_cpu_blocks_independent_of_threads(dtype):
    """The CPU forward splits rows over threads, each running the pipeline on its own blocks (chunk_rows
    sets the block) in head-major row order, with MKL's DFTI called directly (cached descriptors) or through
    at::fft: one thread or several, any block size, either FFT path, a bit-identical result."""
    native = _native.native()
    u, k, D = (t.to(dtype) for t in (torch.randn(4, 5, 300), torch.randn(5, 120), torch.randn(5)))
    n = ops.fft_conv_size(300, 120)
    threads = torch.get_num_threads()
    direct = native.s4_fft_direct_mkl()
    results = []
    try:
        for use_direct in (True, False):
            native.s4_fft_direct_mkl(use_direct)
            for count in (1, max(2, threads)):
                torch.set_num_threads(count)
                results += [native.s4_fft_conv(u, k, D, n, block) for block in (0, 1, 3, 8)]
                results.append(native.s4_fft_conv(u, k, None, n, 0) + D[:, None] * u)  # the no-skip kernel
    finally:
        torch.set_num_threads(threads)
        native.s4_fft_direct_mkl(direct)
    assert all(torch.equal(r, results[0]) for i, r in enumerate(results) if i % 5 != 4)
    expected = ref.fft_conv(u.double(), k.double(), D.double())
    assert relative_error(results[0], expected) < (1e-5 if dtype != torch.bfloat16 else 1.6e-2)
    assert relative_error(results[4], expected) < (1e-5 if dtype != torch.bfloat16 else 1.6e-2)


def test_fft_conv_direct_mkl_is_linked_where_torch_has_mkl():
    """The CPU forward's FFTs go to MKL's DFTI directly exactly where torch's own CPU FFTs are MKL's (without
    MKL the at::fft fallback runs; its results are checked bitwise above)."""
    assert _native.native().s4_fft_direct_mkl() == torch.backends.mkl.is_available()


def test_fft_conv_cpu_many_shapes_cached_descriptors():
    """Many (n, block) descriptor keys in one process (more than the pool keeps), both FFT paths."""
    native = _native.native()
    for L, Lk, B, H in ((7, 7, 1, 1), (64, 30, 3, 2), (100, 100, 2, 9), (129, 64, 5, 3), (1000, 1000, 1, 3)):
        u, k, D = torch.randn(B, H, L), torch.randn(H, Lk), torch.randn(H)
        n = ops.fft_conv_size(L, Lk)
        expected = ref.fft_conv(u.double(), k.double(), D.double())
        for block in (0, 1, 2, 4):
            out = native.s4_fft_conv(u, k, D, n, block)
            assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fft_conv_gradcheck(backend):
    u = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    # fast_mode (random projections): each torch.fft call costs ~20 ms of MKL setup on small inputs
    assert torch.autograd.gradcheck(lambda a, b, c: ops.fft_conv(a, b, c, backend=backend), (u, k, D), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.fft_conv(a, b, None, backend=backend), (u, k), fast_mode=True)


def test_fft_conv_empty():
    assert ops.fft_conv(torch.randn(0, 3, 8), torch.randn(3, 4), backend="cpu").shape == (0, 3, 8)
    assert ops.fft_conv(torch.randn(2, 0, 8), torch.randn(0, 4), backend="cpu").shape == (2, 0, 8)


def test_fft_size_is_smooth_and_large_enough():
    for L, Lk in ((1, 1), (16384, 16384), (1000, 7), (8193, 8193)):
        n = ops.fft_conv_size(L, Lk)
        assert n >= L + Lk - 1
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1
    assert ops.fft_conv_size(16384, 16384) == 32768
    # the next power of two where its n·log n is within 1.3x of the smallest smooth size's
    assert ops.fft_conv_size(1000, 1000) == 2048 and ops.fft_conv_size(1500, 1500) == 3000
    assert ops.fft_conv_size(8193, 8193) == 16875


# ---- ssm_step ------------------------------------------------------------------------------------


def step_inputs(B, H, N, dtype=torch.complex64):
    real = torch.float64
    dA = torch.exp(torch.complex(-0.1 * torch.rand(H, N, dtype=real), torch.randn(H, N, dtype=real))).to(dtype)
    dB = torch.randn(H, N, dtype=torch.complex128).to(dtype)
    C = torch.randn(H, N, dtype=torch.complex128).to(dtype)
    state = torch.randn(B, H, N, dtype=torch.complex128).to(dtype)
    u = torch.randn(B, H, dtype=real)
    return state, u, dA, dB, C, torch.randn(H)


def cpu_step_checked(state, u, dA, dB, C, D):
    """ops.ssm_step on the cpu backend (functional), checked against the complex128 reference: (y, new_state)."""
    y, s2 = ops.ssm_step(state, u, dA, dB, C, D, backend="cpu")
    ry, rs = ref.ssm_step(
        state.to(torch.complex128),
        u.double(),
        dA.to(torch.complex128),
        dB.to(torch.complex128),
        C.to(torch.complex128),
        None if D is None else D.double(),
    )
    assert relative_error(y, ry) < 1e-5
    assert relative_error(torch.view_as_real(s2), torch.view_as_real(rs)) < 1e-6
    return y, s2


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("B,H,N", [(1, 1, 1), (3, 5, 7), (2, 16, 32)])
@pytest.mark.parametrize("with_D", [True, False])
def test_ssm_step_parity(backend, device, B, H, N, with_D, poisoned_outputs):
    require_backend("ssm_step", backend, device, torch.complex64)
    state, u, dA, dB, C, D = step_inputs(B, H, N)
    D = D if with_D else None
    gy, gs = torch.randn(B, H), torch.randn(B, H, N, dtype=torch.complex64)
    inputs = [state, u.float(), dA, dB, C] + ([D] if with_D else [])
    fn = lambda *a: ops.ssm_step(*a[:5], a[5] if with_D else None, backend=backend)  # noqa: E731
    (y, s2), grads = grads_of(fn, [t.to(device) for t in inputs], (gy.to(device), gs.to(device)))
    up = [t.to(torch.complex128) if t.is_complex() else t.double() for t in inputs]
    (ry, rs), rgrads = grads_of(
        lambda *a: ref.ssm_step(*a[:5], a[5] if with_D else None), up, (gy.double(), gs.to(torch.complex128))
    )
    assert y.shape == (B, H) and y.dtype == torch.float32 and s2.shape == (B, H, N)
    assert relative_error(y, ry) < 1e-5
    assert relative_error(torch.view_as_real(s2), torch.view_as_real(rs)) < 1e-6
    for actual, expected in zip(grads, rgrads):
        if actual.is_complex():
            actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
        assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ssm_step_inplace(backend, device):
    require_backend("ssm_step", backend, device, torch.complex64)
    state, u, dA, dB, C, D = (t.to(device) for t in step_inputs(3, 5, 9))
    u = u.float()
    y_ref, s_ref = ops.ssm_step(state, u, dA, dB, C, D, backend=backend)
    work = state.clone()
    y, returned = ops.ssm_step(work, u, dA, dB, C, D, inplace=True, backend=backend)
    assert returned is work
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(work, s_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "B,H,N",
    [
        (1, 2, 8),
        (3, 2, 9),
        (2, 3, 17),
        (2, 2, 24),
        (3, 2, 31),
        (2, 2, 40),
        (1, 3, 100),
        (2, 1, 130),
        (16, 3, 32),
        (21, 2, 16),
        (33, 2, 8),
        (17, 3, 24),
        (48, 1, 32),
    ],
)
def test_ssm_step_cpu_block_and_tail_shapes(B, H, N, poisoned_outputs):
    """The CPU float step has two loops: N = 8/16/24/32 keeps a head's 1-4 coefficient vectors in registers
    and sums 16 rows at a time in a tree (B % 16 rows one by one), other N walk tiles of heads and finish
    N % 8 states scalar: every block size, row-group and tail combination against the complex128 reference,
    in place and without D included."""
    state, u, dA, dB, C, D = step_inputs(B, H, N)
    u = u.float()
    y, s2 = cpu_step_checked(state, u, dA, dB, C, D)
    work = state.clone()
    y2, _ = ops.ssm_step(work, u, dA, dB, C, D, inplace=True, backend="cpu")
    assert torch.equal(y2, y) and torch.equal(work, s2)
    cpu_step_checked(state, u, dA, dB, C, None)


@pytest.mark.parametrize("N", [8, 16, 24, 32])
@pytest.mark.parametrize("B", [16, 32])
def test_ssm_step_cpu_head_pairs_match_single_heads(B, N):
    """With float32 u and B a multiple of 16 the CPU step walks two adjacent heads at once (a range's last odd
    head alone): every head's result must be bitwise the one it gets when stepped as the only head (the
    one-head walk), so a thread's head range never changes the numbers; and both against the reference."""
    H = 5
    state, u, dA, dB, C, D = step_inputs(B, H, N)
    u = u.float()
    y, s2 = cpu_step_checked(state, u, dA, dB, C, D)
    for h in range(H):
        sl = slice(h, h + 1)
        yh, sh = ops.ssm_step(
            state[:, sl].contiguous(), u[:, sl].contiguous(), dA[sl], dB[sl], C[sl], D[sl], backend="cpu"
        )
        assert torch.equal(yh, y[:, sl]) and torch.equal(sh, s2[:, sl])
    y_no_D, _ = cpu_step_checked(state, u, dA, dB, C, None)
    work = state.clone()
    y2, _ = ops.ssm_step(work, u, dA, dB, C, None, inplace=True, backend="cpu")
    assert torch.equal(y2, y_no_D) and torch.equal(work, s2)


def test_ssm_step_cpu_new_state_placement():
    """A functional step's new state of 64 KiB and more lies ~2 KiB away from the input state modulo 4 KiB (so
    the kernel's stores do not alias its next loads) and comes from the step's block cache; it is an ordinary
    contiguous tensor with the reference's values, bitwise the in-place step's."""
    state, u, dA, dB, C, D = step_inputs(16, 40, 32)  # 160 KiB of complex64 state
    u = u.float()
    y, s2 = cpu_step_checked(state, u, dA, dB, C, D)
    assert s2.is_contiguous() and s2.shape == state.shape and s2.dtype == state.dtype
    assert (s2.data_ptr() - state.data_ptr()) % 4096 == 2048
    work = state.clone()
    y2, _ = ops.ssm_step(work, u, dA, dB, C, D, inplace=True, backend="cpu")
    assert torch.equal(y2, y) and torch.equal(work, s2)
    # the new state is a valid input (and in-place target) of the next step
    y3, s3 = ops.ssm_step(s2, u, dA, dB, C, D, backend="cpu")
    y4, s4 = ops.ssm_step(s2.clone(), u, dA, dB, C, D, backend="cpu")
    assert torch.equal(y3, y4) and torch.equal(s3, s4)
    ops.ssm_step(s2, u, dA, dB, C, D, inplace=True, backend="cpu")
    assert torch.equal(s2, s3)


_STEP_LOOP_FAULTS = """
import ctypes, resource, torch
libc = ctypes.CDLL("libc.so.6")
# glibc's mallopt: M_TRIM_THRESHOLD (-1) = 0 and M_MMAP_THRESHOLD (-3) = 64 KiB, so every freed block of the
# state's size goes back to the kernel: without the step's block cache each step would fault its new state in
libc.mallopt(-1, 0)
libc.mallopt(-3, 1 << 16)
import fastcore_ai.ops as ops
torch.set_num_threads(1)
H, N = 256, 32
dA = torch.full((H, N), 0.5 + 0.1j, dtype=torch.complex64)
dB = torch.ones(H, N, dtype=torch.complex64)
C = torch.ones(H, N, dtype=torch.complex64)
u, D, state = torch.ones(16, H), torch.ones(H), torch.zeros(16, H, N, dtype=torch.complex64)
for _ in range(4):
    y, state = ops.ssm_step(state, u, dA, dB, C, D, backend="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    y, state = ops.ssm_step(state, u, dA, dB, C, D, backend="cpu")
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs glibc's mallopt")
def test_ssm_step_generation_loop_does_not_fault_its_state_in():
    """`y, state = ssm_step(state, ...)` in a loop releases the old 1 MiB state as it receives the new one. With
    glibc returning such blocks to the kernel (forced here, as its own heuristics sometimes do: a loop measured
    245-336 µs a step with ~160 page faults each, vs ~25 µs) the step's block cache keeps them mapped: the loop
    faults no state page in (a 1 MiB state is 256 pages)."""
    out = subprocess.run([sys.executable, "-c", _STEP_LOOP_FAULTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    faults_per_step = float(out.stdout.strip().splitlines()[-1])
    assert faults_per_step < 16, faults_per_step


@pytest.mark.parametrize("N", [40, 32])
def test_ssm_step_cpu_independent_of_threads(N):
    """Heads are split over threads; each head's rows are summed in a fixed order, so the result is
    bitwise the same on one thread and on several (shape large enough to be split; both CPU loops)."""
    # H = 129: two threads take 65 + 64 heads, so the first range ends in an unpaired head that one thread pairs
    state, u, dA, dB, C, D = step_inputs(16, 129, N)
    u = u.float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, s1 = ops.ssm_step(state, u, dA, dB, C, D, backend="cpu")
        torch.set_num_threads(max(2, threads))
        y2, s2 = ops.ssm_step(state, u, dA, dB, C, D, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


def test_ssm_step_inplace_errors():
    state, u, dA, dB, C, D = step_inputs(2, 3, 4)
    with pytest.raises(ValueError, match="inplace=True has no autograd"):
        ops.ssm_step(state, u.float().requires_grad_(), dA, dB, C, D, inplace=True)
    with pytest.raises(ValueError, match="contiguous"):
        ops.ssm_step(state.transpose(0, 1).contiguous().transpose(0, 1), u.float(), dA, dB, C, D, inplace=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        ops.ssm_step(state, u.float(), dA, dB, C, D, inplace=1)


def test_ssm_step_does_not_modify_state():
    state, u, dA, dB, C, D = step_inputs(2, 3, 4)
    before = state.clone()
    ops.ssm_step(state, u.float(), dA, dB, C, D, backend="cpu")
    assert torch.equal(state, before)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ssm_step_gradcheck(backend):
    state, u, dA, dB, C, D = step_inputs(2, 3, 4, torch.complex128)
    tensors = [t.detach().requires_grad_(True) for t in (state, u.double(), dA, dB, C, D.double())]
    assert torch.autograd.gradcheck(lambda *a: ops.ssm_step(*a, backend=backend), tensors)


@pytest.mark.parametrize("B,H,N", [(2, 3, 4), (18, 3, 32)])
def test_ssm_step_bf16_u_and_empty(B, H, N):
    state, u, dA, dB, C, D = step_inputs(B, H, N)
    y, _ = ops.ssm_step(state, u.bfloat16(), dA, dB, C, D, backend="cpu")
    ry, _ = ref.ssm_step(
        state.to(torch.complex128),
        u.bfloat16().double(),
        dA.to(torch.complex128),
        dB.to(torch.complex128),
        C.to(torch.complex128),
        D.double(),
    )
    assert y.dtype == torch.bfloat16 and relative_error(y, ry) < 8e-3
    state, u, dA, dB, C, D = step_inputs(0, 3, 4)
    y, s = ops.ssm_step(state, u.float(), dA, dB, C, D, backend="cpu")
    assert y.shape == (0, 3) and s.shape == (0, 3, 4)


# ---- registration --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    v, w = s4_like(2, 3)
    z = bilinear_nodes(5)
    torch.library.opcheck(
        torch.ops.fastcore_ai.s4_cauchy.default, (v.requires_grad_(), z, w.requires_grad_(), True, backend)
    )
    v2, x = s4d_like(2, 3)
    torch.library.opcheck(
        torch.ops.fastcore_ai.s4_vandermonde.default, (v2.requires_grad_(), x.requires_grad_(), 9, backend)
    )
    u, k, D = torch.randn(2, 3, 8, requires_grad=True), torch.randn(3, 5, requires_grad=True), torch.randn(3)
    torch.library.opcheck(torch.ops.fastcore_ai.s4_fft_conv.default, (u, k, D, ops.fft_conv_size(8, 5), backend))
    state, uu, dA, dB, C, DD = step_inputs(2, 3, 4)
    torch.library.opcheck(
        torch.ops.fastcore_ai.s4_ssm_step.default,
        (state, uu.float().requires_grad_(), dA.requires_grad_(), dB, C, DD, backend),
    )


def test_torch_compile_fullgraph_cpu():
    v, w = s4_like(2, 3)
    z = bilinear_nodes(6)
    u, k, D = torch.randn(2, 3, 16), torch.randn(3, 16), torch.randn(3)
    state, uu, dA, dB, C, DD = step_inputs(2, 3, 4)

    def model(v, w, u, k):
        kernel = ops.cauchy(v, z, w, backend="cpu").real.sum() + ops.vandermonde(v, w * 0.01, 16, backend="cpu").sum()
        y = ops.fft_conv(u, k * kernel, D, backend="cpu")
        y2, _ = ops.ssm_step(state, y[..., 0], dA, dB, C, DD, backend="cpu")
        return y.square().mean() + y2.square().mean()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (v, w, u, k)]
    loss = compiled(*leaves)
    loss.backward()
    eager = [t.clone().requires_grad_() for t in (v, w, u, k)]
    expected = model(*eager)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


# ---- error paths ---------------------------------------------------------------------------------


def test_errors_name_op_and_argument():
    v, w = s4_like(2, 3)
    z = bilinear_nodes(4)
    with pytest.raises(TypeError, match=r"fastcore_ai.ops.cauchy: v must be complex64, complex128"):
        ops.cauchy(v.real, z, w)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.cauchy: w must have v's shape"):
        ops.cauchy(v, z, w[:, :2])
    with pytest.raises(TypeError, match=r"fastcore_ai.ops.cauchy: z must have v's dtype"):
        ops.cauchy(v, z.to(torch.complex128), w)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.cauchy: N"):
        ops.cauchy(v[:, :0], z, w[:, :0])
    big_v, big_w = s4_like(1, 4097)
    with pytest.raises(ValueError, match=r"4096"):
        ops.cauchy(big_v, z, big_w)
    with pytest.raises(ValueError, match=r"z must not require grad"):
        ops.cauchy(v, z.clone().requires_grad_(), w)
    with pytest.raises(TypeError, match=r"conj_symmetric must be a bool"):
        ops.cauchy(v, z, w, conj_symmetric=1)
    with pytest.raises(RuntimeError, match=r"backend 'cuda'"):
        ops.cauchy(v, z, w, backend="cuda")
    with pytest.raises(RuntimeError, match=r"complex128 is not supported"):
        ops.cauchy(v.to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128), backend="triton")

    vv, x = s4d_like(2, 3)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.vandermonde: L must satisfy 0 <= L"):
        ops.vandermonde(vv, x, -1)
    with pytest.raises(TypeError, match=r"fastcore_ai.ops.vandermonde: L must be an int"):
        ops.vandermonde(vv, x, 3.0)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.vandermonde: x must have v's shape"):
        ops.vandermonde(vv, x[:1], 4)

    u, k = torch.randn(2, 3, 8), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.fft_conv: Lk"):
        ops.fft_conv(u, torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.fft_conv: k must have H"):
        ops.fft_conv(u, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.fft_conv: D must have H"):
        ops.fft_conv(u, k, torch.randn(4))
    with pytest.raises(TypeError, match=r"fastcore_ai.ops.fft_conv: u must be"):
        ops.fft_conv(u.to(torch.int32), k)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.fft_conv: u must be a 3-D"):
        ops.fft_conv(u[0], k)

    state, uu, dA, dB, C, D = step_inputs(2, 3, 4)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.ssm_step: u must have shape"):
        ops.ssm_step(state, uu.float()[:1], dA, dB, C, D)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.ssm_step: dB must be"):
        ops.ssm_step(state, uu.float(), dA, dB[:, :2], C, D)
    with pytest.raises(ValueError, match=r"fastcore_ai.ops.ssm_step: dA must be"):
        ops.ssm_step(state, uu.float(), dA.to(torch.complex128), dB, C, D)
    with pytest.raises(TypeError, match=r"fastcore_ai.ops.ssm_step: state must be"):
        ops.ssm_step(state.real, uu.float(), dA, dB, C, D)


def test_native_checks_guard_direct_calls():
    """The C++ glue refuses what the kernels cannot take (when _C is called directly)."""
    native = _native.native()
    v, w = s4_like(2, 3)
    with pytest.raises(RuntimeError, match=r"fastcore_ai.ops.cauchy"):
        native.s4_cauchy(v.real.contiguous(), bilinear_nodes(4), w, True)
    with pytest.raises(RuntimeError, match=r"fastcore_ai.ops.fft_conv"):
        native.s4_fft_conv(torch.randn(1, 2, 8), torch.randn(2, 4), None, 4, 0)
    with pytest.raises(RuntimeError, match=r"fastcore_ai.ops.vandermonde"):
        native.s4_vandermonde(v, w, -3)

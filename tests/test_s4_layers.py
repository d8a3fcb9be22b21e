"""fastcore_ai.nn S4 layers: kernels against dense float64 oracles, the recurrent step reproduces the
convolution (both modes), shapes/options, gradients flow, errors."""

import pytest
import torch

from fastcore_ai import nn as fnn
from _helpers import relative_error


def krylov_kernel(dA, dB, C, L):
    """K[h, l] = Re(Cᵀ Ā^l B̄) with the dense full-state system (complex128)."""
    H, N = dB.shape
    x = dB.clone()
    out = torch.empty(H, L, dtype=torch.float64)
    for l in range(L):
        out[:, l] = (C * x).sum(-1).real
        x = (dA @ x[..., None])[..., 0]
    return out


def test_s4d_kernel_matches_recurrence_definition():
    for disc in ("zoh", "bilinear"):
        for init in ("lin", "inv"):
            kernel = fnn.S4DKernel(3, 8, init=init, disc=disc)
            K = kernel(50)[0]
            dA, dB, C = (t.to(torch.complex128) for t in kernel.step_params())
            steps = torch.arange(50, dtype=torch.float64)
            expected = 2 * (C[:, :, None] * dB[:, :, None] * dA[:, :, None] ** steps).sum(1).real
            assert relative_error(K, expected) < 1e-5


def test_s4_kernel_matches_dense_krylov():
    """The Cauchy + Woodbury kernel equals the dense DPLR system's Cᵀ Ā^l B̄ (S4's _check)."""
    for L in (64, 33):
        kernel = fnn.S4Kernel(3, 8, l_max=L)
        K = kernel(L)[0].double()
        dA, dB, C = kernel.discrete_dense()
        assert relative_error(K, krylov_kernel(dA, dB, C, L)) < 1e-4


def test_hippo_legs_dplr_reconstructs_legs():
    N = 8
    Lambda, P, B = fnn.hippo_legs_dplr(N)
    assert bool((Lambda.real < 0).all())
    # the full (conj-paired) DPLR matrix has LegS's eigenvalues
    Lf = torch.cat([Lambda, Lambda.conj()])
    Pf = torch.cat([P, P.conj()])
    A_dplr = torch.diag(Lf) - Pf[:, None] * Pf.conj()[None, :]
    q = torch.arange(N, dtype=torch.float64)
    legs = -torch.sqrt((2 * q[:, None] + 1) * (2 * q[None, :] + 1)) * (q[:, None] > q[None, :]) - torch.diag(q + 1)
    ev1 = torch.sort(torch.linalg.eigvals(A_dplr).real).values
    ev2 = torch.sort(torch.linalg.eigvals(legs.to(torch.complex128)).real).values
    torch.testing.assert_close(ev1, ev2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["s4d", "s4"])
def test_recurrent_step_reproduces_convolution(mode):
    """Stepping through a sequence gives the convolutional output (relative error < 1e-4, float32)."""
    torch.manual_seed(1)
    B, H, L = 2, 4, 64
    layer = fnn.S4Conv(H, d_state=64, l_max=L, mode=mode)
    u = torch.randn(B, H, L)
    with torch.no_grad():
        y_conv = layer(u)
        layer.setup_step()
        state = layer.default_state(B)
        ys = []
        for t in range(L):
            y, state = layer.step(u[:, :, t], state)
            ys.append(y)
    y_rec = torch.stack(ys, dim=-1)
    assert relative_error(y_rec, y_conv) < 1e-4


@pytest.mark.parametrize("mode", ["s4d", "s4"])
def test_step_inplace_updates_the_given_state(mode):
    """step(inplace=True) writes the new state into the tensor passed in and returns that tensor, with the
    functional step's values (mode="s4" used to return a fresh state and leave the given one unchanged)."""
    torch.manual_seed(2)
    B, H = 3, 4
    layer = fnn.S4Conv(H, d_state=16, l_max=32, mode=mode)
    with torch.no_grad():
        layer.setup_step()
        functional = layer.default_state(B)
        state = layer.default_state(B)
        for _ in range(5):
            u = torch.randn(B, H)
            y_f, functional = layer.step(u, functional)
            before = state.data_ptr()
            y_i, returned = layer.step(u, state, inplace=True)
            assert returned is state and state.data_ptr() == before
            torch.testing.assert_close(y_i, y_f, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state, functional, rtol=1e-5, atol=1e-6)
        assert float(state.abs().sum()) > 0


def test_block_step_reproduces_forward():
    torch.manual_seed(2)
    B, H, L = 2, 8, 40
    block = fnn.S4Block(H, d_state=16, l_max=L).eval()
    x = torch.randn(B, L, H)
    with torch.no_grad():
        y_full = block(x)
        block.setup_step()
        state = block.default_state(B)
        ys = []
        for t in range(L):
            y, state = block.step(x[:, t], state)
            ys.append(y)
    assert relative_error(torch.stack(ys, 1), y_full) < 1e-4


def test_conv_options_and_gradients():
    H, L = 4, 32
    for mode in ("s4d", "s4"):
        for bidirectional in (False, True):
            layer = fnn.S4Conv(H, 8, l_max=L, mode=mode, bidirectional=bidirectional, transposed=False)
            u = torch.randn(2, L, H, requires_grad=True)
            y = layer(u)
            assert y.shape == u.shape
            y.square().mean().backward()
            assert u.grad is not None and torch.isfinite(u.grad).all()
            for name, p in layer.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
    block = fnn.S4Block(H, 8, l_max=L, mode="s4", dropout=0.1, transposed=True)
    x = torch.randn(2, H, L)
    assert block(x).shape == x.shape


def test_bidirectional_is_acausal_and_causal_is_causal():
    H, L = 2, 16
    causal = fnn.S4Conv(H, 8)
    bi = fnn.S4Conv(H, 8, bidirectional=True)
    u = torch.randn(1, H, L)
    u2 = u.clone()
    u2[..., -1] += 1.0
    with torch.no_grad():  # FFT rounding reaches every output; causality holds to float32 rounding
        assert (causal(u)[..., :-1] - causal(u2)[..., :-1]).abs().max() < 1e-5
        assert (bi(u)[..., :-1] - bi(u2)[..., :-1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="bidirectional"):
        bi.setup_step()


def test_layer_errors():
    with pytest.raises(ValueError, match="l_max"):
        fnn.S4Conv(4, 8, mode="s4")
    with pytest.raises(ValueError, match="mode"):
        fnn.S4Conv(4, 8, mode="dss")
    with pytest.raises(ValueError, match="d_state"):
        fnn.S4DKernel(4, 7)
    layer = fnn.S4Conv(4, 8, l_max=8, mode="s4")
    with pytest.raises(ValueError, match="exceeds l_max"):
        layer(torch.randn(1, 4, 9))
    with pytest.raises(RuntimeError, match="setup_step"):
        fnn.S4Conv(4, 8).step(torch.randn(1, 4), torch.zeros(1, 4, 4, dtype=torch.complex64))
    assert "d_state=8" in repr(layer)

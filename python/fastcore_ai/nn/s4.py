"""S4/S4D state-space layers on the fastcore_ai.ops kernels.

  S4DKernel   diagonal SSM kernel (S4D-Lin / S4D-Inv init, ZOH or bilinear) via ops.vandermonde
  S4Kernel    DPLR SSM kernel, A = Λ − P Pᴴ (HiPPO-LegS init; Hurwitz as in SaShiMi), via ops.cauchy
              and the Woodbury identity at the bilinear-mapped roots of unity
  S4Conv      the sequence mixer: kernel + ops.fft_conv (+ D skip), optional bidirectional kernel
  S4Block     pre-norm S4Conv → activation → GLU output projection → dropout → residual

Recurrent mode (autoregressive generation): `setup_step()` once after training, then
`state = layer.default_state(batch)` and `y, state = layer.step(u, state)` per time step, which runs
ops.ssm_step on the diagonal discrete system (S4D). S4 (DPLR) steps with the O(N) Woodbury form of the
bilinear step (S4's "linear" mode) in torch ops, C recovered once from S4's stored C̃ = (I − Ā^L)ᵀ C;
diagonalising the HiPPO-LegS system is avoided (its eigenvectors are ill-conditioned). The state is
[B, H, d_state / 2] complex64 in both modes.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

__all__ = ["S4DKernel", "S4Kernel", "S4Conv", "S4Block", "hippo_legs_dplr"]


def _log_dt(d_model: int, dt_min: float, dt_max: float) -> Tensor:
    """log Δ uniform in [log dt_min, log dt_max] (S4's initialisation)."""
    return torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)


class S4DKernel(nn.Module):
    """Diagonal state-space kernel K[c, h, l] = 2 Re Σ_n C[c, h, n] · B̄[h, n] · Ā[h, n]^l (S4D).

    A = −exp(A_log_re) + i·A_im per (h, n), N = d_state // 2 complex modes (the conjugate half).
    init: "lin" (S4D-Lin, A = −1/2 + iπn) or "inv" (S4D-Inv, A = −1/2 + i(N/π)(N/(2n+1) − 1)).
    disc: "zoh" (Ā = e^{ΔA}, B̄ = (e^{ΔA} − 1)/A) or "bilinear" (Ā = (1 + ΔA/2)/(1 − ΔA/2), B̄ = Δ/(1 − ΔA/2)).
    B is folded into C (B = 1), as in S4D.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        channels: int = 1,
        init: str = "lin",
        disc: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"fastcore_ai.nn.S4DKernel: d_state must be an even number >= 2, got {d_state}")
        if init not in ("lin", "inv") or disc not in ("zoh", "bilinear"):
            raise ValueError(
                f"fastcore_ai.nn.S4DKernel: init must be 'lin' or 'inv' and disc 'zoh' or 'bilinear', "
                f"got {init!r}, {disc!r}"
            )
        N = d_state // 2
        self.d_model, self.N, self.channels, self.init, self.disc = d_model, N, channels, init, disc
        self.log_dt = nn.Parameter(_log_dt(d_model, dt_min, dt_max))
        n = torch.arange(N, dtype=torch.float64)
        imag = math.pi * n if init == "lin" else (N / math.pi) * (N / (2 * n + 1) - 1)
        self.A_log_re = nn.Parameter(torch.full((d_model, N), math.log(0.5)))
        self.A_im = nn.Parameter(imag.float().repeat(d_model, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, d_model, N, dtype=torch.cfloat) * 0.5**0.5))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={2 * self.N}, channels={self.channels}, init={self.init}, disc={self.disc}"

    def _discrete(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(dtA [H, N], dA [H, N], dB [H, N]) complex."""
        A = torch.complex(-torch.exp(self.A_log_re), self.A_im)
        dt = torch.exp(self.log_dt)[:, None]
        dtA = A * dt
        if self.disc == "zoh":
            return dtA, torch.exp(dtA), (torch.exp(dtA) - 1) / A
        denominator = 1 - dtA / 2
        dA = (1 + dtA / 2) / denominator
        return torch.log(dA), dA, dt / denominator

    def forward(self, L: int) -> Tensor:
        """The kernel [channels, H, L] (float32)."""
        x, _, dB = self._discrete()
        C = torch.view_as_complex(self.C)
        v = (C * dB).reshape(self.channels * self.d_model, self.N)
        x = x.repeat(self.channels, 1)
        return ops.vandermonde(v.contiguous(), x.contiguous(), L).view(self.channels, self.d_model, L)

    @torch.no_grad()
    def step_params(self, L: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(dA, dB, C) [H, N] complex64 of the diagonal recurrence with y = 2 Re Σ C s' (channel 0)."""
        _, dA, dB = self._discrete()
        return dA.contiguous(), dB.contiguous(), torch.view_as_complex(self.C)[0].contiguous()


def hippo_legs_dplr(N: int) -> Tuple[Tensor, Tensor, Tensor]:
    """HiPPO-LegS in DPLR form with conjugate halves: (Λ, P, B) [N // 2] complex128 such that the LegS
    matrix A = V (diag(Λ_full) − P_full P_fullᴴ) Vᴴ, Λ = −1/2 + iλ (the normal part's eigenvalues,
    Im > 0 half), P = Vᴴ p with p_n = sqrt(n + 1/2), B = Vᴴ b with b_n = sqrt(2n + 1)."""
    q = torch.arange(N, dtype=torch.float64)
    root = torch.sqrt(2 * q + 1)
    outer = root[:, None] * root[None, :]
    # normal part S = A + p pᵀ = −I/2 + skew, skew[n, k] = −½√((2n+1)(2k+1)) for n > k, +½… for n < k
    skew = torch.where(q[:, None] > q[None, :], -0.5 * outer, 0.5 * outer)
    skew.fill_diagonal_(0.0)
    eigenvalues, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # skew = V diag(iλ) Vᴴ
    order = torch.argsort(eigenvalues, descending=True)[: N // 2]
    V = V[:, order]
    Lambda = -0.5 + 1j * eigenvalues[order]
    p = torch.sqrt(q + 0.5).to(torch.complex128)
    return Lambda, V.conj().T @ p, V.conj().T @ root.to(torch.complex128)


class S4Kernel(nn.Module):
    """DPLR state-space kernel (S4): A = diag(Λ) − P Pᴴ over the full N = d_state states stored as N/2
    conjugate pairs, bilinear discretisation with step Δ, and S4's C̃ = (I − Ā^L)ᴴ C parameterisation, so
    the kernel of length L = l_max is the inverse rfft of its generating function at the L-th roots of
    unity ω:  K̂(ω) = 2/(1+ω) · [k_{C̃B} − k_{C̃P} k_{PB} / (1 + k_{PP})],
    k_{ab}(ω) = Δ Σ_{n, conj pairs} a_n b_n / (z − ΔΛ_n),  z = 2(1 − ω)/(1 + ω)   (ops.cauchy, 4H rows).
    Re Λ < 0 (Hurwitz, as in SaShiMi): the recurrence is stable.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        l_max: int = 1024,
        channels: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(f"fastcore_ai.nn.S4Kernel: d_state must be an even number >= 2, got {d_state}")
        if not isinstance(l_max, int) or l_max < 1:
            raise ValueError(
                f"fastcore_ai.nn.S4Kernel: l_max must be a positive int (S4's C̃ is tied to it), got {l_max!r}"
            )
        N = d_state // 2
        self.d_model, self.N, self.channels, self.l_max = d_model, N, channels, l_max
        Lambda, P, B = hippo_legs_dplr(d_state)
        self.log_dt = nn.Parameter(_log_dt(d_model, dt_min, dt_max))
        self.Lambda_log_re = nn.Parameter(torch.log(-Lambda.real).float().repeat(d_model, 1))
        self.Lambda_im = nn.Parameter(Lambda.imag.float().repeat(d_model, 1))
        self.P = nn.Parameter(torch.view_as_real(P.to(torch.complex64).repeat(d_model, 1)).clone())
        self.B = nn.Parameter(torch.view_as_real(B.to(torch.complex64).repeat(d_model, 1)).clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(channels, d_model, N, dtype=torch.cfloat) * 0.5**0.5))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={2 * self.N}, channels={self.channels}, l_max={self.l_max}"

    def _params(self):
        Lambda = torch.complex(-torch.exp(self.Lambda_log_re), self.Lambda_im)
        return (
            Lambda,
            torch.view_as_complex(self.P),
            torch.view_as_complex(self.B),
            torch.view_as_complex(self.C),
            torch.exp(self.log_dt),
        )

    def forward(self, L: Optional[int] = None) -> Tensor:
        """The kernel [channels, H, L] (float32), L ≤ l_max (computed at l_max, then cropped)."""
        L = self.l_max if L is None else L
        if L > self.l_max:
            raise ValueError(f"fastcore_ai.nn.S4Kernel: L = {L} exceeds l_max = {self.l_max}")
        Lambda, P, B, C, dt = self._params()
        H, N, c = self.d_model, self.N, self.channels
        Lm = self.l_max
        omega = torch.exp(-2j * math.pi * torch.arange(Lm // 2 + 1, dtype=torch.float64) / Lm)
        z = (2 * (1 - omega) / (1 + omega)).to(torch.complex64)
        if Lm % 2 == 0:  # ω = −1 maps to z = ∞; a large finite node keeps the Cauchy sums finite (bin replaced below)
            z[-1] = 1e12
        w = Lambda * dt[:, None]  # [H, N]
        # rows: c·H of C̃·B, c·H of C̃·P, H of P̄·B, H of P̄·P
        v = (
            torch.cat([(C * B).reshape(c * H, N), (C * P).reshape(c * H, N), P.conj() * B, P.conj() * P])
            * torch.cat([dt.repeat(c), dt.repeat(c), dt, dt])[:, None]
        )
        w_rows = torch.cat([w.repeat(c, 1), w.repeat(c, 1), w, w])
        r = ops.cauchy(v.contiguous(), z.to(v.device), w_rows.contiguous())  # [(2c + 2) H, F]
        r00 = r[: c * H].view(c, H, -1)
        r01 = r[c * H : 2 * c * H].view(c, H, -1)
        r10 = r[2 * c * H : 2 * c * H + H]
        r11 = r[2 * c * H + H :]
        K_hat = r00 - r01 * r10 / (1 + r11)
        K_hat = K_hat * (2 / (1 + omega)).to(torch.complex64).to(v.device)
        if Lm % 2 == 0:
            # ω = −1 (the Nyquist bin) sends z to ∞, where (z − ΔA)⁻¹ → 1/z: the Woodbury term vanishes and
            # K̂(−1) = lim 2/(1+ω) · C̃ᵀ ΔB / z = Δ/2 · C̃_fullᵀ B_full = Δ · Re Σ_n C̃_n B_n (exactly).
            nyquist = (dt * (C * B).sum(-1).real).to(K_hat.dtype)  # [c, H]
            K_hat = torch.cat([K_hat[..., :-1], nyquist[..., None]], dim=-1)
        k = torch.fft.irfft(K_hat, n=Lm)  # [c, H, Lm]
        return k[..., :L].float()

    @torch.no_grad()
    def discrete_dense(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(Ā [H, N, N], B̄ [H, N], C [H, N]) complex128 of the full N = d_state system, C recovered from
        C̃ by solving (I − Ā^L)ᵀ C = C̃ (channel 0)."""
        Lambda, P, B, C, dt = (
            t.detach().to(torch.complex128) if t.is_complex() else t.detach().double() for t in self._params()
        )
        Lf = torch.cat([Lambda, Lambda.conj()], -1)
        Pf = torch.cat([P, P.conj()], -1)
        Bf = torch.cat([B, B.conj()], -1)
        Cf = torch.cat([C[0], C[0].conj()], -1)
        A = torch.diag_embed(Lf) - Pf[:, :, None] * Pf.conj()[:, None, :]
        eye = torch.eye(A.shape[-1], dtype=A.dtype)
        half = dt[:, None, None] / 2 * A
        left = torch.linalg.inv(eye - half)
        dA = left @ (eye + half)
        dB = (left @ (dt[:, None] * Bf)[..., None])[..., 0]
        power = torch.linalg.matrix_power(dA, self.l_max)
        C_true = torch.linalg.solve((eye - power).transpose(-1, -2), Cf[..., None])[..., 0]
        return dA, dB, C_true

    @torch.no_grad()
    def step_params(self) -> Tuple[Tensor, ...]:
        """Parameters of the O(N) DPLR bilinear step on the stored half state (S4's "linear" step mode;
        diagonalising Ā is not used: HiPPO-LegS eigenvectors are ill-conditioned, cond(V) ≈ 3e7 at
        d_state = 16). Returns (Λ, P, B, C_half, Δ) with C_half the first half of C = (I − Ā^L)⁻ᵀ C̃."""
        _, _, C_true = self.discrete_dense()
        Lambda, P, B, _, dt = self._params()
        return (Lambda.detach(), P.detach(), B.detach(), C_true[:, : self.N].to(torch.complex64), dt.detach())

    @staticmethod
    def step(params: Tuple[Tensor, ...], u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """x' = (I − hA)⁻¹[(I + hA) x + Δ B u], h = Δ/2, A = diag(Λ) − P Pᴴ on the full (x, x̄) state,
        in O(N) on the half x [B, H, N/2]: with s = 2 Re(Pᴴx), m = 1 − hΛ,
          y1 = x + h(Λx − P s) + Δ B u,   x' = y1/m − (P/m) · h t / (1 + h q),
          t = 2 Re Σ P̄ y1/m,  q = 2 Re Σ |P|²/m  (Sherman–Morrison);   y = 2 Re Σ C x'."""
        Lambda, P, B, C, dt = params
        h = (dt / 2)[:, None]
        uu = u.to(torch.float32)[..., None]
        s = 2 * (P.conj() * state).sum(-1, keepdim=True).real
        y1 = state + h * (Lambda * state - P * s) + (2 * h) * B * uu
        m = 1 - h * Lambda
        t = 2 * (P.conj() * y1 / m).sum(-1, keepdim=True).real
        q = 2 * ((P.abs() ** 2) / m).sum(-1, keepdim=True).real
        new_state = y1 / m - (P / m) * (h * t / (1 + h * q))
        y = 2 * (C * new_state).sum(-1).real
        return y, new_state


class S4Conv(nn.Module):
    """S4/S4D sequence mixer: y = K * u + D·u per channel h, K from S4DKernel ("s4d") or S4Kernel ("s4").

    Input/output [B, H, L] (transposed=True, the default) or [B, L, H] (transposed=False).
    bidirectional: a second kernel runs anti-causally: y = K₀ * u + flip(K₁ * flip(u)) + D·u.
    l_max: S4 mode needs it (its kernel is tied to l_max); S4D computes the kernel at each call's L.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        l_max: Optional[int] = None,
        mode: str = "s4d",
        bidirectional: bool = False,
        transposed: bool = True,
        **kernel_args,
    ):
        super().__init__()
        if mode not in ("s4d", "s4"):
            raise ValueError(f"fastcore_ai.nn.S4Conv: mode must be 's4d' or 's4', got {mode!r}")
        channels = 2 if bidirectional else 1
        if mode == "s4":
            if l_max is None:
                raise ValueError("fastcore_ai.nn.S4Conv: mode='s4' needs l_max (S4's C̃ parameterisation is tied to it)")
            self.kernel = S4Kernel(d_model, d_state, l_max, channels=channels, **kernel_args)
        else:
            self.kernel = S4DKernel(d_model, d_state, channels=channels, **kernel_args)
        self.d_model, self.d_state, self.l_max, self.mode = d_model, d_state, l_max, mode
        self.bidirectional, self.transposed = bidirectional, transposed
        self.D = nn.Parameter(torch.randn(d_model))
        self._step = None

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, l_max={self.l_max}, mode={self.mode!r}, "
            f"bidirectional={self.bidirectional}, transposed={self.transposed}"
        )

    def forward(self, u: Tensor) -> Tensor:
        x = u if self.transposed else u.transpose(1, 2)
        L = x.shape[-1]
        if self.l_max is not None and L > self.l_max:
            raise ValueError(f"fastcore_ai.nn.S4Conv: sequence length {L} exceeds l_max = {self.l_max}")
        k = self.kernel(L)
        y = ops.fft_conv(x, k[0].to(torch.float32), self.D)
        if self.bidirectional:
            y = y + ops.fft_conv(x.flip(-1), k[1].to(torch.float32)).flip(-1)
        return y if self.transposed else y.transpose(1, 2)

    @torch.no_grad()
    def setup_step(self) -> None:
        """Precompute the diagonal recurrence (call after training / whenever parameters change)."""
        if self.bidirectional:
            raise ValueError("fastcore_ai.nn.S4Conv: a bidirectional layer has no recurrent (causal) step")
        device = self.D.device
        self._step = tuple(t.to(device) for t in self.kernel.step_params())

    def default_state(self, batch: int) -> Tensor:
        if self._step is None:
            raise RuntimeError("fastcore_ai.nn.S4Conv: call setup_step() before default_state()/step()")
        return torch.zeros(batch, self.d_model, self.d_state // 2, dtype=torch.complex64, device=self.D.device)

    def step(self, u: Tensor, state: Tensor, inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """One time step: u [B, H] -> (y [B, H], new state). Functional unless inplace=True: the state tensor
        is updated in place and returned (S4D: no allocation; S4's DPLR step computes the new state and copies
        it into `state`); needs no autograd.

        Generation should run under torch.no_grad() / torch.inference_mode(): S4D then takes
        ops.ssm_step's lean per-step path (cached validation, the native kernel called directly, bitwise
        the registered op's result). With grad enabled, D (a parameter) makes the step differentiable
        through the registered op instead."""
        if self._step is None:
            raise RuntimeError("fastcore_ai.nn.S4Conv: call setup_step() before step()")
        if self.mode == "s4":  # O(N) DPLR step (torch ops), then the D skip
            y, new_state = S4Kernel.step(self._step, u, state)
            if inplace:
                state = state.copy_(new_state)
            else:
                state = new_state
            return (y + self.D * u.to(y.dtype)).to(u.dtype), state
        dA, dB, C = self._step
        return ops.ssm_step(state, u, dA, dB, C, self.D, inplace=inplace)


class S4Block(nn.Module):
    """Drop-in sequence-mixer block: x + Dropout(GLU(Linear(act(S4Conv(Norm(x)))))).

    Input/output [B, L, H] (transposed=False, the default, like a Transformer block) or [B, H, L].
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        l_max: Optional[int] = None,
        mode: str = "s4d",
        bidirectional: bool = False,
        dropout: float = 0.0,
        transposed: bool = False,
        activation: str = "gelu",
        **kernel_args,
    ):
        super().__init__()
        if activation not in ("gelu", "silu", "identity"):
            raise ValueError(
                f"fastcore_ai.nn.S4Block: activation must be 'gelu', 'silu' or 'identity', got {activation!r}"
            )
        self.transposed = transposed
        self.norm = nn.LayerNorm(d_model)
        self.conv = S4Conv(d_model, d_state, l_max, mode, bidirectional, transposed=True, **kernel_args)
        self.activation = {"gelu": nn.GELU(), "silu": nn.SiLU(), "identity": nn.Identity()}[activation]
        self.output = nn.Linear(d_model, 2 * d_model)
        self.dropout = nn.Dropout(dropout)

    def _mix(self, y: Tensor) -> Tensor:
        # y [..., H] -> activation -> GLU(Linear) -> dropout
        return self.dropout(F.glu(self.output(self.activation(y)), dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        seq = x.transpose(1, 2) if self.transposed else x  # [B, L, H]
        z = self.norm(seq).transpose(1, 2)  # [B, H, L]
        z = self.conv(z).transpose(1, 2)  # [B, L, H]
        out = seq + self._mix(z)
        return out.transpose(1, 2) if self.transposed else out

    def setup_step(self) -> None:
        self.conv.setup_step()

    def default_state(self, batch: int) -> Tensor:
        return self.conv.default_state(batch)

    def step(self, x: Tensor, state: Tensor, inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """x [B, H] -> (y [B, H], new state); the same activation as forward (SaShiMi's step bug, s4#126).
        inplace=True updates `state` in place (S4D; see S4Conv.step, run under torch.no_grad())."""
        y, state = self.conv.step(self.norm(x), state, inplace=inplace)
        return x + self._mix(y), state

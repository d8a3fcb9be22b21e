"""Benchmark cases of the s4 family (S4/S4D state-space kernels) for fastcore_ai.bench: family name -> cases(device, quick).

Shapes from S4/SaShiMi (issue 3): Cauchy and Vandermonde with B = 1024 rows (4·H, H = 256), N = 32
(d_state 64), L = 8193 (the rfft length of 16384); fft_conv with B = 8, H = 256, L = 16384; ssm_step with
B = 16, H = 256, N = 32. Peers, timed in the same run: the naive torch kernels that materialise
[B, N, L] (state-spaces/s4's `cauchy_naive` / `log_vandermonde_naive`), the plain torch.fft composition
of S4's FFTConv, and the torch composition of one S4D step. Errors are against a float64 oracle on the
first rows (the full complex128 oracle would need ~8 GB).
"""

from __future__ import annotations

import math
from typing import List

import torch

_ORACLE_ROWS = 4
GENERATION_STEPS = 64


def naive_cauchy(v, z, w):
    """state-spaces/s4's naive symmetric Cauchy: materialises [B, N, L] complex terms."""
    v2 = torch.cat([v, v.conj()], dim=-1)
    w2 = torch.cat([w, w.conj()], dim=-1)
    return (v2.unsqueeze(-1) / (z - w2.unsqueeze(-1))).sum(dim=-2)


def naive_vandermonde(v, x, L):
    """state-spaces/s4's naive log-Vandermonde: exp(x[..., None] · arange(L)) materialised [B, N, L]."""
    vandermonde = torch.exp(x.unsqueeze(-1) * torch.arange(L, device=x.device))
    return 2 * torch.einsum("bn,bnl->bl", v, vandermonde).real


def torch_fft_conv(u, k, D):
    """S4's FFTConv as plain torch calls: n = 2L, rfft/irfft, crop, D skip."""
    L = u.shape[-1]
    k_f = torch.fft.rfft(k, n=2 * L)
    u_f = torch.fft.rfft(u, n=2 * L)
    y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]
    return y + u * D[:, None]


def torch_ssm_step(state, u, dA, dB, C, D):
    """One S4D step as torch calls (the reference loop of state-spaces/s4's SSMKernelDiag.step)."""
    new_state = dA * state + dB * u.unsqueeze(-1)
    y = 2 * torch.einsum("hn,bhn->bh", C, new_state).real + D * u
    return y, new_state


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().cpu(), torch.as_tensor(b).detach().cpu()
    if a.is_complex():
        a, b = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(b.to(torch.complex128))
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _fast_backends(device: str) -> List[str]:
    return ["cpu"] if device == "cpu" else ["cuda", "triton"]


def s4_cases(device: str, quick: bool = False):
    from .. import ops
    from . import harness as bench
    from ..reference import s4 as ref

    cases = []
    rows = 64 if quick else 1024
    N, L = 32, (1025 if quick else 8193)

    def cauchy_setup():
        g = torch.Generator().manual_seed(0)
        v = torch.randn(rows, N, dtype=torch.complex64, generator=g)
        w = torch.complex(
            -0.5 * torch.rand(rows, N, generator=g) - 0.05,
            math.pi * torch.arange(N).float() * (0.5 + torch.rand(rows, N, generator=g)) * 0.1,
        )
        omega = torch.exp(-2j * math.pi * torch.arange(L, dtype=torch.float64) / (2 * (L - 1)))
        omega[-1] = omega[-1] * (1 - 1e-6)
        z = ((2 / 0.1) * (1 - omega) / (1 + omega)).to(torch.complex64)
        return v.to(device), z.to(device), w.to(device)

    def cauchy_error(out, inputs):
        v, z, w = (t[:_ORACLE_ROWS].cpu() if t.dim() == 2 else t.cpu() for t in inputs)
        expected = ref.cauchy(v.to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128))
        return _rel(out[:_ORACLE_ROWS], expected)

    providers = {b: (lambda v, z, w, b=b: ops.cauchy(v, z, w, backend=b)) for b in _fast_backends(device)}
    providers["naive-torch"] = naive_cauchy
    cases.append(
        bench.Case(
            "s4", f"cauchy B={rows} N={N} L={L} complex64", cauchy_setup, providers, cauchy_error, peer="naive-torch"
        )
    )

    def vand_setup():
        g = torch.Generator().manual_seed(1)
        A = torch.complex(-0.5 * torch.ones(N), math.pi * torch.arange(N).float())
        dt = torch.exp(torch.rand(rows, 1, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        x = (dt * A).to(torch.complex64)
        v = torch.randn(rows, N, dtype=torch.complex64, generator=g)
        return v.to(device), x.to(device)

    def vand_error(out, inputs):
        v, x = (t[:_ORACLE_ROWS].cpu() for t in inputs)
        return _rel(out[:_ORACLE_ROWS], ref.vandermonde(v.to(torch.complex128), x.to(torch.complex128), L))

    providers = {b: (lambda v, x, b=b: ops.vandermonde(v, x, L, backend=b)) for b in _fast_backends(device)}
    providers["naive-torch"] = lambda v, x: naive_vandermonde(v, x, L)
    cases.append(
        bench.Case(
            "s4", f"vandermonde B={rows} N={N} L={L} complex64", vand_setup, providers, vand_error, peer="naive-torch"
        )
    )

    B, H, Lc = (2, 64, 4096) if quick else (8, 256, 16384)

    def fft_setup():
        g = torch.Generator().manual_seed(2)
        u = torch.randn(B, H, Lc, generator=g)
        k = torch.randn(H, Lc, generator=g) / math.sqrt(Lc)
        D = torch.randn(H, generator=g)
        return u.to(device), k.to(device), D.to(device)

    def fft_error(out, inputs):
        u, k, D = (t.cpu() for t in inputs)
        expected = ref.fft_conv(u[:1].double(), k.double(), D.double())
        return _rel(out[:1], expected)

    providers = {b: (lambda u, k, D, b=b: ops.fft_conv(u, k, D, backend=b)) for b in _fast_backends(device)}
    providers["torch-fft"] = torch_fft_conv
    cases.append(
        bench.Case("s4", f"fft_conv B={B} H={H} L={Lc} float32", fft_setup, providers, fft_error, peer="torch-fft")
    )

    Bs, Hs, Ns = 16, 256, 32

    def step_setup():
        g = torch.Generator().manual_seed(3)
        dA = torch.exp(torch.complex(-0.1 * torch.rand(Hs, Ns, generator=g), torch.randn(Hs, Ns, generator=g)))
        dB = torch.randn(Hs, Ns, dtype=torch.complex64, generator=g)
        C = torch.randn(Hs, Ns, dtype=torch.complex64, generator=g)
        state = torch.randn(Bs, Hs, Ns, dtype=torch.complex64, generator=g)
        u = torch.randn(Bs, Hs, generator=g)
        D = torch.randn(Hs, generator=g)
        return tuple(t.to(device) for t in (state, u, dA, dB, C, D))

    def step_error(out, inputs):
        up = [t.cpu().to(torch.complex128) if t.is_complex() else t.cpu().double() for t in inputs]
        y, _ = ref.ssm_step(*up)
        return _rel(out[0], y)

    providers = {b: (lambda *a, b=b: ops.ssm_step(*a, backend=b)) for b in _fast_backends(device)}
    work = {}

    def work_copy(key, state):
        """The in-place providers' state buffer (one per key), reset from `state` (the copy is timed too) so
        every call computes the same step(s) as the other providers."""
        buffer = work.setdefault(key, torch.empty_like(state))
        return buffer.copy_(state)

    def inplace(state, *rest, b):
        # the generation fast path: the state buffer is updated in place
        return ops.ssm_step(work_copy(b, state), *rest, inplace=True, backend=b)

    for b in _fast_backends(device):
        providers[f"{b}-inplace"] = lambda *a, b=b: inplace(*a, b=b)
    providers["torch-composition"] = torch_ssm_step
    cases.append(
        bench.Case(
            "s4",
            f"ssm_step B={Bs} H={Hs} N={Ns} complex64",
            step_setup,
            providers,
            step_error,
            peer="torch-composition",
        )
    )

    # The same step as a generation loop writes it: GENERATION_STEPS steps, each rebinding the state
    # (`y, state = step(state, u_t, ...)`), so every provider's allocator sees a state freed as the next one is
    # received (the single-step row above frees each result before the next call). Times are per loop.
    def loop_setup():
        state, u, dA, dB, C, D = step_setup()
        g = torch.Generator().manual_seed(4)
        us = torch.randn(GENERATION_STEPS, Bs, Hs, generator=g).to(device)
        return state, us, dA, dB, C, D

    def loop_error(out, inputs):
        state, us, dA, dB, C, D = [t.cpu().to(torch.complex128) if t.is_complex() else t.cpu().double() for t in inputs]
        for t in range(GENERATION_STEPS):
            y, state = ref.ssm_step(state, us[t], dA, dB, C, D)
        return max(_rel(out[0], y), _rel(out[1], state))

    def generation_loop(step):
        def run(state, us, dA, dB, C, D):
            for t in range(us.shape[0]):
                y, state = step(state, us[t], dA, dB, C, D)
            return y, state

        return run

    loop_providers = {b: generation_loop(lambda *a, b=b: ops.ssm_step(*a, backend=b)) for b in _fast_backends(device)}

    def inplace_generation_loop(b):
        # the generation fast path: one copy of the initial state into a work buffer, then every step in place
        # (an in-place step returns the buffer as the new state, so the loop rebinds it to itself)
        loop = generation_loop(lambda *a: ops.ssm_step(*a, inplace=True, backend=b))
        return lambda state, *rest: loop(work_copy(("loop", b), state), *rest)

    for b in _fast_backends(device):
        loop_providers[f"{b}-inplace"] = inplace_generation_loop(b)
    loop_providers["torch-composition"] = generation_loop(torch_ssm_step)
    cases.append(
        bench.Case(
            "s4",
            f"ssm_step loop of {GENERATION_STEPS} B={Bs} H={Hs} N={Ns} complex64",
            loop_setup,
            loop_providers,
            loop_error,
            peer="torch-composition",
        )
    )
    return cases


FAMILIES: dict = {"s4": s4_cases}


# ---- the shape sweep (python -m fastcore_ai bench --sweep; bench/sweep.py) ------------------------------------


def chunked_rows(fn, rows_per_chunk: int):
    """fn applied to row chunks of its [B, ·] arguments (the others, e.g. z [L], passed whole), concatenated:
    the naive kernels in the row chunks a user would take so that the [B, N, L] temporary fits in memory."""

    def run(*args):
        rows = args[0].shape[0]
        if rows <= rows_per_chunk:
            return fn(*args)

        def part(i):
            return [
                a[i : i + rows_per_chunk] if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] == rows else a
                for a in args
            ]

        return torch.cat([fn(*part(i)) for i in range(0, rows, rows_per_chunk)])

    return run


def _naive_rows(N: int, L: int, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per chunk keeping the naive [rows, 2N, L] complex64 temporary under budget_bytes."""
    return max(1, budget_bytes // (2 * N * L * 8))


def _s4_inputs(B: int, N: int, L: int, seed: int):
    """Cauchy / Vandermonde inputs as S4D-Lin initialises them (the shapes of s4_cases above)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, N, dtype=torch.complex64, generator=g)
    w = torch.complex(
        -0.5 * torch.rand(B, N, generator=g) - 0.05,
        math.pi * torch.arange(N).float() * (0.5 + torch.rand(B, N, generator=g)) * 0.1,
    )
    omega = torch.exp(-2j * math.pi * torch.arange(L, dtype=torch.float64) / (2 * (L - 1)))
    omega[-1] = omega[-1] * (1 - 1e-6)
    z = ((2 / 0.1) * (1 - omega) / (1 + omega)).to(torch.complex64)
    A = torch.complex(-0.5 * torch.ones(N), math.pi * torch.arange(N).float())
    dt = torch.exp(torch.rand(B, 1, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return v, z, w, (dt * A).to(torch.complex64)


def _rel_first(ours, peer, inputs=None) -> float:
    a = ours[0] if isinstance(ours, tuple) else ours
    b = peer[0] if isinstance(peer, tuple) else peer
    return _rel(a, b)


def _sweep_cauchy(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    B, N, L = p["B"], p["N"], p["L"]

    def setup():
        v, z, w, _ = _s4_inputs(B, N, L, 0)
        return v.to(device), z.to(device), w.to(device)

    return SweepCell(
        setup,
        lambda v, z, w: ops.cauchy(v, z, w),
        {"naive-torch": chunked_rows(naive_cauchy, _naive_rows(N, L))},
        _rel_first,
    )


def _sweep_vandermonde(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    B, N, L = p["B"], p["N"], p["L"]

    def setup():
        v, _, _, x = _s4_inputs(B, N, L, 1)
        return v.to(device), x.to(device)

    naive = chunked_rows(lambda v, x: naive_vandermonde(v, x, L), _naive_rows(N, L) * 2)
    return SweepCell(setup, lambda v, x: ops.vandermonde(v, x, L), {"naive-torch": naive}, _rel_first)


def torch_fft_conv_any(u, k, D):
    """torch_fft_conv for any float dtype: torch.fft has no bfloat16/float16 CPU kernels, so a user's code
    computes in float32 and casts back (float32 input: exactly torch_fft_conv)."""
    if u.dtype == torch.float32:
        return torch_fft_conv(u, k, D)
    return torch_fft_conv(u.float(), k.float(), D.float()).to(u.dtype)


def _sweep_fft_conv(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    B, H, L = p["B"], p["H"], p["L"]

    def setup():
        g = torch.Generator().manual_seed(2)
        u = torch.randn(B, H, L, generator=g)
        k = torch.randn(H, L, generator=g) / math.sqrt(L)
        D = torch.randn(H, generator=g)
        return tuple(t.to(device=device, dtype=dtype) for t in (u, k, D))

    return SweepCell(setup, lambda u, k, D: ops.fft_conv(u, k, D), {"torch-fft": torch_fft_conv_any}, _rel_first)


def _sweep_ssm_step(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    B, H, N = p["B"], p["H"], p["N"]

    def setup():
        g = torch.Generator().manual_seed(3)
        dA = torch.exp(torch.complex(-0.1 * torch.rand(H, N, generator=g), torch.randn(H, N, generator=g)))
        dB = torch.randn(H, N, dtype=torch.complex64, generator=g)
        C = torch.randn(H, N, dtype=torch.complex64, generator=g)
        state = torch.randn(B, H, N, dtype=torch.complex64, generator=g)
        u = torch.randn(B, H, generator=g)
        D = torch.randn(H, generator=g)
        return tuple(t.to(device) for t in (state, u, dA, dB, C, D))

    return SweepCell(setup, lambda *a: ops.ssm_step(*a), {"torch-composition": torch_ssm_step}, _rel_first)


def _sweep_specs():
    from .harness import SweepOp

    kernel_dims = {"B": [16, 64, 256], "N": [16, 32, 64], "L": [513, 2049, 8193]}
    kernel_quick = {"B": [4], "N": [8], "L": [33, 65]}
    naive = (
        "state-spaces/s4's naive torch kernel (materialises [B, 2N, L] complex terms, in row chunks of at most 256 MB)"
    )
    return [
        SweepOp(
            "cauchy",
            "s4",
            kernel_dims,
            kernel_quick,
            _sweep_cauchy,
            naive,
            dtypes=(torch.complex64,),
            fixed="S4D-Lin-like poles, z on the bilinear frequency grid; B = rows (batch x channels)",
        ),
        SweepOp(
            "vandermonde",
            "s4",
            kernel_dims,
            kernel_quick,
            _sweep_vandermonde,
            naive.replace("[B, 2N, L]", "[B, N, L]"),
            dtypes=(torch.complex64,),
            fixed="S4D log-Vandermonde, x = dt * A with log-uniform dt",
        ),
        SweepOp(
            "fft_conv",
            "s4",
            {"B": [1, 4, 8], "H": [16, 64, 256], "L": [1000, 4096, 16384]},
            {"B": [1], "H": [4], "L": [64, 100]},
            _sweep_fft_conv,
            "torch.fft.rfft/irfft at n = 2L, crop, D skip (S4's FFTConv; float32 compute for bfloat16)",
            dtypes=(torch.float32, torch.bfloat16),
            fixed="kernel length = L, D skip on",
        ),
        SweepOp(
            "ssm_step",
            "s4",
            {"B": [1, 16, 64], "H": [64, 256, 1024], "N": [16, 32, 64]},
            {"B": [1], "H": [4], "N": [8, 16]},
            _sweep_ssm_step,
            "the torch step dA*state + dB*u, 2*Re(einsum(C, state)) + D*u",
            dtypes=(torch.complex64,),
            fixed="one step, new state allocated (inplace=False)",
        ),
    ]


SWEEP = _sweep_specs()

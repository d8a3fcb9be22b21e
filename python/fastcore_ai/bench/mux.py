"""Benchmark cases of the mux family (DataMUX multiplexing and attention) for fastcore_ai.bench: family name -> cases(device, quick).

  mux_attention  fused attention vs torch.nn.functional.scaled_dot_product_attention, same run: DataMUX
                 shapes (B = 16, H = 12, L ∈ {128, 169}, D = 64) and odd head sizes D ∈ {13, 48, 96, 200},
                 forward and forward+backward, float32.
  mux            mux + demux (Hadamard mux, separable fused index demux) vs the torch composition of the
                 DataMUX formulas (concatenate [p_i ; h_t], Linear, GELU, LayerNorm).
  mux_encoder    DataMUXEncoder (4 layers, d = 256, 4 heads, L = 128) inference throughput: every provider
                 encodes the same number of instances with N = 1, 2, 5, 10, 20, 40, so "vs peer" (N=1) is the
                 throughput ratio the paper reports.
"""
from __future__ import annotations

import math
from typing import List

import torch

FAMILIES: dict = {}


def _rel(output, expected) -> float:
    return float((output.detach().double().cpu() - expected).norm() / expected.norm().clamp_min(1e-300))


def attention_step(fn, mode: str, q, k, v, grad):
    """One timed attention call: the forward under no_grad, or forward + backward of `grad` from fresh leaves."""
    if mode == "forward":
        with torch.no_grad():
            return fn(q, k, v)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach()


def attention_cases(device: str, quick: bool = False) -> list:
    from .. import ops
    from .harness import Case

    ours = "cpu" if device == "cpu" else "cuda"
    shapes = [(16, 12, 128, 64), (16, 12, 169, 64)] + [(16, 12, 169, D) for D in (13, 48, 96, 200)]
    if quick:
        shapes = [(16, 12, 128, 64), (16, 12, 169, 13)]
    cases: List = []
    for B, H, L, D in shapes:
        for mode in ("forward", "forward+backward"):
            def setup(B=B, H=H, L=L, D=D):
                g = torch.Generator().manual_seed(L * 1000 + D)
                q, k, v = (torch.randn(B, H, L, D, generator=g).to(device) for _ in range(3))
                return q, k, v, torch.randn(B, H, L, D, generator=g).to(device)

            def make(fn, mode=mode):
                return lambda q, k, v, grad: attention_step(fn, mode, q, k, v, grad)

            providers = {
                ours: make(lambda q, k, v: ops.attention(q, k, v, backend=ours)),
                "torch-sdpa": make(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
            }
            if device == "cuda":
                providers["triton"] = make(lambda q, k, v: ops.attention(q, k, v, backend="triton"))

            def error(output, inputs):
                q, k, v, _ = (t.double().cpu() for t in inputs)
                return _rel(output, ops.attention(q, k, v, backend="reference"))

            cases.append(Case("mux_attention", f"attention B={B} H={H} L={L} D={D} float32 {mode}", setup, providers,
                              error, peer="torch-sdpa"))
    return cases


def torch_composition_mux_demux(x, keys, h_keys, weight, bias, gamma, beta):
    """mux then index demux written as the DataMUX formulas in torch (the peer): the demux concatenates
    [p_i ; h_t] for every (instance, token) pair before the Linear."""
    B, N, L, d = x.shape
    h = (x * keys[None, :, None, :]).sum(1) / N
    pairs = torch.cat([h_keys[:, :, None, :].expand(B, N, L, d), h[:, None].expand(B, N, L, d)], dim=-1)
    z = torch.nn.functional.linear(pairs, weight, bias)
    out = torch.nn.functional.layer_norm(torch.nn.functional.gelu(z), (weight.shape[0],), gamma, beta)
    return out.reshape(B * N, L, weight.shape[0])


def mux_demux_cases(device: str, quick: bool = False) -> list:
    from .. import ops
    from .harness import Case
    from ..nn.mux import hadamard_keys

    ours = "cpu" if device == "cpu" else "triton"
    settings = [(24, 2, 128, 256), (24, 10, 128, 256), (16, 40, 128, 256)] if not quick else [(24, 10, 128, 256)]
    cases: List = []
    for B, N, L, d in settings:
        def setup(B=B, N=N, L=L, d=d):
            g = torch.Generator().manual_seed(N)
            x = torch.randn(B, N, L, d, generator=g)
            keys = hadamard_keys(N, d, 1.0, g)
            p = torch.randn(B, N, d, generator=g)
            w = torch.randn(d, 2 * d, generator=g) / math.sqrt(2 * d)
            b, gamma, beta = torch.zeros(d), torch.ones(d), torch.zeros(d)
            return tuple(t.to(device) for t in (x, keys, p, w, b, gamma, beta))

        def fused(x, keys, p, w, b, gamma, beta):
            with torch.no_grad():
                return ops.demux(ops.mux(x, keys, backend=ours), p, w, b, gamma, beta, backend=ours)

        def composition(*inputs):
            with torch.no_grad():
                return torch_composition_mux_demux(*inputs)

        def error(output, inputs):
            return _rel(output, torch_composition_mux_demux(*(t.double().cpu() for t in inputs)))

        cases.append(Case("mux", f"mux+demux B={B} N={N} L={L} d={d} float32", setup,
                          {ours: fused, "torch-composition": composition}, error, peer="torch-composition"))
    return cases


def encoder_cases(device: str, quick: bool = False) -> list:
    from .harness import Case
    from ..nn.mux import DataMUXEncoder

    counts = (1, 2, 5, 10, 20, 40) if not quick else (1, 10)
    instances = 80 if not quick else 20
    L, d, heads, layers = 128, 256, 4, 4
    backend = "cpu" if device == "cpu" else "cuda"

    def setup():
        torch.manual_seed(0)
        x = torch.randn(instances, L, d, device=device)
        models = {N: DataMUXEncoder(N, d, heads, layers, 4 * d, backend=backend).to(device).eval() for N in counts}
        return x, models

    def provider(N):
        def run(x, models):
            with torch.no_grad():
                return models[N](x)
        return run

    def error(output, inputs):
        # the throughput rows compare configurations, not an op against an oracle: report how far N > 1's
        # outputs are from finite (0 when every output is finite) to keep the column meaningful
        return 0.0 if torch.isfinite(output).all() else float("inf")

    providers = {f"N={N}": provider(N) for N in counts}
    return [Case("mux_encoder", f"DataMUXEncoder {layers}L d={d} h={heads} L={L}, {instances} instances", setup,
                 providers, error, peer="N=1")]


FAMILIES.update({"mux_attention": attention_cases, "mux": mux_demux_cases, "mux_encoder": encoder_cases})

"""Benchmark cases of the mux family (DataMUX multiplexing and attention) for fastcore_ai.bench: family name -> cases(device, quick).

mux_attention  fused attention vs torch.nn.functional.scaled_dot_product_attention, same run: DataMUX
               shapes (B = 16, H = 12, L ∈ {128, 169}, D = 64) and odd head sizes D ∈ {13, 48, 96, 200},
               forward and forward+backward, float32.
mux            mux + demux (Hadamard mux, separable fused index demux) vs the torch composition of the
               DataMUX formulas (concatenate [p_i ; h_t], Linear, GELU, LayerNorm).
mux_encoder    DataMUXEncoder (4 layers, d = 256, 4 heads, L = 128) inference throughput: every provider
               encodes the same number of instances with N = 1, 2, 5, 10, 20, 40, so "vs peer" (N=1) is the
               throughput ratio the paper reports.
mux_mha        torch.nn.TransformerEncoder (4 layers, d = 256, 4 heads, B = 16 × L = 128) training step and
               eval forward before vs after nn.replace_attention, same weights.
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

            cases.append(
                Case(
                    "mux_attention",
                    f"attention B={B} H={H} L={L} D={D} float32 {mode}",
                    setup,
                    providers,
                    error,
                    peer="torch-sdpa",
                )
            )
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

        cases.append(
            Case(
                "mux",
                f"mux+demux B={B} N={N} L={L} d={d} float32",
                setup,
                {ours: fused, "torch-composition": composition},
                error,
                peer="torch-composition",
            )
        )
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
    return [
        Case(
            "mux_encoder",
            f"DataMUXEncoder {layers}L d={d} h={heads} L={L}, {instances} instances",
            setup,
            providers,
            error,
            peer="N=1",
        )
    ]


FAMILIES.update({"mux_attention": attention_cases, "mux": mux_demux_cases, "mux_encoder": encoder_cases})


# ---- the shape sweep (python -m fastcore_ai bench --sweep; bench/sweep.py) ------------------------------------


def math_attention_with_lse(q, k, v, scale: float):
    """Attention with its log-sum-exp as the torch math a user writes (SDPA returns no lse): float32 scores,
    logsumexp, exp, the value product in v's dtype."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs.to(v.dtype), v), lse


def torch_mux(x, keys):
    """Hadamard mux in torch: h = Σ_i x_i ⊙ k_i / N."""
    return (x * keys[None, :, None, :]).sum(1) / x.shape[1]


def torch_demux_concat(h, keys, weight, bias, gamma, beta):
    """Index demux as the DataMUX formula: concatenate [p_i ; h_t] for every (instance, token), Linear,
    GELU, LayerNorm -> [B·N, L, e]."""
    B, L, d = h.shape
    N = keys.shape[0]
    pairs = torch.cat([keys[None, :, None, :].expand(B, N, L, d), h[:, None].expand(B, N, L, d)], dim=-1)
    z = torch.nn.functional.linear(pairs, weight, bias)
    out = torch.nn.functional.layer_norm(torch.nn.functional.gelu(z), (weight.shape[0],), gamma, beta)
    return out.reshape(B * N, L, weight.shape[0])


def torch_demux_separable(h, keys, weight, bias, gamma, beta):
    """The same demux with the Linear split (W [p; h] = W_p p + W_h h): two small products and a broadcast
    add before GELU and LayerNorm (the faster torch a careful user writes)."""
    B, L, d = h.shape
    N = keys.shape[0]
    zp = torch.nn.functional.linear(keys, weight[:, :d], bias)  # [N, e]
    zh = torch.nn.functional.linear(h, weight[:, d:])  # [B, L, e]
    z = zp[None, :, None, :] + zh[:, None]
    out = torch.nn.functional.layer_norm(torch.nn.functional.gelu(z), (weight.shape[0],), gamma, beta)
    return out.reshape(B * N, L, weight.shape[0])


def _heads(text: str):
    """'16/4' -> (16 query heads, 4 key/value heads)."""
    a, b = text.split("/")
    return int(a), int(b)


def _sweep_attention(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    Lq, Lk = p["Lq"], p["Lk"]
    Hq, Hkv = _heads(p["heads q/kv"])
    B, D, group = 2, 64, Hq // Hkv

    def setup():
        g = torch.Generator().manual_seed(Lq * 7 + Lk + Hkv)
        q = torch.randn(B, Hq, Lq, D, generator=g)
        k, v = (torch.randn(B, Hkv, Lk, D, generator=g) for _ in range(2))
        return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))

    def ours(q, k, v):
        with torch.no_grad():
            return ops.attention(q, k, v)  # grouped heads (H_kv < H) natively, as SDPA's enable_gqa

    def sdpa(q, k, v):
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)

    return SweepCell(setup, ours, {"torch-sdpa": sdpa}, lambda ours, peer, inputs: _rel(ours, peer.double()))


def _sweep_attention_lse(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    Lq, Lk, D = p["Lq"], p["Lk"], p["D"]
    B, H = 2, 8

    def setup():
        g = torch.Generator().manual_seed(Lq + Lk + D)
        q = torch.randn(B, H, Lq, D, generator=g)
        k, v = (torch.randn(B, H, Lk, D, generator=g) for _ in range(2))
        return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))

    def ours(q, k, v):
        with torch.no_grad():
            return ops.attention_with_lse(q, k, v)

    def peer(q, k, v):
        with torch.no_grad():
            return math_attention_with_lse(q, k, v, 1.0 / math.sqrt(D))

    return SweepCell(
        setup,
        ours,
        {"torch-math": peer},
        lambda ours, peer, inputs: max(_rel(ours[0], peer[0].double()), _rel(ours[1], peer[1].double())),
    )


def _sweep_mux(p, dtype, device):
    from .. import ops
    from .harness import SweepCell
    from ..nn.mux import hadamard_keys

    N, L, d, B = p["N"], p["L"], p["d"], 4

    def setup():
        g = torch.Generator().manual_seed(N + L + d)
        x = torch.randn(B, N, L, d, generator=g)
        return x.to(device=device, dtype=dtype), hadamard_keys(N, d, 1.0, g).to(device=device, dtype=dtype)

    def ours(x, keys):
        with torch.no_grad():
            return ops.mux(x, keys)

    def peer(x, keys):
        with torch.no_grad():
            return torch_mux(x, keys)

    return SweepCell(setup, ours, {"torch-composition": peer}, lambda ours, peer, inputs: _rel(ours, peer.double()))


def _sweep_demux(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    N, L, d, B = p["N"], p["L"], p["d"], 4

    def setup():
        g = torch.Generator().manual_seed(N + L + d)
        h = torch.randn(B, L, d, generator=g)
        keys = torch.randn(N, d, generator=g)
        w = torch.randn(d, 2 * d, generator=g) / math.sqrt(2 * d)
        b, gamma, beta = torch.randn(d, generator=g) * 0.1, torch.ones(d), torch.zeros(d)
        return tuple(t.to(device=device, dtype=dtype) for t in (h, keys, w, b, gamma, beta))

    def no_grad(fn):
        def run(*inputs):
            with torch.no_grad():
                return fn(*inputs)

        return run

    return SweepCell(
        setup,
        no_grad(ops.demux),
        {"torch-concat": no_grad(torch_demux_concat), "torch-separable": no_grad(torch_demux_separable)},
        lambda ours, peer, inputs: _rel(ours, peer.double()),
    )


def _sweep_specs():
    from .harness import SweepOp

    low = (torch.float32, torch.bfloat16)
    return [
        SweepOp(
            "attention",
            "mux",
            {"Lq": [1, 16, 256], "Lk": [16, 256, 4096], "heads q/kv": ["16/16", "16/4", "16/1"]},
            {"Lq": [1, 8], "Lk": [16], "heads q/kv": ["2/1"]},
            _sweep_attention,
            "torch.nn.functional.scaled_dot_product_attention (enable_gqa for grouped heads)",
            dtypes=low,
            fixed="B = 2, D = 64, no mask, forward under no_grad; grouped heads: k/v with H_kv heads passed "
            "to both as they are (ours reads them natively, SDPA with enable_gqa=True)",
        ),
        SweepOp(
            "attention_with_lse",
            "mux",
            {"Lq": [1, 64, 512], "Lk": [64, 512, 4096], "D": [32, 64, 128]},
            {"Lq": [1, 8], "Lk": [16], "D": [8]},
            _sweep_attention_lse,
            "torch math: float32 scores, logsumexp, exp, value product (SDPA returns no lse)",
            dtypes=low,
            fixed="B = 2, H = 8, no mask, forward under no_grad",
        ),
        SweepOp(
            "mux",
            "mux",
            {"N": [2, 10, 40], "L": [32, 128, 256], "d": [128, 256, 768]},
            {"N": [2, 4], "L": [8], "d": [16]},
            _sweep_mux,
            "torch (x * keys).sum(1) / N (Hadamard mux)",
            dtypes=low,
            fixed="B = 4 mux groups, Hadamard keys, forward under no_grad",
        ),
        SweepOp(
            "demux",
            "mux",
            {"N": [2, 10, 40], "L": [32, 128, 256], "d": [128, 256, 512]},
            {"N": [2, 4], "L": [8], "d": [16]},
            _sweep_demux,
            "the faster of the DataMUX formula in torch (concat [p_i; h_t], Linear, GELU, LayerNorm) and its "
            "separable form (W_p p + W_h h, broadcast add)",
            dtypes=low,
            fixed="B = 4, shared index keys [N, d], e = d, forward under no_grad",
        ),
    ]


SWEEP = _sweep_specs()


# ---- nn.MultiheadAttention drop-in: a torch TransformerEncoder before / after replace_attention -----------


def encoder_training_step(model, x, grad):
    """One training step's compute: fresh gradients (set to None, as optimizer.zero_grad does), forward,
    backward of `grad`."""
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.backward(grad)
    return out.detach()


def transformer_encoder_pair(d_model: int, heads: int, layers: int, device: str, seed: int = 0):
    """(torch.nn.TransformerEncoder, the same weights after fastcore_ai.nn.replace_attention): post-LN,
    GELU, dim_feedforward = 4·d_model, dropout 0.0, batch_first=True."""
    import copy

    from ..nn import replace_attention

    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(
        d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, activation="gelu", batch_first=True
    )
    reference = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device)
    return reference, replace_attention(copy.deepcopy(reference))


def multihead_encoder_cases(device: str, quick: bool = False) -> list:
    """torch.nn.TransformerEncoder (d = 256, 4 heads, 4 layers, B = 16 × L = 128, float32) with torch's
    nn.MultiheadAttention vs the same model after replace_attention (fastcore_ai.nn.MultiheadAttention, fused
    kernel), same weights, same run: a training step (forward + backward, dropout 0) and eval inference
    under no_grad (where torch's encoder layers take their native fast path)."""
    from .harness import Case

    B, L, d, heads, layers = (2, 16, 32, 4, 1) if quick else (16, 128, 256, 4, 4)
    cases: List = []
    for mode in ("training step", "eval forward"):

        def setup(mode=mode):
            import copy

            g = torch.Generator().manual_seed(1)
            x = torch.randn(B, L, d, generator=g).to(device)
            grad = torch.randn(B, L, d, generator=g).to(device)
            reference, swapped = transformer_encoder_pair(d, heads, layers, device)
            # the swapped model with its attention kernel replaced by "return v" (nothing computed; the
            # projections, FFNs and norms stay): the time of everything but attention, so torch-mha /
            # no-attention is the largest speedup any attention kernel could give this model (Amdahl)
            no_attention = copy.deepcopy(swapped)
            for module in no_attention.modules():
                if hasattr(module, "_fused_attention"):
                    module._fused_attention = lambda q, k, v, *masks: v
            if mode == "eval forward":
                reference.eval(), swapped.eval(), no_attention.eval()
            return x, grad, reference, swapped, no_attention

        def run(which, mode=mode):
            def step(x, grad, reference, swapped, no_attention):
                model = {"fastcore": swapped, "torch-mha": reference, "no-attention": no_attention}[which]
                if mode == "training step":
                    out = encoder_training_step(model, x, grad)
                else:
                    with torch.no_grad():
                        out = model(x)
                return None if which == "no-attention" else out  # its output means nothing

            return step

        def error(output, inputs):
            import copy

            if output is None:
                return float("nan")
            x, _, reference, _, _ = inputs
            with torch.no_grad():
                expected = copy.deepcopy(reference).cpu().double()(x.cpu().double())
            return _rel(output, expected)

        cases.append(
            Case(
                "mux_mha",
                f"TransformerEncoder {layers}L d={d} h={heads} B={B} L={L} float32 {mode}",
                setup,
                {name: run(name) for name in ("fastcore", "torch-mha", "no-attention")},
                error,
                peer="torch-mha",
            )
        )
    return cases


FAMILIES["mux_mha"] = multihead_encoder_cases

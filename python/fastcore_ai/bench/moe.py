"""Benchmark cases of the moe family for fastcore_ai.bench: family name -> cases(device, quick).

  moe          the fused router (moe_topk_route) against its torch composition, then the routing step
               alone (route + dispatch + combine) against the torch composition a user would write
  moe_routing  only the routing-step rows
  moe_experts  the expert computation against Hugging Face transformers' experts implementations on the
               same MixtralExperts module and routing, plus a "gemm-bound" row: plain torch.mm calls doing
               the same GEMM FLOPs at the same dtype and threads (the speed no implementation that does
               these FLOPs with this BLAS can beat; see docs/moe.md "How close to the GEMM bound")

All providers of a case use the same inputs (same weights, same routing) and are timed in one run.
"""

from __future__ import annotations

from typing import List

import torch

# (name, T, H, I, E, k): the two expert shapes of the issue (Mixtral-like few large experts,
# Qwen3-MoE-like many small experts), scaled to the CPU.
EXPERT_SHAPES = [("mixtral-like", 2048, 1024, 1024, 8, 2), ("qwen3-moe-like", 2048, 512, 256, 64, 8)]


def torch_composition_router(logits: torch.Tensor, k: int, renormalize: bool = True):
    """The router as separate torch calls, as a user would write it (the peer for moe_topk_route)."""
    x = logits.float()
    probs = torch.softmax(x, dim=-1)
    weights, expert_ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    z_loss = torch.logsumexp(x, dim=-1).pow(2).mean()
    tokens_per_expert = torch.bincount(expert_ids.flatten(), minlength=x.shape[1])
    mean_prob = probs.mean(dim=0)
    return weights, expert_ids, z_loss, tokens_per_expert, mean_prob


def torch_composition_routing_step(logits: torch.Tensor, x: torch.Tensor, k: int):
    """Route + dispatch + combine as plain torch calls (what Hugging Face / torchtitan-style code does):
    the router composition above, a stable argsort of the flattened expert ids as the permutation, the
    row gather x[token_of_row], expert offsets from the counts, then the weighted combine with index_add_
    in float32. The experts are the identity here (y_sorted = x_sorted), so the step alone is timed."""
    weights, expert_ids, z_loss, tokens_per_expert, mean_prob = torch_composition_router(logits, k)
    order = torch.argsort(expert_ids.flatten(), stable=True)
    token_of_row = order // k
    x_sorted = x[token_of_row]
    expert_offsets = torch.cat([tokens_per_expert.new_zeros(1), tokens_per_expert.cumsum(0)])
    y_sorted = x_sorted  # identity experts
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y_sorted.float() * weights.flatten()[order].unsqueeze(1))
    return out.to(x.dtype), expert_offsets, z_loss, mean_prob


def fastcore_routing_step(logits: torch.Tensor, x: torch.Tensor, k: int, backend: str):
    """The same step with fastcore_ai's ops: fused router, counting-sort dispatch, fixed-order combine."""
    from .. import ops

    routed = ops.moe_topk_route(logits, k, backend=backend)
    x_sorted, plan = ops.moe_dispatch(x, routed.expert_ids, None, logits.shape[1], backend=backend)
    out = ops.moe_combine(x_sorted, plan, routed.weights, backend=backend)
    return out, plan.expert_offsets, routed.z_loss, routed.mean_prob


def _fast_backends(device: str) -> List[str]:
    return ["cpu"] if device == "cpu" else ["cuda", "triton"]


def moe_router_cases(device: str, quick: bool = False):
    from .. import ops, reference
    from .harness import Case

    cases = []
    for T in (4096, 65536):
        for E in (8, 64, 128):
            for k in (2, 8):
                if quick and (T, E) not in ((4096, 8), (65536, 128)):
                    continue

                def setup(T=T, E=E):
                    generator = torch.Generator().manual_seed(T * 1000 + E)
                    return (torch.randn(T, E, generator=generator).to(device),)

                providers = {
                    b: (lambda x, k=k, b=b: ops.moe_topk_route(x, k, backend=b)) for b in _fast_backends(device)
                }
                providers["reference"] = lambda x, k=k: ops.moe_topk_route(x, k, backend="reference")
                providers["torch-composition"] = lambda x, k=k: torch_composition_router(x, k)

                def error(output, inputs, k=k):
                    oracle = reference.moe_topk_route(inputs[0].double().cpu(), k, True)
                    weights = output[0].double().cpu()
                    return float((weights - oracle[0]).norm() / oracle[0].norm())

                cases.append(
                    Case(
                        "moe",
                        f"moe_topk_route T={T} E={E} k={k} float32",
                        setup,
                        providers,
                        error,
                        peer="torch-composition",
                    )
                )
    return cases


def moe_routing_step_cases(device: str, quick: bool = False):
    """Route + dispatch + combine (identity experts) on the expert shapes, float32 and bfloat16 x
    (the router runs in float32 either way)."""
    from .. import reference
    from .harness import Case

    cases = []
    for name, T, H, _, E, k in EXPERT_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):

            def setup(T=T, H=H, E=E, dtype=dtype):
                generator = torch.Generator().manual_seed(T + H + E)
                logits = torch.randn(T, E, generator=generator)
                x = torch.randn(T, H, generator=generator).to(dtype)
                return logits.to(device), x.to(device)

            providers = {
                b: (lambda logits, x, k=k, b=b: fastcore_routing_step(logits, x, k, b)) for b in _fast_backends(device)
            }
            providers["reference"] = lambda logits, x, k=k: fastcore_routing_step(logits, x, k, "reference")
            providers["torch-composition"] = lambda logits, x, k=k: torch_composition_routing_step(logits, x, k)

            def error(output, inputs, k=k):
                logits, x = (t.double().cpu() for t in inputs)
                weights = reference.moe_topk_route(logits, k, True)[0]
                oracle = weights.sum(1, keepdim=True) * x  # identity experts: Σ_j w_j x_t
                return float((output[0].double().cpu() - oracle).norm() / oracle.norm())

            cases.append(
                Case(
                    "moe",
                    f"routing step (route+dispatch+combine) {name} T={T} H={H} E={E} k={k} "
                    f"{str(dtype).replace('torch.', '')}",
                    setup,
                    providers,
                    error,
                    peer="torch-composition",
                )
            )
    return cases


def experts_gemm_flops(T: int, H: int, I: int, k: int, backward: bool, gated: bool = True) -> int:
    """GEMM FLOPs of the expert computation over S = T·k routed rows: forward gate_up (2·S·H·n1,
    n1 = 2I gated) + down (2·S·I·H); the backward does each product twice more (input and weight
    gradients), so forward+backward is 3× the forward."""
    S, n1 = T * k, (2 * I if gated else I)
    forward = 2 * S * H * n1 + 2 * S * I * H
    return 3 * forward if backward else forward


def gemm_bound(T: int, H: int, I: int, k: int, dtype: torch.dtype, device: str, backward: bool):
    """A provider doing experts_gemm_flops(...) as plain torch.mm calls on [S, ·] operands (one expert
    holding every row: the most BLAS-friendly shape of the same work). Operands are made on the first
    call (the harness's warm-up), so only the GEMMs are timed."""
    operands = {}

    def run(*_):
        if not operands:
            g = torch.Generator().manual_seed(1)
            S = T * k

            def rand(*shape):
                return (torch.randn(*shape, generator=g) * 0.02).to(device=device, dtype=dtype)

            operands.update(
                x=rand(S, H), w1=rand(2 * I, H), w2=rand(H, I), h=rand(S, I), g=rand(S, H), ggu=rand(S, 2 * I)
            )
        o = operands
        torch.mm(o["x"], o["w1"].t())  # gate_up = x W1ᵀ
        torch.mm(o["h"], o["w2"].t())  # y = h W2ᵀ
        if backward:
            torch.mm(o["g"], o["w2"])  # grad_h = g W2
            torch.mm(o["g"].t(), o["h"])  # grad_W2 = gᵀ h
            torch.mm(o["ggu"], o["w1"])  # grad_x = grad_gu W1
            torch.mm(o["ggu"].t(), o["x"])  # grad_W1 = grad_guᵀ x
        return None

    return run


def moe_experts_cases(device: str, quick: bool = False):
    """The expert computation (dispatch -> expert MLPs -> combine) against Hugging Face transformers'
    own experts implementations on the same MixtralExperts module and routing (needs transformers >= 5)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        print("  [moe_experts] transformers >= 5 is not installed (pip install fastcore_ai[bench]); skipped")
        return []
    from .. import ops
    from .harness import Case
    from ..integrations import transformers as fastcore_hf

    fastcore_hf.register()
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    implementations = ["fastcore_ai", "eager", "batched_mm", "grouped_mm"]
    cases = []
    for name, T, H, I, E, k in EXPERT_SHAPES:
        for dtype in dtypes:
            for mode in ("forward", "forward+backward"):

                def setup(T=T, H=H, I=I, E=E, k=k, dtype=dtype):
                    torch.manual_seed(0)
                    config = MixtralConfig(
                        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k
                    )
                    module = MixtralExperts(config).to(device=device, dtype=dtype)
                    for p in module.parameters():
                        torch.nn.init.normal_(p, std=0.02)
                    x = torch.randn(T, H, device=device, dtype=dtype)
                    probs = torch.softmax(torch.randn(T, E, device=device), dim=1)
                    weights, ids = torch.topk(probs, k, dim=1)
                    return module, x, ids, (weights / weights.sum(1, keepdim=True)).to(dtype)

                def provider(module, x, ids, weights, implementation, mode=mode):
                    module.config._experts_implementation = implementation
                    if mode == "forward":
                        with torch.no_grad():
                            return module(x, ids, weights)
                    module.zero_grad(set_to_none=True)
                    x_leaf = x.detach().requires_grad_()
                    out = module(x_leaf, ids, weights)
                    out.float().square().mean().backward()
                    return out.detach()

                # HF's batched_mm gathers a weight matrix per (token, slot): T·k·3·I·H elements.
                gathered_bytes = T * k * 3 * I * H * torch.finfo(dtype).bits // 8
                usable = [impl for impl in implementations if impl != "batched_mm" or gathered_bytes < 2**32]
                if len(usable) < len(implementations):
                    print(
                        f"  [moe_experts {name}] hf-batched_mm left out: it would gather "
                        f"{gathered_bytes / 2**30:.0f} GiB of expert weights"
                    )
                providers = {
                    f"hf-{impl}" if impl != "fastcore_ai" else "fastcore": (
                        lambda *a, impl=impl, run=provider: run(*a, impl)
                    )
                    for impl in usable
                }
                if mode == "forward":
                    # The same computation as three separate ops (dispatch -> grouped MLP -> combine): the
                    # gain of the fused moe_experts path over its own composition.
                    def unfused(module, x, ids, weights):
                        with torch.no_grad():
                            x_sorted, plan = ops.moe_dispatch(x, ids, None, module.gate_up_proj.shape[0])
                            y = ops.moe_grouped_mlp(
                                x_sorted, plan.expert_offsets, module.gate_up_proj, module.down_proj
                            )
                            return ops.moe_combine(y, plan, weights)

                    providers["fastcore-unfused"] = unfused
                providers["gemm-bound"] = gemm_bound(T, H, I, k, dtype, device, mode != "forward")

                def error(output, inputs):
                    if output is None:  # gemm-bound computes nothing comparable
                        return float("nan")
                    module, x, ids, weights = inputs
                    reference_module = type(module)(module.config).double()
                    reference_module.load_state_dict({key: v.double() for key, v in module.state_dict().items()})
                    reference_module.config._experts_implementation = "eager"
                    with torch.no_grad():
                        expected = reference_module(x.double(), ids, weights.double())
                    return float((output.double() - expected).norm() / expected.norm())

                gflop = experts_gemm_flops(T, H, I, k, mode != "forward") / 1e9
                cases.append(
                    Case(
                        "moe_experts",
                        f"experts {name} T={T} H={H} I={I} E={E} k={k} {str(dtype).replace('torch.', '')} {mode}",
                        setup,
                        providers,
                        error,
                        peer="hf-grouped_mm",
                        extra={"gemm_gflop": gflop},
                    )
                )
    return cases


FAMILIES = {
    "moe": lambda device, quick=False: moe_router_cases(device, quick) + moe_routing_step_cases(device, quick),
    "moe_routing": moe_routing_step_cases,
    "moe_experts": moe_experts_cases,
}


# ---- the shape sweep (python -m fastcore_ai bench --sweep; bench/sweep.py) ------------------------------------


def hf_router(logits: torch.Tensor, k: int):
    """The router as Hugging Face's Mixtral/Qwen-MoE blocks write it: softmax in float32, top-k, renormalise."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids


def torch_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Group the routed rows by expert in torch: stable argsort of the flat expert ids, a row gather, offsets
    from bincount (the dispatch of torch_composition_routing_step)."""
    k = expert_ids.shape[1]
    order = torch.argsort(expert_ids.flatten(), stable=True)
    counts = torch.bincount(expert_ids.flatten(), minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return x[order // k], offsets


def torch_combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, T: int):
    """The weighted combine in torch: index_add_ of the weighted rows into float32, cast back."""
    k = weights.shape[1]
    out = torch.zeros(T, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    out.index_add_(0, order // k, y_sorted.float() * weights.flatten()[order].float().unsqueeze(1))
    return out.to(y_sorted.dtype)


def torch_grouped_mlp(
    x_sorted: torch.Tensor, expert_offsets: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
):
    """The expert MLPs as a loop over experts with torch matmuls (HF's eager loop, on grouped rows):
    y_e = (silu(x_e W_gᵀ) ⊙ x_e W_uᵀ) W_downᵀ in the inputs' dtype."""
    inner = w_down.shape[2]
    y = torch.empty(x_sorted.shape[0], w_down.shape[1], dtype=x_sorted.dtype, device=x_sorted.device)
    bounds = expert_offsets.tolist()
    for e in range(len(bounds) - 1):
        begin, end = bounds[e], bounds[e + 1]
        if end > begin:
            gate_up = x_sorted[begin:end] @ w_gate_up[e].t()
            hidden = torch.nn.functional.silu(gate_up[:, :inner]) * gate_up[:, inner:]
            y[begin:end] = hidden @ w_down[e].t()
    return y


def torch_experts(x, expert_ids, weights, w_gate_up, w_down):
    """dispatch -> expert loop -> combine in torch (the experts' peer where transformers is not installed)."""
    x_sorted, offsets = torch_dispatch(x, expert_ids, w_gate_up.shape[0])
    y = torch_grouped_mlp(x_sorted, offsets, w_gate_up, w_down)
    order = torch.argsort(expert_ids.flatten(), stable=True)
    return torch_combine(y, order, weights, x.shape[0])


def _pair(text: str):
    """'8/2' -> (8, 2)."""
    a, b = text.split("/")
    return int(a), int(b)


def _routing(T: int, E: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(T, E, generator=g), dim=1)
    weights, ids = torch.topk(probs, k, dim=1)
    return weights / weights.sum(1, keepdim=True), ids


def _rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _sweep_router(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    T, E, k = p["T"], p["E"], p["k"]

    def setup():
        return (torch.randn(T, E, generator=torch.Generator().manual_seed(T + E)).to(device=device, dtype=dtype),)

    return SweepCell(
        setup,
        lambda x: ops.moe_topk_route(x, k),
        {"torch-topk-softmax": lambda x: hf_router(x, k)},
        lambda ours, peer, inputs: _rel(ours.weights, peer[0]),
    )


def _sweep_dispatch(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    T, H = p["T"], p["H"]
    E, k = _pair(p["E/k"])

    def setup():
        _, ids = _routing(T, E, k, T + H)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        return x, ids.to(device)

    return SweepCell(
        setup,
        lambda x, ids: ops.moe_dispatch(x, ids, None, E),
        {"torch-argsort-gather": lambda x, ids: torch_dispatch(x, ids, E)},
        lambda ours, peer, inputs: _rel(ours[0], peer[0]),
    )


def _sweep_combine(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    T, H = p["T"], p["H"]
    E, k = _pair(p["E/k"])

    def setup():
        weights, ids = _routing(T, E, k, T + H)
        y = torch.randn(T * k, H, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        _, plan = ops.moe_dispatch(torch.zeros(T, 1, dtype=dtype, device=device), ids.to(device), None, E)
        order = torch.argsort(ids.flatten(), stable=True).to(device)
        return y, plan, order, weights.to(device=device, dtype=dtype)

    return SweepCell(
        setup,
        lambda y, plan, order, w: ops.moe_combine(y, plan, w),
        {"torch-index_add": lambda y, plan, order, w: torch_combine(y, order, w, T)},
        lambda ours, peer, inputs: _rel(ours, peer),
    )


def _expert_weights(E: int, H: int, I: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(device=device, dtype=dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(device=device, dtype=dtype)
    return w1, w2


def _sweep_grouped_mlp(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    T = p["T"]
    H, I = _pair(p["H/I"])
    E, k = _pair(p["E/k"])

    def setup():
        _, ids = _routing(T, E, k, T + H)
        counts = torch.bincount(ids.flatten(), minlength=E)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(device)
        x = torch.randn(T * k, H, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
        return (x, offsets) + _expert_weights(E, H, I, dtype, device)

    def ours(x, offsets, w1, w2):
        with torch.no_grad():
            return ops.moe_grouped_mlp(x, offsets, w1, w2)

    def peer(x, offsets, w1, w2):
        with torch.no_grad():
            return torch_grouped_mlp(x, offsets, w1, w2)

    return SweepCell(setup, ours, {"torch-expert-loop": peer}, lambda ours, peer, inputs: _rel(ours, peer))


def _sweep_experts(p, dtype, device):
    from .. import ops
    from .harness import SweepCell

    T = p["T"]
    H, I = _pair(p["H/I"])
    E, k = _pair(p["E/k"])
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        MixtralExperts = None

    def setup():
        weights, ids = _routing(T, E, k, T + H)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
        w1, w2 = _expert_weights(E, H, I, dtype, device)
        module = None
        if MixtralExperts is not None:
            config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
            module = MixtralExperts(config).to(device=device, dtype=dtype)
            with torch.no_grad():
                module.gate_up_proj.copy_(w1)
                module.down_proj.copy_(w2)
            w1, w2 = module.gate_up_proj, module.down_proj
        return x, ids.to(device), weights.to(device=device, dtype=dtype), w1, w2, module

    def ours(x, ids, weights, w1, w2, module):
        with torch.no_grad():
            return ops.moe_experts(x, ids, weights, w1, w2)

    def hf(implementation):
        def run(x, ids, weights, w1, w2, module):
            module.config._experts_implementation = implementation
            with torch.no_grad():
                return module(x, ids, weights)

        return run

    if MixtralExperts is None:
        peers = {"torch-expert-loop": lambda x, ids, weights, w1, w2, module: torch_experts(x, ids, weights, w1, w2)}
    else:
        peers = {"hf-eager": hf("eager"), "hf-grouped_mm": hf("grouped_mm")}
        if T * k * 3 * I * H * torch.finfo(dtype).bits // 8 < 2**30:  # batched_mm gathers a weight matrix per slot
            peers["hf-batched_mm"] = hf("batched_mm")
    return SweepCell(setup, ours, peers, lambda ours, peer, inputs: _rel(ours, peer))


def _sweep_specs():
    from .harness import SweepOp

    routed = {"T": [64, 512, 4096], "H": [256, 1024, 4096], "E/k": ["8/2", "64/8", "256/8"]}
    routed_quick = {"T": [8, 32], "H": [16], "E/k": ["4/2"]}
    mlp = {"T": [16, 256, 2048], "H/I": ["256/128", "512/256", "1024/512"], "E/k": ["8/2", "32/4", "128/8"]}
    mlp_quick = {"T": [4, 16], "H/I": ["16/8"], "E/k": ["4/2"]}
    low = (torch.float32, torch.bfloat16)
    return [
        SweepOp(
            "moe_topk_route",
            "moe",
            {"T": [512, 4096, 65536], "E": [16, 64, 128], "k": [2, 4, 8]},
            {"T": [16, 64], "E": [8], "k": [2]},
            _sweep_router,
            "torch.topk(torch.softmax(logits, dtype=float32)), renormalised (HF Mixtral's router)",
            dtypes=low,
            fixed="renormalize=True, no capacity; ours also returns z-loss, counts and mean probabilities",
        ),
        SweepOp(
            "moe_dispatch",
            "moe",
            routed,
            routed_quick,
            _sweep_dispatch,
            "stable torch.argsort of the expert ids, row gather x[order // k], bincount offsets",
            dtypes=low,
            fixed="top-k routing of random logits (E experts, k slots a token), no capacity drop",
        ),
        SweepOp(
            "moe_combine",
            "moe",
            routed,
            routed_quick,
            _sweep_combine,
            "index_add_ of the weighted rows in float32, cast back",
            dtypes=low,
            fixed="the plan of moe_dispatch on the same routing",
        ),
        SweepOp(
            "moe_grouped_mlp",
            "moe",
            mlp,
            mlp_quick,
            _sweep_grouped_mlp,
            "a loop over experts with torch matmuls (silu-gated MLP, HF's eager loop on grouped rows)",
            dtypes=low,
            fixed="S = T*k grouped rows, silu gated, forward under no_grad",
        ),
        SweepOp(
            "moe_experts",
            "moe",
            mlp,
            mlp_quick,
            _sweep_experts,
            "the fastest of Hugging Face transformers' MixtralExperts implementations (eager, grouped_mm, "
            "batched_mm where its gather fits in 1 GiB) on the same weights and routing; without transformers "
            "a torch loop over experts",
            dtypes=low,
            fixed="forward under no_grad, silu gated",
        ),
    ]


SWEEP = _sweep_specs()

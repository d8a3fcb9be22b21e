"""Property-based fuzzing of every public op, driven by the op registry (DESIGN "Tests": property tests).

Each public op has one entry in MODELS: an input model that draws a valid call (shapes that include 0, 1,
odd sizes and sizes just past SIMD widths and block sizes; the op's dtypes; its index and int arguments),
and what the fuzzer must know about it (which arguments hold indices and their valid range, the error bound
of its results). The perturbations are generic and applied on top of the valid call: memory layout
(transposed, sliced with a step, expanded with stride 0, offset storage), dtype (supported and not),
values (NaN, ±inf, denormals, huge and tiny magnitudes, exact ties), indices and ints (negative, past the
end, huge), shapes inconsistent with the other arguments, and wrong argument types.

The property, for every backend that runs here (cpu, triton under TRITON_INTERPRET=1; reference itself):
the call either raises ValueError / TypeError / RuntimeError whose message names the op and an argument,
or returns what the reference backend returns (same shapes and dtypes, NaN and ±inf in the same places,
the finite values within the op's bound). An error that is not the backend selection's ("cannot run this
call") must be raised by the reference too: validation is the op's, not the backend's.

Profiles: the default (CI) one is derandomized with a bounded number of examples per op; FASTCORE_FUZZ=long
(`make fuzz`) draws many more, with fresh randomness. Every failure found is kept as a regression case in
tests/fuzz_regressions.py, run through the same property. Known disagreements between backends are listed in
KNOWN_DEFECTS with a precise reason; the fuzzer tolerates them only on the inputs they describe, and
test_known_defects_still_hold fails (strict xfail) once one is fixed, so the list cannot go stale.

Huge inputs (index products past 2^31) are expanded tensors, so they cost no memory; they run in a
subprocess under an address-space limit (test_huge_expanded_inputs).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fastcore_ai import ops
from fastcore_ai.ops._define import REGISTRY
from fastcore_ai.reference import pq as ref_pq

import fuzz_regressions

# ---- profiles --------------------------------------------------------------------------------------------

_PROFILE = os.environ.get("FASTCORE_FUZZ", "ci")
if _PROFILE not in ("ci", "long"):
    raise ValueError(f"FASTCORE_FUZZ must be 'ci' or 'long', got {_PROFILE!r}")
# FASTCORE_FUZZ_NO_SHRINK=1: report failures unshrunk (a quick local look over many examples)
_PHASES = [Phase.explicit, Phase.generate] if os.environ.get("FASTCORE_FUZZ_NO_SHRINK") else list(Phase)
_HEALTH = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.function_scoped_fixture,  # address_space_limit sets a process limit, the same for every example
]
settings.register_profile(
    "fastcore-fuzz-ci",
    max_examples=24,
    derandomize=True,
    deadline=None,
    database=None,
    phases=_PHASES,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "fastcore-fuzz-long",
    max_examples=1500,
    derandomize=False,
    deadline=None,
    database=None,
    suppress_health_check=_HEALTH,
)
FUZZ_SETTINGS = settings.get_profile(f"fastcore-fuzz-{_PROFILE}")
if os.environ.get("FASTCORE_FUZZ_EXAMPLES"):  # examples per op, overriding the profile's (a quick local look)
    FUZZ_SETTINGS = settings(FUZZ_SETTINGS, max_examples=int(os.environ["FASTCORE_FUZZ_EXAMPLES"]))

# Sizes along one dimension: 0 and 1, odd sizes, and sizes around SIMD widths (8/16 floats) and block sizes
# (32, 64, 128): the shrinker walks toward the front of the list.
SIZES = (1, 0, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129)
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ALL_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.uint8,
    torch.bool,
)
ALLOWED_ERRORS = (ValueError, TypeError, RuntimeError)

# ---- a drawn call ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One call of a public op: its arguments by name, and what the generic perturbations need to know."""

    args: Dict[str, Any]
    indices: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # int tensor -> valid [low, high)
    ints: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # int argument -> valid [low, high]
    scalars: Tuple[str, ...] = ()  # float arguments (get NaN, ±inf, 0, -1)
    notes: List[str] = field(default_factory=list)  # the perturbations applied (for the failure message)

    def describe(self) -> str:
        def one(value):
            if isinstance(value, torch.Tensor):
                return f"tensor{tuple(value.shape)} {str(value.dtype)[6:]} strides {value.stride()}"
            return repr(value)

        lines = [f"  {name} = {one(value)}" for name, value in self.args.items()]
        return "\n".join(lines + [f"  perturbations: {self.notes or 'none'}"])


def _gen(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**20)))


def _size(draw, high, low=0):
    return draw(st.sampled_from([s for s in SIZES if low <= s <= high] or [low]))


def _randn(g, *shape, dtype=torch.float32):
    if dtype.is_complex:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _rand(g, *shape, dtype=torch.float32):
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


def _randint(g, low, high, *shape):
    if high <= low:
        return torch.full(shape, low, dtype=torch.int64)
    return torch.randint(low, high, shape, generator=g)


# ---- the per-op input models -----------------------------------------------------------------------------


def _route(draw):
    g = _gen(draw)
    E = _size(draw, 65, 1)
    T = _size(draw, 65)
    k = draw(st.integers(1, min(E, ops.MAX_TOP_K)))
    capacity = draw(st.sampled_from([None, None, 1.0, 0.5, 1.25]))
    args = dict(logits=_randn(g, T, E, dtype=draw(st.sampled_from(FLOATS))), k=k)
    args.update(
        renormalize=draw(st.booleans()), capacity_factor=capacity, min_capacity=draw(st.sampled_from([4, 0, 1]))
    )
    args["priority"] = draw(st.sampled_from(["token", "batch"]))
    return Case(args, ints={"k": (1, min(E, 16)), "min_capacity": (0, 2**62)}, scalars=("capacity_factor",))


def _expert_routing(draw, g, T, E):
    k = draw(st.integers(1, 4))
    ids = _randint(g, 0, E, T, k)
    kept = draw(st.sampled_from([None, "mask"]))
    kept = None if kept is None else _rand(g, T, k) > 0.25
    return k, ids, kept


def _dispatch(draw):
    g = _gen(draw)
    T, H, E = _size(draw, 33), _size(draw, 17, 1), _size(draw, 9, 1)
    k, ids, kept = _expert_routing(draw, g, T, E)
    x = _randn(g, T, H, dtype=draw(st.sampled_from(FLOATS)))
    return Case(dict(x=x, expert_ids=ids, kept=kept, num_experts=E), {"expert_ids": (0, E)}, {"num_experts": (1, 4096)})


def _combine(draw):
    g = _gen(draw)
    T, H, E = _size(draw, 33), _size(draw, 17, 1), _size(draw, 9, 1)
    k, ids, kept = _expert_routing(draw, g, T, E)
    dtype = draw(st.sampled_from(FLOATS))
    _, plan = ops.moe_dispatch(torch.zeros(T, 1), ids, kept, E, backend="reference")
    S = plan.slot_to_token.shape[0]
    args = dict(y_sorted=_randn(g, S, H, dtype=dtype), expert_offsets=plan.expert_offsets)
    args.update(slot_to_token=plan.slot_to_token, token_slot=plan.token_slot, weights=_rand(g, T, k, dtype=dtype))
    indices = {"slot_to_token": (0, T), "token_slot": (-1, S), "expert_offsets": (0, S + 1)}
    return Case(args, indices)


def _call_combine(a, backend):
    plan = ops.DispatchPlan(a["expert_offsets"], a["slot_to_token"], a["token_slot"])
    return ops.moe_combine(a["y_sorted"], plan, a["weights"], backend=backend)


def _expert_weights(draw, g, E, H, dtype):
    I = _size(draw, 17, 1)  # noqa: E741 (the intermediate size, as in the docs)
    gated = draw(st.booleans())
    w_gate_up = _randn(g, E, 2 * I if gated else I, H, dtype=dtype) / max(H, 1) ** 0.5
    w_down = _randn(g, E, H, I, dtype=dtype) / I**0.5
    return dict(
        w_gate_up=w_gate_up, w_down=w_down, activation=draw(st.sampled_from(["silu", "gelu", "relu"])), gated=gated
    )


def _grouped_mlp(draw):
    g = _gen(draw)
    S, H, E = _size(draw, 33), _size(draw, 17, 1), _size(draw, 9, 1)
    dtype = draw(st.sampled_from(FLOATS))
    cuts = torch.sort(_randint(g, 0, S + 1, E - 1)).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), S, dtype=torch.int64)])
    args = dict(x_sorted=_randn(g, S, H, dtype=dtype), expert_offsets=offsets, **_expert_weights(draw, g, E, H, dtype))
    return Case(args, {"expert_offsets": (0, S + 1)})


def _experts(draw):
    g = _gen(draw)
    T, H, E = _size(draw, 33), _size(draw, 17, 1), _size(draw, 9, 1)
    dtype = draw(st.sampled_from(FLOATS))
    k, ids, kept = _expert_routing(draw, g, T, E)
    args = dict(x=_randn(g, T, H, dtype=dtype), expert_ids=ids, weights=_rand(g, T, k), kept=kept)
    args.update(_expert_weights(draw, g, E, H, dtype))
    return Case(args, {"expert_ids": (0, E)})


def _poles(g, B, N, dtype):
    v = _randn(g, B, N, dtype=dtype)
    real = -0.5 * _rand(g, B, N, dtype=torch.float64) - 0.05
    imag = math.pi * torch.arange(N, dtype=torch.float64) * (0.5 + _rand(g, B, N, dtype=torch.float64))
    return v, torch.complex(real, imag).to(dtype)


def _cauchy(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.complex64, torch.complex128]))
    B, N, L = _size(draw, 9), _size(draw, 33, 1), _size(draw, 33)
    v, w = _poles(g, B, N, dtype)
    z = torch.complex(_rand(g, L, dtype=torch.float64), 4 * _randn(g, L, dtype=torch.float64)).to(dtype)
    return Case(dict(v=v, z=z, w=w, conj_symmetric=draw(st.booleans())))


def _vandermonde(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.complex64, torch.complex128]))
    B, N = _size(draw, 9), _size(draw, 33, 1)
    v, x = _poles(g, B, N, dtype)
    return Case(dict(v=v, x=x * 0.1, L=_size(draw, 129)), ints={"L": (0, 2**29 - 1)})


def _fft_conv(draw):
    g = _gen(draw)
    B, H, L = _size(draw, 5), _size(draw, 9), _size(draw, 129, 1)
    Lk = draw(st.integers(1, L))
    dtype = draw(st.sampled_from(FLOATS))
    D = draw(st.sampled_from([None, "D"]))
    args = dict(u=_randn(g, B, H, L, dtype=dtype), k=_randn(g, H, Lk, dtype=draw(st.sampled_from(FLOATS))) / Lk**0.5)
    args["D"] = None if D is None else _randn(g, H, dtype=dtype)
    return Case(args)


def _fft_conv_size(draw):
    L = _size(draw, 129, 1)
    return Case(dict(L=L, Lk=draw(st.integers(1, L))), ints={"L": (1, 2**62), "Lk": (1, L)})


def _check_fft_conv_size(a, n):
    L, Lk = a["L"], a["Lk"]
    assert isinstance(n, int) and n >= L + Lk - 1, f"fft_conv_size({L}, {Lk}) = {n} < L + Lk - 1"
    m = n
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    assert m == 1, f"fft_conv_size({L}, {Lk}) = {n} is not 2^a 3^b 5^c"


def _ssm_step(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.complex64, torch.complex128]))
    B, H, N = _size(draw, 9), _size(draw, 17), _size(draw, 33, 1)
    dA = torch.exp(torch.complex(-0.1 * _rand(g, H, N, dtype=torch.float64), _randn(g, H, N, dtype=torch.float64)))
    u_dtype = draw(st.sampled_from(FLOATS))
    args = dict(state=_randn(g, B, H, N, dtype=dtype), u=_randn(g, B, H, dtype=u_dtype), dA=dA.to(dtype))
    args.update(dB=_randn(g, H, N, dtype=dtype), C=_randn(g, H, N, dtype=dtype))
    args.update(D=draw(st.sampled_from([None, _randn(g, H, dtype=u_dtype)])), inplace=draw(st.booleans()))
    return Case(args)


def _call_ssm_step(a, backend):
    a = dict(a)
    if a.get("inplace") is True and isinstance(a["state"], torch.Tensor):
        # a fresh state with the drawn strides (so the in-place rules see the drawn layout) per backend
        state = a["state"]
        fresh = torch.empty_strided(state.shape, state.stride(), dtype=state.dtype)
        a["state"] = fresh.copy_(state.resolve_conj()) if not state.is_conj() else fresh.copy_(state)
    return ops.ssm_step(**a, backend=backend)


def _rays(draw, g, R, dtype):
    o = _rand(g, R, 3, dtype=dtype) * 3 - 1.5
    d = _randn(g, R, 3, dtype=dtype)
    if R and draw(st.booleans()):
        d[0, draw(st.integers(0, 2))] = 0.0  # an axis-parallel ray (exact slab test)
    return o, d


def _aabb(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    R, A = _size(draw, 33), _size(draw, 9)
    o, d = _rays(draw, g, R, dtype)
    lo = _rand(g, A, 3, dtype=dtype) * 2 - 1
    boxes = torch.cat([lo, lo + _rand(g, A, 3, dtype=dtype) * draw(st.sampled_from([1.0, -0.5]))], 1)
    return Case(dict(rays_o=o, rays_d=d, aabbs=boxes))


def _grid_update(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    N, M = _size(draw, 129, 1), _size(draw, 65)
    density = _rand(g, N, dtype=dtype) * 0.02
    density[_randint(g, 0, N, 2)] = -1.0  # culled cells
    args = dict(density=density, cell_indices=_randint(g, 0, N, M), values=_rand(g, M, dtype=dtype) * 0.02)
    args.update(decay=draw(st.sampled_from([0.95, 0.5, 1.0])), threshold=draw(st.sampled_from([0.01, 0.0, 1.0])))
    return Case(args, {"cell_indices": (0, N)}, scalars=("decay", "threshold"))


def _ray_march(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    R, res, levels = _size(draw, 17), draw(st.sampled_from([4, 1, 2, 3, 8])), draw(st.integers(1, 3))
    o, d = _rays(draw, g, R, dtype)
    cells = levels * res**3
    occupied = (_rand(g, cells) < draw(st.sampled_from([0.4, 0.0, 1.0]))).to(torch.uint8)
    occupied = torch.nn.functional.pad(occupied, (0, (-cells) % 8)).view(-1, 8)
    bits = (occupied << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8)
    args = {"rays_o": o, "rays_d": d, "grid.aabb": torch.tensor([-1.0, -1, -1, 1, 1, 1]), "grid.bitfield": bits}
    args.update({"grid.resolution": res, "grid.levels": levels, "near": draw(st.sampled_from([0.0, 0.2]))})
    args.update(far=draw(st.sampled_from([math.inf, 3.0])), step_size=draw(st.sampled_from([0.1, 0.05, 0.3])))
    args.update(cone_angle=draw(st.sampled_from([0.0, 0.01])), max_samples_per_ray=draw(st.sampled_from([64, 1, 5])))
    ints = {"grid.resolution": (1, 1024), "grid.levels": (1, 16), "max_samples_per_ray": (1, 2**20)}
    return Case(args, ints=ints, scalars=("near", "far", "cone_angle"))


def _call_ray_march(a, backend):
    grid = types.SimpleNamespace(
        aabb=a["grid.aabb"], bitfield=a["grid.bitfield"], resolution=a["grid.resolution"], levels=a["grid.levels"]
    )
    rest = {name: value for name, value in a.items() if not name.startswith("grid.")}
    return ops.ray_march(grid=grid, **rest, backend=backend)


def _volume_render(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    R = _size(draw, 17)
    counts = _randint(g, 0, draw(st.sampled_from([5, 1, 17])) + 1, R)
    S = int(counts.sum())
    packed = torch.stack([torch.cumsum(counts, 0) - counts, counts], 1)
    deltas = _rand(g, S, dtype=dtype) * 0.3 + 0.01
    t_starts = torch.zeros(S, dtype=dtype)
    for r in range(R):
        s, c = int(packed[r, 0]), int(counts[r])
        t_starts[s : s + c] = 0.5 + torch.cumsum(deltas[s : s + c], 0) - deltas[s : s + c]
    background = draw(st.sampled_from([None, "one", "per-ray"]))
    background = {None: None, "one": _rand(g, 3, dtype=dtype), "per-ray": _rand(g, R, 3, dtype=dtype)}[background]
    args = dict(sigmas=_rand(g, S, dtype=dtype) * 3, rgbs=_rand(g, S, 3, dtype=dtype), t_starts=t_starts)
    args.update(t_ends=t_starts + deltas, packed_info=packed, background=background)
    args.update(early_stop_eps=draw(st.sampled_from([1e-4, 0.0, 0.5])), return_weights=draw(st.booleans()))
    return Case(args, {"packed_info": (0, S + 1)}, scalars=("early_stop_eps",))


def _composite(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    K, R = _size(draw, 9, 1), _size(draw, 33)
    camera = _randn(g, R, 3, dtype=dtype) if draw(st.booleans()) else _randn(g, 3, dtype=dtype)
    args = dict(
        colors=_rand(g, K, R, 3, dtype=dtype), camera_pos=camera, block_centers=_randn(g, K, 3, dtype=dtype) * 2
    )
    args.update(visibility=_rand(g, K, R, dtype=dtype), power=draw(st.sampled_from([4.0, 1.0, 0.5])))
    args.update(visibility_threshold=draw(st.sampled_from([0.05, 0.0, 0.9])), radius=draw(st.sampled_from([None, 2.5])))
    args["return_weights"] = draw(st.booleans())
    return Case(args, scalars=("power", "visibility_threshold", "radius"))


def _kmeans(draw):
    g = _gen(draw)
    n, d = _size(draw, 65, 1), _size(draw, 9, 1)
    k = draw(st.integers(1, min(n, 9)))
    args = dict(x=_randn(g, n, d, dtype=draw(st.sampled_from([torch.float32, torch.float64]))), k=k)
    args.update(niter=draw(st.sampled_from([3, 0, 1])), seed=draw(st.integers(0, 3)))
    args.update(max_points_per_centroid=draw(st.sampled_from([256, 1, 4])), constrained=draw(st.booleans()))
    return Case(args, ints={"k": (1, n), "niter": (0, 2**20), "max_points_per_centroid": (1, 2**31)})


def _pq_train(draw):
    g = _gen(draw)
    M, dsub = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    n = draw(st.sampled_from([16, 17, 33, 64]))
    args = dict(x=_randn(g, n, M * dsub, dtype=draw(st.sampled_from([torch.float32, torch.float64]))), M=M, nbits=4)
    args.update(metric=draw(st.sampled_from(["l2", "ip"])), niter=draw(st.sampled_from([2, 0])))
    args.update(constrained=draw(st.booleans()), seed=draw(st.integers(0, 3)), max_points_per_centroid=256)
    return Case(args, ints={"M": (1, M * dsub), "niter": (0, 2**20)})


def _codebooks(draw, g, dtype=torch.float32, ksub=None):
    M, dsub = draw(st.integers(1, 5)), _size(draw, 9, 1)
    ksub = ksub or draw(st.sampled_from([16, 1, 3, 17, 256]))
    return _randn(g, M, ksub, dsub, dtype=dtype)


def _pq_encode(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    cb = _codebooks(draw, g, dtype)
    return Case(dict(x=_randn(g, _size(draw, 65), cb.shape[0] * cb.shape[2], dtype=dtype), codebooks=cb))


def _codes(g, n, M, ksub):
    return _randint(g, 0, ksub, n, M).to(torch.uint8)


def _pq_decode(draw):
    g = _gen(draw)
    cb = _codebooks(draw, g, draw(st.sampled_from([torch.float32, torch.float64])))
    M, ksub = cb.shape[:2]
    return Case(dict(codes=_codes(g, _size(draw, 65), M, ksub), codebooks=cb), {"codes": (0, ksub)})


def _pq_lut(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    cb = _codebooks(draw, g, dtype)
    q = _randn(g, _size(draw, 17), cb.shape[0] * cb.shape[2], dtype=dtype)
    return Case(dict(queries=q, codebooks=cb, metric=draw(st.sampled_from(["l2", "ip"]))))


def _pq_search(draw):
    g = _gen(draw)
    cb = _codebooks(draw, g, draw(st.sampled_from([torch.float32, torch.float64])))
    M, ksub, dsub = cb.shape
    n, k = _size(draw, 129), _size(draw, 33, 1)
    q = _randn(g, _size(draw, 9), M * dsub, dtype=cb.dtype)
    args = dict(queries=q, codes=_codes(g, n, M, ksub), codebooks=cb, k=k, metric=draw(st.sampled_from(["l2", "ip"])))
    return Case(args, {"codes": (0, ksub)}, {"k": (1, 2**20)})


def _pq4_pack(draw):
    g = _gen(draw)
    return Case(dict(codes=_codes(g, _size(draw, 129), draw(st.integers(1, 7)), 16)), {"codes": (0, 16)})


def _check_pq4_pack(a, packed):
    n, M = a["codes"].shape
    assert packed.shape == ((n + 31) // 32, (M + 1) // 2, 32), f"pq4_pack shape {tuple(packed.shape)} for {(n, M)}"


def _pq4_search(draw):
    g = _gen(draw)
    cb = _codebooks(draw, g, ksub=16)
    M, _, dsub = cb.shape
    n, k = _size(draw, 129), _size(draw, 33, 1)
    k_factor = draw(st.sampled_from([1, 2, 3]))
    rerank = _randn(g, n, M * dsub) if k_factor > 1 and draw(st.booleans()) else None
    args = dict(queries=_randn(g, _size(draw, 9), M * dsub), packed=ref_pq.pq4_pack(_codes(g, n, M, 16)), n=n)
    args.update(codebooks=cb, k=k, metric=draw(st.sampled_from(["l2", "ip"])), k_factor=k_factor, rerank_vectors=rerank)
    return Case(args, ints={"n": (0, 2**31), "k": (1, 2**20), "k_factor": (1, 64)})


def _lists(g, n, nlist):
    list_no = _randint(g, 0, nlist, n)
    order = torch.argsort(list_no, stable=True)
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(list_no, minlength=nlist), 0)
    return list_no, order, offsets


def _probes(draw, g, nq, nlist):
    nprobe = draw(st.integers(1, nlist + 1))
    return _randint(g, -1, nlist, nq, nprobe)


def _ivfpq_search(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    cb = _codebooks(draw, g, dtype)
    M, ksub, dsub = cb.shape
    n, nlist, nq = _size(draw, 65), _size(draw, 9, 1), _size(draw, 9)
    _, order, offsets = _lists(g, n, nlist)
    coarse = _randn(g, nlist, M * dsub, dtype=dtype)
    metric, by_residual = draw(st.sampled_from(["l2", "ip"])), draw(st.booleans())
    terms = None
    if metric == "l2" and by_residual and draw(st.booleans()):
        terms = ops.ivfpq_list_terms(coarse.float(), cb.float())
    args = dict(
        queries=_randn(g, nq, M * dsub, dtype=dtype), coarse_centroids=coarse, probes=_probes(draw, g, nq, nlist)
    )
    args.update(
        codes=_codes(g, n, M, ksub)[order].contiguous(), list_offsets=offsets, ids=_randint(g, 0, 1000, n)[order]
    )
    args.update(codebooks=cb, k=_size(draw, 33, 1), metric=metric, by_residual=by_residual, list_terms=terms)
    indices = {"probes": (-1, nlist), "codes": (0, ksub), "list_offsets": (0, n + 1)}
    return Case(args, indices, {"k": (1, 2**20)})


def _ivfpq4_search(draw):
    g = _gen(draw)
    cb = _codebooks(draw, g, ksub=16)
    M, _, dsub = cb.shape
    n, nlist, nq = _size(draw, 65), _size(draw, 9, 1), _size(draw, 9)
    packed, list_blocks, sizes, row_ids = ops.pq4_pack_lists(
        _codes(g, n, M, 16), _randint(g, 0, nlist, n), _randint(g, 0, 1000, n), nlist
    )
    args = dict(queries=_randn(g, nq, M * dsub), probes=_probes(draw, g, nq, nlist), packed=packed)
    args.update(list_blocks=list_blocks, list_sizes=sizes, row_ids=row_ids, codebooks=cb, k=_size(draw, 33, 1))
    args["metric"] = draw(st.sampled_from(["l2", "ip"]))
    blocks = packed.shape[0]
    indices = {"probes": (-1, nlist), "list_blocks": (0, blocks + 1), "list_sizes": (0, 32 * blocks + 1)}
    return Case(args, indices, {"k": (1, 2**20)})


def _pq4_pack_lists(draw):
    g = _gen(draw)
    n, M, nlist = _size(draw, 65), draw(st.integers(1, 5)), _size(draw, 9, 1)
    args = dict(codes=_codes(g, n, M, 16), list_no=_randint(g, 0, nlist, n), ids=_randint(g, 0, 1000, n), nlist=nlist)
    return Case(args, {"codes": (0, 16), "list_no": (0, nlist)}, {"nlist": (1, 2**31)})


def _check_pq4_pack_lists(a, out):
    packed, list_blocks, sizes, row_ids = out
    n, M = a["codes"].shape
    assert int(sizes.sum()) == n and (row_ids >= 0).sum() == n, "pq4_pack_lists lost or invented rows"
    assert packed.shape == (int(list_blocks[-1]), (M + 1) // 2, 32) and row_ids.shape == (32 * packed.shape[0],)


def _list_terms(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    cb = _codebooks(draw, g, dtype)
    return Case(dict(coarse_centroids=_randn(g, _size(draw, 9), cb.shape[0] * cb.shape[2], dtype=dtype), codebooks=cb))


def _oracle_list_terms(a):
    coarse, cb = a["coarse_centroids"].double(), a["codebooks"].double()
    M, ksub, dsub = cb.shape
    parts = coarse.reshape(-1, M, dsub)
    return (cb * cb).sum(-1)[None] + 2 * torch.einsum("lmd,mjd->lmj", parts, cb)


def _attention(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from(FLOATS))
    B, Hkv, Lq, Lk, D = _size(draw, 3), draw(st.integers(1, 2)), _size(draw, 17), _size(draw, 33), _size(draw, 65, 1)
    H = Hkv * draw(st.integers(1, 2))
    q, k, v = (_randn(g, B, h, L, D, dtype=dtype) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    mask = draw(st.sampled_from([None, "bool", "float", "float-broadcast"]))
    if mask == "bool":
        mask = _rand(g, Lq, Lk) > 0.3
    elif mask == "float":
        mask = _randn(g, B, H, Lq, Lk, dtype=dtype)
    elif mask == "float-broadcast":
        mask = _randn(g, 1, H, 1, Lk, dtype=dtype)
    padding = _rand(g, B, Lk) > 0.7 if draw(st.booleans()) else None
    args = dict(q=q, k=k, v=v, attn_mask=mask, key_padding_mask=padding, causal=draw(st.booleans()))
    args["scale"] = draw(st.sampled_from([None, 0.3, 2.0]))
    return Case(args, scalars=("scale",))


def _mux(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from(FLOATS))
    B, N, L, d = _size(draw, 5), _size(draw, 5, 1), _size(draw, 17), _size(draw, 33, 1)
    mode = draw(st.sampled_from(["hadamard", "ortho"]))
    keys = _randn(g, N, d, dtype=dtype) if mode == "hadamard" else torch.linalg.qr(_randn(g, N, d, d))[0].to(dtype)
    flat = draw(st.booleans())
    x = _randn(g, B * N, L, d, dtype=dtype) if flat else _randn(g, B, N, L, d, dtype=dtype)
    return Case(dict(x=x, keys=keys, mode=mode, num_instances=N if flat else None), ints={"num_instances": (1, 2**20)})


def _demux(draw):
    g = _gen(draw)
    dtype = draw(st.sampled_from(FLOATS))
    B, N, L, d, e = _size(draw, 5), _size(draw, 5, 1), _size(draw, 17), _size(draw, 33, 1), _size(draw, 17, 1)
    keys = _randn(g, N, d, dtype=dtype) if draw(st.booleans()) else _randn(g, B, N, d, dtype=dtype)
    args = dict(h=_randn(g, B, L, d, dtype=dtype), index_keys=keys, weight=_randn(g, e, 2 * d, dtype=dtype) / d**0.5)
    args.update(
        bias=_randn(g, e, dtype=dtype), norm_weight=_randn(g, e, dtype=dtype), norm_bias=_randn(g, e, dtype=dtype)
    )
    args["eps"] = draw(st.sampled_from([1e-5, 1e-3]))
    return Case(args, scalars=("eps",))


def _load_balancing(draw):
    g = _gen(draw)
    E = _size(draw, 65, 1)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return Case(dict(tokens_per_expert=_randint(g, 0, 50, E), mean_prob=torch.softmax(_randn(g, E, dtype=dtype), 0)))


def _oracle_load_balancing(a):
    counts, prob = a["tokens_per_expert"].double(), a["mean_prob"].double()
    return prob.shape[0] * (counts / counts.sum().clamp_min(1) * prob).sum()


def _pq4_kernel(draw):
    return Case(dict(force=draw(st.sampled_from([None, "auto", "portable", "avx2", "avx512", "avx512bw", "sse", 3]))))


def _call_pq4_kernel(a, backend):
    try:
        return ops.pq4_kernel(**a)
    finally:  # the cap is process-wide: lift it again so nothing after this example runs capped
        ops.pq4_kernel("auto")


# ---- the table -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """What the fuzzer knows about one public op."""

    build: Callable[[Callable], Case]
    registered: Optional[str]  # the op in REGISTRY whose impls say which backends run; None: no backend argument
    call: Optional[Callable[[Dict[str, Any], Optional[str]], Any]] = None  # default: ops.<name>(**args, backend=)
    bound: float = 1e-4  # relative Frobenius error of float32 results (16-bit: bound·200, at least 2e-2)
    bound64: float = 1e-10  # relative Frobenius error of float64 results
    oracle: Optional[Callable[[Dict[str, Any]], Any]] = None  # for ops without backends: the expected result
    invariant: Optional[Callable[[Dict[str, Any], Any], None]] = None  # for ops without backends: a result check
    search: bool = False  # (distances, ids) results: ids may differ only between near-tied distances
    reference_dtype_may_differ: bool = False  # the reference returns float64 results for float64 input (documented)
    error_name: Optional[str] = None  # the op name its messages use, where that is not the public name
    argument_names: Tuple[str, ...] = ()  # names its messages may use besides the drawn arguments' own


MODELS: Dict[str, Model] = {
    "moe_topk_route": Model(_route, "moe_topk_route"),
    "moe_dispatch": Model(_dispatch, "moe_dispatch"),
    "moe_combine": Model(_combine, "moe_combine", _call_combine, argument_names=("plan",)),
    "moe_grouped_mlp": Model(_grouped_mlp, "moe_grouped_mlp"),
    "moe_experts": Model(_experts, "moe_experts"),
    "switch_load_balancing_loss": Model(_load_balancing, None, oracle=_oracle_load_balancing),
    "cauchy": Model(_cauchy, "s4_cauchy", bound=1e-3, bound64=1e-9),
    "vandermonde": Model(_vandermonde, "s4_vandermonde", bound=1e-3, bound64=1e-9),
    "fft_conv": Model(_fft_conv, "s4_fft_conv", bound=1e-4),
    "fft_conv_size": Model(_fft_conv_size, None, invariant=_check_fft_conv_size),
    "ssm_step": Model(_ssm_step, "s4_ssm_step", _call_ssm_step),
    "ray_aabb_intersect": Model(_aabb, "nerf_ray_aabb_intersect"),
    "occupancy_grid_update": Model(_grid_update, "nerf_occupancy_grid_update"),
    "ray_march": Model(_ray_march, "nerf_ray_march", _call_ray_march),
    "volume_render": Model(_volume_render, "nerf_volume_render"),
    "composite_blocks": Model(_composite, "nerf_composite_blocks"),
    "kmeans": Model(_kmeans, "pq_kmeans", bound=1e-3, bound64=1e-6),
    "pq_train": Model(_pq_train, "pq_kmeans", bound=1e-3, bound64=1e-6),
    "pq_encode": Model(_pq_encode, "pq_encode"),
    "pq_decode": Model(_pq_decode, "pq_decode"),
    "pq_lut": Model(_pq_lut, "pq_lut"),
    "pq_search": Model(_pq_search, "pq_search", search=True, reference_dtype_may_differ=True),
    "pq4_pack": Model(_pq4_pack, None, invariant=_check_pq4_pack),
    "pq4_search": Model(_pq4_search, "pq4_search", search=True),
    "ivfpq_search": Model(_ivfpq_search, "ivfpq_search", search=True, reference_dtype_may_differ=True),
    "ivfpq4_search": Model(_ivfpq4_search, "ivfpq4_search", search=True),
    "pq4_pack_lists": Model(_pq4_pack_lists, None, invariant=_check_pq4_pack_lists),
    "ivfpq_list_terms": Model(_list_terms, None, oracle=_oracle_list_terms),
    "pq4_kernel": Model(_pq4_kernel, None, _call_pq4_kernel),
    "attention": Model(_attention, "mux_attention"),
    # its messages say "fastcore_ai.ops.attention" (mux.py validates both through one function)
    "attention_with_lse": Model(_attention, "mux_attention", error_name="attention"),
    "mux": Model(_mux, "mux_mux"),
    "demux": Model(_demux, "mux_demux"),
}


@dataclass(frozen=True)
class KnownDefect:
    """A disagreement with the reference the fuzzer has found and that is not fixed yet: on inputs where
    `applies(args)` holds, a mismatch on `backend` is tolerated (and only a mismatch: errors still count)."""

    op: str
    backend: str
    applies: Callable[[Dict[str, Any]], bool]
    reason: str
    example: Callable[[], Dict[str, Any]]  # a fixed input showing it (test_known_defects_still_hold)


def _has_nan(*names):
    def applies(a):
        return any(
            isinstance(a.get(n), torch.Tensor) and a[n].is_floating_point() and a[n].isnan().any() for n in names
        )

    return applies


def _has_inf(*names):
    def applies(a):
        return any(
            isinstance(a.get(n), torch.Tensor) and a[n].is_floating_point() and a[n].isinf().any() for n in names
        )

    return applies


def _ssm_step_inf_u():
    g = torch.Generator().manual_seed(0)
    u = _randn(g, 1, 2, dtype=torch.float64)
    u[0, 1] = -math.inf
    state, dB, C = (_randn(g, *shape, dtype=torch.complex128) for shape in ((1, 2, 3), (2, 3), (2, 3)))
    return dict(state=state, u=u, dA=0.5 * _randn(g, 2, 3, dtype=torch.complex128), dB=dB, C=C, D=None, inplace=False)


def _huge_float64(name):
    def applies(a):
        t = a.get(name)
        return isinstance(t, torch.Tensor) and t.dtype == torch.float64 and bool((t.abs() > 1e18).any())

    return applies


def _magnitude_past_float32(*names):
    def applies(a):
        for n in names:
            t = a.get(n)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                finite = t[t.isfinite()].abs()
                if finite.numel() and (bool((finite > 1e18).any()) or bool(((finite > 0) & (finite < 1e-18)).any())):
                    return True
        return False

    return applies


def _kmeans_huge_float64():
    return dict(x=torch.full((1, 1), 1e100, dtype=torch.float64), k=1, niter=3)


def _attention_nan_q():
    q = torch.randn(1, 1, 3, 4)
    q[0, 0, 1, 2] = math.nan
    k = torch.randn(1, 1, 5, 4)
    return dict(q=q, k=k, v=k.clone())


KNOWN_DEFECTS: List[KnownDefect] = (
    [
        KnownDefect(
            op,
            "cpu",
            _has_nan("q", "k", "v", "attn_mask"),
            "ops/mux.py cpu attention: a NaN in a query row's inputs gives 0 in that row's output (the reference and "
            "triton give NaN; DESIGN rule 10: NaN in a row -> NaN in that row's outputs only)",
            _attention_nan_q,
        )
        for op in ("attention", "attention_with_lse")
    ]
    + [
        KnownDefect(
            "ssm_step",
            backend,
            _has_inf("u"),
            "reference/s4.py ssm_step: an infinite u gives a NaN new state (torch's complex product dB · u with u "
            "promoted to complex computes inf · 0), while cpu and triton give the infinite state dB · u; y is NaN on "
            "all three. One rule is needed (DESIGN rule 10); the reference is the one to change",
            _ssm_step_inf_u,
        )
        for backend in ("cpu", "triton")
    ]
    + [
        KnownDefect(
            op,
            "cpu",
            _huge_float64("x"),
            "ops/pq.py cpu k-means trains float64 input in float32 (x.float()): values past float32's range give "
            "inf centroids where the reference's are finite, and float64 results carry float32 rounding (hence "
            "bound64=1e-6 for kmeans and pq_train). Docs promise centroids in x's dtype",
            _kmeans_huge_float64,
        )
        for op in ("kmeans",)
    ]
    + [
        KnownDefect(
            "pq_train",
            "cpu",
            _magnitude_past_float32("x"),
            "ops/pq.py cpu pq_train (batched k-means) trains in float32: squared distances of magnitudes past "
            "~1e18 overflow and below ~1e-19 underflow to ties, so the codebooks differ from the reference's",
            lambda: dict(x=torch.linspace(1, 2, 16).reshape(16, 1) * 1e-30, M=1, nbits=4, niter=2),
        ),
        KnownDefect(
            "pq_search",
            "cpu",
            _magnitude_past_float32("queries", "codebooks"),
            "ops/pq.py cpu pq_search builds float32 tables (documented) also for float64 input: magnitudes past "
            "float32's range give inf distances and other ids than the reference's float64 search",
            lambda: dict(
                queries=torch.tensor([[0.0, 0.0]], dtype=torch.float64),
                codes=torch.tensor([[0], [1]], dtype=torch.uint8),
                codebooks=torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                * 1e100,
                k=1,
            ),
        ),
    ]
    + [
        # ±inf inputs: the backends agree on NaN inputs but not on infinite ones (inf − inf, inf · 0 taken on
        # one path and not the other). DESIGN rule 10 wants one rule per op; until the docs state it, these
        # are tolerated on inputs with an inf in the named arguments, and pinned by the examples.
        KnownDefect(op, backend, _has_inf(*names), f"{op} on {backend}: {why}", example)
        for op, backends_, names, why, example in (
            (
                "cauchy",
                ("cpu", "triton"),
                ("v", "z", "w"),
                "an infinite residue gives NaN where the reference gives ±inf (or the other way round)",
                lambda: dict(
                    v=torch.tensor([[complex(math.inf, 0.3)]]),
                    z=torch.tensor([0.2 + 0.5j]),
                    w=torch.tensor([[-0.5 + 1.0j]]),
                ),
            ),
            (
                "vandermonde",
                ("cpu", "triton"),
                ("v", "x"),
                "an infinite v gives NaN where the reference gives ±inf",
                lambda: dict(v=torch.tensor([[complex(math.inf, 0.3)]]), x=torch.tensor([[-0.05 + 0.1j]]), L=1),
            ),
            (
                "ssm_step",
                ("cpu", "triton"),
                ("state", "dA", "dB", "C"),
                "an infinite dB (or state) gives NaN in y where the reference gives ±inf (or the other way round)",
                lambda: dict(
                    state=torch.tensor([[[0.5 + 0.5j]]]),
                    u=torch.tensor([[1.0]]),
                    dA=torch.tensor([[0.9 + 0.0j]]),
                    dB=torch.tensor([[complex(math.inf, 0.3)]]),
                    C=torch.tensor([[1.0 + 0.0j]]),
                ),
            ),
            (
                "volume_render",
                ("cpu", "triton"),
                ("sigmas", "t_starts", "t_ends"),
                "an infinite density (docs: opaque) gives NaN colours where the reference gives the opaque sample's",
                lambda: dict(
                    sigmas=torch.tensor([math.inf, 1.0]),
                    rgbs=torch.full((2, 3), 0.5),
                    t_starts=torch.tensor([0.5, 0.6]),
                    t_ends=torch.tensor([0.6, 0.7]),
                    packed_info=torch.tensor([[0, 2]]),
                ),
            ),
            (
                "pq4_search",
                ("cpu",),
                ("queries", "codebooks"),
                "an infinite query gives NaN distances where the reference gives ±inf (or the other way round)",
                lambda: dict(
                    queries=torch.tensor([[math.inf]]),
                    packed=ref_pq.pq4_pack(torch.zeros(1, 1, dtype=torch.uint8)),
                    n=1,
                    codebooks=torch.linspace(0, 1, 16).reshape(1, 16, 1),
                    k=1,
                ),
            ),
            (
                "ivfpq_search",
                ("cpu",),
                ("queries", "coarse_centroids", "codebooks"),
                "an infinite query gives NaN distances where the reference gives ±inf (or the other way round)",
                lambda: dict(
                    queries=torch.tensor([[math.inf]]),
                    coarse_centroids=torch.zeros(1, 1),
                    probes=torch.zeros(1, 1, dtype=torch.int64),
                    codes=torch.zeros(1, 1, dtype=torch.uint8),
                    list_offsets=torch.tensor([0, 1]),
                    ids=torch.tensor([7]),
                    codebooks=torch.linspace(0, 1, 16).reshape(1, 16, 1),
                    k=1,
                ),
            ),
        )
        for backend in backends_
    ]
)


def _registered_backends(model: Model) -> List[str]:
    """cpu and triton (under the interpreter) where the op has them: the backends that run here."""
    impls = REGISTRY[model.registered].impls
    return [b for b in ("cpu", "triton") if b in impls]


# ---- the generic perturbations ---------------------------------------------------------------------------


def _tensor_names(case, predicate=lambda t: True):
    return [n for n, v in case.args.items() if isinstance(v, torch.Tensor) and predicate(v)]


def _relayout(draw, t: torch.Tensor) -> Tuple[torch.Tensor, str]:
    """The same tensor (values kept, except `expand`) in another memory layout."""
    kind = draw(
        st.sampled_from(
            ["transpose", "step", "offset", "expand", "conj"]
            if t.is_complex()
            else ["transpose", "step", "offset", "expand"]
        )
    )
    if kind == "transpose" and t.dim() >= 2:
        a, b = draw(st.sampled_from([(i, j) for i in range(t.dim()) for j in range(i + 1, t.dim())]))
        return t.transpose(a, b).contiguous().transpose(a, b), f"transposed dims {a},{b}"
    if kind == "offset" or (kind == "transpose" and t.dim() < 2):
        storage = torch.empty(t.numel() + 5, dtype=t.dtype)
        out = storage[5:].view(t.shape)
        out.copy_(t)
        return out, "offset storage"
    if kind == "expand" and t.dim() >= 1:
        dim = draw(st.integers(0, t.dim() - 1))
        if t.shape[dim] > 0:
            return t.narrow(dim, 0, 1).expand(t.shape), f"expanded along dim {dim} (stride 0)"
    if kind == "conj":
        return t.conj().resolve_conj().conj(), "conjugate view"  # same values, conj bit set
    if t.dim() == 0:
        return t, "0-d (unchanged)"
    dim = draw(st.integers(0, t.dim() - 1))
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.full(shape, 7, dtype=t.dtype)
    out = big[(slice(None),) * dim + (slice(None, None, 2),)]
    out.copy_(t)
    return out, f"sliced with step 2 along dim {dim}"


def _special_values(draw, t: torch.Tensor) -> Tuple[torch.Tensor, str]:
    dense = t.resolve_conj().contiguous()
    real = torch.view_as_real(dense).clone() if t.is_complex() else dense.clone()
    kind = draw(st.sampled_from(["nan", "+inf", "-inf", "denormal", "huge", "tiny", "ties", "zeros", "negative"]))
    flat = real.view(-1)
    if kind in ("nan", "+inf", "-inf", "denormal"):
        info = torch.finfo(real.dtype)
        value = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "denormal": info.tiny / 4}[kind]
        positions = draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=3))
        flat[positions] = value
        note = f"{kind} at flat positions {positions}"
    elif kind == "huge":
        # large, not at the edge of the dtype's range: where float32 math overflows is the algorithm's
        scale = {torch.float16: 3e2, torch.float64: 1e100}.get(real.dtype, draw(st.sampled_from([1e4, 1e12])))
        flat.mul_(scale)
        note = f"scaled by {scale:g}"
    elif kind == "tiny":
        flat.mul_(1e-30 if real.dtype in (torch.float32, torch.float64, torch.bfloat16) else 1e-5)
        note = "scaled to tiny magnitudes"
    elif kind == "ties":
        flat.copy_((flat * 2).round() / 2)  # few distinct values: duplicates and exact ties
        note = "rounded to multiples of 0.5 (ties)"
    elif kind == "zeros":
        flat.zero_()
        note = "all zeros"
    else:
        flat.neg_()
        note = "negated"
    return (torch.view_as_complex(real) if t.is_complex() else real), note


def _bad_int(draw, low, high):
    return draw(st.sampled_from([low - 1, high + 1, -1, 0, 2**31, 2**31 - 1, 2**62, -(2**31) - 1]))


def perturb(draw, case: Case) -> Case:
    """Apply 0 to 2 generic perturbations to a valid call."""
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["layout", "layout", "values", "values", "index", "dtype", "shape", "type"]))
        args = case.args
        if kind == "layout" and _tensor_names(case):
            name = draw(st.sampled_from(_tensor_names(case)))
            args[name], note = _relayout(draw, args[name])
        elif kind == "values" and (
            _tensor_names(case, lambda t: (t.is_floating_point() or t.is_complex()) and t.numel()) or case.scalars
        ):
            names = _tensor_names(case, lambda t: (t.is_floating_point() or t.is_complex()) and t.numel() > 0)
            name = draw(st.sampled_from(names + [f"scalar:{s}" for s in case.scalars]))
            if name.startswith("scalar:"):
                name = name[len("scalar:") :]
                args[name] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0]))
                note = f"= {args[name]}"
            else:
                args[name], note = _special_values(draw, args[name])
        elif kind == "index" and ([n for n in case.indices if args[n] is not None and args[n].numel()] or case.ints):
            names = [n for n in case.indices if args[n] is not None and args[n].numel()] + list(case.ints)
            name = draw(st.sampled_from(names))
            if name in case.ints:
                args[name] = _bad_int(draw, *case.ints[name])
                note = f"= {args[name]}"
            else:
                low, high = case.indices[name]
                t = args[name].clone()
                info = torch.iinfo(t.dtype)
                value = max(info.min, min(info.max, _bad_int(draw, low, high - 1)))
                position = draw(st.integers(0, t.numel() - 1))
                t[torch.unravel_index(torch.tensor(position), t.shape)] = value  # keeps t's layout
                args[name], note = t, f"flat position {position} = {value}"
        elif kind == "dtype" and _tensor_names(case):
            name = draw(st.sampled_from(_tensor_names(case)))
            dtype = draw(st.sampled_from(ALL_DTYPES))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # complex -> real drops the imaginary part, as intended here
                args[name] = args[name].to(dtype)
            note = f"as {dtype}"
        elif kind == "shape" and _tensor_names(case):
            name = draw(st.sampled_from(_tensor_names(case)))
            t = args[name]
            how = draw(st.sampled_from(["unsqueeze", "flatten", "grow", "shrink"]))
            if how == "unsqueeze" or t.dim() == 0:
                args[name] = t.unsqueeze(0)
            elif how == "flatten":
                args[name] = t.reshape(-1) if t.dim() > 1 else t.sum()
            else:
                dim = draw(st.integers(0, t.dim() - 1))
                if how == "grow" or t.shape[dim] == 0:
                    pad = list(t.shape)
                    pad[dim] = 1
                    args[name] = torch.cat([t, torch.zeros(pad, dtype=t.dtype)], dim)
                else:
                    args[name] = t.narrow(dim, 0, t.shape[dim] - 1)
            note = f"{how}: shape {tuple(t.shape)} -> {tuple(args[name].shape)}"
        elif kind == "type" and _tensor_names(case):
            name = draw(st.sampled_from(_tensor_names(case)))
            args[name] = draw(st.sampled_from([None, [[1.0, 2.0]], 1.5]))
            note = f"replaced by {args[name]!r}"
        else:
            continue
        case.notes.append(f"{kind} {name}: {note}")
    return case


# ---- the property ----------------------------------------------------------------------------------------


def _public_name_in(message: str, op: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(op)}(?![\w])", message) is not None


def _names_an_argument(message: str, case: Case, model: "Model") -> bool:
    names = [n for n in case.args] + [n.split(".")[-1] for n in case.args if "." in n] + list(model.argument_names)
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names)


def _is_selection_error(error: BaseException) -> bool:
    message = str(error)
    return isinstance(error, RuntimeError) and ("cannot run this call" in message or "no backend can run" in message)


def _run(op: str, model: Model, case: Case, backend: Optional[str]):
    """(result, None) or (None, error); an error of another kind, or one that names neither the op nor an
    argument, fails here."""
    call = model.call or (lambda a, b: getattr(ops, op)(**a, backend=b) if b else getattr(ops, op)(**a))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call(dict(case.args), backend), None
    except ALLOWED_ERRORS as error:
        message = str(error)
        if not (_public_name_in(message, model.error_name or op) and _names_an_argument(message, case, model)):
            pytest.fail(
                f"{op} on {backend}: {type(error).__name__} that does not name the op and an argument:\n"
                f"  {message[:600]}\n{case.describe()}"
            )
        return None, error
    except Exception as error:  # noqa: BLE001 (any other exception type is the failure being looked for)
        pytest.fail(f"{op} on {backend}: raised {type(error).__name__}: {str(error)[:600]}\n{case.describe()}")


def _flatten(value) -> List[Any]:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _bound(model: Model, dtype: torch.dtype) -> float:
    if dtype in (torch.float64, torch.complex128):
        return model.bound64
    if dtype in (torch.float16, torch.bfloat16):
        return max(model.bound * 200, 2e-2)
    return model.bound


def _mismatch(got, want, model: Model) -> Optional[str]:
    """Why `got` differs from the reference's `want` (None when it does not)."""
    got, want = _flatten(got), _flatten(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, the reference returns {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(w, torch.Tensor):
            if g != w and not (isinstance(w, float) and math.isnan(w) and math.isnan(g)):
                return f"output {i}: {g!r}, the reference returns {w!r}"
            continue
        if not isinstance(g, torch.Tensor):
            return f"output {i} is {type(g).__name__}, the reference returns a tensor"
        if g.shape != w.shape:
            return f"output {i}: shape {tuple(g.shape)}, the reference returns {tuple(w.shape)}"
        if g.dtype != w.dtype and not model.reference_dtype_may_differ:
            return f"output {i}: dtype {g.dtype}, the reference returns {w.dtype}"
        if not (w.is_floating_point() or w.is_complex()):
            if not torch.equal(g.to(w.dtype), w):
                bad = (g.to(w.dtype) != w).nonzero()[:4].tolist()
                return f"output {i}: {int((g.to(w.dtype) != w).sum())} elements differ, e.g. at {bad}"
            continue
        gd, wd = g.detach().resolve_conj(), w.detach().resolve_conj()
        if wd.is_complex():
            # a complex number with a NaN part is NaN (complex products spread a NaN to both parts on
            # some paths and not others); ±inf compares by position only
            gd, wd = gd.to(torch.complex128), wd.to(torch.complex128)
            if not torch.equal(gd.isnan(), wd.isnan()):
                bad = (gd.isnan() != wd.isnan()).nonzero()[:4].tolist()
                return f"output {i}: NaN in other places than the reference's, e.g. at {bad}"
            if not torch.equal(gd.isinf(), wd.isinf()):
                bad = (gd.isinf() != wd.isinf()).nonzero()[:4].tolist()
                return f"output {i}: inf in other places than the reference's, e.g. at {bad}"
        else:
            gd, wd = gd.double(), wd.double()
            if not torch.equal(gd.isnan(), wd.isnan()):
                bad = (gd.isnan() != wd.isnan()).nonzero()[:4].tolist()
                return f"output {i}: NaN in other places than the reference's, e.g. at {bad}"
            inf = gd.isinf() | wd.isinf()
            if not torch.equal(gd[inf], wd[inf]):
                bad = (inf & (gd != wd)).nonzero()[:4].tolist()
                return f"output {i}: ±inf in other places than the reference's, e.g. at {bad}"
        finite = gd.isfinite() & wd.isfinite()
        error, scale = (gd[finite] - wd[finite]).norm().item(), wd[finite].norm().item()
        bound = _bound(model, max(g.dtype, w.dtype, key=lambda d: torch.finfo(d).eps))  # the less precise one
        if not error <= bound * scale + 1e-30:
            return f"output {i}: relative error {error / max(scale, 1e-300):.3g} > {bound:g} (|ref| = {scale:.3g})"
    return None


def _search_mismatch(got, want, model: Model) -> Optional[str]:
    """(distances, ids): distances as any result; ids equal except where the reference has a near tie."""
    (gd, gi), (wd, wi) = got, want
    why = _mismatch(gd, wd.to(gd.dtype) if model.reference_dtype_may_differ else wd, model)
    if why or gi.shape != wi.shape:
        return why or f"ids shape {tuple(gi.shape)}, the reference returns {tuple(wi.shape)}"
    w = wd.double()
    tolerance = 1e-3 * (w[w.isfinite()].abs().max().item() if w.isfinite().any() else 0.0) + 1e-6
    for row, col in (gi != wi).nonzero().tolist():
        gap = (w[row] - w[row, col]).abs()
        gap[col] = math.inf
        tied = bool((gap <= tolerance).any()) or not math.isfinite(w[row, col].item())
        if not tied:
            return f"ids[{row}, {col}] = {int(gi[row, col])}, the reference returns {int(wi[row, col])} (no tie)"
    return None


def check_property(op: str, case: Case) -> None:
    model = MODELS[op]
    if model.registered is None:
        result, error = _run(op, model, case, None)
        if error is None and model.oracle is not None:
            why = _mismatch(result, model.oracle(case.args).to(result.dtype), model)
            assert why is None, f"{op}: {why}\n{case.describe()}"
        if error is None and model.invariant is not None:
            model.invariant(case.args, result)
        return
    want, want_error = _run(op, model, case, "reference")
    for backend in _registered_backends(model):
        got, error = _run(op, model, case, backend)
        if error is not None:
            if _is_selection_error(error) or want_error is not None:
                continue
            pytest.fail(f"{op}: {backend} raises where the reference returns: {error}\n{case.describe()}")
        if want_error is not None:
            pytest.fail(f"{op}: {backend} returns where the reference raises: {want_error}\n{case.describe()}")
        why = (_search_mismatch if model.search else _mismatch)(got, want, model)
        if why is None:
            continue
        known = [d for d in KNOWN_DEFECTS if d.op == op and d.backend == backend and d.applies(case.args)]
        if not known:
            pytest.fail(f"{op} on {backend} differs from the reference: {why}\n{case.describe()}")


# ---- the tests -------------------------------------------------------------------------------------------


def _public_ops() -> List[str]:
    return sorted(
        name
        for name in ops.__all__
        if callable(getattr(ops, name)) and not isinstance(getattr(ops, name), type) and not name.isupper()
    )


def test_every_public_op_has_an_input_model():
    missing = sorted(set(_public_ops()) - set(MODELS))
    assert not missing, f"public ops without an input model in tests/test_fuzz_ops.py MODELS: {missing}"
    unknown = sorted(set(MODELS) - set(_public_ops()))
    assert not unknown, f"input models for names that are not public ops: {unknown}"


_COMPANIONS = ("_backward", "_train", "_")
_FAMILY_PREFIXES = ("s4_", "nerf_", "mux_")


def test_every_registered_op_is_reached_by_a_model():
    """Every op in REGISTRY is run by the public op a model fuzzes (a companion — backward, in-place,
    training form — through its base op), so a new registered op without a model fails here."""
    reached = {m.registered for m in MODELS.values() if m.registered}
    for name in sorted(REGISTRY):
        base = name
        for suffix in _COMPANIONS:
            if base.endswith(suffix) and base[: -len(suffix)] in REGISTRY:
                base = base[: -len(suffix)]
        public = base[len(base.split("_")[0]) + 1 :] if base.startswith(_FAMILY_PREFIXES) else base
        assert base in reached or public in MODELS, f"registered op {name} is reached by no model in MODELS"


@pytest.fixture
def address_space_limit():
    """A few GiB above what the process maps now: a drawn int that asks for a huge output (a valid k, nlist,
    L past 2^31) must fail to allocate, not take the shared machine's memory (overcommit would let the
    allocation succeed and the OOM killer end the run)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + (6 << 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.usefixtures("address_space_limit")
@pytest.mark.parametrize("op", sorted(MODELS))
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz(op, data):
    case = MODELS[op].build(data.draw)
    check_property(op, perturb(data.draw, case))


@pytest.mark.parametrize("regression", fuzz_regressions.REGRESSIONS, ids=lambda r: r.name)
def test_fuzz_regression(regression):
    """Every failure the fuzzer found, as a fixed input through the same property."""
    case = Case(regression.build(), notes=[regression.name])
    check_property(regression.op, case)
    if regression.expect is not None:
        regression.expect(case.args)


@pytest.mark.parametrize("defect", KNOWN_DEFECTS, ids=lambda d: f"{d.op}-{d.backend}")
def test_known_defects_still_hold(defect):
    """Strict: once a known defect is fixed this fails, and its entry in KNOWN_DEFECTS must go."""
    case = Case(defect.example())
    model = MODELS[defect.op]
    want, _ = _run(defect.op, model, case, "reference")
    got, _ = _run(defect.op, model, case, defect.backend)
    why = (_search_mismatch if model.search else _mismatch)(got, want, model)
    assert why is not None, f"fixed, remove it from KNOWN_DEFECTS: {defect.reason}"


# Huge inputs: index products past 2^31 from expanded (stride-0) tensors. Each runs in one subprocess under
# a 6 GiB address-space limit, so an op that tries to materialise one fails (and is reported) instead of
# taking the machine's memory; the property is the same: a named error, or a result (none here can fit).
_HUGE_CASES = {
    "moe_topk_route": "ops.moe_topk_route(torch.zeros(1, 8).expand(2**31 // 4, 8), 2, backend=B)",
    "moe_dispatch": "ops.moe_dispatch(torch.zeros(1, 4).expand(2**29, 4), torch.zeros(1, 4, dtype=torch.int64)"
    ".expand(2**29, 4), None, 4, backend=B)",
    "fft_conv": "ops.fft_conv(torch.zeros(1, 1, 1).expand(2**16, 2**8, 2**8), torch.zeros(1, 4).expand(2**8, 4), "
    "backend=B)",
    "pq_encode": "ops.pq_encode(torch.zeros(1, 8).expand(2**29, 8), torch.zeros(2, 16, 4), backend=B)",
    "pq_lut": "ops.pq_lut(torch.zeros(1, 8).expand(2**26, 8), torch.zeros(2, 256, 4), backend=B)",
    "attention": "ops.attention(*(torch.zeros(1, 1, 1, 8).expand(2**10, 2**5, 2**10, 8),) * 3, backend=B)",
    "volume_render": "ops.volume_render(*(torch.zeros(1).expand(2**31 + 8),), torch.zeros(1, 3).expand(2**31 + 8, 3),"
    " torch.zeros(1).expand(2**31 + 8), torch.ones(1).expand(2**31 + 8), torch.tensor([[0, 2**31 + 8]]), backend=B)",
}

_HUGE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from fastcore_ai import ops
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    results = {}
    for op, backend, code in json.loads(sys.argv[1]):
        B = backend
        try:
            eval(code)
            results[f"{op}-{backend}"] = "returned"
        except (ValueError, TypeError, RuntimeError) as error:
            results[f"{op}-{backend}"] = "error: " + str(error)[:300]
        except BaseException as error:
            results[f"{op}-{backend}"] = f"raised {type(error).__name__}: {str(error)[:300]}"
    print(json.dumps(results))
    """
)


def test_huge_expanded_inputs():
    import json

    calls = [(op, backend, code) for op, code in _HUGE_CASES.items() for backend in ("cpu", "reference")]
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", _HUGE_SCRIPT, json.dumps(calls)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, f"the huge-input subprocess died ({done.returncode}): {done.stderr[-2000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    bad = {}
    for key, outcome in results.items():
        op = key.rsplit("-", 1)[0]
        named = outcome.startswith("error: ") and _public_name_in(outcome, op)
        if not (named or outcome == "returned"):  # a result that fits under the limit is fine
            bad[key] = outcome
    assert not bad, "huge inputs without a named error:\n" + "\n".join(f"  {k}: {v}" for k, v in bad.items())

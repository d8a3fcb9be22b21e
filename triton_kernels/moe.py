"""Triton kernels for the fused MoE top-k router (fastcore_ai.ops.moe_topk_route, backend="triton").

Same API and math as fastcore_ai.reference.moe (and csrc/kernels/moe/topk_route.h), per row
x = logits[t, :] of E experts, in float32 whatever the input dtype:

  lse_t     = m_t + log Σ_e exp(x_te − m_t),  m_t = max_e x_te over non-NaN entries
              (NaN for a row holding a NaN or only −inf: there is no distribution to route with)
  p_te      = exp(x_te − lse_t)
  s_t0..    = the k largest logits (NaN counts as −inf; equal values: lower expert index first)
  weight_tj = p_{t,s_j}    or, with renormalize,   p_{t,s_j} / Σ_i p_{t,s_i}
  z_loss    = (1/T) Σ_t lse_t²,   mean_prob_e = (1/T) Σ_t p_te,   tokens_per_expert_e = #{(t, j): s_tj = e}

Layout of the work: one program handles `blocks_per_program` consecutive tiles of BLOCK_T rows ×
BLOCK_E = next_power_of_2(E) columns (padding columns are masked: −inf and "already taken"). The
top-k runs as K (constexpr, ≤ 16, so the loop unrolls) rounds of argmax over the columns not yet taken:
the largest key, then the lowest column index attaining it, then that column is marked taken. The
taken mask is explicit (values are never overwritten with −inf), so ties among −inf / NaN entries
still pick distinct, lowest-index columns in [0, E).

Determinism (DESIGN rule 8): no float atomics. Each program writes partial column sums of p, a
partial Σ lse² and partial int32 counts into scratch rows of its own; torch adds the partials in
program order (float64 for the floats, int64 for the counts). BLOCK_T and blocks_per_program depend
on (T, E) only, so results are bitwise reproducible for a given shape and device.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# Scratch bound: at most this many partial entries (num_programs × E) per statistic. Above it a
# program loops over several row tiles (keeps scratch ~16 MiB for T in the tens of millions).
_MAX_PARTIAL_ENTRIES = 1 << 22
# Upper bound on a row tile's elements (BLOCK_T × BLOCK_E), sized for registers on a GPU.
_MAX_TILE_ELEMENTS = 8192
_MAX_BLOCK_T = 32


def _block_e(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _block_t(block_e: int) -> int:
    return max(1, min(_MAX_BLOCK_T, _MAX_TILE_ELEMENTS // block_e))


def _num_warps(block_t: int, block_e: int) -> int:
    return 4 if block_t * block_e <= 2048 else 8


@triton.jit
def _moe_topk_route_fwd_kernel(
    # ---- pointers ----
    logits_ptr,  # [T, E] float32/float16/bfloat16, element (t, e) at t * stride_t + e * stride_e
    weights_ptr,  # [T, K] float32 out, contiguous
    ids_ptr,  # [T, K] int64 out, contiguous
    lse_ptr,  # [T] float32 out
    partial_prob_ptr,  # [num_programs, E] float32 out: Σ_t p_te over the program's rows
    partial_lse_sq_ptr,  # [num_programs] float32 out: Σ_t lse_t² over the program's rows
    partial_counts_ptr,  # [num_programs, E] int32 out: assignments per expert over the program's rows
    # ---- sizes ----
    T,
    E,
    blocks_per_program,  # row tiles (of BLOCK_T rows) handled by one program, in order
    # ---- strides (elements) ----
    stride_t,
    stride_e,
    # ---- meta-parameters ----
    K: tl.constexpr,  # experts per token (1..16)
    K_PAD: tl.constexpr,  # next power of two ≥ K (register tile of the outputs)
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # rows per tile
    BLOCK_E: tl.constexpr,  # columns per tile, power of two ≥ E
):
    """Forward router over `blocks_per_program` tiles of BLOCK_T rows (see the module docstring)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    col_off = cols.to(tl.int64) * stride_e
    kcols = tl.arange(0, K_PAD)

    prob_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    count_acc = tl.zeros([BLOCK_E], dtype=tl.int32)
    lse_sq_acc = tl.zeros([BLOCK_T], dtype=tl.float32)

    first_row = pid.to(tl.int64) * blocks_per_program * BLOCK_T
    for b in range(0, blocks_per_program):
        rows = first_row + b * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_t + col_off[None, :], mask=mask, other=float("-inf")).to(
            tl.float32
        )

        # Selection key: NaN -> -inf. Its row max is the max over non-NaN entries (-inf if none).
        key = tl.where(x != x, float("-inf"), x)
        row_max = tl.max(key, axis=1)
        # A row whose key max is -inf (only -inf / NaN, or a padding row) has no distribution: lse = NaN.
        # Otherwise a NaN entry stays NaN through exp and the sum, so lse is NaN for it too. (The shift
        # by 0 for such rows only keeps the interpreter free of -inf - -inf warnings; it is discarded.)
        has_max = row_max > float("-inf")
        shift = tl.where(has_max, row_max, 0.0)
        shifted = tl.where(mask, tl.exp(x - shift[:, None]), 0.0)
        total = tl.where(has_max, tl.sum(shifted, axis=1), 1.0)
        lse = tl.where(has_max, shift + tl.log(total), float("nan"))
        tl.store(lse_ptr + rows, lse, mask=row_ok)

        probs = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)
        prob_acc += tl.sum(probs, axis=0)
        lse_sq_acc += tl.where(row_ok, lse * lse, 0.0)

        # K rounds of argmax over the columns not yet taken (padding columns start taken).
        taken = (cols[None, :] >= E) | (rows[:, None] < 0)  # [BLOCK_T, BLOCK_E]
        w_tile = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        id_tile = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int64)
        w_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(K):
            candidate = tl.where(taken, float("-inf"), key)
            best = tl.max(candidate, axis=1)
            attains = (candidate == best[:, None]) & ~taken
            choice = tl.min(tl.where(attains, cols[None, :], BLOCK_E), axis=1)  # lowest index attaining it
            taken = taken | (cols[None, :] == choice[:, None])
            # best == x at the chosen column unless that x is NaN, in which case lse is NaN anyway.
            w = tl.exp(best - lse)
            w_sum += w
            w_tile = tl.where(kcols[None, :] == j, w[:, None], w_tile)
            id_tile = tl.where(kcols[None, :] == j, choice.to(tl.int64)[:, None], id_tile)
        if RENORMALIZE:
            w_tile = w_tile / w_sum[:, None]

        out_off = rows[:, None] * K + kcols[None, :]
        out_mask = row_ok[:, None] & (kcols[None, :] < K)
        tl.store(weights_ptr + out_off, w_tile, mask=out_mask)
        tl.store(ids_ptr + out_off, id_tile, mask=out_mask)
        count_acc += tl.sum((taken & mask).to(tl.int32), axis=0)

    part = pid.to(tl.int64) * E
    tl.store(partial_prob_ptr + part + cols, prob_acc, mask=col_ok)
    tl.store(partial_counts_ptr + part + cols, count_acc, mask=col_ok)
    tl.store(partial_lse_sq_ptr + pid, tl.sum(lse_sq_acc, axis=0))


@triton.jit
def _moe_topk_route_bwd_kernel(
    # ---- pointers ----
    logits_ptr,  # [T, E] float32/float16/bfloat16, element (t, e) at t * stride_t + e * stride_e
    ids_ptr,  # [T, K] int64, contiguous (forward's expert_ids)
    weights_ptr,  # [T, K] float32, contiguous (forward's weights)
    lse_ptr,  # [T] float32 (forward's lse)
    grad_weights_ptr,  # [T, K] float32, contiguous
    grad_z_loss_ptr,  # [1] float32
    grad_mean_prob_ptr,  # [E] float32, contiguous
    grad_logits_ptr,  # [T, E] float32 out, contiguous
    # ---- sizes ----
    T,
    E,
    # ---- strides (elements) of logits ----
    stride_t,
    stride_e,
    # ---- meta-parameters ----
    K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """d(loss)/d(logits) for one tile of BLOCK_T rows, per row (p_e = exp(x_e − lse)):

    dense_e = gP_e / T (+ gw_j at e = s_j when not renormalising),   dot = Σ_e p_e dense_e,
    c = 2 gz lse / T,   dx_e = p_e (dense_e − dot) + c p_e
    (+ w_j (gw_j − Σ_i w_i gw_i) at e = s_j when renormalising).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]

    x = tl.load(
        logits_ptr + rows[:, None] * stride_t + cols[None, :].to(tl.int64) * stride_e, mask=mask, other=float("-inf")
    ).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    probs = tl.where(mask, tl.exp(x - lse[:, None]), 0.0)

    grad_mean_prob = tl.load(grad_mean_prob_ptr + cols, mask=col_ok, other=0.0)
    dense = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) + (grad_mean_prob / T)[None, :]
    if not RENORMALIZE:
        for j in tl.static_range(K):
            s_j = tl.load(ids_ptr + rows * K + j, mask=row_ok, other=-1)
            gw_j = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0)
            dense += tl.where(cols[None, :].to(tl.int64) == s_j[:, None], gw_j[:, None], 0.0)
    dot = tl.sum(tl.where(mask, probs * dense, 0.0), axis=1)
    grad_z_loss = tl.load(grad_z_loss_ptr)
    c = 2.0 * grad_z_loss * lse / T
    dx = probs * (dense - dot[:, None]) + c[:, None] * probs
    if RENORMALIZE:
        w_dot_gw = tl.zeros([BLOCK_T], dtype=tl.float32)
        for j in tl.static_range(K):
            w_j = tl.load(weights_ptr + rows * K + j, mask=row_ok, other=0.0)
            gw_j = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0)
            w_dot_gw += w_j * gw_j
        for j in tl.static_range(K):
            s_j = tl.load(ids_ptr + rows * K + j, mask=row_ok, other=-1)
            w_j = tl.load(weights_ptr + rows * K + j, mask=row_ok, other=0.0)
            gw_j = tl.load(grad_weights_ptr + rows * K + j, mask=row_ok, other=0.0)
            dx += tl.where(cols[None, :].to(tl.int64) == s_j[:, None], (w_j * (gw_j - w_dot_gw))[:, None], 0.0)
    tl.store(grad_logits_ptr + rows[:, None] * E + cols[None, :], dx, mask=mask)


def moe_topk_route(
    logits: Tensor, k: int, renormalize: bool = True
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton forward of the fused router; returns (weights, expert_ids, z_loss, tokens_per_expert,
    mean_prob, lse) exactly as fastcore_ai.reference.moe_topk_route (float32 outputs). Inputs are
    validated by fastcore_ai.ops: logits [T, E] float32/float16/bfloat16 with any strides, E ≤ 1024,
    1 ≤ k ≤ min(E, 16)."""
    T, E = logits.shape
    device = logits.device
    weights = torch.empty((T, k), dtype=torch.float32, device=device)
    expert_ids = torch.empty((T, k), dtype=torch.int64, device=device)
    lse = torch.empty((T,), dtype=torch.float32, device=device)
    if T == 0:
        z_loss = torch.zeros((), dtype=torch.float32, device=device)
        tokens_per_expert = torch.zeros(E, dtype=torch.int64, device=device)
        mean_prob = torch.zeros(E, dtype=torch.float32, device=device)
        return weights, expert_ids, z_loss, tokens_per_expert, mean_prob, lse

    block_e = _block_e(E)
    block_t = _block_t(block_e)
    num_tiles = triton.cdiv(T, block_t)
    max_programs = max(1, _MAX_PARTIAL_ENTRIES // E)
    blocks_per_program = triton.cdiv(num_tiles, max_programs)
    num_programs = triton.cdiv(num_tiles, blocks_per_program)

    partial_prob = torch.empty((num_programs, E), dtype=torch.float32, device=device)
    partial_lse_sq = torch.empty((num_programs,), dtype=torch.float32, device=device)
    partial_counts = torch.empty((num_programs, E), dtype=torch.int32, device=device)

    _moe_topk_route_fwd_kernel[(num_programs,)](
        logits,
        weights,
        expert_ids,
        lse,
        partial_prob,
        partial_lse_sq,
        partial_counts,
        T,
        E,
        blocks_per_program,
        logits.stride(0),
        logits.stride(1),
        K=k,
        K_PAD=max(2, triton.next_power_of_2(k)),
        RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=_num_warps(block_t, block_e),
    )
    z_loss = (partial_lse_sq.sum(dtype=torch.float64) / T).to(torch.float32)
    mean_prob = (partial_prob.sum(0, dtype=torch.float64) / T).to(torch.float32)
    tokens_per_expert = partial_counts.sum(0, dtype=torch.int64)
    return weights, expert_ids, z_loss, tokens_per_expert, mean_prob, lse


def moe_topk_route_backward(
    logits: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    lse: Tensor,
    grad_weights: Tensor,
    grad_z_loss: Tensor,
    grad_mean_prob: Tensor,
    renormalize: bool,
) -> Tensor:
    """Triton backward: d(loss)/d(logits) as float32 [T, E] (contiguous), same math as
    fastcore_ai.reference.moe_topk_route_backward; the caller casts to the logits dtype.
    grad_weights may be any tensor expandable to [T, k]; grad_z_loss is a 0-dim tensor read on the device."""
    T, E = logits.shape
    k = expert_ids.shape[1]
    device = logits.device
    grad_logits = torch.empty((T, E), dtype=torch.float32, device=device)
    if T == 0:
        return grad_logits.zero_()
    f32 = dict(dtype=torch.float32, device=device)
    expert_ids = expert_ids.to(device=device, dtype=torch.int64).contiguous()
    weights = weights.to(**f32).contiguous()
    lse = lse.to(**f32).contiguous()
    grad_weights = grad_weights.to(**f32).expand(T, k).contiguous()
    grad_z_loss = grad_z_loss.to(**f32).reshape(1)
    grad_mean_prob = grad_mean_prob.to(**f32).expand(E).contiguous()

    block_e = _block_e(E)
    block_t = _block_t(block_e)
    _moe_topk_route_bwd_kernel[(triton.cdiv(T, block_t),)](
        logits,
        expert_ids,
        weights,
        lse,
        grad_weights,
        grad_z_loss,
        grad_mean_prob,
        grad_logits,
        T,
        E,
        logits.stride(0),
        logits.stride(1),
        K=k,
        RENORMALIZE=bool(renormalize),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=_num_warps(block_t, block_e),
    )
    return grad_logits

"""Triton kernels of the mux family (fastcore_ai.ops.attention / mux / demux, backend="triton").

Attention (same math as fastcore_ai.reference.mux and csrc/kernels/mux/attention.h):
  forward, grid (⌈Lq / BLOCK_M⌉, B·H): a query block stays in registers while key blocks stream by with
    the online softmax (running max m, sum l, accumulator o; a new block rescales by exp(m − m')); every
    load is masked, so any Lq, Lk and any head size D ≤ 256 (padded to a power of two ≥ 16 in registers)
    work — no multiple-of-block requirement. A fully masked row keeps l = 0: out = 0, lse = −inf.
  backward (FlashAttention-2): δ = rowsum(dO ∘ O) (one torch reduction), then
    _attention_dkdv_kernel, grid (⌈Lk / BLOCK_N⌉, B·H): dV = Σ pᵀ dO, dK = scale Σ dsᵀ q over all query blocks;
    _attention_dq_kernel,   grid (⌈Lq / BLOCK_M⌉, B·H): dQ = scale Σ ds k over all key blocks;
    with p = exp(s − lse) recomputed and ds = p (dO vᵀ − δ). No atomics: results are deterministic.
  float32 products use IEEE precision (no TF32) so parity with the float64 reference holds; bf16/fp16
  inputs feed tensor cores with float32 accumulation and a float32 softmax.

Mux / demux: the Hadamard mux and the demux GELU + LayerNorm epilogue are Triton kernels; the
orthogonal mux and the demux's two small GEMMs (A = p W_Lᵀ + b once per index, C = h W_Rᵀ once per
token) are torch matmuls, as in the cpu backend; reductions of the backward over rows are torch sums.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

# ---- attention ------------------------------------------------------------------------------------


@triton.jit
def _bias(
    s,
    b,
    h,
    rows,
    cols,
    Lq,
    Lk,
    mask_ptr,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    kpm_ptr,
    skp_b,
    skp_k,
    MASK_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Adds the mask terms to scores s [BLOCK_M, BLOCK_N] (−inf where masked or out of range)."""
    valid = (rows[:, None] < Lq) & (cols[None, :] < Lk)
    keep = cols[None, :] < Lk
    if MASK_KIND == 1:
        m = tl.load(mask_ptr + b * sm_b + h * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k, mask=valid, other=0)
        keep = keep & (m != 0)
    if MASK_KIND == 2:
        a = tl.load(mask_ptr + b * sm_b + h * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k, mask=valid, other=0.0)
        s = s + a.to(tl.float32)
    if HAS_KPM:
        pad = tl.load(kpm_ptr + b * skp_b + cols * skp_k, mask=cols < Lk, other=1)
        keep = keep & (pad == 0)[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    mask_ptr,
    kpm_ptr,
    sq_b,
    sq_h,
    sq_l,
    sq_d,
    sk_b,
    sk_h,
    sk_l,
    sk_d,
    sv_b,
    sv_h,
    sv_l,
    sv_d,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    skp_b,
    skp_k,
    H,
    Lq,
    Lk,
    D,
    scale,
    MASK_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    dim_ok = dims < D
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :] * sq_d,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if IEEE:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = Lk
    if CAUSAL:
        end = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)  # keys beyond the block's last row are all masked
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Lk
        k = tl.load(
            k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_l + dims[None, :] * sk_d,
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_l + dims[None, :] * sv_d,
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        if IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = _bias(
            s,
            b,
            h,
            rows,
            cols,
            Lq,
            Lk,
            mask_ptr,
            sm_b,
            sm_h,
            sm_q,
            sm_k,
            kpm_ptr,
            skp_b,
            skp_k,
            MASK_KIND,
            HAS_KPM,
            CAUSAL,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: p = 0, nothing to rescale
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_rows = bh * Lq + rows
    tl.store(
        o_ptr + o_rows[:, None] * D + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    tl.store(lse_ptr + o_rows, lse, mask=row_ok)


@triton.jit
def _probs(
    q,
    k,
    lse,
    b,
    h,
    rows,
    cols,
    Lq,
    Lk,
    scale,
    mask_ptr,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    kpm_ptr,
    skp_b,
    skp_k,
    MASK_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """p = exp(s − lse) [BLOCK_M, BLOCK_N], 0 where masked or the row is fully masked (lse = −inf)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    s = _bias(
        s, b, h, rows, cols, Lq, Lk, mask_ptr, sm_b, sm_h, sm_q, sm_k, kpm_ptr, skp_b, skp_k, MASK_KIND, HAS_KPM, CAUSAL
    )
    finite = lse > float("-inf")
    return tl.where(finite[:, None], tl.exp(s - tl.where(finite, lse, 0.0)[:, None]), 0.0)


@triton.jit
def _attention_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    mask_ptr,
    kpm_ptr,
    sq_b,
    sq_h,
    sq_l,
    sq_d,
    sk_b,
    sk_h,
    sk_l,
    sk_d,
    sv_b,
    sv_h,
    sv_l,
    sv_d,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    skp_b,
    skp_k,
    H,
    Lq,
    Lk,
    D,
    scale,
    MASK_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < Lk
    dim_ok = dims < D
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_l + dims[None, :] * sk_d, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_l + dims[None, :] * sv_d, mask=kv_mask, other=0.0)
    if IEEE:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    begin = 0
    if CAUSAL:
        begin = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # query blocks wholly above the diagonal add nothing
    for start in range(begin, Lq, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :] * sq_d,
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        do = tl.load(
            do_ptr + (bh * Lq + rows)[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        )
        lse = tl.load(lse_ptr + bh * Lq + rows, mask=row_ok, other=float("-inf"))
        delta = tl.load(delta_ptr + bh * Lq + rows, mask=row_ok, other=0.0)
        if IEEE:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        p = _probs(
            q,
            k,
            lse,
            b,
            h,
            rows,
            cols,
            Lq,
            Lk,
            scale,
            mask_ptr,
            sm_b,
            sm_h,
            sm_q,
            sm_k,
            kpm_ptr,
            skp_b,
            skp_k,
            MASK_KIND,
            HAS_KPM,
            CAUSAL,
            IEEE,
        )
        if IEEE:
            dv += tl.dot(tl.trans(p), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    out_rows = bh * Lk + cols
    tl.store(dk_ptr + out_rows[:, None] * D + dims[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_rows[:, None] * D + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    mask_ptr,
    kpm_ptr,
    sq_b,
    sq_h,
    sq_l,
    sq_d,
    sk_b,
    sk_h,
    sk_l,
    sk_d,
    sv_b,
    sv_h,
    sv_l,
    sv_d,
    sm_b,
    sm_h,
    sm_q,
    sm_k,
    skp_b,
    skp_k,
    H,
    Lq,
    Lk,
    D,
    scale,
    MASK_KIND: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < Lq
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + dims[None, :] * sq_d, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + (bh * Lq + rows)[:, None] * D + dims[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + bh * Lq + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(delta_ptr + bh * Lq + rows, mask=row_ok, other=0.0)
    if IEEE:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = Lk
    if CAUSAL:
        end = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols < Lk)[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_l + dims[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_l + dims[None, :] * sv_d, mask=kv_mask, other=0.0)
        if IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = _probs(
            q,
            k,
            lse,
            b,
            h,
            rows,
            cols,
            Lq,
            Lk,
            scale,
            mask_ptr,
            sm_b,
            sm_h,
            sm_q,
            sm_k,
            kpm_ptr,
            skp_b,
            skp_k,
            MASK_KIND,
            HAS_KPM,
            CAUSAL,
            IEEE,
        )
        if IEEE:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(
        dq_ptr + (bh * Lq + rows)[:, None] * D + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask
    )


def _ieee(q: Tensor) -> bool:
    """float32 math with IEEE products: always for float32 inputs (no TF32), and for every dtype under the
    CPU interpreter, whose dot on 16-bit floats is not exact (tiles are widened to float32 after loading)."""
    return q.dtype == torch.float32 or q.device.type == "cpu"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _blocks(D: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64×64 tiles up to D = 64, smaller for wide heads (registers on a GPU)."""
    if D <= 64:
        return 64, 64
    if D <= 128:
        return 64, 32
    return 32, 32


def _mask_args(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if attn_mask is None:
        mask, kind, strides = q, 0, (0, 0, 0, 0)
    else:
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(B, H, Lq, Lk)
        if mask.dtype == torch.bool:
            mask, kind = mask.view(torch.uint8), 1
        else:
            kind = 2
        strides = mask.stride()
    if key_padding_mask is None:
        kpm, kpm_strides = q, (0, 0)
    else:
        kpm, kpm_strides = key_padding_mask.view(torch.uint8), key_padding_mask.stride()
    return mask, kind, strides, kpm, key_padding_mask is not None, kpm_strides


def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    mask, kind, ms, kpm, has_kpm, ks = _mask_args(q, k, attn_mask, key_padding_mask)
    block_m, block_n = _blocks(D)
    grid = (triton.cdiv(Lq, block_m), B * H)
    _attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        mask,
        kpm,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *ms,
        *ks,
        H,
        Lq,
        Lk,
        D,
        scale,
        MASK_KIND=kind,
        HAS_KPM=has_kpm,
        CAUSAL=causal,
        IEEE=_ieee(q),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_block_d(D),
    )
    return out, lse


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=v.device)
    if B * H == 0 or (Lq == 0 and Lk == 0):
        return dq, dk, dv
    if Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # δ_i = dO_i · O_i
    lse = lse.float().contiguous()
    mask, kind, ms, kpm, has_kpm, ks = _mask_args(q, k, attn_mask, key_padding_mask)
    block_m, block_n = _blocks(D)
    common = dict(
        MASK_KIND=kind,
        HAS_KPM=has_kpm,
        CAUSAL=causal,
        IEEE=_ieee(q),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_block_d(D),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *ms, *ks)
    _attention_dkdv_kernel[(triton.cdiv(Lk, block_n), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, mask, kpm, *strides, H, Lq, Lk, D, scale, **common
    )
    _attention_dq_kernel[(triton.cdiv(Lq, block_m), B * H)](
        q, k, v, grad_out, lse, delta, dq, mask, kpm, *strides, H, Lq, Lk, D, scale, **common
    )
    return dq, dk, dv


# ---- mux / demux ------------------------------------------------------------------------------------


@triton.jit
def _hadamard_mux_kernel(x_ptr, v_ptr, out_ptr, N, L, d, inv_n, BLOCK_D: tl.constexpr):
    """out[b, l, :] = (1/N) Σ_i x[b, i, l, :] ⊙ v[i, :] (fixed i order, float32), one (b, l) row per program."""
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row % L
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < d
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, N):
        x = tl.load(x_ptr + ((b * N + i) * L + l) * d + cols, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + i * d + cols, mask=ok, other=0.0).to(tl.float32)
        acc += x * v
    tl.store(out_ptr + row * d + cols, (acc * inv_n).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _hadamard_mux_backward_kernel(g_ptr, v_ptr, dx_ptr, N, L, d, inv_n, BLOCK_D: tl.constexpr):
    """dx[b, i, l, :] = (1/N) dout[b, l, :] ⊙ v[i, :], one (b, i, l) row per program."""
    row = tl.program_id(0).to(tl.int64)  # (b·N + i)·L + l
    l = row % L
    bi = row // L
    b = bi // N
    i = bi % N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < d
    g = tl.load(g_ptr + (b * L + l) * d + cols, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + i * d + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * d + cols, (g * v * inv_n).to(dx_ptr.dtype.element_ty), mask=ok)


def _row_block(d: int) -> int:
    return min(1024, max(16, triton.next_power_of_2(d)))


def _ortho_weight(keys: Tensor) -> Tensor:
    N, d, _ = keys.shape
    return keys.permute(0, 2, 1).reshape(N * d, d)


def mux_forward(x: Tensor, keys: Tensor, mode: int) -> Tensor:
    B, N, L, d = x.shape
    if mode == 1:  # orthogonal: one GEMM with K = N·d
        rows = x.permute(0, 2, 1, 3).reshape(B * L, N * d)
        return (rows.float() @ _ortho_weight(keys).float() / math.sqrt(N)).to(x.dtype).reshape(B, L, d)
    out = torch.empty((B, L, d), dtype=x.dtype, device=x.device)
    if B * L * d == 0:
        return out
    block = _row_block(d)
    _hadamard_mux_kernel[(B * L, triton.cdiv(d, block))](
        x.contiguous(), keys.contiguous(), out, N, L, d, 1.0 / N, BLOCK_D=block
    )
    return out


def mux_backward(grad_out: Tensor, x: Tensor, keys: Tensor, mode: int, need_keys: bool) -> Tuple[Tensor, Tensor]:
    B, N, L, d = x.shape
    g = grad_out.contiguous()
    if mode == 1:
        w = _ortho_weight(keys).float()
        g2 = g.reshape(B * L, d).float()
        gx = (g2 @ w.t() / math.sqrt(N)).reshape(B, L, N, d).permute(0, 2, 1, 3).contiguous().to(x.dtype)
        if not need_keys:
            return gx, keys.new_empty((0,))
        rows = x.permute(0, 2, 1, 3).reshape(B * L, N * d).float()
        gk = (rows.t() @ g2 / math.sqrt(N)).reshape(N, d, d).permute(0, 2, 1).contiguous().to(keys.dtype)
        return gx, gk
    gx = torch.empty((B, N, L, d), dtype=x.dtype, device=x.device)
    if B * N * L * d > 0:
        block = _row_block(d)
        _hadamard_mux_backward_kernel[(B * N * L, triton.cdiv(d, block))](
            g, keys.contiguous(), gx, N, L, d, 1.0 / N, BLOCK_D=block
        )
    if not need_keys:
        return gx, keys.new_empty((0,))
    gk = torch.einsum("bld,bild->id", g.float(), x.float()) / N  # dv_i = (1/N) Σ_{b,l} dout ⊙ x_i
    return gx, gk.to(keys.dtype)


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _demux_kernel(
    a_ptr,
    c_ptr,
    gamma_ptr,
    beta_ptr,
    out_ptr,
    z_out_ptr,
    ghat_ptr,
    go_ptr,
    a_batch_stride,
    N,
    L,
    e,
    eps,
    BACKWARD: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """One output row (b, i, t): z = A[b, i] + C[b, t], g = GELU(z), out = LN(g) · γ + β. With BACKWARD it
    instead writes dz (the gradient w.r.t. z, from dout) and ĝ = (g − μ) r (for dγ = Σ dout ĝ)."""
    row = tl.program_id(0).to(tl.int64)  # (b·N + i)·L + t
    t = row % L
    bi = row // L
    b = bi // N
    i = bi % N
    cols = tl.arange(0, BLOCK_E)
    ok = cols < e
    z = tl.load(a_ptr + b * a_batch_stride + i * e + cols, mask=ok, other=0.0) + tl.load(
        c_ptr + (b * L + t) * e + cols, mask=ok, other=0.0
    )
    g = _gelu(z)
    mean = tl.sum(tl.where(ok, g, 0.0), axis=0) / e
    centered = tl.where(ok, g - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / e + eps)
    ghat = centered * rstd
    gamma = tl.load(gamma_ptr + cols, mask=ok, other=0.0)
    if BACKWARD:
        dy = tl.load(go_ptr + row * e + cols, mask=ok, other=0.0).to(tl.float32)
        dghat = dy * gamma
        mean_dg = tl.sum(dghat, axis=0) / e
        mean_dgg = tl.sum(dghat * ghat, axis=0) / e
        dg = rstd * (dghat - mean_dg - ghat * mean_dgg)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        tl.store(z_out_ptr + row * e + cols, dg * (cdf + z * pdf), mask=ok)
        tl.store(ghat_ptr + row * e + cols, ghat, mask=ok)
    else:
        beta = tl.load(beta_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * e + cols, (ghat * gamma + beta).to(out_ptr.dtype.element_ty), mask=ok)


def _demux_prepare(h, keys, weight, bias, norm_weight, norm_bias):
    B, L, d = h.shape
    w = weight.float()
    a = (keys.float().reshape(-1, d) @ w[:, :d].t() + bias.float()).contiguous()  # once per index
    c = (h.float().reshape(B * L, d) @ w[:, d:].t()).contiguous()  # once per token
    N = keys.shape[-2]
    return (
        a,
        c,
        norm_weight.float().contiguous(),
        norm_bias.float().contiguous(),
        (0 if keys.dim() == 2 else N * weight.shape[0]),
    )


def demux_forward(h, keys, weight, bias, norm_weight, norm_bias, eps):
    B, L, d = h.shape
    N, e = keys.shape[-2], weight.shape[0]
    out = torch.empty((B * N, L, e), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    a, c, gamma, beta, a_stride = _demux_prepare(h, keys, weight, bias, norm_weight, norm_bias)
    _demux_kernel[(B * N * L,)](
        a, c, gamma, beta, out, out, out, out, a_stride, N, L, e, eps, BACKWARD=False, BLOCK_E=triton.next_power_of_2(e)
    )
    return out


def demux_backward(grad_out, h, keys, weight, bias, norm_weight, norm_bias, eps):
    B, L, d = h.shape
    N, e = keys.shape[-2], weight.shape[0]
    a, c, gamma, beta, a_stride = _demux_prepare(h, keys, weight, bias, norm_weight, norm_bias)
    dz = torch.empty((B, N, L, e), dtype=torch.float32, device=h.device)
    ghat = torch.empty((B, N, L, e), dtype=torch.float32, device=h.device)
    go = grad_out.contiguous()
    if dz.numel() > 0:
        _demux_kernel[(B * N * L,)](
            a,
            c,
            gamma,
            beta,
            go,
            dz,
            ghat,
            go,
            a_stride,
            N,
            L,
            e,
            eps,
            BACKWARD=True,
            BLOCK_E=triton.next_power_of_2(e),
        )
    dy = go.float().reshape(B, N, L, e)
    dgamma = (dy * ghat).sum((0, 1, 2))
    dbeta = dy.sum((0, 1, 2))
    dA = dz.sum(2)  # [B, N, e]
    dC = dz.sum(1)  # [B, L, e]
    w = weight.float()
    dA_keys = dA if keys.dim() == 3 else dA.sum(0)
    g_keys = dA_keys @ w[:, :d]
    g_wl = dA_keys.reshape(-1, e).t() @ keys.float().reshape(-1, d)
    g_h = dC @ w[:, d:]
    g_wr = dC.reshape(B * L, e).t() @ h.float().reshape(B * L, d)
    return (
        g_h.to(h.dtype),
        g_keys.to(keys.dtype),
        torch.cat([g_wl, g_wr], 1).to(weight.dtype),
        dA.sum((0, 1)).to(bias.dtype),
        dgamma.to(norm_weight.dtype),
        dbeta.to(norm_bias.dtype),
    )

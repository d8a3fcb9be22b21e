"""DataMUX multiplexing, index demultiplexing and attention: float64 pure-torch references.

These are the oracles every backend of `fastcore_ai.ops.{mux, demux, attention}` is tested against,
and the `reference` backend itself. They are written for reading, not speed; they take any float
dtype and compute in it (call them on float64 inputs for the oracle). Backward passes come from
torch autograd through these forward functions (`*_backward` helpers below).

Shapes and formulas (DataMUX, Murahari et al. 2022, §1.2 / §1.3 of the anchor notes):

  mux, "hadamard":  x [B, N, L, d], keys v [N, d]      out[b, l] = (1/N)  Σ_i x[b, i, l] ⊙ v_i
  mux, "ortho":     x [B, N, L, d], keys Φ [N, d, d]   out[b, l] = (1/√N) Σ_i Φ_i x[b, i, l]   (= x Φ_iᵀ as a row)
  demux (index):    h [B, L, d], p [B, N, d] (or [N, d]), W [e, 2d] = [W_L | W_R], b [e], γ, β [e]
                    out[b·N + i, t] = LayerNorm_{γ,β}(GELU(W_L p_{b,i} + W_R h_{b,t} + b))      [B·N, L, e]
                    GELU is the exact erf form; LayerNorm uses the biased variance and eps.
  attention:        q [B, H, Lq, D], k [B, H_kv, Lk, D], v [B, H_kv, Lk, D], H % H_kv == 0 (grouped-query
                    attention, SDPA's enable_gqa: query head h reads kv head h // (H / H_kv); H_kv = H is
                    plain multi-head attention)
                    s_ij = scale · q_i·k_j + a_ij   (a: additive mask, −inf where a bool mask is False,
                    where key_padding_mask[b, j] is True, or where causal and j > i)
                    out_i = Σ_j softmax_j(s_i) v_j,   lse_i = log Σ_j exp(s_ij)
                    A row whose every key is masked has out_i = 0 and lse_i = −inf (defined, never NaN),
                    and gradients 0 through it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "mux",
    "mux_backward",
    "demux",
    "demux_backward",
    "attention",
    "attention_with_lse",
    "attention_backward",
    "attention_bias",
]


# ---- mux -----------------------------------------------------------------------------------------


def mux(x: Tensor, keys: Tensor, mode: str = "hadamard") -> Tensor:
    """x [B, N, L, d] -> [B, L, d]; see the module docstring for the two modes."""
    n = x.shape[1]
    if mode == "hadamard":
        return (x * keys[None, :, None, :]).sum(dim=1) / n
    # Φ_i x as a row vector is x Φ_iᵀ: out[b, l, e] = Σ_i Σ_c x[b, i, l, c] Φ[i, e, c]
    return torch.einsum("bilc,iec->ble", x, keys) / math.sqrt(n)


def mux_backward(grad_out: Tensor, x: Tensor, keys: Tensor, mode: str, need_keys: bool) -> Tuple[Tensor, Tensor]:
    """(grad_x, grad_keys) written out (grad_keys is an empty tensor when not need_keys):
    hadamard: dx_i = (1/N) dout ⊙ v_i,  dv_i = (1/N) Σ_{b,l} dout ⊙ x_i;
    ortho:    dx_i = (1/√N) dout Φ_i,   dΦ_i = (1/√N) Σ_{b,l} doutᵀ x_i."""
    n = x.shape[1]
    if mode == "hadamard":
        grad_x = grad_out[:, None] * keys[None, :, None, :] / n
        grad_keys = torch.einsum("bld,bild->id", grad_out, x) / n if need_keys else keys.new_empty((0,))
    else:
        grad_x = torch.einsum("ble,iec->bilc", grad_out, keys) / math.sqrt(n)
        grad_keys = torch.einsum("ble,bilc->iec", grad_out, x) / math.sqrt(n) if need_keys else keys.new_empty((0,))
    return grad_x, grad_keys


# ---- demux ---------------------------------------------------------------------------------------


def demux(
    h: Tensor,
    index_keys: Tensor,
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """Index demultiplexing, the straightforward way: concatenate [p_i ; h_t] for every (i, t) pair and
    apply Linear(2d -> e), GELU, LayerNorm. h [B, L, d], index_keys [B, N, d] or [N, d] -> [B·N, L, e]."""
    B, L, d = h.shape
    p = index_keys if index_keys.dim() == 3 else index_keys.expand(B, *index_keys.shape)
    N = p.shape[1]
    pairs = torch.cat([p[:, :, None, :].expand(B, N, L, d), h[:, None, :, :].expand(B, N, L, d)], dim=-1)
    z = pairs @ weight.t() + bias
    g = torch.nn.functional.gelu(z)
    out = torch.nn.functional.layer_norm(g, (weight.shape[0],), norm_weight, norm_bias, eps)
    return out.reshape(B * N, L, weight.shape[0])


def demux_backward(
    grad_out: Tensor,
    h: Tensor,
    index_keys: Tensor,
    weight: Tensor,
    bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float = 1e-5,
) -> Tuple[Tensor, ...]:
    """Gradients of `demux` for (h, index_keys, weight, bias, norm_weight, norm_bias), written out with
    z = W_L p_i + b + W_R h_t, g = GELU(z), ĝ = (g − μ) r:
      dγ = Σ dy ĝ, dβ = Σ dy, dg = r (dĝ − mean(dĝ) − ĝ mean(dĝ ĝ)) with dĝ = dy γ,
      dz = dg (Φ(z) + z φ(z)), dA_{b,i} = Σ_t dz, dC_{b,t} = Σ_i dz, then the two GEMMs' gradients."""
    B, L, d = h.shape
    shared = index_keys.dim() == 2
    p = index_keys.expand(B, *index_keys.shape) if shared else index_keys
    N, e = p.shape[1], weight.shape[0]
    w_l, w_r = weight[:, :d], weight[:, d:]
    z = (p @ w_l.t() + bias)[:, :, None, :] + (h @ w_r.t())[:, None, :, :]  # [B, N, L, e]
    g = torch.nn.functional.gelu(z)
    mean = g.mean(-1, keepdim=True)
    rstd = torch.rsqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    ghat = (g - mean) * rstd
    dy = grad_out.reshape(B, N, L, e)
    d_norm_weight = (dy * ghat).sum((0, 1, 2))
    d_norm_bias = dy.sum((0, 1, 2))
    dghat = dy * norm_weight
    dg = rstd * (dghat - dghat.mean(-1, keepdim=True) - ghat * (dghat * ghat).mean(-1, keepdim=True))
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    dz = dg * (cdf + z * pdf)
    dA, dC = dz.sum(2), dz.sum(1)  # [B, N, e], [B, L, e]
    d_keys = dA @ w_l
    d_weight = torch.cat([torch.einsum("bne,bnd->ed", dA, p), torch.einsum("ble,bld->ed", dC, h)], dim=1)
    return dC @ w_r, (d_keys.sum(0) if shared else d_keys), d_weight, dA.sum((0, 1)), d_norm_weight, d_norm_bias


# ---- attention -----------------------------------------------------------------------------------


def expand_kv(kv: Tensor, heads: int) -> Tensor:
    """k or v [B, H_kv, Lk, D] -> [B, H, Lk, D]: query head h reads kv head h // (H / H_kv)."""
    kv_heads = kv.shape[1]
    return kv if kv_heads == heads else kv.repeat_interleave(heads // kv_heads, dim=1)


def reduce_kv_grad(grad: Tensor, kv_heads: int) -> Tensor:
    """The gradient of `expand_kv`: [B, H, Lk, D] -> [B, H_kv, Lk, D], summing each kv head's G query heads."""
    B, H, Lk, D = grad.shape
    return grad if kv_heads == H else grad.reshape(B, kv_heads, H // kv_heads, Lk, D).sum(2)


def attention_bias(
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    dtype: torch.dtype,
    device,
) -> Tensor:
    """The additive bias a [B, H, Lq, Lk] every mask argument adds to the scores (0 or −inf, or the
    additive mask's values): bool attn_mask True = attend (as torch SDPA), key_padding_mask True = ignore
    that key (as nn.MultiheadAttention), causal = top-left aligned (key j > query i is masked)."""
    bias = torch.zeros(B, H, Lq, Lk, dtype=dtype, device=device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attn_mask.expand(B, H, Lq, Lk), float("-inf"))
        else:
            bias = bias + attn_mask.to(dtype).expand(B, H, Lq, Lk)
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :].expand(B, H, Lq, Lk), float("-inf"))
    if causal:
        above = torch.ones(Lq, Lk, dtype=torch.bool, device=device).triu(1)
        bias = bias.masked_fill(above, float("-inf"))
    return bias


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """(out [B, H, Lq, D], lse [B, H, Lq]) by materialising the [Lq, Lk] scores (fine for an oracle).
    Fully masked rows: out = 0, lse = −inf; the safe max below keeps their gradient 0 instead of NaN."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    k, v = expand_kv(k, H), expand_kv(v, H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s + attention_bias(B, H, Lq, Lk, attn_mask, key_padding_mask, causal, s.dtype, s.device)
    m = s.amax(dim=-1, keepdim=True) if Lk > 0 else s.new_full((B, H, Lq, 1), float("-inf"))
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m_safe)  # exp(−inf) = 0 for masked keys
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = p @ v
    lse = (torch.log(denom) + m_safe).squeeze(-1)  # −inf for a fully masked row
    return out, lse


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
) -> Tensor:
    """softmax(scale · q kᵀ + mask) v, [B, H, Lq, D]; fully masked rows give 0 (see attention_with_lse)."""
    return attention_with_lse(q, k, v, attn_mask, key_padding_mask, causal, scale)[0]


def attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor],
    causal: bool,
    scale: Optional[float],
    need_mask_grad: bool = False,
) -> Tuple[Tensor, ...]:
    """(grad_q, grad_k, grad_v, grad_attn_mask) written out:
    dV = pᵀ dO,  dp = dO vᵀ,  ds = p (dp − rowsum(dp ∘ p)),  dQ = scale ds k,  dK = scale dsᵀ q.
    An additive attn_mask enters s with coefficient 1, so its gradient is ds summed over the dimensions
    it was broadcast along (returned when need_mask_grad, else None); bool masks, key_padding_mask and
    causal are constants. Grouped kv heads: dK, dV of a kv head sum those of its G query heads."""
    B, H, Lq, D = q.shape
    Lk, kv_heads = k.shape[2], k.shape[1]
    k, v = expand_kv(k, H), expand_kv(v, H)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s + attention_bias(B, H, Lq, Lk, attn_mask, key_padding_mask, causal, s.dtype, s.device)
    m = s.amax(dim=-1, keepdim=True) if Lk > 0 else s.new_full((B, H, Lq, 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    grad_v = p.transpose(-1, -2) @ grad_out
    dp = grad_out @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    grad_mask = ds.sum_to_size(attn_mask.shape) if need_mask_grad else None
    grad_k = reduce_kv_grad((ds.transpose(-1, -2) @ q) * scale, kv_heads)
    return (ds @ k) * scale, grad_k, reduce_kv_grad(grad_v, kv_heads), grad_mask

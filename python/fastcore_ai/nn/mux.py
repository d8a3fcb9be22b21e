"""DataMUX layers: a drop-in fused attention block, multiplexed self-attention, and the DataMUX encoder.

Attention                 nn.MultiheadAttention(batch_first=True)'s interface and parameter names, with
                          the fused `ops.attention` core (never materialises the attention weights).
MultiplexedSelfAttention  mux N instances into one sequence, then self-attention over it.
DataMUXEncoder            DataMUX (Murahari et al. 2022): index prefix -> mux -> Transformer layers ->
                          index demux, [B·N, L, d] -> [B·N, L, d]; a batch that is not a multiple of N is
                          padded with masked instances and the padding removed (never dropped silently).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops

__all__ = ["Attention", "MultiplexedSelfAttention", "DataMUXEncoder", "hadamard_keys", "ortho_keys"]


def hadamard_keys(
    num_instances: int, dim: int, norm: float = 1.0, generator: Optional[torch.Generator] = None
) -> Tensor:
    """DataMUX Gaussian Hadamard keys v_i = norm · g_i / ‖g_i‖, g_i ~ N(0, I_d): [N, d]."""
    g = torch.randn(num_instances, dim, generator=generator)
    return norm * g / g.norm(dim=1, keepdim=True)


def ortho_keys(num_instances: int, dim: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Haar-random orthogonal matrices Φ_i (QR of a Gaussian with the sign fix of R's diagonal): [N, d, d]."""
    g = torch.randn(num_instances, dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q.float()


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention(batch_first=True)'s parameters (in_proj_weight
    [3E, E], in_proj_bias [3E], out_proj), so its state_dict loads either way, and the fused attention core.

    forward(query [B, Lq, E], key=None, value=None, key_padding_mask=None, attn_mask=None, need_weights=False)
    returns (out [B, Lq, E], None). Mask conventions are nn.MultiheadAttention's: key_padding_mask bool
    [B, Lk] True = ignore; attn_mask [Lq, Lk] or [B·H, Lq, Lk], bool True = NOT allowed, or additive float.
    `causal=True` (constructor or forward) masks future keys. Attention weights are never formed, so
    need_weights=True raises. A query whose keys are all masked outputs out_proj(0) = out_proj.bias.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = True,
        causal: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"fastcore_ai.nn.Attention: embed_dim = {embed_dim} must be divisible by num_heads = {num_heads}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.backend = causal, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D] view, no copy

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Tuple[Tensor, None]:
        if need_weights:
            raise ValueError(
                "fastcore_ai.nn.Attention: need_weights=True is not supported (the fused kernel never "
                "forms the attention weights); pass need_weights=False"
            )
        key = query if key is None else key
        value = key if value is None else value
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is query and value is query:
            q, k, v = nn.functional.linear(query, w, b).chunk(3, dim=-1)
        else:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q = nn.functional.linear(query, w[:E], bq)
            k = nn.functional.linear(key, w[E : 2 * E], bk)
            v = nn.functional.linear(value, w[2 * E :], bv)
        B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # [B·H, Lq, Lk]
                attn_mask = attn_mask.view(B, self.num_heads, Lq, Lk)
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        out = ops.attention(
            self._heads(q),
            self._heads(k),
            self._heads(v),
            attn_mask=mask,
            key_padding_mask=key_padding_mask,
            causal=self.causal or is_causal,
            backend=self.backend,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, E)), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, backend={self.backend!r}"


class MultiplexedSelfAttention(nn.Module):
    """Mux N instances [B·N, L, d] into [B, L, d] (fixed Hadamard or orthogonal keys, or learned with
    learn_keys=True), then self-attention over the multiplexed sequence: returns [B, L, d]. The flat batch
    must be a multiple of N (see DataMUXEncoder for padding)."""

    def __init__(
        self,
        num_instances: int,
        embed_dim: int,
        num_heads: int,
        mux: str = "hadamard",
        key_norm: float = 1.0,
        learn_keys: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if mux not in ops.MUX_MODES:
            raise ValueError(
                f"fastcore_ai.nn.MultiplexedSelfAttention: mux must be one of {ops.MUX_MODES}, got {mux!r}"
            )
        self.num_instances, self.mux_mode, self.backend = num_instances, mux, backend
        keys = (
            hadamard_keys(num_instances, embed_dim, key_norm)
            if mux == "hadamard"
            else ortho_keys(num_instances, embed_dim)
        )
        if learn_keys:
            self.keys = nn.Parameter(keys)
        else:
            self.register_buffer("keys", keys)
        self.attention = Attention(embed_dim, num_heads, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        muxed = ops.mux(
            x,
            self.keys.to(x.dtype),
            self.mux_mode,
            num_instances=self.num_instances,
            backend=_aux_backend(self.backend),
        )
        return self.attention(muxed)[0]

    def extra_repr(self) -> str:
        return f"num_instances={self.num_instances}, mux={self.mux_mode!r}"


def _aux_backend(backend: str) -> str:
    """mux/demux have no cuda kernel of their own: a layer told backend='cuda' runs them on 'auto'."""
    return "auto" if backend == "cuda" else backend


class _EncoderLayer(nn.Module):
    """Post-LN Transformer layer (BERT/RoBERTa): x = LN(x + Attn(x)); x = LN(x + FFN(x)), GELU FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, backend: str):
        super().__init__()
        self.attention = Attention(d_model, n_heads, backend=backend)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.dropout(self.attention(x)[0]))
        return self.norm2(x + self.dropout(self.ff(x)))


class DataMUXEncoder(nn.Module):
    """DataMUX encoder: [B·N, L, d] -> [B·N, L, d].

    1. Index prefix (DataMUX index demux): instance i gets N + 1 prefix tokens, its learned index
       embedding at position i, a shared filler elsewhere, and a shared CLS token at position N.
    2. Mux the N instances (L' = L + N + 1 tokens) with fixed keys: "hadamard" (Gaussian, norm
       `key_norm`) or "ortho".
    3. n_layers post-LN Transformer layers (fused attention) on the muxed [B, L', d] sequence.
    4. Index demux: out[b·N + i, t] = LayerNorm(GELU(W [h_{b,i} ; h_{b,N+1+t}] + b)), i.e. instance i's
       prefix output p_i against every token output.

    Rows: a flat batch R that is not a multiple of N is padded to B·N rows with zero instances, which are
    masked out of the mux (their prefix too) and removed from the output, so the output always has R rows
    in input order (DataMUX's reference silently drops those rows).
    """

    def __init__(
        self,
        num_instances: int,
        d_model: int,
        n_heads: int,
        n_layers: int,
        d_ff: int,
        mux: str = "hadamard",
        demux: str = "index",
        dropout: float = 0.0,
        key_norm: float = 1.0,
        backend: str = "auto",
        seed: int = 0,
    ):
        super().__init__()
        if mux not in ops.MUX_MODES:
            raise ValueError(f"fastcore_ai.nn.DataMUXEncoder: mux must be one of {ops.MUX_MODES}, got {mux!r}")
        if demux != "index":
            raise ValueError(
                f"fastcore_ai.nn.DataMUXEncoder: demux must be 'index' (the only demux implemented), got {demux!r}"
            )
        if not (isinstance(num_instances, int) and num_instances >= 1):
            raise ValueError(f"fastcore_ai.nn.DataMUXEncoder: num_instances must be an int >= 1, got {num_instances!r}")
        N = num_instances
        self.num_instances, self.d_model, self.mux_mode, self.backend = N, d_model, mux, backend
        generator = torch.Generator().manual_seed(seed)
        keys = (
            hadamard_keys(N, d_model, key_norm, generator) if mux == "hadamard" else ortho_keys(N, d_model, generator)
        )
        self.register_buffer("mux_keys", keys)
        self.index_embedding = nn.Parameter(torch.randn(N, d_model, generator=generator) * 0.02)
        self.filler_embedding = nn.Parameter(torch.randn(d_model, generator=generator) * 0.02)
        self.cls_embedding = nn.Parameter(torch.randn(d_model, generator=generator) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(d_model, n_heads, d_ff, dropout, backend) for _ in range(n_layers))
        self.demux_linear = nn.Linear(2 * d_model, d_model)
        self.demux_norm = nn.LayerNorm(d_model)

    def prefix(self) -> Tensor:
        """[N, N + 1, d]: row i is instance i's prefix (index embedding at i, filler elsewhere, CLS last)."""
        N, d = self.num_instances, self.d_model
        eye = torch.eye(N, dtype=self.index_embedding.dtype, device=self.index_embedding.device)[:, :, None]
        body = eye * self.index_embedding[:, None, :] + (1 - eye) * self.filler_embedding
        return torch.cat([body, self.cls_embedding.expand(N, 1, d)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"fastcore_ai.nn.DataMUXEncoder: x must be [B·N, L, d_model = {self.d_model}], got {tuple(x.shape)}"
            )
        R, L, d = x.shape
        N = self.num_instances
        B = -(-R // N)
        pad = B * N - R
        instance_mask = torch.ones(B * N, 1, 1, dtype=x.dtype, device=x.device)
        if pad:
            x = torch.cat([x, x.new_zeros(pad, L, d)], dim=0)
            instance_mask[R:] = 0  # padded instances: nothing of them (prefix included) enters the mux
        prefixed = torch.cat([self.prefix().to(x.dtype).repeat(B, 1, 1), x], dim=1) * instance_mask  # [B·N, L', d]
        aux = _aux_backend(self.backend)
        h = ops.mux(prefixed, self.mux_keys.to(x.dtype), self.mux_mode, num_instances=N, backend=aux)  # [B, L', d]
        for layer in self.layers:
            h = layer(h)
        out = ops.demux(
            h[:, N + 1 :],
            h[:, :N],
            self.demux_linear.weight,
            self.demux_linear.bias,
            self.demux_norm.weight,
            self.demux_norm.bias,
            eps=self.demux_norm.eps,
            backend=aux,
        )
        return out[:R]

    def extra_repr(self) -> str:
        return f"num_instances={self.num_instances}, d_model={self.d_model}, mux={self.mux_mode!r}, demux='index'"

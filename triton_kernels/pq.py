"""Triton ADC scan with partial top-k (the `triton` backend of fastcore_ai.ops.pq_search).

One program per (query, block of BLOCK code rows): dist[r] = Σ_m lut[q, m, code[r, m]] in float32,
summed in m order like the CPU kernel. The partial top-k of the block is exact under the library's
(key, id) order: the key (dist, or −dist for ip) is mapped to an order-preserving int32, packed with
the row number into one int64 (key in the high half, row in the low half) and the block is sorted;
its first K entries are written to [nq, blocks, K]. The final merge sorts those candidates the same
way (torch), so ties go to the lower id exactly as on the other backends.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _adc_partial_topk_kernel(
    lut_ptr,
    codes_ptr,
    out_ptr,
    n,
    nblocks,
    ksub,
    M: tl.constexpr,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    IP: tl.constexpr,
):
    q = tl.program_id(0)
    b = tl.program_id(1)
    rows = b * BLOCK + tl.arange(0, BLOCK)
    valid = rows < n
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    lut_q = lut_ptr + q.to(tl.int64) * M * ksub
    for m in range(M):
        code = tl.load(codes_ptr + rows64 * M + m, mask=valid, other=0).to(tl.int32)
        acc += tl.load(lut_q + m * ksub + code, mask=valid, other=0.0)
    key = -acc if IP else acc
    key = tl.where(valid, key, float("inf"))
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    packed = (ordered.to(tl.int64) << 32) | rows64
    packed = tl.sort(packed)
    slot = tl.arange(0, BLOCK)
    tl.store(out_ptr + (q.to(tl.int64) * nblocks + b) * K + slot, packed, mask=slot < K)


def _unpack(packed: Tensor) -> Tuple[Tensor, Tensor]:
    ordered = (packed >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), packed & 0xFFFFFFFF


def adc_search(lut: Tensor, codes: Tensor, k: int, metric: str) -> Tuple[Tensor, Tensor]:
    """lut [nq, M, ksub] float32, codes [n, M] uint8 -> (dist [nq, k] float32, ids [nq, k] int64)."""
    nq, M, ksub = lut.shape
    n = codes.shape[0]
    ip = metric == "ip"
    pad = float("-inf") if ip else float("inf")
    if nq == 0 or n == 0:
        return (
            torch.full((nq, k), pad, dtype=torch.float32, device=lut.device),
            torch.full((nq, k), -1, dtype=torch.int64, device=lut.device),
        )
    if n >= 2**31:
        raise ValueError("fastcore_ai.ops.pq_search: the triton backend takes n < 2^31 codes")
    block = max(128, triton.next_power_of_2(k))
    nblocks = triton.cdiv(n, block)
    partial = torch.empty((nq, nblocks, k), dtype=torch.int64, device=lut.device)
    _adc_partial_topk_kernel[(nq, nblocks)](
        lut.contiguous(), codes.contiguous(), partial, n, nblocks, ksub, M=M, K=k, BLOCK=block, IP=ip
    )
    merged, _ = torch.sort(partial.reshape(nq, nblocks * k), dim=1)
    key, rows = _unpack(merged[:, :k])
    valid = rows < n
    dist = torch.where(valid, -key if ip else key, torch.full_like(key, pad))
    return dist, torch.where(valid, rows, torch.full_like(rows, -1))

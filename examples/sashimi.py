"""A small SaShiMi (Goel et al. 2022) on fastcore_ai's S4 layers: autoregressive audio generation with
the recurrent path, timed against re-running the convolutional model on the growing prefix.

Architecture (the non-U-Net autoregressive SaShiMi): 256-way µ-law sample embedding → tiers of width
H, 2H, 4H at lengths L, L/4, L/16 (DownPool: reshape 4 steps into one, linear to 2× width). The centre
runs S4 blocks; each outer tier adds the up-pooled inner output (linear to 4 steps of the outer width,
shifted right by one pooled step so that output time t only sees inputs < t's pooled period: causal)
to its own input and runs its S4 blocks; a linear head predicts the next sample's class.

Recurrent generation: every tier keeps its S4 states, a buffer of the last `pool` inputs (DownPool) and
the `pool` pending outputs of its UpPool; a tier-k block steps once every 4^k samples.

    python examples/sashimi.py --samples 2048 --d-model 32 --layers 2
"""

from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch
from torch import nn

from fastcore_ai.nn import S4Block


class Tier(nn.Module):
    def __init__(self, width: int, pools: List[int], layers: int, d_state: int, mode: str, l_max: Optional[int]):
        super().__init__()
        self.width, self.pool = width, (pools[0] if pools else None)
        self.blocks = nn.ModuleList([S4Block(width, d_state, l_max=l_max, mode=mode) for _ in range(layers)])
        if pools:
            p = pools[0]
            self.down = nn.Linear(width * p, 2 * width)  # DownPool: p steps -> one, width x2
            self.inner = Tier(2 * width, pools[1:], layers, d_state, mode, None if l_max is None else l_max // p)
            self.up = nn.Linear(2 * width, width * p)  # UpPool: one step -> p steps
        else:
            self.inner = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, W], L a multiple of the pools' product
        if self.inner is not None:
            B, L, W = x.shape
            p = self.pool
            pooled = self.down(x.reshape(B, L // p, p * W))
            inner = self.up(self.inner(pooled))  # [B, L/p, p·W]
            inner = torch.cat([torch.zeros_like(inner[:, :1]), inner[:, :-1]], dim=1)  # causal shift
            x = x + inner.reshape(B, L, W)
        for block in self.blocks:
            x = block(x)
        return x

    # ---- recurrent mode
    def setup_step(self, batch: int) -> None:
        for block in self.blocks:
            block.setup_step()
        self.states = [block.default_state(batch) for block in self.blocks]
        self.count = 0
        if self.inner is not None:
            self.inner.setup_step(batch)
            self.buffer: List[torch.Tensor] = []
            self.pending = torch.zeros(batch, self.pool, self.width, device=self.up.weight.device)

    def step(self, x: torch.Tensor) -> torch.Tensor:  # x [B, W] -> y [B, W]
        phase = self.count % self.pool if self.inner is not None else 0
        h = x
        if self.inner is not None:
            self.buffer.append(x)
            h = x + self.pending[:, phase]
        for i, block in enumerate(self.blocks):
            h, self.states[i] = block.step(h, self.states[i])
        if self.inner is not None and phase == self.pool - 1:  # a pooled step is complete: run the inner tier
            pooled = self.down(torch.cat(self.buffer, dim=-1))
            self.buffer = []
            self.pending = self.up(self.inner.step(pooled)).view(x.shape[0], self.pool, self.width)
        self.count += 1
        return h


class SaShiMi(nn.Module):
    def __init__(
        self,
        d_model: int = 32,
        layers: int = 2,
        pools=(4, 4),
        d_state: int = 16,
        mode: str = "s4d",
        l_max: Optional[int] = None,
        classes: int = 256,
    ):
        super().__init__()
        self.embed = nn.Embedding(classes, d_model)
        self.body = Tier(d_model, list(pools), layers, d_state, mode, l_max)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)
        self.period = 1
        for p in pools:
            self.period *= p

    def forward(self, samples: torch.Tensor) -> torch.Tensor:  # [B, L] int64 -> logits [B, L, classes]
        B, L = samples.shape
        padded = -(-L // self.period) * self.period
        x = self.embed(torch.nn.functional.pad(samples, (0, padded - L)))
        return self.head(self.norm(self.body(x)))[:, :L]

    def setup_step(self, batch: int) -> None:
        self.body.setup_step(batch)

    def step(self, sample: torch.Tensor) -> torch.Tensor:  # [B] -> logits [B, classes]
        return self.head(self.norm(self.body.step(self.embed(sample))))


@torch.no_grad()
def generate_recurrent(model: SaShiMi, first: torch.Tensor, count: int):
    model.setup_step(first.shape[0])
    sample, out, logits = first, [first], []
    for _ in range(count - 1):
        step_logits = model.step(sample)
        logits.append(step_logits)
        sample = step_logits.argmax(-1)  # greedy: deterministic, so both paths must agree
        out.append(sample)
    return torch.stack(out, 1), torch.stack(logits, 1)


@torch.no_grad()
def generate_convolution(model: SaShiMi, first: torch.Tensor, count: int):
    samples, logits = first[:, None], []
    for _ in range(count - 1):
        step_logits = model(samples)[:, -1]
        logits.append(step_logits)
        samples = torch.cat([samples, step_logits.argmax(-1)[:, None]], dim=1)
    return samples, torch.stack(logits, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--mode", choices=("s4d", "s4"), default="s4d")
    parser.add_argument(
        "--conv-samples",
        type=int,
        default=None,
        help="samples for the (quadratic) convolution re-run (default: min(samples, 256))",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    l_max = None
    if args.mode == "s4":  # S4's kernel is tied to l_max: the padded generation length
        l_max = -(-args.samples // 16) * 16
    model = SaShiMi(args.d_model, args.layers, (4, 4), args.d_state, args.mode, l_max).eval()
    first = torch.randint(0, 256, (args.batch,))
    start = time.perf_counter()
    samples, rec_logits = generate_recurrent(model, first, args.samples)
    recurrent_s = time.perf_counter() - start
    conv_count = args.conv_samples or min(args.samples, 256)
    start = time.perf_counter()
    conv_samples, conv_logits = generate_convolution(model, first, conv_count)
    conv_s = time.perf_counter() - start
    agree = rec_logits[:, : conv_count - 1]
    error = float((agree - conv_logits).norm() / conv_logits.norm())
    result = {
        "recurrent_samples_per_s": args.batch * (args.samples - 1) / recurrent_s,
        "convolution_samples_per_s": args.batch * (conv_count - 1) / conv_s,
        "logits_rel_error": error,
        "same_samples": bool(torch.equal(samples[:, :conv_count], conv_samples)),
    }
    print(f"recurrent generation:  {result['recurrent_samples_per_s']:.1f} samples/s ({args.samples} samples)")
    print(f"convolution re-run:    {result['convolution_samples_per_s']:.1f} samples/s ({conv_count} samples)")
    print(
        f"recurrent vs convolutional logits: relative error {error:.2e}, same greedy samples: {result['same_samples']}"
    )
    return result


if __name__ == "__main__":
    main()

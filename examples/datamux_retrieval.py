"""DataMUX's retrieval warm-up task, small, on the CPU: recover every instance's tokens from one
multiplexed representation, for N ∈ {1, 2, 5, 10}, and print token accuracy and inference throughput.

Each instance is a random token sequence (vocabulary V, length L). Tokens are embedded (+ learned
positions), N instances are multiplexed into one sequence by fastcore_ai.nn.DataMUXEncoder (index
prefix -> Hadamard mux -> Transformer layers with the fused attention -> index demux), and a linear head
predicts every instance's token at every position (DataMUX's retrieval objective, all instances at once).

    python examples/datamux_retrieval.py                 # the table, a few minutes on 2 cores
    python examples/datamux_retrieval.py --tiny          # seconds (used by the test)
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import torch
from torch import nn

from fastcore_ai.nn import DataMUXEncoder


class RetrievalModel(nn.Module):
    def __init__(self, n: int, vocab: int, length: int, d_model: int, heads: int, layers: int, backend: str):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.encoder = DataMUXEncoder(
            n, d_model, heads, layers, 4 * d_model, key_norm=float(d_model) ** 0.5, backend=backend
        )
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B·N, L] -> logits [B·N, L, V]
        return self.head(self.encoder(self.tokens(ids) + self.positions))


def run(n: int, args) -> Dict[str, float]:
    torch.manual_seed(n)
    model = RetrievalModel(n, args.vocab, args.length, args.d_model, args.heads, args.layers, args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batch = args.muxed_batch * n  # instances per step
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (batch, args.length))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        ids = torch.randint(
            0, args.vocab, (args.eval_instances, args.length), generator=torch.Generator().manual_seed(7)
        )
        accuracy = (model(ids).argmax(-1) == ids).float().mean().item()
        model(ids[: 2 * n])  # warm-up
        start = time.perf_counter()
        for _ in range(args.repeats):
            model(ids)
        elapsed = (time.perf_counter() - start) / args.repeats
    return {"N": n, "accuracy": accuracy, "instances_per_s": args.eval_instances / elapsed, "loss": loss.item()}


def main(argv: List[str] = None) -> List[Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--muxed-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-instances", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a few steps at a tiny size (smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.ns, args.d_model, args.layers, args.steps, args.eval_instances, args.repeats = [1, 2], 16, 1, 3, 20, 1
    results = [run(n, args) for n in args.ns]
    base = results[0]["instances_per_s"]
    print("| N | token accuracy | instances/s | throughput vs N=%d |" % results[0]["N"])
    print("|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['N']} | {r['accuracy']:.3f} | {r['instances_per_s']:.0f} | {r['instances_per_s'] / base:.2f}x |")
    return results


if __name__ == "__main__":
    main()

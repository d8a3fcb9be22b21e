"""How much of a Hugging Face model's forward is attention, and how fast each implementation runs it
inside the model (not in isolation): the attention function HF calls is wrapped with a timer, the model
run with attn_implementation "fastcore_ai" and "sdpa" alternately, and the time spent inside attention
summed per forward. The median of rounds 2..N is printed per model.

    python benchmarks/hf_attention_share.py [--rounds 5] [--threads 2]

Why: a whole-model table (`bench --family hf_attention`) compares end-to-end times where attention is a
few percent of the work, so its ratios sit inside the GEMMs' run-to-run noise; this measures the part an
attention kernel can change, and the model time it sits in, in the same run.
"""

import argparse
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastcore_ai.bench import hf_models
from fastcore_ai.integrations import transformers as fastcore_hf

inside = {"seconds": 0.0}


def timed(attention):
    def run(*args, **kwargs):
        begin = time.perf_counter()
        result = attention(*args, **kwargs)
        inside["seconds"] += time.perf_counter() - begin
        return result

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the tiny models (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_models._register()
    implementations = {"fastcore_ai": fastcore_hf.attention_forward, "sdpa": sdpa_attention_forward}
    for name, attention in implementations.items():
        ALL_ATTENTION_FUNCTIONS.register(f"timed_{name}", timed(attention))
        ALL_MASK_ATTENTION_FUNCTIONS.register(f"timed_{name}", sdpa_mask)
    print(f"{args.threads} threads, torch {torch.__version__}, median of rounds 2..{args.rounds}\n")
    print("| model (forward, float32) | attention | in attention ms | model ms | attention share |")
    print("|---|---|---:|---:|---:|")
    for label, build, batch, length, padded, side in hf_models.forward_shapes(args.quick):
        label = f"{label} B={batch} L={length} {int(padded * 100)}% {side}-padded"
        torch.manual_seed(0)
        model, vocab = build(args.quick)
        ids, mask = hf_models._padded_batch(batch, length, vocab, padded, side)
        samples = {name: [] for name in implementations}
        with torch.no_grad():
            for round_ in range(args.rounds):
                for name in implementations:
                    model.set_attn_implementation(f"timed_{name}")
                    inside["seconds"] = 0.0
                    begin = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask)
                    total = time.perf_counter() - begin
                    if round_:
                        samples[name].append((inside["seconds"] * 1e3, total * 1e3))
        for name, values in samples.items():
            attention_ms = statistics.median(v[0] for v in values)
            model_ms = statistics.median(v[1] for v in values)
            print(f"| {label} | {name} | {attention_ms:.1f} | {model_ms:.1f} | {100 * attention_ms / model_ms:.1f}% |")


if __name__ == "__main__":
    main()

"""Per-call time (µs, median of 7 rounds of 2000 calls) of public ops on tiny inputs vs the torch code a user writes."""

import statistics
import time

import torch
import fastcore_ai
from fastcore_ai import ops

print("fastcore_ai from", fastcore_ai.__file__)
torch.set_num_threads(2)


def per_call(fn, n=2000, rounds=7):
    for _ in range(200):
        fn()
    out = []
    for _ in range(rounds):
        s = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - s) / n * 1e6)
    return statistics.median(out)


x = torch.randn(4, 8)
q = torch.randn(1, 1, 4, 8)
qd, kd = torch.randn(1, 8, 1, 64), torch.randn(1, 8, 256, 64)
u, k, D = torch.randn(1, 4, 64), torch.randn(4, 64), torch.randn(4)
c = torch.complex64
st, us, dA, dB, C, Dd = (
    torch.randn(1, 4, 8, dtype=c),
    torch.randn(1, 4),
    0.9 * torch.randn(4, 8, dtype=c),
    torch.randn(4, 8, dtype=c),
    torch.randn(4, 8, dtype=c),
    torch.randn(4),
)
sdpa = torch.nn.functional.scaled_dot_product_attention


def fft(u, k, D):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]] + u * D[:, None]


rows = [
    (
        "moe_topk_route [4,8] k=2",
        lambda: ops.moe_topk_route(x, 2),
        "torch.topk(softmax)",
        lambda: torch.topk(torch.softmax(x, -1), 2),
    ),
    ("attention [1,1,4,8]", lambda: ops.attention(q, q, q), "sdpa", lambda: sdpa(q, q, q)),
    ("attention decode [1,8,1,64] x 256", lambda: ops.attention(qd, kd, kd), "sdpa", lambda: sdpa(qd, kd, kd)),
    ("fft_conv (1,4,64)", lambda: ops.fft_conv(u, k, D), "torch.fft", lambda: fft(u, k, D)),
    ("ssm_step B1 H4 N8", lambda: ops.ssm_step(st, us, dA, dB, C, Dd), "torch", lambda: dA * st + dB * us[..., None]),
]
for name, ours, peer_name, peer in rows:
    a, b = per_call(ours), per_call(peer)
    print(f"| {name} | {a:.1f} | {b:.1f} ({peer_name}) | {b / a:.2f}x |")

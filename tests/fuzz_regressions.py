"""Every failure tests/test_fuzz_ops.py found, as a fixed input run through the same property
(test_fuzz_regression). Each entry: the op, a name saying what went wrong, a builder of the call's
arguments, and optionally an extra expectation (the fixed behaviour, where the property alone would also
accept another outcome, e.g. a named error where an empty result is the rule)."""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import pytest
import torch

from fastcore_ai import ops
from fastcore_ai.reference import pq as ref_pq


@dataclass(frozen=True)
class Regression:
    op: str
    name: str
    build: Callable[[], Dict[str, Any]]
    expect: Optional[Callable[[Dict[str, Any]], None]] = None


def _fft_conv_case(B, H, L, Lk):
    return lambda: dict(u=torch.randn(B, H, L), k=torch.randn(H, Lk), D=torch.randn(H))


def _empty_on_every_backend(a):
    for backend in ("cpu", "reference"):
        y = ops.fft_conv(a["u"], a["k"], a["D"], backend=backend)
        assert y.shape == a["u"].shape, f"fft_conv on {backend}: shape {tuple(y.shape)}"


def _raises(op, **kwargs):
    def expect(a):
        with pytest.raises(ValueError, match=rf"fastcore_ai\.ops\.{op}: "):
            getattr(ops, op)(**a, **kwargs)

    return expect


def _ivf4_case(packed_pairs=None, list_blocks_step=1):
    def build():
        codes = torch.randint(0, 16, (40, 3), dtype=torch.uint8)
        packed, list_blocks, sizes, row_ids = ops.pq4_pack_lists(codes, torch.randint(0, 5, (40,)), torch.arange(40), 5)
        if packed_pairs is not None:
            packed = packed[:, :packed_pairs]
        if list_blocks_step != 1:
            spread = torch.zeros(list_blocks.shape[0] * list_blocks_step, dtype=torch.int64)
            list_blocks = spread[::list_blocks_step].copy_(list_blocks)
            list_blocks[2] = list_blocks[3] + 1  # not rising
        args = dict(queries=torch.randn(2, 27), probes=torch.tensor([[0, 1], [4, -1]]), packed=packed)
        args.update(list_blocks=list_blocks, list_sizes=sizes, row_ids=row_ids, codebooks=torch.randn(3, 16, 9))
        return dict(args, k=33, metric="ip")

    return build


def _pq4_rerank_no_queries():
    packed = ref_pq.pq4_pack(torch.zeros(0, 4, dtype=torch.uint8))
    args = dict(queries=torch.randn(0, 20), packed=packed, n=0, codebooks=torch.randn(4, 16, 5), k=9, metric="ip")
    return dict(args, k_factor=2, rerank_vectors=torch.randn(0, 20))


def _empty_search_result(a):
    for backend in ("cpu", "reference"):
        d, i = ops.pq4_search(**a, backend=backend)
        assert d.shape == (0, a["k"]) and i.shape == (0, a["k"]), f"pq4_search on {backend}"


def _pq_train_case(**overrides):
    return lambda: dict(dict(x=torch.randn(33, 4), M=2, nbits=4, niter=2, seed=0, constrained=False), **overrides)


REGRESSIONS = [
    Regression("fft_conv", "empty-batch-reference-raw-mkl-error", _fft_conv_case(0, 2, 5, 3), _empty_on_every_backend),
    Regression(
        "fft_conv", "zero-length-cpu-error-reference-empty", _fft_conv_case(1, 2, 0, 1), _empty_on_every_backend
    ),
    Regression("fft_conv", "zero-length-long-kernel", _fft_conv_case(1, 2, 0, 4), _empty_on_every_backend),
    Regression("fft_conv", "no-channels", _fft_conv_case(3, 0, 5, 2), _empty_on_every_backend),
    Regression("fft_conv_size", "negative-length-accepted", lambda: dict(L=-1, Lk=2), _raises("fft_conv_size")),
    Regression("fft_conv_size", "kernel-longer-than-input", lambda: dict(L=3, Lk=10), _raises("fft_conv_size")),
    Regression("fft_conv_size", "zero-length-kernel", lambda: dict(L=5, Lk=0), _raises("fft_conv_size")),
    Regression(
        "switch_load_balancing_loss",
        "mismatched-lengths-raw-torch-error",
        lambda: dict(tokens_per_expert=torch.arange(8), mean_prob=torch.full((9,), 1 / 9)),
        _raises("switch_load_balancing_loss"),
    ),
    Regression(
        "switch_load_balancing_loss",
        "two-dimensional-counts",
        lambda: dict(tokens_per_expert=torch.ones(2, 4, dtype=torch.int64), mean_prob=torch.full((4,), 0.25)),
    ),
    Regression("ivfpq4_search", "packed-pairs-mismatch-reference-indexerror", _ivf4_case(packed_pairs=1)),
    Regression("ivfpq4_search", "list-blocks-not-rising-strided", _ivf4_case(list_blocks_step=2)),
    Regression("pq4_search", "rerank-with-no-queries-reshape-error", _pq4_rerank_no_queries, _empty_search_result),
    Regression("pq_train", "huge-niter-unchecked-on-batched-cpu", _pq_train_case(niter=2**31), _raises("pq_train")),
    Regression("pq_train", "negative-seed-named-kmeans", _pq_train_case(seed=-1), _raises("pq_train")),
    Regression("pq_train", "constrained-not-a-bool", _pq_train_case(constrained=2)),
]

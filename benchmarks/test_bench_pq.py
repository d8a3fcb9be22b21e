"""pq benchmarks (pytest-benchmark): fastcore_ai's PQ indexes against FAISS (faiss-cpu) on the same
clustered synthetic data, one provider per parametrisation (compare rows of one run,
`--benchmark-group-by=group`). The full matrix with recall lives in `python -m fastcore_ai bench --family pq`."""

import pytest
import torch

import faiss  # a test dependency: an error, not a skip, when missing

from fastcore_ai.bench.pq import _built  # noqa: E402

D, NT, NB, NQ = 64, 20000, 50000, 200
CONFIGS = [("flat", 16, 8, 0, None), ("flat", 16, 4, 0, None), ("ivf", 16, 4, 64, 8), ("ivf", 16, 8, 64, 8)]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c[0]}-M{c[1]}-{c[2]}bit" + (f"-nprobe{c[4]}" if c[4] else "")
)
@pytest.mark.parametrize("provider", ["fastcore", "faiss"])
def test_pq_search_cpu(benchmark, provider, config):
    kind, M, nbits, nlist, nprobe = config
    name, ours, theirs, xq, gt = _built(kind, M, nbits, nlist, D, NT, NB, NQ, "l2")
    benchmark.group = f"{name} nb={NB} nq={NQ} k=10" + (f" nprobe={nprobe}" if nprobe else "")
    if provider == "fastcore":
        out = benchmark(lambda: ours.search(xq, 10, nprobe=nprobe)[1])
    else:
        faiss.omp_set_num_threads(torch.get_num_threads())
        if nprobe:
            faiss.extract_index_ivf(theirs).nprobe = nprobe
        out = torch.from_numpy(benchmark(lambda: theirs.search(xq.numpy(), 10)[1]))
    assert out.shape == (NQ, 10) and (out >= 0).all()

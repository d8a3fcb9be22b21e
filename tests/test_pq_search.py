"""fastcore_ai.search: PQIndex / IVFPQIndex (train, add, search, remove_ids, reconstruct, len, numpy
inputs, save/load and every corrupted-file case) and ShardedPQIndex over 2 gloo processes."""

import os
import struct

import numpy as np
import pytest
import torch

from _gloo import run_gloo_workers
from fastcore_ai import ops
from fastcore_ai.reference import pq as ref
from fastcore_ai.search import IndexFileError, IVFPQIndex, PQIndex, ShardedPQIndex, load_index


def _clustered(n, d, centers=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    return c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def data():
    return _clustered(3000, 32, seed=1), _clustered(25, 32, seed=2)


@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_pq_index_search_equals_ops(data, nbits, metric):
    x, q = data
    index = PQIndex(32, 8, nbits, metric).train(x[:2000], niter=4)
    index.add(x[:1500])
    index.add(x[1500:].numpy())  # numpy input
    assert len(index) == index.len() == 3000
    d, i = index.search(q, 10)
    codes = ops.pq_encode(x, index.codebooks)
    if nbits == 8:
        ed, ei = ops.pq_search(q, codes, index.codebooks, 10, metric)
    else:
        ed, ei = ops.pq4_search(q, ops.pq4_pack(codes), 3000, index.codebooks, 10, metric)
    assert torch.equal(i, ei) and torch.equal(d, ed)


def test_recall_sanity_on_clustered_data(data):
    """Queries are database vectors plus small noise, so the true nearest neighbour stands out; every
    index must put it in its top 10 for > 90 % of the queries (1-R@10)."""
    x, _ = data
    q = x[:40] + 0.05 * torch.randn(40, 32)
    gt = ref.topk_with_ties(torch.cdist(q.double(), x.double()) ** 2, 10)[1]
    for index, kwargs in (
        (PQIndex(32, 8, 8), {}),
        (IVFPQIndex(32, 16, 8, 8), {"nprobe": 4}),
        (PQIndex(32, 16, 4), {"refine": 10}),
        (IVFPQIndex(32, 16, 16, 4, by_residual=False), {"nprobe": 4}),
    ):
        index.train(x, niter=4)
        index.add(x)
        _, i = index.search(q, 10, **kwargs)
        recall_at_10 = (i[:, :10] == gt[:, :1]).any(1).float().mean()
        assert recall_at_10 > 0.9, type(index).__name__


@pytest.mark.parametrize("coarse_niter", [0, 1])
def test_ivfpq_coarse_iterations_are_their_own(data, coarse_niter):
    # the coarse quantizer runs coarse_niter Lloyd iterations (FAISS's IndexIVF default is 10), independent of
    # the PQ codebooks' niter
    x, _ = data
    index = IVFPQIndex(32, 8, 8, 8).train(x, niter=2, seed=5, coarse_niter=coarse_niter)
    assert torch.equal(index.coarse, ops.kmeans(x, 8, niter=coarse_niter, seed=5))
    assert not torch.equal(index.coarse, ops.kmeans(x, 8, niter=coarse_niter + 2, seed=5))


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("by_residual", [True, False])
@pytest.mark.parametrize("nprobe", [1, 3])
def test_ivfpq_matches_reference_scan(data, metric, by_residual, nprobe):
    # nprobe = 1 takes the fused nearest-list kernel, more the native selection over the coarse scores
    x, q = data
    index = IVFPQIndex(32, 8, 8, 8, metric, by_residual).train(x, niter=4)
    index.add(x, ids=torch.arange(3000) * 3 + 7)
    d, i = index.search(q, 20, nprobe=nprobe)
    scores = index._coarse_scores(q, index.coarse)
    probes = torch.topk(scores, nprobe, dim=1).indices.contiguous()
    codes, ids, offsets = index._lists()
    rd, ri = ops.ivfpq_search(
        q, index.coarse, probes, codes, offsets, ids, index.codebooks, 20, metric, by_residual, backend="reference"
    )
    assert torch.allclose(d, rd, rtol=1e-4, atol=1e-3)
    assert (i == ri).float().mean() > 0.97
    # nprobe = nlist scans everything: same as exhaustive over the reconstructions
    d_all, i_all = index.search(q, 5, nprobe=8)
    recon = index.reconstruct(torch.arange(3000) * 3 + 7).double()
    dist_all = ((recon[None] - q.double()[:, None]) ** 2).sum(-1) if metric == "l2" else q.double() @ recon.T
    ed, ei = ref.topk_with_ties(dist_all, 5, metric, torch.arange(3000) * 3 + 7)
    assert torch.allclose(d_all.double(), ed, rtol=1e-4, atol=1e-3)


def test_k_greater_than_n_and_empty(data):
    x, q = data
    index = PQIndex(32, 8, 8).train(x, niter=2)
    d, i = index.search(q, 4)
    assert (i == -1).all() and torch.isinf(d).all()
    index.add(x[:3])
    d, i = index.search(q[:2], 5)
    assert (i[:, 3:] == -1).all() and (i[:, :3] >= 0).all()
    d, i = index.search(q[:0], 5)
    assert d.shape == (0, 5)


def test_remove_and_reconstruct(data):
    x, _ = data
    for index in (PQIndex(32, 8, 8), IVFPQIndex(32, 4, 8, 8)):
        index.train(x, niter=2)
        index.add(x[:100], ids=np.arange(100, 200))
        assert index.remove_ids([150, 151, 999]) == 2 and len(index) == 98
        r = index.reconstruct([100, 199])
        assert r.shape == (2, 32)
        assert ((r - x[[0, 99]]).norm(dim=1) < x[[0, 99]].norm(dim=1)).all()
        with pytest.raises(KeyError):
            index.reconstruct([150])
        _, i = index.search(x[50:51], 98)
        assert 150 not in i.tolist()[0] and 151 not in i.tolist()[0]


def test_errors():
    with pytest.raises(ValueError, match="d must be divisible by M"):
        PQIndex(30, 8)
    with pytest.raises(ValueError, match="nbits must be 4 or 8"):
        PQIndex(32, 8, 6)
    index = PQIndex(32, 8)
    with pytest.raises(RuntimeError, match="untrained"):
        index.search(torch.randn(2, 32), 1)
    with pytest.raises(RuntimeError, match="untrained"):
        index.add(torch.randn(2, 32))
    index.train(torch.randn(300, 32), niter=1)
    with pytest.raises(ValueError, match=r"ids must have shape \[n\]"):
        index.add(torch.randn(5, 32), ids=torch.arange(4))
    with pytest.raises(ValueError, match="shape"):
        index.search(torch.randn(2, 31), 1)


@pytest.mark.parametrize("kind", ["pq", "ivfpq"])
def test_add_rejects_duplicate_ids_and_non_finite_vectors(data, kind):
    """Duplicate ids (within one add, or already in the index) and NaN/inf vectors used to be accepted
    silently: a search could then return one id for two vectors, or garbage codes for a NaN row."""
    x, _ = data
    index = PQIndex(32, 8) if kind == "pq" else IVFPQIndex(32, 8, 8)
    index.train(x[:1000], niter=2) if kind == "pq" else index.train(x[:1000], niter=2, coarse_niter=2)
    index.add(x[:10], ids=torch.arange(100, 110))
    with pytest.raises(ValueError, match=r"search\.\w+Index: add: ids must be unique"):
        index.add(x[10:13], ids=torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match="add: id 105 is already in the index"):
        index.add(x[10:13], ids=torch.tensor([3, 105, 4]))
    bad = x[10:14].clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"x must be finite: 1 row\(s\) hold NaN or inf \(first: row 2\)"):
        index.add(bad, ids=torch.arange(200, 204))
    bad[2, 5] = float("inf")
    with pytest.raises(ValueError, match="x must be finite"):
        index.add(bad)
    with pytest.raises(ValueError, match="x must be finite"):
        (PQIndex(32, 8) if kind == "pq" else IVFPQIndex(32, 8, 8)).train(torch.cat([x[:500], bad]))
    assert len(index) == 10  # nothing of a refused add landed
    index.add(x[10:14], ids=torch.arange(200, 204))  # fresh unique ids are fine
    index.add(x[14:16])  # automatic ids continue past the largest id
    assert len(index) == 16 and int(index.ids.max()) == 205


def test_cuda_inputs_warn_once_that_the_index_runs_on_the_cpu(monkeypatch, data):
    """CUDA inputs are copied to the host: loud the first time, not silent (a GPU index is not built yet)."""
    import fastcore_ai.search.index as index_module

    x, q = data
    monkeypatch.setattr(index_module, "_warned_cuda_copy", False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: torch.Tensor.contiguous(self).float())
    with pytest.warns(RuntimeWarning, match="CUDA inputs are copied to the CPU"):
        index_module._as_matrix("PQIndex", "q", q, 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index_module._as_matrix("PQIndex", "q", q, 32)  # once only


def test_save_load_roundtrip_and_corruption(tmp_path, data):
    x, q = data
    for index in (PQIndex(32, 8, 8, "ip"), IVFPQIndex(32, 4, 8, 4, "l2"), PQIndex(32, 8, 4)):
        index.train(x, niter=2)
        index.add(x[:500], ids=torch.arange(500) + 10)
        path = str(tmp_path / "index.fcpq")
        index.save(path)
        loaded = load_index(path)
        assert type(loaded) is type(index) and len(loaded) == 500
        d0, i0 = index.search(q, 7, nprobe=2)
        d1, i1 = loaded.search(q, 7, nprobe=2)
        assert torch.equal(i0, i1) and torch.equal(d0, d1)
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    raw = open(path, "rb").read()

    def corrupt(data_bytes, name):
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            f.write(data_bytes)
        return p

    with pytest.raises(IndexFileError, match="truncated"):
        load_index(corrupt(raw[:-100], "trunc"))
    with pytest.raises(IndexFileError, match="truncated"):
        load_index(corrupt(raw[:10], "short"))
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    with pytest.raises(IndexFileError, match="checksum"):
        load_index(corrupt(bytes(flipped), "flip"))
    with pytest.raises(IndexFileError, match="magic"):
        load_index(corrupt(b"PICKLE!!" + raw[8:], "magic"))
    wrong_version = raw[:8] + struct.pack("<I", 99) + raw[12:]
    with pytest.raises(IndexFileError, match="version 99"):
        load_index(corrupt(wrong_version, "version"))
    with pytest.raises(IndexFileError, match="cannot read"):
        load_index(str(tmp_path / "missing"))
    with pytest.raises(IndexFileError, match="holds a PQIndex"):
        IVFPQIndex.load(path)


# ---- sharded: 2 gloo processes ---------------------------------------------------------------------------


def _shard_worker(rank, world, out_dir):
    x, q = _clustered(2000, 16, seed=3), _clustered(9, 16, seed=4)
    sharded = ShardedPQIndex(PQIndex(16, 4, 8))
    sharded.train(x if rank == 0 else None, niter=3)
    mine = torch.arange(rank, 2000, world)  # interleaved shards
    sharded.add(x[mine], ids=mine)
    d, i = sharded.search(q, 12)
    n = len(sharded)
    if rank == 0:
        torch.save({"d": d, "i": i, "n": n, "codebooks": sharded.local.codebooks}, os.path.join(out_dir, "r0.pt"))


def test_sharded_two_gloo_processes_match_single_index(tmp_path):
    run_gloo_workers(_shard_worker, 2, str(tmp_path))
    got = torch.load(str(tmp_path / "r0.pt"))
    x, q = _clustered(2000, 16, seed=3), _clustered(9, 16, seed=4)
    single = PQIndex(16, 4, 8)
    single.codebooks = got["codebooks"]
    single.add(x)
    d, i = single.search(q, 12)
    assert got["n"] == 2000
    assert torch.equal(got["i"], i) and torch.equal(got["d"], d)

"""Thread safety: every op called from 4 Python threads at once gives bit for bit the results of a
single-threaded run computed first, with the same inputs in every thread and with different ones, also
while torch.set_num_threads changes under the calls; PQIndex / IVFPQIndex searches on one shared index,
and searches overlapping add / remove_ids, see the index before or after each change, never a mixture;
ShardedPQIndex refuses a second thread's collective call instead of mis-pairing it across ranks.

The calls overlap: every thread waits at a threading.Barrier before its first call (with a timeout, so a
deadlock fails the test instead of hanging it). Inputs are built in the main thread (the global RNG is not
shared with the workers). Results are compared by their bytes, so NaN outputs compare equal to themselves.
"""

import threading

import pytest
import torch

from _examples import PUBLIC
from _examples_nerf import _boxes, _grid, _packed
from _examples_s4 import _nodes, _poles, _step_inputs
from _gloo import run_gloo_workers
from fastcore_ai import nn, ops
from fastcore_ai.search import IVFPQIndex, PQIndex, ShardedPQIndex

WORKERS = 4
TIMEOUT_S = 120


def _leaves(out):
    """The tensors of an op's result (tuples, NamedTuples and lists flattened; None and numbers kept)."""
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _leaves(item)]
    return [out]


def _bitwise_equal(a, b) -> bool:
    """Equal results, compared by bytes (NaN == NaN); non-tensor leaves (None, ints) by ==."""
    left, right = _leaves(a), _leaves(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            if x != y:
                return False
            continue
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(_bytes(x), _bytes(y)):
            return False
    return True


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)


def _run_in_threads(jobs, between_calls=None):
    """Run jobs[j]() in thread j, all released together by a barrier; returns their results (a worker's
    exception is raised here). between_calls(j, repetition), if given, runs in thread j before each call."""
    barrier = threading.Barrier(len(jobs), timeout=TIMEOUT_S)
    results, errors = [None] * len(jobs), []

    def work(j):
        try:
            barrier.wait()
            results[j] = jobs[j]()
        except BaseException as error:  # noqa: BLE001 (re-raised in the main thread below)
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(j,), name=f"worker-{j}") for j in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def restore_num_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- cases: (fn, args) built in the main thread ------------------------------------------------------------


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _cauchy(seed):
    torch.manual_seed(seed)
    v, w = _poles(8, 64)
    return (lambda v, z, w: ops.cauchy(v, z, w)), (v, _nodes(1024 + 17 * seed), w)


def _vandermonde(seed):
    torch.manual_seed(seed)
    v, x = _poles(16, 64)
    return (lambda v, x: ops.vandermonde(v, x, 2048 - 31 * seed)), (v, x * 0.01)


def _fft_conv(seed):
    # Each input its own length, so the threads want different cached MKL plans at the same time.
    L = (1000, 2048, 3001, 4096, 1500)[seed % 5]
    g = _g(seed)
    return (lambda u, k, D: ops.fft_conv(u, k, D)), (
        torch.randn(2, 16, L, generator=g),
        torch.randn(16, L, generator=g),
        torch.randn(16, generator=g),
    )


def _ssm_steps(state, u, dA, dB, C, D, inplace):
    """16 steps of a generation loop; the functional loop at this size (128 KiB states) takes its new
    states from the step's shared block cache, the in-place loop writes its own state."""
    ys = []
    if inplace:
        state = state.clone()
    for t in range(16):
        y, state = ops.ssm_step(state, u * (1 + t / 16), dA, dB, C, D, inplace=inplace)
        ys.append(y)
    return torch.stack(ys), state.clone()


def _ssm_step_functional(seed):
    torch.manual_seed(seed)
    return (lambda *a: _ssm_steps(*a, inplace=False)), _step_inputs(B=4, H=64, N=64)


def _ssm_step_inplace(seed):
    torch.manual_seed(seed)
    return (lambda *a: _ssm_steps(*a, inplace=True)), _step_inputs(B=4, H=64, N=64)


def _route(seed):
    g = _g(seed)
    return (lambda logits: tuple(ops.moe_topk_route(logits, 2))), (torch.randn(4096, 64, generator=g),)


def _route_capacity(seed):
    g = _g(seed)
    return (lambda logits: tuple(ops.moe_topk_route(logits, 2, capacity_factor=1.25, priority="batch"))), (
        torch.randn(2048, 16, generator=g),
    )


_SHARED_ROUTER = None


def _router_module(seed):
    """One nn.TopKRouter shared by every thread (modules are shared between serving threads)."""
    global _SHARED_ROUTER
    if _SHARED_ROUTER is None:
        torch.manual_seed(0)
        _SHARED_ROUTER = nn.TopKRouter(64, 32, k=2, capacity_factor=1.0).eval()
    g = _g(seed)

    def route(x):
        with torch.no_grad():
            return tuple(_SHARED_ROUTER(x))

    return route, (torch.randn(8, 256, 64, generator=g),)


def _experts(seed):
    g = _g(seed)
    T, H, I, E = 256, 64, 96, 8
    logits = torch.randn(T, E, generator=g)
    routed = ops.moe_topk_route(logits, 2, capacity_factor=1.0)
    return (lambda *a: ops.moe_experts(*a[:5], kept=a[5])), (
        torch.randn(T, H, generator=g),
        routed.expert_ids,
        routed.weights,
        torch.randn(E, 2 * I, H, generator=g) * 0.1,
        torch.randn(E, H, I, generator=g) * 0.1,
        routed.kept,
    )


def _rays(n, g):
    return torch.rand(n, 3, generator=g) * 3 - 1.5, torch.randn(n, 3, generator=g)


def _aabb(seed):
    o, d = _rays(4096, _g(seed))
    return (lambda o, d, boxes: tuple(ops.ray_aabb_intersect(o, d, boxes))), (o, d, _boxes(torch.float32))


def _march(seed):
    torch.manual_seed(seed)
    grid = _grid(res=16, levels=2)
    o, d = _rays(2048, _g(seed))
    return (lambda o, d: tuple(ops.ray_march(o, d, grid, step_size=0.02, max_samples_per_ray=64))), (o, d)


def _render(seed):
    torch.manual_seed(seed)
    sigmas, rgbs, ts, te, packed = _packed(2048, max_count=24, dtype=torch.float32)
    return (lambda *a: tuple(ops.volume_render(*a, return_weights=True))), (sigmas, rgbs, ts, te, packed)


def _pq_search(seed):
    g = _g(seed)
    codebooks = torch.randn(8, 256, 4, generator=g)
    codes = torch.randint(0, 256, (20000, 8), generator=g, dtype=torch.uint8)
    return (lambda q, codes, cb: tuple(ops.pq_search(q, codes, cb, 10, "l2"))), (
        torch.randn(48, 32, generator=g),
        codes,
        codebooks,
    )


def _attention(seed):
    g = _g(seed)
    q, k, v = (torch.randn(2, 4, 160, 64, generator=g) for _ in range(3))
    return (lambda q, k, v: ops.attention(q, k, v, causal=True)), (q, k, v)


def _attention_lse(seed):
    g = _g(seed)
    q, k, v = (torch.randn(1, 4, L, 32, generator=g) for L in (96, 200, 200))
    padding = torch.zeros(1, 200, dtype=torch.bool)
    padding[0, 150:] = True
    return (lambda q, k, v, p: tuple(ops.attention_with_lse(q, k, v, key_padding_mask=p))), (q, k, v, padding)


def _mux(seed):
    g = _g(seed)
    keys = torch.linalg.qr(torch.randn(3, 64, 64, generator=g))[0]
    return (lambda x, keys: ops.mux(x, keys, "ortho", num_instances=3)), (torch.randn(24, 96, 64, generator=g), keys)


# One representative call per family at sizes that take the ops' threaded and cached paths; the small
# calls of every public op (tests/_examples.py) run as well, below.
CASES = {
    "cauchy": _cauchy,
    "vandermonde": _vandermonde,
    "fft_conv": _fft_conv,
    "ssm_step functional (block cache)": _ssm_step_functional,
    "ssm_step inplace (separate states)": _ssm_step_inplace,
    "moe_topk_route": _route,
    "moe_topk_route capacity": _route_capacity,
    "nn.TopKRouter shared": _router_module,
    "moe_experts": _experts,
    "ray_aabb_intersect": _aabb,
    "ray_march": _march,
    "volume_render": _render,
    "pq_search": _pq_search,
    "attention": _attention,
    "attention_with_lse": _attention_lse,
    "mux": _mux,
}


def _public_case(name):
    def make(seed):
        torch.manual_seed(seed)
        return PUBLIC[name]()

    return make


ALL_CASES = {**CASES, **{f"public {name}": _public_case(name) for name in PUBLIC}}


def _single_threaded(cases):
    """(fn, args, expected) per input, each expected result checked to repeat exactly first."""
    prepared = []
    for make in cases:
        fn, args = make()
        expected = fn(*args)
        assert _bitwise_equal(fn(*args), expected), "not deterministic even in one thread"
        prepared.append((fn, args, expected))
    return prepared


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_ops_from_four_threads_match_one_thread(name):
    make = ALL_CASES[name]
    different = _single_threaded([lambda s=seed: make(s) for seed in range(WORKERS)])
    same = [different[0]] * WORKERS
    for prepared in (same, different):
        jobs = [lambda fn=fn, args=args: [fn(*args) for _ in range(2)] for fn, args, _ in prepared]
        for (_, _, expected), results in zip(prepared, _run_in_threads(jobs)):
            assert all(_bitwise_equal(result, expected) for result in results), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_ops_while_the_thread_count_changes(name, restore_num_threads):
    """torch.set_num_threads changes mid-run, from the workers between their calls and from a fifth thread
    throughout: the results stay those of the single-threaded run (computed at the default count)."""
    make = CASES[name]
    prepared = _single_threaded([lambda s=seed: make(s) for seed in range(WORKERS)])
    stop = threading.Event()

    def toggler():
        count = 1
        while not stop.wait(0.0002):  # a short pause: a bare spin would starve the workers of the 2 cores
            torch.set_num_threads(count)
            count = 3 - count

    def calls(j, fn, args):
        out = []
        for repetition in range(3):
            torch.set_num_threads(1 + (j + repetition) % 2)
            out.append(fn(*args))
        return out

    background = threading.Thread(target=toggler, name="toggler")
    background.start()
    try:
        jobs = [lambda j=j, fn=fn, args=args: calls(j, fn, args) for j, (fn, args, _) in enumerate(prepared)]
        results = _run_in_threads(jobs)
    finally:
        stop.set()
        background.join(TIMEOUT_S)
    for (_, _, expected), outs in zip(prepared, results):
        assert all(_bitwise_equal(out, expected) for out in outs), name


# ---- indexes -----------------------------------------------------------------------------------------------


def _points(n, d, seed):
    g = _g(seed)
    centers = torch.randn(16, d, generator=g) * 3
    return centers[torch.randint(0, 16, (n,), generator=g)] + torch.randn(n, d, generator=g)


INDEXES = {
    "pq8": lambda: PQIndex(32, 8, 8, "l2"),
    "pq4": lambda: PQIndex(32, 8, 4, "ip"),
    "ivf8": lambda: IVFPQIndex(32, 8, 8, 8, "l2"),
    "ivf4 fast-scan": lambda: IVFPQIndex(32, 8, 8, 4, "ip", by_residual=False),
}


def _trained(kind):
    index = INDEXES[kind]()
    extra = {"coarse_niter": 3} if isinstance(index, IVFPQIndex) else {}
    return index.train(_points(2000, 32, seed=1), niter=3, **extra)


def _search(index, q):
    return index.search(q, 10, nprobe=3, refine=4)


@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_index_search_shared_by_four_threads(kind):
    index = _trained(kind)
    index.add(_points(3000, 32, seed=2))
    queries = [_points(20, 32, seed=10 + j) for j in range(WORKERS)]
    index.search(queries[0], 1)  # builds the lists / packing once, which the next add invalidates
    index.add(_points(500, 32, seed=3))  # invalidates the lists / packing: the threads race to rebuild them
    expected = [_search(_copy_of(index), q) for q in queries]
    for per_thread in ([queries[0]] * WORKERS, queries):
        results = _run_in_threads([lambda q=q: [_search(index, q) for _ in range(3)] for q in per_thread])
        for q, outs in zip(per_thread, results):
            want = expected[next(j for j, other in enumerate(queries) if other is q)]
            assert all(_bitwise_equal(out, want) for out in outs)


def _copy_of(index):
    """An independent index with the same model and contents and no cached search structures."""
    twin = type(index).__new__(type(index))
    twin.__setstate__(index.__getstate__())
    twin._packed, twin._csr, twin._list_terms = None, None, None
    return twin


@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_searches_overlapping_adds_and_removals_see_a_whole_state(kind):
    """One thread adds batches and removes ids while three search; every search equals the search of one of
    the states the index passes through, and each searcher sees those states in order."""
    index = _trained(kind)
    base = _points(1500, 32, seed=4)
    index.add(base[:1000])
    changes = [("add", base[1000 + 100 * b : 1100 + 100 * b]) for b in range(5)]
    changes.insert(2, ("remove", torch.arange(0, 1000, 3)))
    changes.append(("remove", torch.arange(1000, 1500, 2)))
    q = _points(16, 32, seed=5)

    replay = _copy_of(index)  # the states, computed first in one thread
    states = [_search(replay, q)]
    for what, payload in changes:
        replay.add(payload) if what == "add" else replay.remove_ids(payload)
        states.append(_search(replay, q))
    assert all(not _bitwise_equal(a, b) for a, b in zip(states, states[1:])), "every change must be visible"

    done = threading.Event()

    def writer():
        for what, payload in changes:
            index.add(payload) if what == "add" else index.remove_ids(payload)
        done.set()
        return None

    def searcher():
        seen = []
        while True:
            finished = done.is_set()
            result = _search(index, q)
            matches = [s for s, state in enumerate(states) if _bitwise_equal(result, state)]
            assert matches, "a search returned a result of no state of the index"
            seen.append(matches[0])
            if finished:
                return seen

    results = _run_in_threads([writer, searcher, searcher, searcher])
    for seen in results[1:]:
        assert seen == sorted(seen) and seen[-1] == len(changes)
    assert _bitwise_equal(_search(index, q), states[-1]) and len(index) == len(replay)


def test_concurrent_adds_keep_ids_unique_and_complete():
    """Four threads adding with default ids: every vector gets its own id (the id counter is under the lock)."""
    index = _trained("pq8")
    batches = [_points(200, 32, seed=20 + j) for j in range(WORKERS)]
    _run_in_threads([lambda x=x: [index.add(x[i : i + 50]) for i in range(0, 200, 50)] for x in batches])
    assert len(index) == 800 and torch.equal(torch.sort(index.ids).values, torch.arange(800))
    stored = torch.unique(index.codes, dim=0, return_counts=True)
    added = torch.unique(torch.cat([ops.pq_encode(x, index.codebooks) for x in batches]), dim=0, return_counts=True)
    assert all(torch.equal(a, b) for a, b in zip(stored, added))  # every vector's code stored, none twice


def test_concurrent_saves_and_loads_are_whole_files(tmp_path):
    """Threads saving different indexes to one path while others load it: every load is one whole index."""
    path = tmp_path / "shared.fcpq"
    indexes = [_trained("pq8") for _ in range(2)]
    indexes[0].add(_points(300, 32, seed=6))
    indexes[1].add(_points(700, 32, seed=7))
    indexes[0].save(path)

    def saver(index):
        return [index.save(path) for _ in range(5)]

    def loader():
        return [len(PQIndex.load(path)) for _ in range(8)]

    results = _run_in_threads([lambda: saver(indexes[0]), lambda: saver(indexes[1]), loader, loader])
    assert {n for sizes in results[2:] for n in sizes} <= {300, 700}
    assert [p.name for p in tmp_path.iterdir()] == ["shared.fcpq"]


# ---- ShardedPQIndex ----------------------------------------------------------------------------------------


def _sharded_worker(rank, world, out_dir):
    sharded = ShardedPQIndex(PQIndex(16, 4, 8))
    sharded.train(_points(500, 16, seed=8), niter=2)
    sharded.add(_points(300, 16, seed=9), torch.arange(300))
    q = _points(4, 16, seed=10)
    expected = sharded.search(q, 5)
    inside, release = threading.Event(), threading.Event()
    real_search = sharded.local.search

    def slow_search(*args, **kwargs):  # holds the first caller inside the collective call
        inside.set()
        release.wait(TIMEOUT_S)
        return real_search(*args, **kwargs)

    sharded.local.search = slow_search
    first = []
    thread = threading.Thread(target=lambda: first.append(sharded.search(q, 5)))
    thread.start()
    assert inside.wait(TIMEOUT_S)
    try:
        sharded.search(q, 5)
        raise AssertionError("a second concurrent collective call was not refused")
    except RuntimeError as error:
        assert "ShardedPQIndex.search: another thread of this rank" in str(error)
    for call in (lambda: len(sharded), lambda: sharded.train(None)):
        try:
            call()
            raise AssertionError("a concurrent collective call was not refused")
        except RuntimeError as error:
            assert "another thread of this rank" in str(error)
    release.set()
    thread.join(TIMEOUT_S)
    del sharded.local.search
    assert _bitwise_equal(first[0], expected) and _bitwise_equal(sharded.search(q, 5), expected)
    assert len(sharded) == 300


def test_sharded_index_refuses_a_second_threads_collective(tmp_path):
    run_gloo_workers(_sharded_worker, 1, str(tmp_path))

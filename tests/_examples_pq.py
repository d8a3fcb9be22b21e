"""Sample calls of the pq ops (format: tests/_examples.py)."""

import torch

from fastcore_ai import ops
from fastcore_ai.reference import pq as ref


def _codebooks(M=3, ksub=16, dsub=2, dtype=torch.float32, requires_grad=False):
    return torch.randn(M, ksub, dsub, dtype=dtype).requires_grad_(requires_grad)


def _codes(n, M, ksub):
    return torch.randint(0, ksub, (n, M), dtype=torch.uint8)


def _ivf_lists(nlist, M, ksub, n=30):
    """(codes grouped by list, ids, list_offsets [nlist + 1]) with list 1 empty."""
    list_no = torch.randint(0, nlist, (n,))
    list_no[list_no == 1] = 0
    order = torch.argsort(list_no, stable=True)
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(list_no, minlength=nlist), 0)
    return _codes(n, M, ksub)[order].contiguous(), torch.randperm(1000)[:n][order].contiguous(), offsets


def _pq4_lists(nlist=4, M=3, n=45):
    list_no = torch.randint(0, nlist, (n,))
    list_no[list_no == 2] = 3
    return ops.pq4_pack_lists(_codes(n, M, 16), list_no, torch.arange(100, 100 + n), nlist)


# ---- REGISTERED: argument tuples without the trailing backend --------------------------------------------


def _kmeans():
    x = torch.randn(40, 3)
    return [(x, 4, 3, 0, 256, False), (x.double()[:, :2], 3, 2, 5, 4, False), (x[:24], 4, 2, 1, 256, True)]


def _encode():
    cb = _codebooks()
    return [(torch.randn(7, 6), cb), (torch.randn(5, 6, dtype=torch.float64), cb.double()), (torch.randn(0, 6), cb)]


def _decode():
    cb = _codebooks(requires_grad=True)
    return [(_codes(9, 3, 16), cb), (_codes(4, 2, 256), _codebooks(2, 256, 3, torch.float64, requires_grad=True))]


def _lut():
    return [
        (torch.randn(4, 6, requires_grad=True), _codebooks(requires_grad=True), "l2"),
        (
            torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
            _codebooks(dtype=torch.float64, requires_grad=True),
            "ip",
        ),
    ]


def _search():
    cb = _codebooks()
    codes = _codes(20, 3, 16)
    return [
        (torch.randn(4, 6), codes, cb, 5, "l2"),
        (torch.randn(3, 6), codes, cb, 25, "ip"),  # k > n: padded
        (torch.randn(2, 6, dtype=torch.float64), codes, cb.double(), 3, "l2"),
    ]


def _pack():
    return [(_codes(40, 3, 16),), (_codes(5, 4, 16),)]


def _pq4_search():
    cb = _codebooks()
    n = 40
    packed = ref.pq4_pack(_codes(n, 3, 16))
    return [
        (torch.randn(4, 6), packed, n, cb, 5, "l2", 1, None),
        (torch.randn(3, 6), packed, n, cb, 4, "ip", 3, None),
        (torch.randn(2, 6), packed, n, cb, 3, "l2", 2, torch.randn(n, 6)),
    ]


def _ivf_search():
    nlist, cb = 4, _codebooks()
    codes, ids, offsets = _ivf_lists(nlist, 3, 16)
    coarse = torch.randn(nlist, 6)
    probes = torch.tensor([[0, 2], [3, -1], [1, 0]])
    q = torch.randn(3, 6)
    terms = ops.ivfpq_list_terms(coarse, cb)
    return [
        (q, coarse, probes, codes, offsets, ids, cb, 4, "l2", True, None),
        (q, coarse, probes, codes, offsets, ids, cb, 3, "ip", True, None),
        (q, coarse, probes, codes, offsets, ids, cb, 40, "l2", False, None),  # k > rows probed: padded
        (q, coarse, probes, codes, offsets, ids, cb, 4, "l2", True, terms),
    ]


def _ivf4_search():
    packed, list_blocks, sizes, row_ids = _pq4_lists()
    probes = torch.tensor([[0, 3], [2, -1], [1, 0]])
    cb = _codebooks()
    q = torch.randn(3, 6)
    return [
        (q, probes, packed, list_blocks, sizes, row_ids, cb, 5, "l2"),
        (q, probes, packed, list_blocks, sizes, row_ids, cb, 3, "ip"),
    ]


REGISTERED = {
    "pq_kmeans": _kmeans,
    "pq_encode": _encode,
    "pq_decode": _decode,
    "pq_lut": _lut,
    "pq_search": _search,
    "pq4_pack": _pack,
    "pq4_search": _pq4_search,
    "ivfpq_search": _ivf_search,
    "ivfpq4_search": _ivf4_search,
}


# ---- PUBLIC: (fn, args) with the default backend ------------------------------------------------------------


def _ivfpq_case():
    nlist, cb = 4, _codebooks()
    codes, ids, offsets = _ivf_lists(nlist, 3, 16)
    coarse = torch.randn(nlist, 6)
    probes = torch.tensor([[0, 2], [3, -1], [1, 0]])

    def fn(q, coarse, probes, codes, offsets, ids, cb):
        return ops.ivfpq_search(q, coarse, probes, codes, offsets, ids, cb, 4)

    return fn, (torch.randn(3, 6), coarse, probes, codes, offsets, ids, cb)


def _ivfpq4_case():
    packed, list_blocks, sizes, row_ids = _pq4_lists()
    probes = torch.tensor([[0, 3], [2, -1], [1, 0]])

    def fn(q, probes, packed, list_blocks, sizes, row_ids, cb):
        return ops.ivfpq4_search(q, probes, packed, list_blocks, sizes, row_ids, cb, 5, "ip")

    return fn, (torch.randn(3, 6), probes, packed, list_blocks, sizes, row_ids, _codebooks())


PUBLIC = {
    "kmeans": lambda: (lambda x: ops.kmeans(x, 4, niter=3), (torch.randn(40, 3),)),
    "pq_encode": lambda: (ops.pq_encode, (torch.randn(7, 6), _codebooks())),
    # ksub = 16 < 256: the code-range check runs, as a traced assertion
    "pq_decode": lambda: (ops.pq_decode, (_codes(9, 3, 16), _codebooks())),
    "pq_lut": lambda: (lambda q, cb: ops.pq_lut(q, cb, "ip"), (torch.randn(4, 6), _codebooks())),
    "pq_search": lambda: (
        lambda q, codes, cb: ops.pq_search(q, codes, cb, 5),
        (torch.randn(4, 6), _codes(20, 3, 16), _codebooks()),
    ),
    "pq4_pack": lambda: (ops.pq4_pack, (_codes(40, 3, 16),)),
    "pq4_search": lambda: (
        lambda q, packed, cb: ops.pq4_search(q, packed, 40, cb, 5, k_factor=2),
        (torch.randn(4, 6), ref.pq4_pack(_codes(40, 3, 16)), _codebooks()),
    ),
    "ivfpq_search": _ivfpq_case,
    "ivfpq4_search": _ivfpq4_case,
    "ivfpq_list_terms": lambda: (ops.ivfpq_list_terms, (torch.randn(4, 6), _codebooks())),
}


NOT_COMPILABLE = {
    "pq_train": (
        "its cpu path (the batched k-means of all sub-spaces) calls the native encode and centroid-update "
        "kernels directly (pybind functions, not registered ops) and reads the empty-cluster counts on "
        "the host",
        lambda: (lambda x: ops.pq_train(x, 2, 4, niter=2), (torch.randn(40, 4),)),
    ),
    "pq4_pack_lists": (
        "the packed layout's size depends on the list sizes (bincount of list_no, then "
        "int(list_blocks[-1]) on the host): a data-dependent output shape",
        lambda: (
            lambda codes, list_no, ids: ops.pq4_pack_lists(codes, list_no, ids, 4),
            (_codes(45, 3, 16), torch.randint(0, 4, (45,)), torch.arange(45)),
        ),
    ),
    "pq4_kernel": (
        "a configuration call, not a tensor op: it returns a str from the native pybind function "
        "cpu_isa, which dynamo cannot trace",
        lambda: (lambda: ops.pq4_kernel(), ()),
    ),
}

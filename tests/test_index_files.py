"""Index files (fastcore_ai.search._format, PQIndex / IVFPQIndex save and load): every damaged or
inconsistent file raises IndexFileError naming the file and the problem, and a failed save leaves the
file already at the path byte-identical and no temporary file behind.

The file layout is parsed here independently of the reader (magic, version, header length, JSON header,
arrays, SHA-256), so that truncation and flipped bytes can be aimed at every section; `_reseal` rewrites a
file with an edited header or edited arrays and a fresh checksum, for the inconsistencies a checksum
cannot catch (a file written wrongly rather than damaged)."""

import errno
import hashlib
import json
import os
import random
import stat
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcore_ai.search import IndexFileError, IVFPQIndex, PQIndex, load_index
from fastcore_ai.search import _format

D = 16


def _points(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, D, generator=g) * 3
    return centers[torch.randint(0, 8, (n,), generator=g)] + torch.randn(n, D, generator=g)


def _build(kind):
    x = _points(400, seed=1)
    if kind == "pq8":
        index = PQIndex(D, 4, 8, "l2")
    elif kind == "pq4":
        index = PQIndex(D, 4, 4, "ip")
    elif kind == "ivf8":
        index = IVFPQIndex(D, 4, 4, 8, "l2")
    else:  # the fast-scan IVF (non-residual 4-bit)
        index = IVFPQIndex(D, 4, 4, 4, "ip", by_residual=False)
    index.train(x, niter=2, **({"coarse_niter": 2} if isinstance(index, IVFPQIndex) else {}))
    index.add(x[:150], ids=torch.arange(150) * 3 + 7)
    return index


KINDS = ("pq8", "pq4", "ivf8", "ivf4")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (index, path, file bytes)}"""
    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for kind in KINDS:
        index = _build(kind)
        path = str(root / f"{kind}.fcpq")
        index.save(path)
        out[kind] = (index, path, Path(path).read_bytes())
    return out


def _layout(raw: bytes) -> dict:
    """{section name: (start, end)} of a well-formed file: magic, version, hlen, header, one per array, sha256."""
    hlen = struct.unpack("<I", raw[12:16])[0]
    header = json.loads(raw[16 : 16 + hlen])
    sections = {"magic": (0, 8), "version": (8, 12), "hlen": (12, 16), "header": (16, 16 + hlen)}
    for entry in header["arrays"]:
        start = 16 + hlen + entry["offset"]
        sections["array " + entry["name"]] = (start, start + entry["nbytes"])
    sections["sha256"] = (len(raw) - 32, len(raw))
    return sections


def _reseal(raw: bytes, edit_header=None, edit_arrays=None) -> bytes:
    """The file with its header (a dict, edited in place by edit_header) and/or its arrays ({name: numpy
    array}, edited in place by edit_arrays, which then also set the header's entries) rewritten, and a
    correct checksum: structurally sealed, so only the reader's consistency checks can object."""
    hlen = struct.unpack("<I", raw[12:16])[0]
    header = json.loads(raw[16 : 16 + hlen])
    data = raw[16 + hlen : -32]
    if edit_arrays is not None:
        arrays = {
            e["name"]: np.frombuffer(data[e["offset"] : e["offset"] + e["nbytes"]], dtype=e["dtype"])
            .reshape(e["shape"])
            .copy()
            for e in header["arrays"]
        }
        edit_arrays(arrays)
        entries, blobs, offset = [], [], 0
        for name, array in arrays.items():
            blob = np.ascontiguousarray(array).tobytes()
            entries.append(
                {
                    "name": name,
                    "dtype": str(array.dtype),
                    "shape": list(array.shape),
                    "offset": offset,
                    "nbytes": len(blob),
                }
            )
            blobs.append(blob)
            offset += len(blob)
        header["arrays"], data = entries, b"".join(blobs)
    if edit_header is not None:
        edit_header(header)
    text = json.dumps(header).encode()
    body = raw[:12] + struct.pack("<I", len(text)) + text + data
    return body + hashlib.sha256(body).digest()


def _write(tmp_path, name, data: bytes) -> str:
    path = str(tmp_path / name)
    Path(path).write_bytes(data)
    return path


def _load_fails(path, match, loader=load_index):
    """The load raises IndexFileError whose message names the file and matches `match`."""
    with pytest.raises(IndexFileError, match=match) as caught:
        loader(path)
    assert repr(path) in str(caught.value) or path in str(caught.value)
    return caught.value


def _same_index(a, b):
    assert type(a) is type(b) and len(a) == len(b)
    assert (a.d, a.M, a.nbits, a.metric, a._next_id) == (b.d, b.M, b.nbits, b.metric, b._next_id)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.ids, b.ids) and torch.equal(a.codebooks, b.codebooks)
    if isinstance(a, IVFPQIndex):
        assert (a.nlist, a.by_residual) == (b.nlist, b.by_residual)
        assert torch.equal(a.coarse, b.coarse) and torch.equal(a.list_no, b.list_no)
    q = _points(9, seed=5)
    da, ia = a.search(q, 6, nprobe=2)
    db, ib = b.search(q, 6, nprobe=2)
    assert torch.equal(ia, ib) and torch.equal(da, db)


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(saved, kind):
    index, path, _ = saved[kind]
    _same_index(index, load_index(path))
    _same_index(index, type(index).load(Path(path)))  # os.PathLike too


def test_untrained_and_empty_indexes_round_trip(tmp_path):
    for index in (PQIndex(D, 4), IVFPQIndex(D, 3, 4)):
        path = tmp_path / "untrained.fcpq"
        index.save(path)
        loaded = load_index(path)
        assert type(loaded) is type(index) and not loaded.is_trained and len(loaded) == 0
    emptied = _build("ivf8")
    emptied.remove_ids(emptied.ids)
    emptied.save(tmp_path / "empty.fcpq")
    loaded = IVFPQIndex.load(tmp_path / "empty.fcpq")
    assert len(loaded) == 0 and loaded.is_trained and loaded._next_id == emptied._next_id
    d, i = loaded.search(_points(2, seed=3), 3)
    assert bool((i == -1).all())


def test_saving_writes_the_documented_layout(saved):
    _, _, raw = saved["pq8"]
    assert raw[:8] == b"FCPQIDX\0" and struct.unpack("<I", raw[8:12])[0] == _format.FORMAT_VERSION == 1
    assert hashlib.sha256(raw[:-32]).digest() == raw[-32:]
    names = [name for name in _layout(raw) if name.startswith("array ")]
    assert names == ["array codes", "array ids", "array codebooks"]


# ---- damaged files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pq8", "ivf4"])
def test_truncation_at_every_section_boundary_and_at_random_offsets(saved, tmp_path, kind):
    _, _, raw = saved[kind]
    boundaries = {edge for span in _layout(raw).values() for edge in span} - {len(raw)}
    offsets = sorted(boundaries | {b + 1 for b in boundaries} | {b - 1 for b in boundaries if b > 0})
    offsets += random.Random(0).sample(range(1, len(raw)), 25)
    for cut in offsets:
        path = _write(tmp_path, f"cut{cut}.fcpq", raw[:cut])
        _load_fails(path, "truncated")


def test_truncation_says_how_much_is_missing(saved, tmp_path):
    _, _, raw = saved["pq8"]
    path = _write(tmp_path, "short.fcpq", raw[:-100])
    message = str(_load_fails(path, "truncated"))
    assert f"{len(raw) - 100} bytes, its header describes {len(raw)}" in message


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_in_any_section_is_detected(saved, tmp_path, kind):
    _, _, raw = saved[kind]
    expected = {"magic": "bad magic", "version": "format version"}
    for section, (start, end) in _layout(raw).items():
        for where in sorted({start, (start + end) // 2, end - 1}):
            for mask in (0x01, 0x80, 0xFF):
                flipped = bytearray(raw)
                flipped[where] ^= mask
                path = _write(tmp_path, f"flip{where}_{mask}.fcpq", bytes(flipped))
                _load_fails(path, expected.get(section, "checksum mismatch"))


def test_wrong_magic(saved, tmp_path):
    _, _, raw = saved["pq8"]
    _load_fails(_write(tmp_path, "magic.fcpq", b"PICKLE!!" + raw[8:]), "not a fastcore_ai index")
    pickled = str(tmp_path / "model.pt")
    torch.save({"codes": torch.zeros(3)}, pickled)  # a pickle is refused by its first bytes, never unpickled
    _load_fails(pickled, "bad magic")
    _load_fails(_write(tmp_path, "zeros.fcpq", bytes(200)), "bad magic")


def test_newer_and_unknown_versions(saved, tmp_path):
    _, _, raw = saved["pq8"]
    for version, match in ((2, "format version 2, newer than"), (99, "version 99"), (0, "format version 0;")):
        body = raw[:8] + struct.pack("<I", version) + raw[12:-32]
        path = _write(tmp_path, f"v{version}.fcpq", body + hashlib.sha256(body).digest())
        _load_fails(path, match)


def test_missing_unreadable_and_non_path_arguments(tmp_path):
    _load_fails(str(tmp_path / "missing.fcpq"), "cannot read")
    _load_fails(str(tmp_path), "cannot read")  # a directory
    with pytest.raises(TypeError, match="fastcore_ai.search.load: path must be a str or os.PathLike"):
        load_index(None)


# ---- sealed but inconsistent files ------------------------------------------------------------------------


def _set(path_in_header, value):
    """An edit_header setting header[k1][k2]... = value for the keys in path_in_header."""

    def edit(header):
        node = header
        for key in path_in_header[:-1]:
            node = node[key]
        node[path_in_header[-1]] = value

    return edit


def _entry(header, name):
    return next(e for e in header["arrays"] if e["name"] == name)


def _edit_entry(array, **changes):
    def edit(header):
        _entry(header, array).update(changes)

    return edit


# (kind, edit_header, edit_arrays, what the message must say)
HEADER_CASES = {
    "shape bytes disagree with nbytes": (
        "pq8",
        _edit_entry("codes", shape=[150, 5]),
        None,
        "shape \\[150, 5\\] of uint8 is 750 bytes, the header says 600",
    ),
    "dtype bytes disagree with nbytes": (
        "pq8",
        _edit_entry("ids", dtype="uint8"),
        None,
        "150 bytes, the header says 1200",
    ),
    "unknown dtype": ("pq8", _edit_entry("ids", dtype="object"), None, "has dtype 'object'"),
    "negative dimension": ("pq8", _edit_entry("codes", shape=[-150, -4]), None, "invalid shape"),
    "fractional dimension": ("pq8", _edit_entry("codes", shape=[150.0, 4]), None, "invalid shape"),
    "codes reshaped against M": (
        "pq8",
        _edit_entry("codes", shape=[300, 2]),
        None,
        r"codes must be \[n, M\] with M = 4",
    ),
    "ids shorter than codes": (
        "pq8",
        None,
        lambda a: a.update(ids=a["ids"][:100]),
        r"'ids' is int64 \[100\], the metadata implies int64 \[150\]",
    ),
    "offset past the data": ("pq8", _edit_entry("codebooks", offset=10**6), None, "lies at bytes"),
    "overlapping arrays": ("pq8", _edit_entry("ids", offset=0), None, "lies at bytes"),
    "bytes no array describes": ("pq8", lambda h: h["arrays"].pop(), None, "bytes of data that no array"),
    "repeated array name": ("pq8", _edit_entry("ids", name="codes"), None, "repeated or non-string array name"),
    "extra entry key": ("pq8", _edit_entry("ids", extra=1), None, "malformed array entry"),
    "meta d disagrees with codebooks": (
        "pq8",
        _set(("meta", "d"), 32),
        None,
        r"'codebooks' is float32 \[4, 256, 4\], the metadata implies float32 \[4, 256, 8\]",
    ),
    "meta M disagrees with codes": ("pq8", _set(("meta", "M"), 8), None, r"codes must be \[n, M\] with M = 8"),
    "meta nbits disagrees": (
        "pq8",
        _set(("meta", "nbits"), 4),
        None,
        "out of range for nbits = 4|the metadata implies",
    ),
    "meta nlist disagrees with coarse": (
        "ivf8",
        _set(("meta", "nlist"), 8),
        None,
        r"'coarse' is float32 \[4, 16\], the metadata implies float32 \[8, 16\]",
    ),
    "meta M does not divide d": ("pq8", _set(("meta", "M"), 5), None, "inconsistent metadata.*divisible"),
    "meta missing a key": ("pq8", lambda h: h["meta"].pop("nbits"), None, "has no 'nbits' in its metadata"),
    "meta flag of the wrong type": ("pq8", _set(("meta", "trained"), "yes"), None, "'trained' must be a bool"),
    "meta int given as a bool": ("ivf8", _set(("meta", "nlist"), True), None, "'nlist' must be a int"),
    "meta metric unknown": ("pq8", _set(("meta", "metric"), "cosine"), None, "inconsistent metadata.*metric"),
    "untrained but holding vectors": ("pq8", _set(("meta", "trained"), False), None, "untrained index holds"),
    "header not an object": ("pq8", lambda h: (h.clear(), h.update(meta=[], arrays=[])), None, "malformed header"),
    "next_id below an id": ("pq8", _set(("meta", "next_id"), 5), None, "next_id = 5 must be"),
    "repeated ids": ("pq8", None, lambda a: a["ids"].__setitem__(1, a["ids"][0]), "ids are not unique"),
    "negative id": ("pq8", None, lambda a: a["ids"].__setitem__(3, -4), "negative id -4"),
    "code out of range": (
        "pq4",
        None,
        lambda a: a["codes"].__setitem__((2, 1), 16),
        "codes hold 16, out of range for nbits = 4",
    ),
    "NaN codebooks": (
        "pq8",
        None,
        lambda a: a["codebooks"].__setitem__((0, 0, 0), np.nan),
        "codebooks hold NaN or inf",
    ),
    "inf coarse": ("ivf8", None, lambda a: a["coarse"].__setitem__((1, 2), np.inf), "coarse hold NaN or inf"),
    "list number out of range": (
        "ivf8",
        None,
        lambda a: a["list_no"].__setitem__(0, 4),
        r"list numbers outside \[0, 4\)",
    ),
    "list_no missing": ("ivf8", None, lambda a: a.pop("list_no"), "has no array 'list_no'"),
    "codes of the wrong dtype": (
        "pq8",
        None,
        lambda a: a.update(codes=a["codes"].astype(np.int64)),
        r"'codes' is int64 \[150, 4\], the metadata implies uint8",
    ),
    "unknown kind": ("pq8", _set(("meta", "kind"), "HNSWIndex"), None, "unknown index kind 'HNSWIndex'"),
    "IVF arrays under a PQ kind": (
        "ivf8",
        _set(("meta", "kind"), "PQIndex"),
        None,
        r"holds arrays \['coarse', 'list_no'\] that a PQIndex has not",
    ),
    "PQ file relabelled IVF": ("pq8", _set(("meta", "kind"), "IVFPQIndex"), None, "has no 'nlist' in its metadata"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_sealed_inconsistent_file_is_refused(saved, tmp_path, case):
    kind, edit_header, edit_arrays, match = HEADER_CASES[case]
    _, _, raw = saved[kind]
    path = _write(tmp_path, "sealed.fcpq", _reseal(raw, edit_header, edit_arrays))
    _load_fails(path, match)


def test_reseal_without_edits_loads(saved, tmp_path):
    """The sealing helper itself writes valid files, so the refusals above come from the edits alone."""
    for kind in ("pq8", "ivf8"):
        index, _, raw = saved[kind]
        path = _write(tmp_path, f"{kind}.fcpq", _reseal(raw, lambda h: None, lambda a: None))
        _same_index(index, load_index(path))


# ---- the wrong class --------------------------------------------------------------------------------------


def test_loading_with_the_wrong_class_is_refused_before_building(saved, monkeypatch):
    _, pq_path, _ = saved["pq8"]
    _, ivf_path, _ = saved["ivf8"]
    built = []
    real_init = PQIndex.__init__  # IVFPQIndex.__init__ calls it too

    def counting_init(self, *args, **kwargs):
        built.append(type(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(PQIndex, "__init__", counting_init)
    _load_fails(pq_path, "IVFPQIndex.load: .* holds a PQIndex, not a IVFPQIndex", IVFPQIndex.load)
    _load_fails(ivf_path, "PQIndex.load: .* holds a IVFPQIndex, not a PQIndex", PQIndex.load)
    assert built == []  # refused from the metadata: no index object was made
    assert type(PQIndex.load(pq_path)) is PQIndex and type(IVFPQIndex.load(ivf_path)) is IVFPQIndex
    assert type(load_index(pq_path)) is PQIndex and type(load_index(ivf_path)) is IVFPQIndex
    assert built == [PQIndex, IVFPQIndex, PQIndex, IVFPQIndex]  # the counter does see the loads that build


# ---- failed saves -----------------------------------------------------------------------------------------


class _DiskFull:
    """A file object whose writes fail with ENOSPC once `limit` bytes have gone to the disk (the bytes up to
    the limit are written and flushed first, as a filling disk would leave them)."""

    def __init__(self, real, limit, log):
        self.real, self.limit, self.written, self.log = real, limit, 0, log

    def write(self, data):
        data = memoryview(data).cast("B")
        if self.written + len(data) > self.limit:
            self.real.write(data[: self.limit - self.written])
            self.real.flush()
            self.log.append(os.fstat(self.real.fileno()).st_size)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def _old_file(tmp_path):
    old = _build("pq8")
    path = tmp_path / "index.fcpq"
    old.save(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.999])
def test_write_failing_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fraction):
    path, before = _old_file(tmp_path)
    new = _build("ivf8")
    new.save(tmp_path / "probe.fcpq")  # the new file's size, so that the fractions land in its first and last bytes
    size = os.path.getsize(tmp_path / "probe.fcpq")
    os.unlink(tmp_path / "probe.fcpq")
    on_disk, real_fdopen = [], os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: _DiskFull(real_fdopen(*a, **k), int(size * fraction), on_disk))
    with pytest.raises(OSError, match="IVFPQIndex.save: cannot write index file .*index.fcpq.*No space left") as caught:
        new.save(path)
    assert caught.value.errno == errno.ENOSPC
    assert on_disk == [int(size * fraction)]  # the temporary file had really received those bytes
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["index.fcpq"]


@pytest.mark.parametrize("step", ["fsync", "replace", "mkstemp"])
def test_other_failing_steps_leave_the_old_file_and_no_temporary(tmp_path, monkeypatch, step):
    path, before = _old_file(tmp_path)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, f"simulated {step} failure")

    monkeypatch.setattr(tempfile if step == "mkstemp" else os, step, fail)
    with pytest.raises(OSError, match=f"PQIndex.save: cannot write index file .*simulated {step} failure"):
        _build("pq4").save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["index.fcpq"]


def test_interrupted_save_removes_its_temporary(tmp_path, monkeypatch):
    path, before = _old_file(tmp_path)

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _build("pq8").save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["index.fcpq"]


def test_save_into_a_missing_directory_names_the_path(tmp_path):
    with pytest.raises(OSError, match="PQIndex.save: cannot write index file .*nowhere"):
        _build("pq8").save(tmp_path / "nowhere" / "index.fcpq")
    assert os.listdir(tmp_path) == []


def test_a_successful_save_replaces_the_file_and_keeps_its_permissions(tmp_path):
    path, before = _old_file(tmp_path)
    os.chmod(path, 0o640)
    new = _build("ivf4")
    new.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    _same_index(new, load_index(path))
    assert os.listdir(tmp_path) == ["index.fcpq"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # what open() gives a new file (0o666 less the umask); mkstemp's 0o600 must not stick
    new.save(tmp_path / "fresh.fcpq")
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.fcpq").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)

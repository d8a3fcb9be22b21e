"""The on-disk format of fastcore_ai indexes (no pickle, DESIGN rule 9).

    magic   8 bytes  b"FCPQIDX\\0"
    version uint32 little-endian (FORMAT_VERSION)
    hlen    uint32 little-endian: length of the header
    header  hlen bytes of UTF-8 JSON: {"meta": {...}, "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}]}
    data    the arrays' raw little-endian bytes, at their offsets relative to the start of data
    sha256  32 bytes: SHA-256 of everything before it

Reading checks, in order: the size, the magic, the version, the checksum, then the header's structure
and that the arrays tile the data section exactly (each with an allowed dtype, a shape whose size matches
its byte count, no gaps, overlaps, duplicates or trailing bytes). Any failure raises IndexFileError
(a ValueError) naming the file; nothing is interpreted before the checksum passed (only the message
of a failed checksum looks further, to say whether the file is shorter than its header describes).

Writing is atomic: the bytes go to a temporary file in the target's directory, which is flushed,
fsynced and renamed over the target (then the directory is fsynced). If anything fails on the way
(a full disk, an interrupt) the temporary file is removed and the file at the target is untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
from typing import Dict, Tuple

import numpy as np
import torch

MAGIC = b"FCPQIDX\0"
FORMAT_VERSION = 1
_DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "uint8": np.uint8}
_PREFIX = 8 + 4 + 4
_DIGEST = 32
_TEMP_PREFIX, _TEMP_SUFFIX = ".fcpq-", ".tmp"


class IndexFileError(ValueError):
    """A fastcore_ai index file is missing, truncated, corrupted, of another version or inconsistent."""


def _fail(where: str, problem: str) -> IndexFileError:
    """'... index file 'p' is truncated', '... index file 'p': array 'codes' ...'"""
    return IndexFileError(f"fastcore_ai.search: {where}{':' if problem.startswith('array') else ''} {problem}")


def _encode(arrays: Dict[str, torch.Tensor]) -> Tuple[list, list]:
    """The header entries and the little-endian bytes of every array, in order."""
    entries, blobs, offset = [], [], 0
    for name, tensor in arrays.items():
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"fastcore_ai.search: cannot store array {name} of dtype {dtype}")
        little = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))
        data = little.reshape(-1).view(np.uint8)
        entries.append(
            {"name": name, "dtype": dtype, "shape": list(array.shape), "offset": offset, "nbytes": int(data.nbytes)}
        )
        blobs.append(data)
        offset += int(data.nbytes)
    return entries, blobs


def _new_file_mode(path: str) -> int:
    """The permission bits the saved file should get: those of the file it replaces, else what a plain
    open() would give (0o666 less the umask). mkstemp makes its file 0o600, which would otherwise stick."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    try:  # Linux reports the umask without changing it (os.umask would, for every thread at once)
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def write_index_file(path, meta: dict, arrays: Dict[str, torch.Tensor], who: str = "save") -> None:
    """Write meta and arrays to path atomically (see the module docstring). `who` names the caller in
    errors. An OSError on the way is raised again as an OSError (same errno) naming the caller and the
    path; the previous file at path, if any, is left as it was and no temporary file stays behind."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"fastcore_ai.search.{who}: path must be a str or os.PathLike, got {type(path).__name__}")
    entries, blobs = _encode(arrays)
    header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode("utf-8")
    prefix = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header))
    directory = os.path.dirname(os.path.abspath(path))
    mode = _new_file_mode(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=directory)
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            # The arrays are streamed: joining them into one bytes object would hold the index twice in memory.
            digest = hashlib.sha256()
            for chunk in (prefix, header, *blobs):
                digest.update(chunk)
                f.write(chunk)
            f.write(digest.digest())
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        raise OSError(
            error.errno, f"fastcore_ai.search.{who}: cannot write index file {path!r}: {error.strerror or error}"
        ) from error
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:  # already gone: nothing is left behind either way
                pass
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename itself is atomic
        pass


def _declared_size(raw: memoryview, hlen: int):
    """For the message of a failed checksum only: the file size the header describes, or None."""
    try:
        entries = json.loads(bytes(raw[_PREFIX : _PREFIX + hlen]).decode("utf-8"))["arrays"]
        return _PREFIX + hlen + sum(int(entry["nbytes"]) for entry in entries) + _DIGEST
    except Exception:  # any damage: the checksum message stands alone
        return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_entries(where: str, entries, data_bytes: int) -> list:
    """The header's array entries, checked to tile the data section exactly."""
    if not isinstance(entries, list):
        raise _fail(where, "has a malformed header: 'arrays' must be a list")
    checked, names, expected_offset = [], set(), 0
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise _fail(where, f"has a malformed array entry {entry!r}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        offset, nbytes = entry["offset"], entry["nbytes"]
        if not isinstance(name, str) or name in names:
            raise _fail(where, f"has a repeated or non-string array name {name!r}")
        names.add(name)
        if dtype not in _DTYPES:
            raise _fail(where, f"array {name!r} has dtype {dtype!r}, not one of {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise _fail(where, f"array {name!r} has an invalid shape {shape!r}")
        if not _is_int(offset) or not _is_int(nbytes):
            raise _fail(where, f"array {name!r} has a non-integer offset or byte count")
        size = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[dtype]).itemsize
        if size != nbytes:
            raise _fail(where, f"array {name!r}: shape {shape} of {dtype} is {size} bytes, the header says {nbytes}")
        if offset != expected_offset or offset + nbytes > data_bytes:
            raise _fail(
                where,
                f"array {name!r} lies at bytes [{offset}, {offset + nbytes}) of the data section, "
                f"expected to start at {expected_offset} and end by {data_bytes}",
            )
        expected_offset = offset + nbytes
        checked.append((name, dtype, shape, offset, nbytes))
    if expected_offset != data_bytes:
        raise _fail(where, f"has {data_bytes - expected_offset} bytes of data that no array of the header describes")
    return checked


def read_index_file(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(meta, arrays) of an index file, every structural check of the module docstring passed."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"fastcore_ai.search.load: path must be a str or os.PathLike, got {type(path).__name__}")
    try:
        with open(path, "rb") as f:
            raw = memoryview(f.read())
    except OSError as error:
        raise IndexFileError(f"fastcore_ai.search: cannot read index file {path!r}: {error}") from error
    where = f"index file {path!r}"
    if len(raw) < _PREFIX + _DIGEST:
        raise _fail(where, f"is truncated ({len(raw)} bytes, less than the {_PREFIX + _DIGEST} of an empty file)")
    if raw[:8] != MAGIC:
        raise _fail(where, f"is not a fastcore_ai index (bad magic {bytes(raw[:8])!r}, expected {MAGIC!r})")
    version, hlen = struct.unpack("<II", raw[8:_PREFIX])
    if version > FORMAT_VERSION:
        raise _fail(
            where,
            f"has format version {version}, newer than this fastcore_ai reads (version {FORMAT_VERSION}); "
            "upgrade fastcore_ai to load it",
        )
    if version != FORMAT_VERSION:
        raise _fail(where, f"has format version {version}; this fastcore_ai reads version {FORMAT_VERSION}")
    body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        declared = _declared_size(raw, hlen)
        if declared is not None and declared > len(raw):
            raise _fail(where, f"is truncated ({len(raw)} bytes, its header describes {declared}; checksum mismatch)")
        raise _fail(where, "is corrupted or truncated (checksum mismatch)")
    if _PREFIX + hlen > len(body):
        raise _fail(where, f"has a header length {hlen} longer than the file")
    try:
        header = json.loads(bytes(body[_PREFIX : _PREFIX + hlen]).decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _fail(where, f"has an unreadable header ({error})") from error
    if not isinstance(header, dict) or set(header) != {"meta", "arrays"} or not isinstance(header["meta"], dict):
        raise _fail(where, "has a malformed header: expected an object with 'meta' (an object) and 'arrays'")
    data = body[_PREFIX + hlen :]
    arrays = {}
    for name, dtype, shape, offset, nbytes in _read_entries(where, header["arrays"], len(data)):
        native = np.dtype(_DTYPES[dtype])
        stored = np.frombuffer(data[offset : offset + nbytes], dtype=native.newbyteorder("<"))
        arrays[name] = torch.from_numpy(stored.astype(native).reshape(shape))  # astype copies: writable, owned
    return header["meta"], arrays

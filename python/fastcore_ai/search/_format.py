"""The on-disk format of fastcore_ai indexes (no pickle, DESIGN rule 9).

    magic   8 bytes  b"FCPQIDX\\0"
    version uint32 little-endian (FORMAT_VERSION)
    hlen    uint32 little-endian: length of the header
    header  hlen bytes of UTF-8 JSON: {"meta": {...}, "arrays": [{"name", "dtype", "shape", "offset", "nbytes"}]}
    data    the arrays' raw little-endian bytes, at their offsets relative to the start of data
    sha256  32 bytes: SHA-256 of everything before it

Reading checks, in order: the size, the magic, the version, the checksum, then that every array has
an allowed dtype, a shape whose size matches nbytes and lies inside the data. Any failure raises
IndexFileError (a ValueError); nothing is interpreted before the checksum passed. Writing is atomic:
a temporary file in the same directory, fsync, rename over the target, fsync of the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
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


class IndexFileError(ValueError):
    """A fastcore_ai index file is missing, truncated, corrupted or of another version."""


def write_index_file(path: str, meta: dict, arrays: Dict[str, torch.Tensor]) -> None:
    entries, blobs, offset = [], [], 0
    for name, tensor in arrays.items():
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        dtype = str(array.dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"fastcore_ai.search: cannot store array {name} of dtype {dtype}")
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append(
            {"name": name, "dtype": dtype, "shape": list(array.shape), "offset": offset, "nbytes": len(data)}
        )
        blobs.append(data)
        offset += len(data)
    header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode("utf-8")
    body = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    digest = hashlib.sha256(body).digest()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fcpq-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.write(digest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename itself is atomic
        pass


def read_index_file(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise IndexFileError(f"fastcore_ai.search: cannot read index file {path!r}: {error}") from error
    where = f"index file {path!r}"
    if len(raw) < _PREFIX + _DIGEST:
        raise IndexFileError(f"fastcore_ai.search: {where} is truncated ({len(raw)} bytes)")
    if raw[:8] != MAGIC:
        raise IndexFileError(f"fastcore_ai.search: {where} is not a fastcore_ai index (bad magic)")
    version, hlen = struct.unpack("<II", raw[8:16])
    if version != FORMAT_VERSION:
        raise IndexFileError(
            f"fastcore_ai.search: {where} has format version {version}; this fastcore_ai reads version {FORMAT_VERSION}"
        )
    body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise IndexFileError(f"fastcore_ai.search: {where} is corrupted or truncated (checksum mismatch)")
    if _PREFIX + hlen > len(body):
        raise IndexFileError(f"fastcore_ai.search: {where} has a header longer than the file")
    try:
        header = json.loads(body[_PREFIX : _PREFIX + hlen].decode("utf-8"))
        meta, entries = header["meta"], header["arrays"]
    except (ValueError, KeyError, TypeError) as error:
        raise IndexFileError(f"fastcore_ai.search: {where} has an unreadable header ({error})") from error
    data = memoryview(body)[_PREFIX + hlen :]
    arrays = {}
    for entry in entries:
        try:
            name, dtype, shape = str(entry["name"]), str(entry["dtype"]), [int(s) for s in entry["shape"]]
            offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as error:
            raise IndexFileError(f"fastcore_ai.search: {where} has a malformed array entry ({error})") from error
        if dtype not in _DTYPES or any(s < 0 for s in shape):
            raise IndexFileError(f"fastcore_ai.search: {where}: array {name} has dtype {dtype} / shape {shape}")
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if int(np.prod(shape, dtype=np.int64)) * itemsize != nbytes or offset < 0 or offset + nbytes > len(data):
            raise IndexFileError(f"fastcore_ai.search: {where}: array {name} does not fit the file")
        array = np.frombuffer(data[offset : offset + nbytes], dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        arrays[name] = torch.from_numpy(array.astype(_DTYPES[dtype]).reshape(shape).copy())
    return meta, arrays

"""The index file: its layout, its checksum, and the atomic write.

Format 1, little-endian::

    MAGIC (8 bytes) | header length (u32) | header (JSON) | faiss section (``faiss.write_index``; absent
    when the header's ``has_faiss`` is false) | image ids (``n_images`` int64) |
    trailer: faiss section length (u64), crc32 of every byte before the trailer (u32), END_MAGIC (8 bytes)

A file is written to a temp file in the same folder, fsynced, renamed over the old one and the folder
fsynced, under a lock file that serialises savers of one path (processes too): a crash at any point
leaves either the previous file or the new one, both complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from catalog.vector_index.base import Ids

MAGIC = b"B2MVIDX\x01"
END_MAGIC = b"B2MVEND\x01"
FORMAT_VERSION = 1
TRAILER = struct.Struct("<QI8s")  # faiss section length, crc32 of everything before the trailer, magic
CHUNK_BYTES = 1 << 20


class IndexFileError(RuntimeError):
    """The index file is missing, truncated, corrupt or of another format; rebuild it from the catalog."""


@dataclass(frozen=True, slots=True)
class Header:
    """The header's fields, in the order they are written (after ``format``)."""

    kind: str
    dim: int | None
    vectors_per_image: int
    n_images: int
    generation: int
    nlist: int | None
    nprobe: int
    ivf_codec: str
    trained_images: int
    has_faiss: bool
    info: dict[str, str]

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes, path: Path) -> Header:
        fields = json.loads(data)
        if not isinstance(fields, dict):
            raise IndexFileError(f"{path} is damaged: its header is not an object")
        if fields.get("format") != FORMAT_VERSION:
            raise IndexFileError(f"{path} has format {fields.get('format')}, expected {FORMAT_VERSION}")
        return cls(
            kind=fields["kind"],
            dim=fields["dim"],
            vectors_per_image=fields["vectors_per_image"],
            n_images=fields["n_images"],
            generation=int(fields["generation"]),
            nlist=fields["nlist"],
            nprobe=fields["nprobe"],
            ivf_codec=fields["ivf_codec"],
            trained_images=int(fields["trained_images"]),
            has_faiss=fields["has_faiss"],
            info=dict(fields["info"]),
        )


@dataclass(frozen=True, slots=True)
class IndexFile:
    """What a file holds: its header, the faiss index (None if it had none), the slot -> image id array."""

    header: Header
    faiss_index: Any
    ids: Ids


class CrcWriter:
    """A write-only stream that keeps the crc32 and count of what passed through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.crc = 0
        self.count = 0

    def write(self, data: bytes | memoryview) -> int:
        self.raw.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(data)
        return len(data)


class CrcReader:
    """A read-only stream that keeps the crc32 and count of what it read."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.crc = 0
        self.count = 0

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise IndexFileError("index file is truncated")
        return data

    def read_into(self, array: np.ndarray[Any, Any]) -> None:
        view = array.data.cast("B")
        got = 0
        while got < len(view):
            n = self.raw.readinto(view[got : got + CHUNK_BYTES])
            if not n:
                raise IndexFileError("index file is truncated")
            self.crc = zlib.crc32(view[got : got + n], self.crc)
            got += n
        self.count += got


@contextlib.contextmanager
def save_lock(path: Path) -> Iterator[None]:
    """Serialise savers of one path (processes too): a dead saver's temp file can then be swept safely."""
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` by what ``write`` writes: temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with save_lock(path):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            # Left by a saver that died; we hold the save lock, so nobody is writing it.
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as raw:
                write(raw)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def write_index_file(path: Path, header: Header, faiss_index: Any, ids: Ids) -> None:
    """Write an index file atomically; ``header`` must describe ``faiss_index`` and ``ids``."""
    if header.n_images != len(ids) or header.has_faiss != (faiss_index is not None):
        raise ValueError("the header does not describe the faiss index and ids given")

    def write(raw: BinaryIO) -> None:
        out = CrcWriter(raw)
        data = header.to_json()
        out.write(MAGIC)
        out.write(struct.pack("<I", len(data)))
        out.write(data)
        start = out.count
        if faiss_index is not None:
            faiss.write_index(faiss_index, faiss.PyCallbackIOWriter(out.write, CHUNK_BYTES))
        faiss_len = out.count - start
        little = np.ascontiguousarray(ids, dtype="<i8")
        for offset in range(0, little.nbytes, CHUNK_BYTES):
            out.write(little.data.cast("B")[offset : offset + CHUNK_BYTES])
        raw.write(TRAILER.pack(faiss_len, out.crc, END_MAGIC))

    write_atomically(path, write)


def read_index_file(path: Path) -> IndexFile:
    """Read and check a file written by :func:`write_index_file`.

    Raises ``FileNotFoundError`` if there is none and :class:`IndexFileError` if it is damaged or of
    another format (the checksum covers the whole file).
    """
    with open(path, "rb") as raw:
        src = CrcReader(raw)
        try:
            if src.read_exact(len(MAGIC)) != MAGIC:
                raise IndexFileError(f"{path} is not a multi-vector index file")
            (header_len,) = struct.unpack("<I", src.read_exact(4))
            header = Header.from_json(src.read_exact(header_len), path)
            start = src.count
            faiss_index = (
                faiss.read_index(faiss.PyCallbackIOReader(src.read, CHUNK_BYTES))
                if header.has_faiss
                else None
            )
            faiss_len = src.count - start
            ids = np.empty(header.n_images, dtype="<i8")
            src.read_into(ids)
            trailer = raw.read(TRAILER.size)
        except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as exc:
            if isinstance(exc, IndexFileError):
                raise
            raise IndexFileError(f"{path} is damaged: {exc}") from exc
        if len(trailer) != TRAILER.size or raw.read(1):
            raise IndexFileError(f"{path} is truncated or has trailing bytes")
        want_len, want_crc, end = TRAILER.unpack(trailer)
        if end != END_MAGIC or want_len != faiss_len or want_crc != src.crc:
            raise IndexFileError(f"{path} failed its checksum")
    return IndexFile(header, faiss_index, ids.astype(np.int64))

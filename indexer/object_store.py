"""Library roots in an object store (``s3://bucket/prefix``), through pyarrow's filesystems: listing
for the scan, and streams for sniffing and hashing. Credentials and endpoint come from pyarrow's usual
sources (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``,
instance roles). Only the Ray engine reads such roots (its decode tasks open the URIs)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterator, Sequence
from functools import lru_cache
from typing import Any

from catalog.paths import ObjectURI


@lru_cache(maxsize=8)
def _filesystem(scheme_and_bucket: str, endpoint: str | None) -> Any:
    """One client per bucket (and endpoint: the cache must not outlive a changed AWS_ENDPOINT_URL)."""
    from pyarrow import fs

    filesystem, _ = fs.FileSystem.from_uri(scheme_and_bucket)
    return filesystem


def _split(uri: ObjectURI) -> tuple[Any, str]:
    """(pyarrow filesystem, its path of ``uri``: ``bucket/key``)."""
    scheme, *rest = uri.parts
    return _filesystem(f"{scheme}//{rest[0]}", os.environ.get("AWS_ENDPOINT_URL")), "/".join(rest)


def is_folder(uri: ObjectURI) -> bool:
    """Whether ``uri`` names a bucket or a prefix with objects under it."""
    from pyarrow import fs

    filesystem, inner = _split(uri)
    return bool(filesystem.get_file_info(inner).type == fs.FileType.Directory)


def list_objects(
    root: ObjectURI, folders: Sequence[str] = ("",), excluded: Collection[str] = ()
) -> Iterator[tuple[str, ObjectURI, int, int]]:
    """``(rel, uri, size, mtime_ns)`` of every object under ``folders`` of ``root`` (sorted; objects
    under ``excluded`` folders and hidden names are left out, as the local walk does)."""
    from pyarrow import fs

    filesystem, inner = _split(root)
    seen: set[str] = set()
    for folder in sorted(folders):
        base = f"{inner}/{folder}".rstrip("/")
        infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != fs.FileType.File:
                continue
            rel = info.path[len(inner) + 1 :]
            hidden = any(part.startswith(".") for part in rel.split("/"))
            inside = any(rel == e or rel.startswith(e + "/") for e in excluded)
            if rel in seen or hidden or inside:
                continue
            seen.add(rel)
            mtime_ns = int(info.mtime_ns) if info.mtime_ns is not None else 0
            yield rel, root / rel, int(info.size), mtime_ns


def read_head(uri: ObjectURI, size: int) -> bytes:
    filesystem, inner = _split(uri)
    with filesystem.open_input_file(inner) as fh:
        return bytes(fh.read(size))


def sha256_object(uri: ObjectURI, chunk: int = 1 << 20) -> str:
    filesystem, inner = _split(uri)
    h = hashlib.sha256()
    with filesystem.open_input_stream(inner) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()

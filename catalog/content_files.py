"""Files named by content hash, ``<folder>/<sha[:2]>/<sha><suffix>``, written atomically.

The catalog's derived file storage (thumbnails, model inputs) is built on this: the indexer writes, the
search API reads. Named by content, so duplicates share one file, a moved photo keeps its files, and a
write that a crash interrupted is simply redone (the temp file and rename make a half-written file
impossible).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def content_path(folder: Path, sha256: str, suffix: str) -> Path:
    return Path(folder) / sha256[:2] / f"{sha256}{suffix}"


def write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temp file in the same folder, fsync, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            # The catalog commit that follows is durable (synchronous=FULL); without this fsync a power
            # cut could leave a committed image with an empty file. The indexer's writer thread pays for
            # it, off the model's path.
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ContentFiles:
    """One folder of content-named files with one suffix."""

    suffix = ""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path:
        return content_path(self.folder, sha256, self.suffix)

    def put(self, sha256: str, data: bytes) -> Path:
        """Store ``data`` under its content hash; an existing file is kept (same content, same bytes)."""
        target = self.path(sha256)
        if not target.exists():
            write_atomic(target, data)
        return target

    def read(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

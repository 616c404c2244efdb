"""Thumbnails on disk, one JPEG per content hash: ``<dir>/<sha[:2]>/<sha>.jpg``.

Part of the catalog's derived storage: the indexer writes them, the search API reads them.

Named by content, so duplicates share one file, a moved photo keeps its thumbnail, and a write that a
crash interrupted is simply redone (the temp-file-and-rename makes a half-written thumbnail impossible).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def thumbnail_path(folder: Path, sha256: str) -> Path:
    return folder / sha256[:2] / f"{sha256}.jpg"


class ThumbnailStore:
    def __init__(self, folder: Path, max_side: int) -> None:
        self.folder = Path(folder)
        self.max_side = max_side

    def path(self, sha256: str) -> Path:
        return thumbnail_path(self.folder, sha256)

    def put(self, sha256: str, data: bytes) -> Path:
        target = self.path(sha256)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".jpg")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                # The catalog commit that follows is durable (synchronous=FULL); without this fsync a
                # power cut could leave a committed image with an empty thumbnail file. The writer
                # thread pays for it, off the model's path.
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

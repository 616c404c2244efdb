"""Thumbnails on disk, one JPEG per content hash: ``<dir>/<sha[:2]>/<sha>.jpg``.

Part of the catalog's derived storage (``catalog.content_files``): the indexer writes them, the search
API reads them.
"""

from __future__ import annotations

from pathlib import Path

from catalog.content_files import ContentFiles, content_path


def thumbnail_path(folder: Path, sha256: str) -> Path:
    return content_path(folder, sha256, ThumbnailStore.suffix)


class ThumbnailStore(ContentFiles):
    suffix = ".jpg"

    def __init__(self, folder: Path, max_side: int) -> None:
        super().__init__(folder)
        self.max_side = max_side

"""The service's access to the catalog: short sessions around the ``catalog.repository`` functions.

Nothing else in the service builds SQL; it calls this object, which opens one short session per call
(SQLite in WAL mode lets these reads run while the indexer writes) and returns plain values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from catalog import repository as repo
from catalog.db import make_engine, session_factory
from catalog.paths import ObjectURI
from catalog.repository import ImageInfo
from search_api.service.types import SearchFilters

__all__ = ["CatalogReader", "ImageInfo", "readable_file"]


def readable_file(paths: Sequence[Path], roots: Iterable[Path]) -> Path | None:
    """The first of ``paths`` that is a regular file and resolves (symlinks followed) inside a root."""
    # Object-store roots hold no local files: their originals are not served (docs/scale-out.md).
    resolved_roots = [r.resolve() for r in roots if not isinstance(r, ObjectURI)]
    for path in paths:
        real = path.resolve()
        if real.is_file() and any(real.is_relative_to(r) for r in resolved_roots):
            return real
    return None


class CatalogReader:
    def __init__(self, database_url: str, *, engine: Engine | None = None) -> None:
        self.engine = engine or make_engine(database_url)
        self._sessions: sessionmaker[Session] = session_factory(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ index state
    def published_generation(self) -> int:
        # begin(): the first read of a fresh catalog inserts the state row, which must be committed.
        with self._sessions.begin() as s:
            return int(repo.published_generation(s))

    def vectors(self, image_id: int, model_key: str) -> npt.NDArray[np.float32] | None:
        with self._sessions() as s:
            return repo.load_embeddings(s, [image_id], model_key).get(image_id)

    def vectors_many(self, ids: Iterable[int], model_key: str) -> dict[int, npt.NDArray[np.float32]]:
        with self._sessions() as s:
            return repo.load_embeddings(s, ids, model_key)

    def facets(self) -> repo.LibraryFacets:
        """Filter choices: roots, folders, cameras, capture-date range, live image count."""
        with self._sessions() as s:
            return repo.library_facets(s)

    # ------------------------------------------------------------------ images and files
    def image_infos(self, ids: Iterable[int]) -> dict[int, ImageInfo]:
        """Images among ``ids`` that still have a live file (a hit whose files all went is dropped)."""
        with self._sessions() as s:
            return {i: info for i, info in repo.image_details(s, ids).items() if info.paths}

    def roots(self) -> dict[int, Path]:
        with self._sessions() as s:
            return repo.list_roots(s)

    def filter_ids(self, filters: SearchFilters) -> set[int]:
        """Ids of live images with a file matching every filter (see ``repo.filter_image_ids``).

        ``root`` names a library root folder; an unknown root matches nothing. ``path_prefix`` is
        relative to the root. Capture times compare with the camera's wall-clock time (naive).
        """
        after, before = filters.captured_after, filters.captured_before
        with self._sessions() as s:
            root_id = None
            if filters.root:
                wanted = Path(filters.root).expanduser()
                matches = [i for i, p in repo.list_roots(s).items() if p == wanted or str(p) == filters.root]
                if not matches:
                    return set()
                root_id = matches[0]
            ids = repo.filter_image_ids(
                s,
                root_id=root_id,
                path_prefix=filters.path_prefix or None,
                captured_after=None if after is None else after.replace(tzinfo=None),
                captured_before=None if before is None else before.replace(tzinfo=None),
                camera=filters.camera or None,
            )
        return {int(i) for i in ids}

    def original_path(self, image_id: int) -> Path | None:
        """A readable file holding this image and lying inside its root (no symlink escapes)."""
        with self._sessions() as s:
            paths = repo.image_paths(s, [image_id]).get(image_id, [])
            roots = list(repo.list_roots(s).values())
        return readable_file(paths, roots)

    # ------------------------------------------------------------------ captions
    def captions(self, ids: Iterable[int], model_key: str, prompt: str | None) -> dict[int, str]:
        with self._sessions() as s:
            return repo.get_captions(s, ids, model_key, prompt or "")

    def store_captions(self, texts: dict[int, str], model_key: str, prompt: str | None) -> None:
        with self._sessions.begin() as s:
            for image_id, text in texts.items():
                repo.store_caption(s, image_id, model_key, text, prompt or "")

"""The indexer's side of the catalog: reading the diff's view, and the writes of one run.

All SQL goes through ``catalog.repository``.
Every write function takes the session and leaves the commit to the caller, who commits once per batch.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from catalog import repository as repo
from catalog.models import FileStatus
from indexer.diff import CatalogFile, Failure
from indexer.scan import ScannedFile


def catalog_view(session: Session, root_id: int) -> dict[str, CatalogFile]:
    """The diff's view of one root: relative path -> size, mtime, content hash, status."""
    states = repo.files_under_root(session, root_id)
    hashes = repo.image_hashes(session, (s.image_id for s in states.values() if s.image_id is not None))
    return {
        rel: CatalogFile(
            rel,
            s.size,
            s.mtime_ns,
            hashes.get(s.image_id) if s.image_id is not None else None,
            FileStatus(s.status).value,
            s.error,
        )
        for rel, s in states.items()
    }


def embedded_hashes(session: Session, hashes: set[str], model_key: str) -> set[str]:
    """The hashes whose image has an embedding under ``model_key``."""
    ids = repo.image_ids_by_hash(session, hashes)
    missing = repo.images_missing_embedding(session, ids.values(), model_key)
    return {h for h, i in ids.items() if i not in missing}


def captioned_hashes(session: Session, hashes: set[str], model_key: str, prompt: str = "") -> set[str]:
    ids = repo.image_ids_by_hash(session, hashes)
    have = repo.get_captions(session, ids.values(), model_key, prompt)
    return {h for h, i in ids.items() if i in have}


def _error_text(reason: str, message: str) -> str:
    # One column holds both: the slug first, so `error LIKE 'truncated:%'` finds a kind of failure.
    return f"{reason}: {message}"


@dataclass
class RootIds:
    """Root path -> catalog id, created on first use."""

    ids: dict[Path, int]

    def __getitem__(self, root: Path) -> int:
        return self.ids[root]


def update(
    f: ScannedFile, image_id: int | None, status: FileStatus, error: str | None = None
) -> repo.FileUpdate:
    return repo.FileUpdate(f.rel, f.size, f.mtime_ns, image_id, status, error)


def write_file_updates(
    session: Session, roots: RootIds, updates: Iterable[tuple[ScannedFile, repo.FileUpdate]], generation: int
) -> None:
    by_root: dict[Path, list[repo.FileUpdate]] = {}
    for f, u in updates:
        by_root.setdefault(f.root, []).append(u)
    for root, batch in by_root.items():
        repo.upsert_files(session, roots[root], batch, generation)


def failure_updates(
    session: Session, failures: Iterable[Failure]
) -> list[tuple[ScannedFile, repo.FileUpdate]]:
    """File rows for failures; a failure with a known hash keeps its image id, so a resumed run or the
    next one knows the content without hashing it again."""
    failures = list(failures)
    known = repo.get_or_create_images(
        session, [(fl.sha256, fl.file.size) for fl in failures if fl.sha256 is not None]
    )
    return [
        (
            fl.file,
            update(
                fl.file,
                known.get(fl.sha256) if fl.sha256 else None,
                FileStatus.FAILED,
                _error_text(fl.reason, fl.message),
            ),
        )
        for fl in failures
    ]


def store_metadata(session: Session, image_id: int, meta: object) -> None:
    captured = getattr(meta, "captured_at", None)
    if isinstance(captured, dt.datetime) and captured.tzinfo is not None:
        # The catalog keeps the camera's wall-clock time without a zone.
        captured = captured.replace(tzinfo=None)
    repo.set_image_metadata(
        session,
        image_id,
        width=getattr(meta, "width", None),
        height=getattr(meta, "height", None),
        captured_at=captured,
        camera_make=getattr(meta, "camera_make", None),
        camera_model=getattr(meta, "camera_model", None),
    )


def store_vectors(
    session: Session, image_ids: Sequence[int], model_key: str, vectors: np.ndarray, generation: int
) -> None:
    repo.store_embeddings(session, list(image_ids), model_key, vectors, generation)

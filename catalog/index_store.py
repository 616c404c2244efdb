"""Keeping a vector index file in step with the catalog.

The catalog is the system of record; the index file is derived from it. Each file is stamped with the
catalog generation it reflects, the catalog's uid and the model key. On open, the stamp is checked
against the catalog: a current file is used as is, an older one is caught up incrementally (only the
images whose embedding or liveness changed since its generation are read), and a missing, damaged or
foreign one is rebuilt. The search API keeps a :class:`LiveIndex` and calls :meth:`LiveIndex.refresh`
when it sees a newer published generation.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from catalog import repository as repo
from catalog.vector_index import (
    IndexFileError,
    IndexKind,
    IvfCodec,
    MultiVectorIndex,
    auto_nlist,
    index_device,
)

log = logging.getLogger(__name__)


class StaleIndexError(RuntimeError):
    """The index cannot be caught up incrementally (other catalog, or newer than the catalog): rebuild."""


@dataclass(frozen=True, slots=True)
class VectorIndexOptions:
    """How to build and search vector indexes (the settings give them:
    ``VectorIndexOptions(**settings.vector_index_options())``)."""

    kind: IndexKind | Literal["auto"] = "auto"
    ivf_threshold: int = 250_000
    ivf_threshold_cuda: int = 2_000_000
    ivf_codec: IvfCodec = "sq8"
    nlist: int | None = None
    nprobe: int = 32
    device: Literal["auto", "cpu", "cuda"] = "auto"


def _options(options: VectorIndexOptions | None) -> VectorIndexOptions:
    return VectorIndexOptions() if options is None else options


def index_path(index_dir: str | Path, model_key: str) -> Path:
    """The index file of ``model_key`` in ``index_dir`` (a readable slug plus a hash of the exact key)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key).strip("._")[:80] or "model"
    digest = hashlib.sha256(model_key.encode()).hexdigest()[:12]
    return Path(index_dir) / f"{slug}-{digest}.mvidx"


def choose_kind(
    n_images: int, options: VectorIndexOptions, device: str, current: IndexKind | None = None
) -> IndexKind:
    """The index kind for a collection of ``n_images``.

    "flat" and "ivf" are taken as configured. "auto" is flat up to the threshold (a GPU scan stays fast
    much longer, hence its own threshold) and IVF above it; an IVF index only goes back to flat below
    half the threshold, so a collection hovering at the threshold does not flip on every change.
    """
    if options.kind != "auto":
        return options.kind
    threshold = options.ivf_threshold_cuda if device == "cuda" else options.ivf_threshold
    if current == "ivf":
        return "ivf" if n_images > threshold // 2 else "flat"
    return "ivf" if n_images > threshold else "flat"


def rebuild_reason(
    index: MultiVectorIndex, options: VectorIndexOptions, n_images: int | None = None
) -> str | None:
    """Why ``index`` should be rebuilt rather than caught up, or None.

    ``n_images``: the collection size to judge by (default: the index's own size).
    """
    n = len(index) if n_images is None else n_images
    want = choose_kind(n, options, index.device, current=index.kind)
    if want != index.kind:
        return f"{n} images call for a {want} index, this one is {index.kind}"
    if index.kind == "ivf" and n > max(4 * index.trained_images, 10_000):
        # IVF lists sized for the training-time collection grow long and slow; retrain.
        return f"IVF trained for {index.trained_images} images now holds {n}"
    return None


def build_from_catalog(
    engine: Engine, model_key: str, options: VectorIndexOptions | None = None, *, batch_size: int = 1024
) -> MultiVectorIndex:
    """A new index of every live image with an embedding under ``model_key``, stamped with the
    published generation (read before the rows, so anything newer is re-applied by the next catch-up)."""
    opts = _options(options)
    device = index_device(opts.device)
    with Session(engine) as session:
        state = repo.generation_state(session)
        n_images = repo.count_index_members(session, model_key, state.published_generation)
        shape = repo.embedding_shape(session, model_key)
        kind = choose_kind(n_images, opts, device)
        index = MultiVectorIndex(
            None,
            kind=kind,
            vectors_per_image=shape[0] if shape else 32,
            nlist=opts.nlist,
            nprobe=opts.nprobe,
            ivf_codec=opts.ivf_codec,
            device=device,
        )
        started = time.perf_counter()
        if kind == "ivf" and n_images:
            rows_wanted = 64 * (opts.nlist or auto_nlist(n_images * index.vectors_per_image))
            every = max(1, n_images // max(1, math.ceil(rows_wanted / index.vectors_per_image)))
            sample = [
                batch.upsert_vectors
                for batch in repo.embeddings_changed_since(
                    session, model_key, 0, state.published_generation, sample_every=every
                )
                if len(batch.upsert_ids)
            ]
            if sample:
                index.train(np.concatenate(sample), expected_images=n_images)
        for batch in repo.embeddings_changed_since(
            session, model_key, 0, state.published_generation, batch_size=batch_size
        ):
            index.add(batch.upsert_ids, batch.upsert_vectors)
    index.generation = state.published_generation
    index.info = {"catalog_uid": state.catalog_uid, "model_key": model_key}
    log.info(
        "built %s index of %d images for %s at generation %d in %.1f s",
        kind,
        len(index),
        model_key,
        index.generation,
        time.perf_counter() - started,
    )
    return index


def catch_up(index: MultiVectorIndex, engine: Engine, model_key: str, *, batch_size: int = 1024) -> int:
    """Apply the catalog's changes since ``index.generation`` up to the published generation.

    Returns how many images were added, replaced or removed. Searches may run meanwhile (each batch is
    applied under the index's write lock). Raises :class:`StaleIndexError` if the index belongs to
    another catalog or model, or claims a generation the catalog has not published.
    """
    with Session(engine) as session:
        state = repo.generation_state(session)
        uid = index.info.get("catalog_uid")
        if uid is not None and uid != state.catalog_uid:
            raise StaleIndexError(f"index is from catalog {uid}, this catalog is {state.catalog_uid}")
        if index.info.get("model_key", model_key) != model_key:
            raise StaleIndexError(f"index is for model {index.info['model_key']!r}, not {model_key!r}")
        if index.generation > state.published_generation:
            raise StaleIndexError(
                f"index generation {index.generation} is newer than the catalog's "
                f"{state.published_generation} (catalog restored from a backup?)"
            )
        if index.generation == state.published_generation:
            return 0
        changed = 0
        for batch in repo.embeddings_changed_since(
            session, model_key, index.generation, state.published_generation, batch_size=batch_size
        ):
            changed += index.remove(batch.removed_ids)
            index.add(batch.upsert_ids, batch.upsert_vectors)
            changed += len(batch.upsert_ids)
    log.info(
        "caught up %s index from generation %d to %d: %d images changed",
        model_key,
        index.generation,
        state.published_generation,
        changed,
    )
    index.generation = state.published_generation
    index.info = {"catalog_uid": state.catalog_uid, "model_key": model_key}
    return changed


def open_vector_index(
    engine: Engine,
    model_key: str,
    path: str | Path,
    options: VectorIndexOptions | None = None,
    *,
    save: bool = True,
) -> MultiVectorIndex:
    """Load the index file at ``path``, bring it up to the catalog's published generation, and (with
    ``save``) write it back if anything changed. A missing, damaged, foreign or wrongly-sized index is
    rebuilt from the catalog."""
    opts = _options(options)
    path = Path(path)
    index: MultiVectorIndex | None = None
    changed = False
    try:
        index, _ = MultiVectorIndex.load(path, device=opts.device)
    except FileNotFoundError:
        log.info("no vector index at %s; building it from the catalog", path)
    except IndexFileError as exc:
        log.warning("vector index at %s is unusable (%s); rebuilding it from the catalog", path, exc)
    if index is not None:
        try:
            changed = catch_up(index, engine, model_key) > 0
        except StaleIndexError as exc:
            log.warning("vector index at %s is stale (%s); rebuilding it", path, exc)
            index = None
    if index is not None and (reason := rebuild_reason(index, opts)):
        log.info("rebuilding the vector index at %s: %s", path, reason)
        index = None
    if index is None:
        index = build_from_catalog(engine, model_key, opts)
        changed = True
    if save and changed:
        index.save(path)
    return index


class LiveIndex:
    """The current index of one model, for a server: searches read ``.index``; a background task calls
    :meth:`refresh` (catch up in place, or rebuild beside it and swap the reference) and :meth:`save`.

    Searches never wait for a rebuild: the old index answers until the new one is swapped in. A
    reader that picked up the old reference finishes its search on it.
    """

    def __init__(
        self,
        engine: Engine,
        model_key: str,
        path: str | Path,
        options: VectorIndexOptions | None = None,
    ) -> None:
        self.engine = engine
        self.model_key = model_key
        self.path = Path(path)
        self.options = _options(options)
        self._refresh_lock = threading.Lock()
        self._index = open_vector_index(engine, model_key, self.path, self.options)
        self.unsaved_changes = 0

    @property
    def index(self) -> MultiVectorIndex:
        return self._index

    @property
    def generation(self) -> int:
        return self._index.generation

    def refresh(self) -> bool:
        """Catch up to the published generation; True if the contents changed.

        When the collection has grown or shrunk past what the current index suits (kind, IVF
        training), a new index is built beside it and swapped in; the old one is left untouched for
        searches still running on it.
        """
        with self._refresh_lock:
            index = self._index
            with Session(self.engine) as session:
                state = repo.generation_state(session)
                if (
                    state.published_generation == index.generation
                    and index.info.get("catalog_uid") == state.catalog_uid
                ):
                    return False
                n_images = repo.count_index_members(session, self.model_key)
            if reason := rebuild_reason(index, self.options, n_images):
                log.info("rebuilding the vector index: %s", reason)
                self._swap(build_from_catalog(self.engine, self.model_key, self.options))
                return True
            try:
                changed = catch_up(index, self.engine, self.model_key)
            except StaleIndexError as exc:
                log.warning("rebuilding the vector index: %s", exc)
                self._swap(build_from_catalog(self.engine, self.model_key, self.options))
                return True
            self.unsaved_changes += changed
            return changed > 0

    def _swap(self, index: MultiVectorIndex) -> None:
        self._index = index  # one reference assignment: readers see the old or the new index, whole
        self.unsaved_changes = max(1, len(index))

    def save(self) -> None:
        """Write the current index to its file (atomically; searches go on meanwhile)."""
        with self._refresh_lock:
            index = self._index
            index.save(self.path)
            self.unsaved_changes = 0


def describe(index: MultiVectorIndex) -> dict[str, Any]:
    """A small summary for health endpoints and logs."""
    return {
        "kind": index.kind,
        "images": len(index),
        "dim": index.dim,
        "vectors_per_image": index.vectors_per_image,
        "generation": index.generation,
        "device": index.device,
        "nlist": index.nlist if index.kind == "ivf" else None,
        "nprobe": index.nprobe if index.kind == "ivf" else None,
        "memory_bytes": index.memory_bytes(),
    }

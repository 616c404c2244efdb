"""Keeps the API's vector index in step with the catalog's published generation.

The index itself is the catalog's :class:`catalog.index_store.LiveIndex`: it catches up in place under
the index's read/write lock (searches wait at most for one batch of adds) and swaps in a rebuilt index
with one reference assignment. This module adds the polling loop, start-up retries (the API may start
before the indexer has created the catalog), and :class:`IndexHandle`, the view one request holds: it
captures the index object and its generation when the request starts, so a swap during the request
never mixes two indexes in one response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from catalog.index_store import LiveIndex, VectorIndexOptions
from catalog.vector_index import MultiVectorIndex
from search_api.service.catalog_reader import CatalogReader

log = logging.getLogger(__name__)


class IndexHandle:
    """One request's view of the index: ``[(image id, score)]`` results, best first."""

    def __init__(self, index: MultiVectorIndex | None) -> None:
        self.index = index
        self.generation = index.generation if index is not None else 0

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    @staticmethod
    def _allowed(allowed: set[int] | None) -> npt.NDArray[np.int64] | None:
        return None if allowed is None else np.fromiter(allowed, np.int64, len(allowed))

    @staticmethod
    def _pairs(ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32]) -> list[tuple[int, float]]:
        return [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0]

    def search(
        self, query: npt.NDArray[np.float32], k: int, *, allowed: set[int] | None = None
    ) -> list[tuple[int, float]]:
        """Top-k images by max-sim of one (D,) text vector (exact for a flat index)."""
        if self.index is None or len(self.index) == 0 or (allowed is not None and not allowed):
            return []
        ids, scores = self.index.search(
            np.asarray(query, np.float32)[None], k, allowed_ids=self._allowed(allowed)
        )
        return self._pairs(ids[0], scores[0])

    def search_by_image(
        self,
        vectors: npt.NDArray[np.float32],
        k: int,
        *,
        allowed: set[int] | None = None,
        exclude: int | None = None,
    ) -> list[tuple[int, float]]:
        """Top-k images by Chamfer similarity to an image's (32, D) vectors."""
        if self.index is None or len(self.index) == 0 or (allowed is not None and not allowed):
            return []
        ids, scores = self.index.search_by_image(
            np.asarray(vectors, np.float32), k, exclude_id=exclude, allowed_ids=self._allowed(allowed)
        )
        return self._pairs(ids, scores)


class IndexWatcher:
    """Opens the index when the catalog is reachable, then follows its published generation."""

    def __init__(
        self,
        catalog: CatalogReader,
        model_key: str,
        path: Path,
        options: VectorIndexOptions,
        *,
        poll_seconds: float = 2.0,
        on_change: Callable[[IndexHandle], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.model_key = model_key
        self.path = path
        self.options = options
        self.poll_seconds = poll_seconds
        self.published = 0
        self.error: str | None = None
        self._live: LiveIndex | None = None
        self._on_change = on_change
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return self._live is not None

    def handle(self) -> IndexHandle:
        return IndexHandle(None if self._live is None else self._live.index)

    def refresh(self) -> IndexHandle:
        """Blocking: open the index if needed, then catch up to the published generation."""
        with self._lock:
            self.published = self.catalog.published_generation()
            if self._live is None:
                self._live = LiveIndex(self.catalog.engine, self.model_key, self.path, self.options)
                changed = True
            elif self._live.generation != self.published:
                changed = self._live.refresh()
            else:
                changed = False
            self.error = None
            handle = self.handle()
        if changed:
            log.info("serving index generation %d (%d images)", handle.generation, len(handle))
        if self._on_change is not None:
            self._on_change(handle)
        return handle

    def _try_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # catalog not created yet, locked, unreachable: keep serving, retry
            self.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning(
                "index catch-up failed (%s); serving generation %d", self.error, self.handle().generation
            )

    async def start(self, *, poll: bool = True) -> None:
        """Open the index (retried by the poll loop if the catalog is not there yet); ``poll=False``
        opens it once (a one-shot caller such as the CLI)."""
        await asyncio.to_thread(self._try_refresh)
        if poll:
            self._task = asyncio.create_task(self._poll(), name="index-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            await asyncio.to_thread(self._try_refresh)

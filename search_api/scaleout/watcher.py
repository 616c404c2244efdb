"""The coordinator of the shards, in the ingress process: what the single-process server's
``IndexWatcher``/``IndexHandle`` are, over Ray actors (see ``shards`` for exactness and generations).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from catalog.index_store import VectorIndexOptions
from search_api.scaleout.shards import Hits, IndexShard, ids_array, merge_top
from search_api.service.catalog_reader import CatalogReader
from search_api.service.errors import Unavailable
from search_api.service.index_watcher import IndexHandle, IndexWatcher

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
QUERY_TIMEOUT_SECONDS = 30.0


def unavailable(why: str) -> Unavailable:
    return Unavailable(
        f"the search index is not available: {why}; retry shortly", code="shards-unavailable",
        retry_after_seconds=RETRY_AFTER_SECONDS,
    )  # fmt: skip


class ShardedHandle(IndexHandle):
    """One request's view: a generation every shard holds; answers are whole (all shards) or a 503."""

    def __init__(self, shards: list[Any], generation: int, size: int) -> None:
        super().__init__(None)
        self.shards = shards
        self.generation = generation
        self.size = size

    def __len__(self) -> int:
        return self.size

    def _gather(self, refs: list[Any]) -> list[Hits]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            parts: list[Hits] = ray.get(refs, timeout=QUERY_TIMEOUT_SECONDS)
            return parts
        except RayActorError as exc:  # a shard died; Ray restarts it and the watcher reloads it
            raise unavailable("a shard is restarting") from exc
        except GetTimeoutError as exc:
            raise unavailable("a shard did not answer in time") from exc
        except RayTaskError as exc:  # ShardNotReady: restarted and not reloaded yet
            raise unavailable("a shard is reloading") from exc

    def search(self, query: np.ndarray, k: int, *, allowed: set[int] | None = None) -> Hits:
        if self.size == 0 or (allowed is not None and not allowed):
            return []
        q, ids = np.asarray(query, np.float32), ids_array(allowed)
        parts = self._gather([s.search.remote(self.generation, q, k, ids) for s in self.shards])
        return merge_top(parts, k)

    def search_by_image(
        self, vectors: np.ndarray, k: int, *, allowed: set[int] | None = None, exclude: int | None = None
    ) -> Hits:
        if self.size == 0 or (allowed is not None and not allowed):
            return []
        v, ids = np.asarray(vectors, np.float32), ids_array(allowed)
        parts = self._gather(
            [s.search_by_image.remote(self.generation, v, k, ids, exclude) for s in self.shards]
        )
        return merge_top(parts, k)


class ShardedWatcher(IndexWatcher):
    """Follows the published generation with N shard actors: prepare it on all, then switch all."""

    def __init__(
        self,
        catalog: CatalogReader,
        model_key: str,
        options: VectorIndexOptions,
        *,
        shards: int,
        database_url: str,
        num_gpus: float = 0.0,
        poll_seconds: float = 2.0,
        on_change: Any = None,
    ) -> None:
        # No index file: the shards build their partitions from the catalog.
        super().__init__(catalog, model_key, Path(), options, poll_seconds=poll_seconds, on_change=on_change)
        import ray

        actor = ray.remote(IndexShard).options(max_restarts=-1, num_cpus=0, num_gpus=num_gpus)
        self.shards: list[Any] = [
            actor.remote(database_url, model_key, i, shards, options) for i in range(shards)
        ]
        self._current: ShardedHandle | None = None
        self._swap = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def handle(self) -> IndexHandle:
        current = self._current
        return current if current is not None else IndexHandle(None)

    def refresh(self) -> IndexHandle:
        """Bring every shard to the published generation (a restarted one too), then switch them all."""
        import ray

        with self._swap:
            self.published = self.catalog.published_generation()
            target = self.published
            held = ray.get([s.generations.remote() for s in self.shards])
            current = self._current
            if current is not None and current.generation == target and all(target in h for h in held):
                # Stable for a poll: the generation before it has no queries left worth keeping.
                ray.get([s.retire.remote(target) for s in self.shards])
                self.error = None
                return current
            sizes = ray.get([s.prepare.remote(target) for s in self.shards])
            ray.get([s.activate.remote(target) for s in self.shards])
            changed = current is None or current.generation != target
            self._current = ShardedHandle(self.shards, target, int(sum(sizes)))
            self.error = None
            handle = self._current
        if changed:
            log.info(
                "serving generation %d over %d shards (%d images)", target, len(self.shards), len(handle)
            )
        if self._on_change is not None:
            self._on_change(handle)
        return handle

    async def stop(self) -> None:
        import ray

        await super().stop()
        for s in self.shards:
            ray.kill(s)

    def shard_pids(self) -> list[int]:
        import ray

        pids: list[int] = ray.get([s.pid.remote() for s in self.shards])
        return pids

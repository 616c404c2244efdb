"""Index shards: each a Ray actor holding the flat (or IVF) index of the images with
``image_id % shards == shard``, at the generations the coordinator asked for.

Exactness: every image lives in exactly one shard, and each image's score (max-sim, Chamfer) depends
only on its own vectors and the query. An image of the global top-k has fewer than k images above it
in the whole collection, so fewer than k in its shard: it is in its shard's (exact, flat) top-k. The
k best of the shards' lists are therefore the global top-k, with the same scores. ``merge_top``
orders by (score desc, id asc).

Generations never mix: a shard builds the next generation beside the one it serves (``prepare``), the
coordinator switches all shards at once (``activate``), and a query names its generation; a shard that
does not hold it (restarted, or not caught up) refuses, and the query is answered 503 rather than
from fewer or mixed partitions.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from catalog import repository as repo
from catalog.index_store import VectorIndexOptions, choose_kind
from catalog.vector_index import MultiVectorIndex
from catalog.vector_index import index_device as resolve_device

log = logging.getLogger(__name__)

Hits = list[tuple[int, float]]


class ShardNotReady(RuntimeError):
    """This shard does not hold the generation a query asked for (restarted, or still catching up)."""


def merge_top(parts: Iterable[Hits], k: int) -> Hits:
    """The k best (image id, score) pairs of disjoint partitions' top-k lists."""
    return heapq.nsmallest(k, (h for part in parts for h in part), key=lambda h: (-h[1], h[0]))


def _mine(ids: np.ndarray, shard: int, shards: int) -> np.ndarray:
    mask: np.ndarray = np.asarray(ids, dtype=np.int64) % shards == shard
    return mask


class IndexShard:
    """One partition's index (run as a Ray actor with ``max_restarts=-1``: a restarted shard is empty
    until the coordinator prepares it again)."""

    def __init__(
        self, database_url: str, model_key: str, shard: int, shards: int, options: VectorIndexOptions
    ) -> None:
        from catalog.db import make_engine

        self.engine: Engine = make_engine(database_url)
        self.model_key = model_key
        self.shard, self.shards = shard, shards
        self.options = options
        self.indexes: dict[int, MultiVectorIndex] = {}  # generation -> index; the active one and the next
        self.active: int | None = None

    def pid(self) -> int:
        return os.getpid()

    def generations(self) -> list[int]:
        return sorted(self.indexes)

    def prepare(self, generation: int) -> int:
        """Hold the index of this partition at ``generation`` (beside the active one); returns its size."""
        if generation in self.indexes:
            return len(self.indexes[generation])
        base = self.indexes.get(self.active) if self.active is not None else None
        if base is not None and base.kind == "flat" and base.generation < generation:
            index = self._caught_up(base, generation)
        else:
            index = self._build(generation)
        self.indexes[generation] = index
        return len(index)

    def activate(self, generation: int) -> None:
        """Serve ``generation``; the one before stays for the queries still running on it."""
        if generation not in self.indexes:
            raise ShardNotReady(f"shard {self.shard} has no index at generation {generation}")
        previous, self.active = self.active, generation
        self.retire(min(generation, previous) if previous is not None else generation)

    def retire(self, below: int) -> None:
        """Drop the generations older than ``below``."""
        for g in [g for g in self.indexes if g < below]:
            del self.indexes[g]

    def _index(self, generation: int) -> MultiVectorIndex:
        index = self.indexes.get(generation)
        if index is None:
            raise ShardNotReady(f"shard {self.shard} is not at generation {generation}")
        return index

    def search(self, generation: int, query: np.ndarray, k: int, allowed: np.ndarray | None) -> Hits:
        index = self._index(generation)
        if len(index) == 0:
            return []
        ids, scores = index.search(np.asarray(query, np.float32)[None], k, allowed_ids=allowed)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def search_by_image(
        self, generation: int, vectors: np.ndarray, k: int, allowed: np.ndarray | None, exclude: int | None
    ) -> Hits:
        index = self._index(generation)
        if len(index) == 0:
            return []
        ids, scores = index.search_by_image(
            np.asarray(vectors, np.float32), k, exclude_id=exclude, allowed_ids=allowed
        )
        return [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0]

    def get_vectors(self, generation: int, image_id: int) -> np.ndarray | None:
        index = self._index(generation)
        return index.get_vectors(np.array([image_id]))[0] if image_id in index else None

    # ------------------------------------------------------------------ building
    def _new(self, n_images: int, vectors_per_image: int) -> MultiVectorIndex:
        device = resolve_device(self.options.device)
        return MultiVectorIndex(
            None,
            kind=choose_kind(n_images, self.options, device),
            vectors_per_image=vectors_per_image,
            nlist=self.options.nlist,
            nprobe=self.options.nprobe,
            ivf_codec=self.options.ivf_codec,
            device=device,
        )

    def _add(self, index: MultiVectorIndex, ids: np.ndarray, vectors: np.ndarray) -> None:
        keep = _mine(ids, self.shard, self.shards)
        if keep.any():
            index.add(ids[keep], vectors[keep])

    def _build(self, generation: int) -> MultiVectorIndex:
        """The partition at ``generation`` from the catalog (IVF: trained on the partition's rows)."""
        with Session(self.engine) as session:
            total = repo.count_index_members(session, self.model_key, generation)
            shape = repo.embedding_shape(session, self.model_key)
            index = self._new(total // self.shards + 1, shape[0] if shape else 32)
            batches = list(repo.embeddings_changed_since(session, self.model_key, 0, generation))
        if index.kind == "ivf":
            sample = [b.upsert_vectors[_mine(b.upsert_ids, self.shard, self.shards)] for b in batches]
            rows = np.concatenate([s for s in sample if len(s)]) if any(len(s) for s in sample) else None
            if rows is not None:
                index.train(rows, expected_images=sum(len(s) for s in sample))
        for b in batches:
            self._add(index, b.upsert_ids, b.upsert_vectors)
        index.generation = generation
        log.info(
            "shard %d/%d: built %d images at generation %d", self.shard, self.shards, len(index), generation
        )
        return index

    def _caught_up(self, base: MultiVectorIndex, generation: int) -> MultiVectorIndex:
        """A flat copy of ``base`` with the catalog's changes up to ``generation`` (float16 rows copy
        exactly, so this equals a fresh build)."""
        index = MultiVectorIndex(
            None, kind="flat", vectors_per_image=base.vectors_per_image, device=base.device
        )
        ids = base.ids()
        if len(ids):
            index.add(ids, base.get_vectors(ids))
        with Session(self.engine) as session:
            for b in repo.embeddings_changed_since(session, self.model_key, base.generation, generation):
                index.remove(b.removed_ids)
                self._add(index, b.upsert_ids, b.upsert_vectors)
        index.generation = generation
        return index


def shard_of(image_id: int, shards: int) -> int:
    return int(image_id) % shards


def ids_array(ids: Sequence[int] | set[int] | None) -> np.ndarray | None:
    return None if ids is None else np.fromiter(ids, np.int64, len(ids))

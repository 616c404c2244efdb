"""The backend interface that flat and IVF implement, and the pieces they share.

A backend stores the rows of one index (``vectors_per_image`` (V) rows of dimension D per image) in
faiss and searches them. The facade, :class:`catalog.vector_index.MultiVectorIndex`, validates input,
keeps the slot -> image id array and holds the read/write lock; a backend is only called under that
lock, with valid input, and answers in image ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Slots:
    """The index's images as one search sees them: the image id of each slot, and which it may return."""

    ids: Ids
    allowed: Mask | None = None  # per slot; None: all

    @property
    def count(self) -> int:
        """How many images the search may return."""
        return len(self.ids) if self.allowed is None else int(self.allowed.sum())


class Backend(ABC):
    """Row storage and search for one kind of index. Images are appended in the facade's slot order."""

    def __init__(self, dim: int, vectors_per_image: int) -> None:
        self.dim = dim
        self.vectors_per_image = vectors_per_image

    @property
    @abstractmethod
    def faiss_index(self) -> Any:
        """The faiss object the index file stores; None while an IVF index is untrained."""

    @property
    def is_trained(self) -> bool:
        return self.faiss_index is not None and bool(self.faiss_index.is_trained)

    def train(self, vectors: Floats, expected_images: int | None) -> None:  # noqa: B027 - optional hook
        """Learn what the index needs from a sample (n, V, D) or (rows, D); nothing, unless overridden."""

    @abstractmethod
    def add(self, ids: Ids, vectors: Floats) -> None:
        """Append these images (new slots at the end, in this order); ``vectors`` (n, V, D)."""

    @abstractmethod
    def remove(self, present: Mask, ids: Ids) -> None:
        """Drop the images in the slots where ``present`` is true (``ids``: their image ids).

        The other slots keep their order.
        """

    @abstractmethod
    def vectors(self, ids: Ids, slots: Ids) -> Floats:
        """float32 (n, V, D) of images held, given both as image ids and as their slots (n >= 1)."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Approximate resident size of the rows and faiss structures (the slot array not included)."""

    def top_images(self, q: Floats, k: int, slots: Slots) -> tuple[Ids, Floats]:
        """The top ``k`` distinct images by max-sim for each query vector of ``q`` (M, D).

        Returns image ids int64 (M, k) and scores float32 (M, k), best first, padded with -1 / -inf;
        1 <= k <= ``slots.count``. By default the best ``V * k`` rows, grouped by image (see
        ``catalog.vector_index.index`` for why that is exact).
        """
        scores, images = self._search_rows(q, self.vectors_per_image * k, slots)
        return first_distinct(images, scores, k)

    @abstractmethod
    def _search_rows(self, q: Floats, fetch: int, slots: Slots) -> tuple[Floats, Ids]:
        """The best ``fetch`` rows for each query vector: (scores, image id of each row or -1), (M, fetch)."""

    @abstractmethod
    def chamfer_topk(self, q: Floats, k: int, slots: Slots) -> tuple[Ids, Floats]:
        """Top ``k`` images by Chamfer similarity to the query image's vectors ``q`` (Vq, D).

        Returns at most ``k`` image ids int64 and their scores float32, best first; 1 <= k <= ``slots.count``.
        """


def first_distinct(images: Ids, scores: Floats, k: int) -> tuple[Ids, Floats]:
    """Per row of ``images`` (M, R), in score order: the first ``k`` distinct images (>= 0), their scores."""
    m = images.shape[0]
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_scores = np.full((m, k), -np.inf, dtype=np.float32)
    for i in range(m):
        valid = images[i] >= 0
        row_images, row_scores = images[i][valid], scores[i][valid]
        _, first = np.unique(row_images, return_index=True)
        first = np.sort(first)[:k]
        out_ids[i, : len(first)] = row_images[first]
        out_scores[i, : len(first)] = row_scores[first]
    return out_ids, out_scores


def chamfer_scores(rows: Floats, q: Floats, vectors_per_image: int) -> Floats:
    """Chamfer score against ``q`` (Vq, D) of each image whose rows (n * V, D) are given, image-major."""
    sims = rows @ q.T
    scores: Floats = sims.reshape(-1, vectors_per_image, q.shape[0]).max(axis=1).mean(axis=1)
    return scores


def bitmap_selector(mask: Mask) -> tuple[Any, npt.NDArray[np.uint8]]:
    """A faiss selector of the rows where ``mask`` is true; keep the returned array alive while it's used."""
    bits = np.packbits(mask, bitorder="little")
    # The size is in bytes; ids beyond it are not members.
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits

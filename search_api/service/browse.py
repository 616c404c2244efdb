"""What a browsing client (the web page) needs besides searches: the library's filter choices,
near-duplicate groups among hits, and display images of any format.

Scores are never touched here: groups only say which hits belong together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from blip2_embed.errors import ImageError
from blip2_embed.images import load_image, make_thumbnail
from catalog.repository import LibraryFacets
from search_api.service.components import Components, Floats
from search_api.service.errors import NotFound
from search_api.service.image_store import LRU
from search_api.service.types import ImageBytes

# One /duplicates call groups at most this many hits.
MAX_DUPLICATE_IDS = 500
# One display image is up to a few hundred KB; a handful covers a viewer's back-and-forth. Keyed by the
# file (path, mtime, size) and the side, so one process serving several catalogs is fine.
_display_cache: LRU[tuple[str, int, int, int], bytes] = LRU(32)


@dataclass(frozen=True)
class DuplicateGroups:
    threshold: float
    groups: list[list[int]]  # each: a leader (first given) and the ids folded into it, in input order


async def library(c: Components) -> LibraryFacets:
    return await asyncio.to_thread(c.catalog.facets)


def image_similarity(vectors: Floats) -> Floats:
    """(n, n) symmetric Chamfer similarity of n images' (32, D) L2-normalised vectors.

    sim(a, b) = (mean_i max_j a_i·b_j + mean_j max_i a_i·b_j) / 2: the "more like this" score taken
    both ways, so the grouping does not depend on which hit came first.
    """
    n, m, d = vectors.shape
    flat = vectors.reshape(n * m, d).astype(np.float32)
    a_to_b = np.empty((n, n), np.float32)
    for a in range(n):  # one image at a time: (m, n*m) dots instead of an (n*m)^2 matrix
        a_to_b[a] = (vectors[a].astype(np.float32) @ flat.T).reshape(m, n, m).max(axis=2).mean(axis=0)
    out: Floats = ((a_to_b + a_to_b.T) / 2).astype(np.float32)
    return out


def group_near_duplicates(vectors: dict[int, Floats], ids: list[int], threshold: float) -> list[list[int]]:
    """Greedy groups in ``ids`` order: each ungrouped id leads a group of the later ungrouped ids whose
    similarity to it is at least ``threshold``. Only groups of two or more are returned."""
    known = [i for i in ids if i in vectors]
    if len(known) < 2:
        return []
    sim = image_similarity(np.stack([vectors[i] for i in known]))
    taken = np.zeros(len(known), bool)
    groups = []
    for a in range(len(known)):
        if taken[a]:
            continue
        members = [b for b in range(a + 1, len(known)) if not taken[b] and sim[a, b] >= threshold]
        if members:
            taken[members] = True
            groups.append([known[a]] + [known[b] for b in members])
    return groups


async def near_duplicates(c: Components, ids: list[int], threshold: float | None = None) -> DuplicateGroups:
    """Near-duplicate groups among ``ids`` (best-ranked first); threshold default: the settings'."""
    thr = c.settings.duplicate_similarity if threshold is None else threshold
    ids = list(dict.fromkeys(ids))[:MAX_DUPLICATE_IDS]
    vectors = await asyncio.to_thread(c.catalog.vectors_many, ids, c.retrieval_key)
    groups = await asyncio.to_thread(group_near_duplicates, vectors, ids, thr)
    return DuplicateGroups(thr, groups)


def _display(c: Components, image_id: int) -> bytes | None:
    side = c.settings.display_max_side
    path = c.catalog.original_path(image_id)
    if path is None:
        return None
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, side)
    cached = _display_cache.get(key)
    if cached is not None:
        return cached
    try:
        image = load_image(path, max_pixels=c.settings.max_image_pixels, draft_size=side)
    except ImageError:
        return None
    data = make_thumbnail(image, side, quality=88)
    _display_cache.put(key, data)
    return data


async def display(c: Components, image_id: int) -> ImageBytes:
    """A JPEG of the original for viewing (longer side at most ``display_max_side``), whatever the
    original's format: HEIC, AVIF, TIFF ... that browsers may not show are decoded here."""
    data = await asyncio.to_thread(_display, c, image_id)
    if data is None:
        raise NotFound(f"no readable image with id {image_id}", code="unknown-image")
    return ImageBytes(data, "image/jpeg")

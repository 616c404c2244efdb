"""What the web page adds on top of ranking: date order, near-duplicate groups, display images.

No HTTP here: the routes call these with the app state. Scores are never changed: date order only
reorders hits of the relevance ranking, and near-duplicate groups only say which hits belong together.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

import numpy as np

from blip2_embed.errors import ImageError
from blip2_embed.images import load_image, make_thumbnail
from search_api.deps import AppState
from search_api.media import LRU
from search_api.schemas import SearchHit, SearchResponse

# One display image is up to a few hundred KB; a handful covers the viewer's back-and-forth.
_DISPLAY_CACHE_ITEMS = 32
# Keyed by the file (path, mtime, size) and the side, so one process serving several catalogs is fine.
_display_cache: LRU[tuple[str, int, int, int], bytes] = LRU(_DISPLAY_CACHE_ITEMS)


def _date_key(hit: SearchHit) -> tuple[int, float, int]:
    # Newest first; undated photos last, in relevance order. Capture times are naive wall-clock times.
    if hit.captured_at is None:
        return (1, 0.0, hit.rank)
    stamp = hit.captured_at.replace(tzinfo=None) - dt.datetime(1970, 1, 1)
    return (0, -stamp.total_seconds(), hit.rank)


def order_by_date(pool: SearchResponse, *, k: int, offset: int) -> SearchResponse:
    """One page of ``pool``'s hits (the best ``date_sort_pool`` of a ranking) ordered newest first.

    Each hit keeps its relevance ``rank`` and scores; only the order changes.
    """
    ordered = sorted(pool.hits, key=_date_key)
    end = offset + k
    return pool.model_copy(
        update={
            "k": k,
            "offset": offset,
            "hits": ordered[offset:end],
            "next_offset": end if len(ordered) > end else None,
        }
    )


async def fill_captions(state: AppState, hits: list[SearchHit], count: int) -> None:
    """Caption the first ``count`` hits (cached ones from the catalog, the rest generated and stored)."""
    if not count or not state.has_captions or not hits:
        return
    key = state.encoder.caption_key or ""
    ids = [h.image_id for h in hits[:count]]
    cached = await asyncio.to_thread(state.view.captions, ids, key, None)
    todo = [i for i in ids if i not in cached]
    fresh: dict[int, str] = {}
    if todo:
        pixels = await state.media.pixels_many(todo)
        ok = [i for i in todo if i in pixels]
        if ok:
            res = await state.worker.score(
                np.stack([pixels[i] for i in ok]),
                None,
                caption_rows=list(range(len(ok))),
                max_new_tokens=state.settings.caption_max_new_tokens,
            )
            fresh = {i: res.captions[r] for r, i in enumerate(ok) if r in res.captions}
            await asyncio.to_thread(state.view.store_captions, fresh, key, None)
            state.metrics.captions.labels("generated").inc(len(fresh))
    for h in hits[:count]:
        h.caption = cached.get(h.image_id) or fresh.get(h.image_id)


@dataclass(frozen=True)
class DuplicateGroups:
    groups: list[list[int]]  # each: a leader (first given) and the ids collapsed into it, input order
    threshold: float


def image_similarity(vectors: np.ndarray) -> np.ndarray:
    """(n, n) symmetric Chamfer similarity of n images' (32, D) L2-normalised vectors.

    sim(a, b) = (mean_i max_j a_i·b_j + mean_j max_i a_i·b_j) / 2: the "more like this" score taken
    both ways, so the grouping does not depend on which hit came first.
    """
    n, m, d = vectors.shape
    flat = vectors.reshape(n * m, d).astype(np.float32)
    a_to_b = np.empty((n, n), np.float32)
    for a in range(n):  # one image at a time: (m, n*m) dots instead of an (n*m)^2 matrix
        a_to_b[a] = (vectors[a].astype(np.float32) @ flat.T).reshape(m, n, m).max(axis=2).mean(axis=0)
    return (a_to_b + a_to_b.T) / 2


def group_near_duplicates(
    vectors: dict[int, np.ndarray], ids: list[int], threshold: float
) -> list[list[int]]:
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


async def near_duplicates(state: AppState, ids: list[int], threshold: float) -> DuplicateGroups:
    key = state.encoder.retrieval_key or ""
    vectors = await asyncio.to_thread(state.view.vectors_many, ids, key)
    groups = await asyncio.to_thread(group_near_duplicates, vectors, ids, threshold)
    return DuplicateGroups(groups, threshold)


def display_image(state: AppState, image_id: int) -> bytes | None:
    """A JPEG of the original for the viewer (longer side at most ``display_max_side``), whatever the
    original's format (HEIC, AVIF, TIFF... decode on the server); None when no readable file."""
    side = state.settings.display_max_side
    path = state.view.original_path(image_id)
    if path is None:
        return None
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, side)
    cached = _display_cache.get(key)
    if cached is not None:
        return cached
    try:
        image = load_image(path, max_pixels=state.settings.max_image_pixels, draft_size=side)
    except ImageError:
        return None
    data = make_thumbnail(image, side, quality=88)
    _display_cache.put(key, data)
    return data

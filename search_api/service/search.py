"""Searches: text -> images, image -> images ("more like this" and uploads).

One straight path each: options checked -> query encoded (text vectors cached) -> filter ids -> vector
index -> page ranked (``_page``) -> ``SearchPage``. The ranking rule is ``search_api.service.ranking``;
docs/search_api.md documents the scores.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace

import numpy as np

from catalog.paths import encode_path
from catalog.repository import ImageInfo
from search_api.service.components import Components, Floats
from search_api.service.errors import BadInput, NotFound
from search_api.service.index_watcher import IndexHandle
from search_api.service.ranking import Candidate, final_order, next_offset
from search_api.service.timing import Timer
from search_api.service.types import Hit, SearchFilters, SearchOptions, SearchPage

# No page starts past this offset.
MAX_OFFSET = 10_000
# Extra ITC hits asked of the index: one tells whether a next page exists, the rest cover images whose
# files went since the index caught up (they are dropped, not shown broken).
_SLACK = 1 + 8


def check_options(c: Components, opts: SearchOptions) -> None:
    """The same limits the HTTP schema states, for every caller."""
    s = c.settings
    for name, value, low, high in (
        ("k", opts.k, 1, s.max_k),
        ("offset", opts.offset, 0, MAX_OFFSET),
        ("rerank", opts.rerank, 0, s.max_rerank_depth),
        ("captions", opts.captions, 0, s.max_caption_hits),
    ):
        if not low <= value <= high:
            raise BadInput(f"{name}: must be between {low} and {high} (got {value})", code="validation-error")
    if opts.sort not in ("relevance", "date"):
        raise BadInput(f"sort: relevance or date (got {opts.sort!r})", code="validation-error")
    opts.filters.check()


async def search_text(c: Components, text: str, opts: SearchOptions) -> SearchPage:
    """Text -> images: ITC top-N over the index, ITM re-rank of N, captions of the top hits."""
    check_options(c, opts)
    if not text.strip():
        raise BadInput("the query text is empty", code="validation-error")
    timer = c.timer()
    with timer.stage("text_encode"):
        vec, truncated = await c.encode_text(text)
    allowed = await _allowed(c, opts.filters, timer)
    snapshot = c.index.handle()  # this search's index, whatever swaps happen meanwhile
    need = max(opts.offset + opts.k, opts.rerank, _pool(c, opts)) + _SLACK
    with timer.stage("vector_search"):
        hits = await asyncio.to_thread(snapshot.search, vec, need, allowed=allowed)
    if opts.sort == "date":
        return await _by_date(c, snapshot, hits, opts, timer, text=text, truncated=truncated)
    return await _page(c, snapshot, hits, opts, timer, text=text, truncated=truncated)


async def search_similar(c: Components, image_id: int, opts: SearchOptions) -> SearchPage:
    """ "More like this": images closest to a catalog image (Chamfer similarity of the 32 vectors)."""
    check_options(c, opts)
    timer = c.timer()
    with timer.stage("load_query_vectors"):
        vectors = await asyncio.to_thread(c.catalog.vectors, image_id, c.retrieval_key)
    if vectors is None:
        raise NotFound(f"no indexed image with id {image_id}", code="unknown-image")
    return await _by_image(c, vectors, opts, timer, exclude=image_id)


async def search_upload(c: Components, data: bytes, opts: SearchOptions) -> SearchPage:
    """Image -> images for an uploaded image's bytes."""
    check_options(c, opts)
    timer = c.timer()
    with timer.stage("decode_upload"):
        pixels = await c.upload_pixels(data)
    with timer.stage("image_encode"):
        vectors = (await c.worker.embed_images(pixels))[0]
    return await _by_image(c, vectors, opts, timer)


async def _by_image(
    c: Components, vectors: Floats, opts: SearchOptions, timer: Timer, *, exclude: int | None = None
) -> SearchPage:
    allowed = await _allowed(c, opts.filters, timer)
    snapshot = c.index.handle()
    need = max(opts.offset + opts.k, _pool(c, opts)) + _SLACK
    with timer.stage("vector_search"):
        hits = await asyncio.to_thread(
            snapshot.search_by_image, np.asarray(vectors), need, allowed=allowed, exclude=exclude
        )
    if opts.sort == "date":
        return await _by_date(c, snapshot, hits, opts, timer, text=None, truncated=False)
    return await _page(c, snapshot, hits, opts, timer, text=None, truncated=False)


def _pool(c: Components, opts: SearchOptions) -> int:
    return c.settings.date_sort_pool if opts.sort == "date" else 0


def _date_key(hit: Hit) -> tuple[int, float, int]:
    # Newest first; undated photos last, in relevance order. Capture times are naive wall-clock times.
    if hit.captured_at is None:
        return (1, 0.0, hit.rank)
    return (0, -(hit.captured_at.replace(tzinfo=None) - dt.datetime(1970, 1, 1)).total_seconds(), hit.rank)


async def _by_date(
    c: Components,
    snapshot: IndexHandle,
    hits: list[tuple[int, float]],
    opts: SearchOptions,
    timer: Timer,
    *,
    text: str | None,
    truncated: bool,
) -> SearchPage:
    """sort=date: the best ``date_sort_pool`` hits of the relevance ranking, newest first. Each hit keeps
    its rank and scores; only the order changes. The page's first ``captions`` hits are captioned."""
    pool_opts = replace(opts, k=c.settings.date_sort_pool, offset=0, captions=0, sort="relevance")
    pool = await _page(c, snapshot, hits, pool_opts, timer, text=text, truncated=truncated)
    ordered = sorted(pool.hits, key=_date_key)
    page = ordered[opts.offset : opts.offset + opts.k]
    n_cap = opts.captions if c.has_captions else 0
    if n_cap and page:
        key = c.encoder.caption_key or ""
        ids = [h.image_id for h in page[:n_cap]]
        cached = await asyncio.to_thread(c.catalog.captions, ids, key, None)
        todo = [i for i in ids if i not in cached]
        fresh: dict[int, str] = {}
        if todo:
            infos = await asyncio.to_thread(c.catalog.image_infos, todo)
            fresh = await _caption(c, [i for i in todo if i in infos], infos, timer)
            if fresh:
                c.metrics.captions.labels("generated").inc(len(fresh))
                await asyncio.to_thread(c.catalog.store_captions, fresh, key, None)
        for h in page[:n_cap]:
            h.caption = cached.get(h.image_id) or fresh.get(h.image_id)
    return replace(
        pool, k=opts.k, offset=opts.offset, hits=page,
        next_offset=next_offset(len(ordered), opts.offset, opts.k), timings_ms=timer.done(),
    )  # fmt: skip


async def _allowed(c: Components, filters: SearchFilters, timer: Timer) -> set[int] | None:
    if not filters.active():
        return None
    with timer.stage("filter"):
        return await asyncio.to_thread(c.catalog.filter_ids, filters)


async def _page(
    c: Components,
    snapshot: IndexHandle,
    hits: list[tuple[int, float]],
    opts: SearchOptions,
    timer: Timer,
    *,
    text: str | None,
    truncated: bool,
) -> SearchPage:
    """Raw hits (best first, at least offset + k + 1 of them when there are) -> one ranked page."""
    with timer.stage("load_metadata"):  # the one catalog read of these ids' metadata
        infos = await asyncio.to_thread(c.catalog.image_infos, [i for i, _ in hits])
    cands = [Candidate(i, s) for i, s in hits if i in infos]
    depth = min(opts.rerank, len(cands)) if text is not None else 0
    end = opts.offset + opts.k
    n_cap = opts.captions if c.has_captions else 0
    key = c.encoder.caption_key or ""
    cached: dict[int, str] = {}
    if n_cap:
        # The first n_cap hits of the page get captions. With re-ranking the page is only known after
        # ITM, so every re-ranked candidate that could land there is a possible target.
        possible = [x.image_id for x in cands[: max(depth, end)]]
        with timer.stage("captions_cached"):
            cached = await asyncio.to_thread(c.catalog.captions, possible, key, None)
    if depth:
        order, fresh = await _rerank(c, cands, depth, infos, text or "", opts, n_cap, cached, timer)
    else:
        order = cands
        targets = [x.image_id for x in order[opts.offset : end][:n_cap] if x.image_id not in cached]
        fresh = await _caption(c, targets, infos, timer) if targets else {}
    page = order[opts.offset : end]
    for x in page[:n_cap]:
        x.caption = cached.get(x.image_id) or fresh.get(x.image_id)
    if fresh:
        c.metrics.captions.labels("generated").inc(len(fresh))
        with timer.stage("captions_store"):
            await asyncio.to_thread(c.catalog.store_captions, fresh, key, None)
    if cached:
        c.metrics.captions.labels("cache").inc(sum(1 for x in page[:n_cap] if x.image_id in cached))
    return SearchPage(
        query=text,
        query_truncated=truncated,
        k=opts.k,
        offset=opts.offset,
        rerank_depth=opts.rerank if text is not None else 0,
        generation=snapshot.generation,
        indexed_images=len(snapshot),
        hits=[_hit(x, infos[x.image_id], opts.offset + n + 1) for n, x in enumerate(page)],
        next_offset=next_offset(len(order), opts.offset, opts.k),
        timings_ms=timer.done(),
    )


async def _rerank(
    c: Components,
    cands: list[Candidate],
    depth: int,
    infos: dict[int, ImageInfo],
    text: str,
    opts: SearchOptions,
    n_cap: int,
    cached: dict[int, str],
    timer: Timer,
) -> tuple[list[Candidate], dict[int, str]]:
    """ITM of the first ``depth`` candidates, the final order (computed once, here), and captions of
    the page's top hits from the same ViT pass (features kept on the model worker in between)."""
    end = opts.offset + opts.k
    work = [x.image_id for x in cands[:depth]]
    if n_cap:  # page hits past the depth keep their ITC order (order[i] is cands[i] there): known now,
        # so those among the page's first n_cap join the ViT pass
        first = cands[max(depth, opts.offset) : opts.offset + n_cap]
        work += [x.image_id for x in first if x.image_id not in cached]
    work = list(dict.fromkeys(work))
    with timer.stage("load_candidates"):
        pixels = await asyncio.to_thread(c.images.pixels_of, {i: infos[i] for i in work})
    ok = [i for i in work if i in pixels]
    if not ok:
        return cands, {}
    rows = {i: r for r, i in enumerate(ok)}
    head = {x.image_id for x in cands[:depth]}
    itm_rows = [rows[i] for i in ok if i in head]
    with timer.stage("rerank" if itm_rows else "captions"):
        res = await c.worker.score(
            np.stack([pixels[i] for i in ok]), text if itm_rows else None, itm_rows=itm_rows,
            keep_features=n_cap > 0,
        )  # fmt: skip
    try:
        for x in cands[:depth]:
            r = rows.get(x.image_id)
            if r is not None:
                x.itm_prob = float(res.probs[r])
                x.itm_logit = float(res.logits[r, 1])
        order = final_order(cands, depth)
        page_rows = [rows[x.image_id] for x in order[opts.offset : end][:n_cap] if x.image_id in rows]
        targets = [r for r in page_rows if ok[r] not in cached]
        fresh: dict[int, str] = {}
        if targets and res.kept is not None:
            with timer.stage("captions"):
                texts = await c.worker.caption_kept(
                    res.kept, targets, max_new_tokens=c.settings.caption_max_new_tokens
                )
            fresh = {ok[r]: t for r, t in texts.items()}
    finally:
        c.worker.release(res.kept)
    return order, fresh


async def _caption(
    c: Components, ids: list[int], infos: dict[int, ImageInfo], timer: Timer
) -> dict[int, str]:
    """Plain captions of catalog images (no re-rank): one model call for all of them."""
    with timer.stage("load_candidates"):
        pixels = await asyncio.to_thread(c.images.pixels_of, {i: infos[i] for i in ids})
    ok = [i for i in ids if i in pixels]
    if not ok:
        return {}
    with timer.stage("captions"):
        res = await c.worker.score(
            np.stack([pixels[i] for i in ok]), None, caption_rows=list(range(len(ok))),
            max_new_tokens=c.settings.caption_max_new_tokens,
        )  # fmt: skip
    return {ok[r]: t for r, t in res.captions.items()}


def _hit(x: Candidate, info: ImageInfo, rank: int) -> Hit:
    # Grouped by where each field comes from: the catalog's image, then the ranking's candidate.
    return Hit(
        image_id=x.image_id, rank=rank, path=encode_path(info.paths[0]) if info.paths else None,
        width=info.width, height=info.height, captured_at=info.captured_at,
        itc_score=x.itc, itm_prob=x.itm_prob, itm_logit=x.itm_logit, score=x.score, reranked=x.reranked,
        caption=x.caption,
    )  # fmt: skip

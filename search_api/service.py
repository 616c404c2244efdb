"""The search pipeline behind the routes: ITC top-N -> ITM re-rank -> captions of the top hits.

Ranking (documented in docs/search_api.md): the first ``rerank_depth`` ITC hits are re-scored with
``score = itm_logit + itc_score`` -- LAVIS's retrieval score, where ``itm_logit`` is the ITM head's
"match" logit -- and ordered by it; hits past the depth keep ``score = itc_score`` and follow them.
Pages are slices of that one ranking, so paging with a fixed depth is consistent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from catalog.paths import encode_path
from search_api.deps import AppState
from search_api.index_watcher import IndexHandle
from search_api.inference import ScoreResult
from search_api.schemas import SearchHit, SearchResponse


@dataclass
class Timer:
    """Per-stage wall times in ms, also observed into the stage histogram."""

    state: AppState
    start: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.stages[name] = round(self.stages.get(name, 0.0) + dt * 1000, 3)
            self.state.metrics.stage_seconds.labels(name).observe(dt)

    def done(self) -> dict[str, float]:
        self.stages["total"] = round((time.perf_counter() - self.start) * 1000, 3)
        return self.stages


@dataclass
class Filters:
    root: str | None = None
    path_prefix: str | None = None
    captured_from: object | None = None
    captured_to: object | None = None
    camera: str | None = None

    def any(self) -> bool:
        values = (self.root, self.path_prefix, self.captured_from, self.captured_to, self.camera)
        return any(v not in (None, "") for v in values)


@dataclass
class _Cand:
    image_id: int
    itc: float
    itm_prob: float | None = None
    itm_logit: float | None = None
    reranked: bool = False
    caption: str | None = None

    @property
    def score(self) -> float:
        return self.itc + self.itm_logit if self.reranked and self.itm_logit is not None else self.itc


def image_urls(image_id: int) -> tuple[str, str]:
    return f"/api/images/{image_id}/thumbnail", f"/api/images/{image_id}/original"


async def allowed_ids(state: AppState, filters: Filters, timer: Timer) -> set[int] | None:
    if not filters.any():
        return None
    with timer.stage("filter"):
        return await asyncio.to_thread(
            state.view.filter_ids,
            root=filters.root,
            path_prefix=filters.path_prefix,
            captured_from=filters.captured_from,
            captured_to=filters.captured_to,
            camera=filters.camera,
        )


async def rank_and_page(
    state: AppState,
    snapshot: IndexHandle,
    hits: list[tuple[int, float]],
    *,
    text: str | None,
    k: int,
    offset: int,
    rerank_depth: int,
    caption_hits: int,
    timer: Timer,
    query: str | None = None,
    query_truncated: bool = False,
) -> SearchResponse:
    """Turn raw ITC hits (best first, at least offset + k + 1 of them when there are) into a page."""
    with timer.stage("load_metadata"):
        infos = await asyncio.to_thread(state.view.image_infos, [i for i, _ in hits])
    # A hit whose files all disappeared since the index caught up is dropped, not shown broken.
    cands = [_Cand(i, s) for i, s in hits if i in infos]
    depth = min(rerank_depth, len(cands)) if text is not None else 0
    end = offset + k
    caption_hits = caption_hits if state.has_captions else 0
    key = state.encoder.caption_key or ""

    # Which ids may need a caption: the first `caption_hits` of the page. With re-ranking the page is
    # only known after ITM, so every re-ranked candidate that could land there is a possible target.
    if caption_hits:
        possible = [c.image_id for c in cands[: max(depth, end)]]
        with timer.stage("captions_cached"):
            cached = await asyncio.to_thread(state.view.captions, possible, key, None)
    else:
        cached = {}

    work_ids = [c.image_id for c in cands[:depth]]
    if not depth and caption_hits:
        work_ids = [c.image_id for c in cands[offset : offset + caption_hits] if c.image_id not in cached]
    elif depth and caption_hits:
        # Page hits past the re-rank depth keep their ITC order (ordered[i] is cands[i] there), so the
        # ones among the page's first `caption_hits` are known now.
        first = cands[max(depth, offset) : offset + caption_hits]
        work_ids += [c.image_id for c in first if c.image_id not in cached]
    work_ids = list(dict.fromkeys(work_ids))
    result: ScoreResult | None = None
    rows: dict[int, int] = {}
    if work_ids:
        with timer.stage("load_candidates"):
            pixels = await state.media.pixels_many(work_ids)
        ok_ids = [i for i in work_ids if i in pixels]
        rows = {i: r for r, i in enumerate(ok_ids)}
        rerank_ids = {c.image_id for c in cands[:depth]}
        itm_rows = [rows[i] for i in ok_ids if i in rerank_ids]
        if ok_ids:
            base = [(c.image_id, c.itc) for c in cands]

            def select(res: ScoreResult) -> list[int]:
                # Runs on the worker thread right after ITM: rank, take the page's top hits, skip cached.
                order = _final_order(base, depth, res, rows)
                page = order[offset:end][:caption_hits]
                return [rows[i] for i in page if i in rows and i not in cached]

            stage = "rerank" if itm_rows else "captions"
            with timer.stage(stage):
                result = await state.worker.score(
                    np.stack([pixels[i] for i in ok_ids]),
                    text if itm_rows else None,
                    itm_rows=itm_rows,
                    caption_rows=select if caption_hits else [],
                    max_new_tokens=state.settings.caption_max_new_tokens,
                )
    if result is not None:
        for c in cands[:depth]:
            r = rows.get(c.image_id)
            if r is not None:
                c.reranked = True
                c.itm_prob = float(result.probs[r])
                c.itm_logit = float(result.logits[r, 1])
    top = sorted((c for c in cands[:depth] if c.reranked), key=lambda c: (-c.score, c.image_id))
    ordered = top + [c for c in cands[:depth] if not c.reranked] + cands[depth:]
    page = ordered[offset:end]
    fresh: dict[int, str] = {}
    if result is not None:
        fresh = {i: result.captions[rows[i]] for i in rows if rows[i] in result.captions}
    for c in page[:caption_hits]:
        c.caption = cached.get(c.image_id) or fresh.get(c.image_id)
    if fresh:
        state.metrics.captions.labels("generated").inc(len(fresh))
        with timer.stage("captions_store"):
            await asyncio.to_thread(state.view.store_captions, fresh, key, None)
    if cached:
        state.metrics.captions.labels("cache").inc(
            sum(1 for c in page[:caption_hits] if c.image_id in cached)
        )

    out_hits = []
    for n, c in enumerate(page):
        info = infos[c.image_id]
        thumb, orig = image_urls(c.image_id)
        out_hits.append(
            SearchHit(
                image_id=c.image_id,
                path=encode_path(info.paths[0]) if info.paths else None,
                thumbnail_url=thumb,
                original_url=orig,
                width=info.width,
                height=info.height,
                captured_at=info.captured_at,
                rank=offset + n + 1,
                itc_score=c.itc,
                itm_prob=c.itm_prob,
                itm_logit=c.itm_logit,
                score=c.score,
                reranked=c.reranked,
                caption=c.caption,
            )
        )
    return SearchResponse(
        query=query,
        query_truncated=query_truncated,
        k=k,
        offset=offset,
        rerank_depth=rerank_depth,
        generation=snapshot.generation,
        indexed_images=len(snapshot),
        hits=out_hits,
        next_offset=end if len(ordered) > end else None,
        timings_ms=timer.done(),
    )


def _final_order(
    base: list[tuple[int, float]], depth: int, res: ScoreResult, rows: dict[int, int]
) -> list[int]:
    scored = []
    rest = []
    for i, itc in base[:depth]:
        r = rows.get(i)
        if r is None:
            rest.append(i)
        else:
            scored.append((-(itc + float(res.logits[r, 1])), i))
    scored.sort()
    return [i for _, i in scored] + rest + [i for i, _ in base[depth:]]

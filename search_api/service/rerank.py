"""Re-ranking for other services: one text against catalog images and/or uploaded images, by ITM."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from search_api.service.components import Components
from search_api.service.errors import BadInput, NotFound
from search_api.service.types import RerankItem, RerankResult


async def rerank(
    c: Components, text: str, image_ids: Sequence[int], uploads: Sequence[bytes] = ()
) -> RerankResult:
    """ITM probabilities and match logits of ``text`` against each candidate, highest first."""
    ids = list(image_ids)
    limit = c.settings.max_rerank_candidates
    if not ids and not uploads:
        raise BadInput("give at least one candidate (image_ids or files)", code="no-candidates")
    if len(ids) + len(uploads) > limit:
        raise BadInput(f"at most {limit} candidates per call", code="too-many-candidates")
    if len(set(ids)) != len(ids):
        raise BadInput("image_ids contains duplicates", code="duplicate-ids")
    timer = c.timer()
    decoded = []
    if uploads:
        with timer.stage("decode_uploads"):
            decoded = [(await c.upload_pixels(data))[0] for data in uploads]
    with timer.stage("load_candidates"):
        infos = await asyncio.to_thread(c.catalog.image_infos, ids)
        pixels = await asyncio.to_thread(c.images.pixels_of, infos)
    missing = [i for i in ids if i not in pixels]
    if missing:
        raise NotFound(f"unknown or unreadable image ids: {missing[:20]}", code="unknown-image")
    batch = np.stack([pixels[i] for i in ids] + decoded)
    with timer.stage("rerank"):
        truncated = (await c.worker.text_truncation([text]))[0]
        res = await c.worker.score(batch, text)
    items = [
        RerankItem(
            rank=0,
            image_id=ids[r] if r < len(ids) else None,
            upload_index=r - len(ids) if r >= len(ids) else None,
            itm_prob=float(res.probs[r]),
            itm_logit=float(res.logits[r, 1]),
            itm_logits=[float(v) for v in res.logits[r]],
        )
        for r in range(len(batch))
    ]
    items.sort(key=lambda it: -it.itm_prob)
    for n, it in enumerate(items):
        it.rank = n + 1
    return RerankResult(text=text, text_truncated=truncated, results=items, timings_ms=timer.done())

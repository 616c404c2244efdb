"""Re-ranking for other services: one text against catalog images and/or uploads, by ITM."""

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File

from blip2_embed.images import preprocess
from blip2_search.settings import Settings
from search_api.deps import AppState, State
from search_api.errors import ApiError
from search_api.media import decode_upload, read_upload
from search_api.routes.common import api_router, problems
from search_api.schemas import Limits, RerankItem, RerankResponse, request_models
from search_api.service import Timer


async def _rerank(
    state: AppState, text: str, ids: list[int], uploads: list[np.ndarray], timer: Timer
) -> RerankResponse:
    limit = state.settings.max_rerank_candidates
    if not ids and not uploads:
        raise ApiError(422, "give at least one candidate (image_ids or files)", code="no-candidates")
    if len(ids) + len(uploads) > limit:
        raise ApiError(422, f"at most {limit} candidates per call", code="too-many-candidates")
    if len(set(ids)) != len(ids):
        raise ApiError(422, "image_ids contains duplicates", code="duplicate-ids")
    with timer.stage("load_candidates"):
        pixels = await state.media.pixels_many(ids)
    missing = [i for i in ids if i not in pixels]
    if missing:
        raise ApiError(404, f"unknown or unreadable image ids: {missing[:20]}", code="unknown-image")
    batch = np.stack([pixels[i] for i in ids] + uploads)
    with timer.stage("rerank"):
        truncated = (await state.worker.text_truncation([text]))[0]
        res = await state.worker.score(batch, text)
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
    return RerankResponse(text=text, text_truncated=truncated, results=items, timings_ms=timer.done())


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/rerank", ["rerank"])
    models = request_models(Limits.of(settings))
    RerankRequest, RerankUploadForm = models.rerank, models.rerank_upload

    @router.post("", response_model=RerankResponse, responses=problems(401, 404, 422))
    async def rerank(state: State, body: RerankRequest) -> RerankResponse:
        """ITM probabilities and match logits of one text against catalog images, highest first."""
        return await _rerank(state, body.text, list(body.image_ids), [], Timer(state))

    @router.post("/upload", response_model=RerankResponse, responses=problems(401, 404, 413, 415, 422))
    async def rerank_upload(state: State, form: Annotated[RerankUploadForm, File()]) -> RerankResponse:
        """Like ``POST /api/rerank`` with uploaded candidates (multipart); ids may be mixed in."""
        timer = Timer(state)
        files, image_ids = form.files or [], form.image_ids or []
        if len(files) + len(image_ids) > settings.max_rerank_candidates:
            raise ApiError(422, f"at most {settings.max_rerank_candidates} candidates per call")
        uploads = []
        with timer.stage("decode_uploads"):
            for f in files:
                data = await read_upload(f, settings.max_upload_bytes)
                image = await asyncio.to_thread(decode_upload, data, settings.max_upload_pixels)
                uploads.append((await asyncio.to_thread(preprocess, [image], state.encoder.spec))[0])
        return await _rerank(state, form.text, list(image_ids), uploads, timer)

    return router

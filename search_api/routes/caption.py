"""Captions and instructed generation (OPT), cached in the catalog for catalog images."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, File

from blip2_embed.images import preprocess
from blip2_search.settings import Settings
from search_api.deps import AppState, State
from search_api.errors import ApiError
from search_api.media import decode_upload, read_upload
from search_api.routes.common import api_router, problems
from search_api.schemas import CaptionResponse, Limits, request_models
from search_api.service import Timer


def _need_captions(state: AppState) -> str:
    if not state.has_captions:
        raise ApiError(409, "this server runs without a caption model", code="no-caption-model")
    return state.encoder.caption_key or ""


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/caption", ["caption"])
    models = request_models(Limits.of(settings))
    CaptionRequest, CaptionUploadForm = models.caption, models.caption_upload

    @router.post("", response_model=CaptionResponse, responses=problems(401, 404, 409, 422))
    async def caption_image(state: State, body: CaptionRequest) -> CaptionResponse:
        """Caption a catalog image, or answer ``prompt`` about it. Default-length results are cached."""
        key = _need_captions(state)
        timer = Timer(state)
        prompt = body.prompt
        tokens = body.max_new_tokens or settings.caption_max_new_tokens
        # The cache key is (image, model, prompt); only default-length generations are stored under it.
        cacheable = tokens == settings.caption_max_new_tokens
        if cacheable:
            with timer.stage("captions_cached"):
                hit = (await asyncio.to_thread(state.view.captions, [body.image_id], key, prompt)).get(
                    body.image_id
                )
            if hit is not None:
                state.metrics.captions.labels("cache").inc()
                return CaptionResponse(
                    image_id=body.image_id, prompt=prompt, text=hit, cached=True, model_key=key,
                    timings_ms=timer.done(),
                )  # fmt: skip
        with timer.stage("load_candidates"):
            pixels = await state.media.pixels_many([body.image_id])
        if body.image_id not in pixels:
            raise ApiError(404, f"no readable image with id {body.image_id}", code="unknown-image")
        with timer.stage("captions"):
            res = await state.worker.score(
                pixels[body.image_id][None], None, caption_rows=[0], prompt=prompt, max_new_tokens=tokens
            )
        text = res.captions.get(0, "")
        state.metrics.captions.labels("generated").inc()
        if cacheable:
            await asyncio.to_thread(state.view.store_captions, {body.image_id: text}, key, prompt)
        return CaptionResponse(
            image_id=body.image_id,
            prompt=prompt,
            text=text,
            cached=False,
            model_key=key,
            timings_ms=timer.done(),
        )

    @router.post("/upload", response_model=CaptionResponse, responses=problems(401, 409, 413, 415, 422))
    async def caption_upload(state: State, form: Annotated[CaptionUploadForm, File()]) -> CaptionResponse:
        """Caption an uploaded image, or answer ``prompt`` about it (never cached)."""
        key = _need_captions(state)
        timer = Timer(state)
        prompt, tokens = form.prompt, form.max_new_tokens or settings.caption_max_new_tokens
        with timer.stage("decode_upload"):
            data = await read_upload(form.file, settings.max_upload_bytes)
            image = await asyncio.to_thread(decode_upload, data, settings.max_upload_pixels)
            pixels = await asyncio.to_thread(preprocess, [image], state.encoder.spec)
        with timer.stage("captions"):
            res = await state.worker.score(
                pixels, None, caption_rows=[0], prompt=prompt, max_new_tokens=tokens
            )
        return CaptionResponse(
            prompt=prompt, text=res.captions.get(0, ""), cached=False, model_key=key, timings_ms=timer.done()
        )

    return router

"""Captions and instructed generation (OPT), cached in the catalog for catalog images."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from blip2_embed.images import preprocess
from blip2_search.settings import Settings
from search_api.deps import AppState, State, require_reader
from search_api.errors import ApiError
from search_api.media import decode_upload, read_upload
from search_api.routes.common import clean_text, problems
from search_api.schemas import CaptionRequest, CaptionResponse
from search_api.service import Timer


def _need_captions(state: AppState) -> str:
    if not state.has_captions:
        raise ApiError(409, "this server runs without a caption model", code="no-caption-model")
    return state.encoder.caption_key or ""


def _tokens(value: int | None, settings: Settings) -> int:
    if value is None:
        return settings.caption_max_new_tokens
    if not 1 <= value <= 128:
        raise ApiError(422, "max_new_tokens must be between 1 and 128", code="bad-max-new-tokens")
    return value


def build(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/api/caption", tags=["caption"], dependencies=[Depends(require_reader)])

    @router.post("", response_model=CaptionResponse, responses=problems(401, 404, 409, 422))
    async def caption_image(state: State, body: CaptionRequest) -> CaptionResponse:
        """Caption a catalog image, or answer ``prompt`` about it. Default-length results are cached."""
        key = _need_captions(state)
        timer = Timer(state)
        prompt = clean_text(body.prompt, settings.max_query_chars, "prompt", required=False)
        tokens = _tokens(body.max_new_tokens, settings)
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
    async def caption_upload(
        state: State,
        file: Annotated[UploadFile, File(description="The image.")],
        prompt: Annotated[str | None, Form(max_length=settings.max_query_chars * 4)] = None,
        max_new_tokens: Annotated[int | None, Form()] = None,
    ) -> CaptionResponse:
        """Caption an uploaded image, or answer ``prompt`` about it (never cached)."""
        key = _need_captions(state)
        timer = Timer(state)
        clean = clean_text(prompt, settings.max_query_chars, "prompt", required=False)
        tokens = _tokens(max_new_tokens, settings)
        with timer.stage("decode_upload"):
            data = await read_upload(file, settings.max_upload_bytes)
            image = await asyncio.to_thread(decode_upload, data, settings.max_upload_pixels)
            pixels = await asyncio.to_thread(preprocess, [image], state.encoder.spec)
        with timer.stage("captions"):
            res = await state.worker.score(
                pixels, None, caption_rows=[0], prompt=clean, max_new_tokens=tokens
            )
        return CaptionResponse(
            prompt=clean, text=res.captions.get(0, ""), cached=False, model_key=key, timings_ms=timer.done()
        )

    return router

"""Captions and instructed generation (OPT), cached in the catalog for catalog images."""

from typing import Annotated

from fastapi import APIRouter, File

from blip2_search.settings import Settings
from search_api.http.deps import Service
from search_api.http.routes.common import api_router, problems
from search_api.http.schemas import CaptionResponse, Limits, request_models
from search_api.http.uploads import read_upload


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/caption", ["caption"])
    models = request_models(Limits.of(settings))
    CaptionRequest, CaptionUploadForm = models.caption, models.caption_upload

    @router.post("", response_model=CaptionResponse, responses=problems(401, 404, 409, 422))
    async def caption_image(service: Service, body: CaptionRequest) -> CaptionResponse:
        """Caption a catalog image, or answer ``prompt`` about it. Default-length results are cached."""
        result = await service.caption(body.image_id, prompt=body.prompt, max_new_tokens=body.max_new_tokens)
        return CaptionResponse.of(result)

    @router.post("/upload", response_model=CaptionResponse, responses=problems(401, 409, 413, 415, 422))
    async def caption_upload(service: Service, form: Annotated[CaptionUploadForm, File()]) -> CaptionResponse:
        """Caption an uploaded image, or answer ``prompt`` about it (never cached)."""
        service.caption_key()  # 409 before reading the upload when there is no caption model
        data = await read_upload(form.file, settings.max_upload_bytes)
        result = await service.caption_upload(data, prompt=form.prompt, max_new_tokens=form.max_new_tokens)
        return CaptionResponse.of(result)

    return router

"""Embeddings for other services: text -> (D,), image -> (32, D)."""

from typing import Annotated

from fastapi import APIRouter, File

from blip2_search.settings import Settings
from search_api.http.deps import Service
from search_api.http.routes.common import IdPath, api_router, problems
from search_api.http.schemas import EmbedImageResponse, EmbedTextResponse, Limits, request_models
from search_api.http.uploads import read_upload


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/embed", ["embeddings"])
    models = request_models(Limits.of(settings))
    EmbedTextRequest, EmbedUploadForm = models.embed_text, models.embed_upload

    @router.post("/text", response_model=EmbedTextResponse, responses=problems(401, 422))
    async def embed_text(service: Service, body: EmbedTextRequest) -> EmbedTextResponse:
        """ITC text embeddings (L2-normalised), one per text; at most 64 texts."""
        return EmbedTextResponse.of(await service.embed_texts(body.texts))

    @router.post("/image", response_model=EmbedImageResponse, responses=problems(401, 413, 415, 422))
    async def embed_image(service: Service, form: Annotated[EmbedUploadForm, File()]) -> EmbedImageResponse:
        """ITC image embedding of an upload: 32 L2-normalised query vectors."""
        data = await read_upload(form.file, settings.max_upload_bytes)
        return EmbedImageResponse.of(await service.embed_upload(data))

    @router.get("/image/{image_id}", response_model=EmbedImageResponse, responses=problems(401, 404, 422))
    async def stored_embedding(service: Service, image_id: IdPath) -> EmbedImageResponse:
        """The stored embedding of a catalog image (as indexed; float16 precision)."""
        return EmbedImageResponse.of(await service.stored_embedding(image_id))

    return router

"""Embeddings for other services: text -> (D,), image -> (32, D)."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, File

from blip2_embed.images import preprocess
from blip2_search.settings import Settings
from search_api.deps import State
from search_api.errors import ApiError
from search_api.media import decode_upload, read_upload
from search_api.routes.common import IdPath, api_router, problems
from search_api.schemas import EmbedImageResponse, EmbedTextResponse, Limits, request_models


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/embed", ["embeddings"])
    models = request_models(Limits.of(settings))
    EmbedTextRequest, EmbedUploadForm = models.embed_text, models.embed_upload

    @router.post("/text", response_model=EmbedTextResponse, responses=problems(401, 422))
    async def embed_text(state: State, body: EmbedTextRequest) -> EmbedTextResponse:
        """ITC text embeddings (L2-normalised), one per text; at most 64 texts."""
        vecs, truncated = await state.worker.embed_texts(body.texts)
        return EmbedTextResponse(
            model_key=state.encoder.retrieval_key or "",
            dim=state.encoder.embed_dim,
            truncated=truncated,
            vectors=vecs.tolist(),
        )

    @router.post("/image", response_model=EmbedImageResponse, responses=problems(401, 413, 415, 422))
    async def embed_image(state: State, form: Annotated[EmbedUploadForm, File()]) -> EmbedImageResponse:
        """ITC image embedding of an upload: 32 L2-normalised query vectors."""
        data = await read_upload(form.file, settings.max_upload_bytes)
        image = await asyncio.to_thread(decode_upload, data, settings.max_upload_pixels)
        pixels = await asyncio.to_thread(preprocess, [image], state.encoder.spec)
        vecs = (await state.worker.embed_images(pixels))[0]
        return EmbedImageResponse(
            model_key=state.encoder.retrieval_key or "",
            dim=int(vecs.shape[1]),
            num_vectors=int(vecs.shape[0]),
            vectors=vecs.tolist(),
        )

    @router.get("/image/{image_id}", response_model=EmbedImageResponse, responses=problems(401, 404, 422))
    async def stored_embedding(state: State, image_id: IdPath) -> EmbedImageResponse:
        """The stored embedding of a catalog image (as indexed; float16 precision)."""
        key = state.encoder.retrieval_key or ""
        vecs = await asyncio.to_thread(state.view.vectors, image_id, key)
        if vecs is None:
            raise ApiError(404, f"no embedding for image id {image_id}", code="unknown-image")
        return EmbedImageResponse(
            model_key=key, image_id=image_id, dim=int(vecs.shape[1]), num_vectors=int(vecs.shape[0]),
            vectors=vecs.tolist(),
        )  # fmt: skip

    return router

"""Re-ranking for other services: one text against catalog images and/or uploads, by ITM."""

from typing import Annotated

from fastapi import APIRouter, File

from blip2_search.settings import Settings
from search_api.http.deps import Service
from search_api.http.routes.common import api_router, problems
from search_api.http.schemas import Limits, RerankResponse, request_models
from search_api.http.uploads import read_uploads
from search_api.service import BadInput


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/rerank", ["rerank"])
    models = request_models(Limits.of(settings))
    RerankRequest, RerankUploadForm = models.rerank, models.rerank_upload

    @router.post("", response_model=RerankResponse, responses=problems(401, 404, 422))
    async def rerank(service: Service, body: RerankRequest) -> RerankResponse:
        """ITM probabilities and match logits of one text against catalog images, highest first."""
        return RerankResponse.of(await service.rerank(body.text, body.image_ids))

    @router.post("/upload", response_model=RerankResponse, responses=problems(401, 404, 413, 415, 422))
    async def rerank_upload(service: Service, form: Annotated[RerankUploadForm, File()]) -> RerankResponse:
        """Like ``POST /api/rerank`` with uploaded candidates (multipart); ids may be mixed in."""
        files, ids = form.files or [], form.image_ids or []
        if len(files) + len(ids) > settings.max_rerank_candidates:  # before reading any of them
            raise BadInput(f"at most {settings.max_rerank_candidates} candidates per call")
        uploads = await read_uploads(files, settings.max_upload_bytes)
        return RerankResponse.of(await service.rerank(form.text, ids, uploads))

    return router

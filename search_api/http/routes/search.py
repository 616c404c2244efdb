"""Text -> image and image -> image search."""

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Query

from blip2_search.settings import Settings
from search_api.http.deps import Service
from search_api.http.routes.common import IdPath, api_router, problems
from search_api.http.schemas import MAX_OFFSET, MAX_PATH_CHARS, Limits, SearchResponse, request_models
from search_api.http.uploads import read_upload
from search_api.http.validation import int_type, text_type
from search_api.service import SearchFilters, SearchOptions


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/search", ["search"])
    Text = text_type(settings.max_query_chars)
    PathText = text_type(MAX_PATH_CHARS, strip=False, optional=True)
    SearchUploadForm = request_models(Limits.of(settings)).search_upload
    K = Annotated[int_type(1, settings.max_k), Query(description="Hits per page.")]
    Offset = Annotated[int_type(0, MAX_OFFSET), Query(description="Hits to skip (pagination).")]
    Depth = Annotated[
        int_type(0, settings.max_rerank_depth),
        Query(description="ITC candidates re-ranked by ITM (0: no re-ranking)."),
    ]
    Captions = Annotated[
        int_type(0, settings.max_caption_hits), Query(description="Caption this many top hits of the page.")
    ]
    Root = Annotated[PathText | None, Query(description="Only files under this library root.")]
    Prefix = Annotated[PathText | None, Query(description="Only files whose path below the root starts so.")]
    After = Annotated[dt.datetime | None, Query(description="Captured at or after (camera local time).")]
    Before = Annotated[dt.datetime | None, Query(description="Captured at or before (camera local time).")]
    Camera = Annotated[
        Text | None, Query(description='EXIF camera: make, model, or "make model" (GET /api/library).')
    ]
    Sort = Annotated[
        Literal["relevance", "date"],
        Query(description=f"relevance, or date: the best {settings.date_sort_pool} hits, newest first."),
    ]

    def filters(
        root: Root = None,
        path_prefix: Prefix = None,
        captured_after: After = None,
        captured_before: Before = None,
        camera: Camera = None,
    ) -> SearchFilters:
        return SearchFilters(root, path_prefix, captured_after, captured_before, camera)

    Filters = Annotated[SearchFilters, Depends(filters)]

    @router.get("", response_model=SearchResponse, responses=problems(401, 422))
    async def search_text(
        service: Service,
        q: Annotated[Text, Query(description="Query text.")],
        k: K = 20,
        offset: Offset = 0,
        rerank: Depth = min(32, settings.max_rerank_depth),
        captions: Captions = 0,
        sort: Sort = "relevance",
        *,
        flt: Filters,
    ) -> SearchResponse:
        """Text -> images: ITC top-N over the index, ITM re-rank of N, captions of the top hits."""
        options = SearchOptions(k=k, offset=offset, rerank=rerank, captions=captions, filters=flt, sort=sort)
        return SearchResponse.of(await service.search_text(q, options))

    @router.get("/similar/{image_id}", response_model=SearchResponse, responses=problems(401, 404, 422))
    async def search_similar(
        service: Service,
        image_id: IdPath,
        k: K = 20,
        offset: Offset = 0,
        captions: Captions = 0,
        sort: Sort = "relevance",
        *,
        flt: Filters,
    ) -> SearchResponse:
        """ "More like this": images closest to a catalog image (Chamfer similarity of the 32 vectors)."""
        options = SearchOptions(k=k, offset=offset, captions=captions, filters=flt, sort=sort)
        return SearchResponse.of(await service.search_similar(image_id, options))

    @router.post("/image", response_model=SearchResponse, responses=problems(401, 413, 415, 422))
    async def search_by_upload(service: Service, form: Annotated[SearchUploadForm, File()]) -> SearchResponse:
        """Image -> images for an uploaded image (multipart form field ``file``)."""
        data = await read_upload(form.file, settings.max_upload_bytes)
        flt = SearchFilters(
            form.root, form.path_prefix, form.captured_after, form.captured_before, form.camera
        )
        options = SearchOptions(
            k=form.k, offset=form.offset, captions=form.captions, filters=flt, sort=form.sort
        )
        return SearchResponse.of(await service.search_upload(data, options))

    return router

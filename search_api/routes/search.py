"""Text -> image and image -> image search."""

import asyncio
import datetime as dt
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Query

from blip2_embed.images import preprocess
from blip2_search.settings import Settings
from search_api.browse import fill_captions, order_by_date
from search_api.deps import AppState, State
from search_api.errors import ApiError
from search_api.index_watcher import IndexHandle
from search_api.media import decode_upload, read_upload
from search_api.routes.common import IdPath, api_router, problems
from search_api.schemas import MAX_OFFSET, MAX_PATH_CHARS, Limits, SearchResponse, request_models
from search_api.service import Filters, Timer, allowed_ids, rank_and_page
from search_api.validation import int_type, text_type


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
        after: After = None,
        before: Before = None,
        camera: Camera = None,
    ) -> Filters:
        if (
            after is not None
            and before is not None
            and after.replace(tzinfo=None) > before.replace(tzinfo=None)
        ):
            raise ApiError(422, "captured_after is later than captured_before", code="bad-date-range")
        return Filters(root, path_prefix, after, before, camera)

    def filter_dep(
        root: Root = None,
        path_prefix: Prefix = None,
        captured_after: After = None,
        captured_before: Before = None,
        camera: Camera = None,
    ) -> Filters:
        return filters(root, path_prefix, captured_after, captured_before, camera)

    @router.get("", response_model=SearchResponse, responses=problems(401, 422))
    async def search_text(
        state: State,
        q: Annotated[Text, Query(description="Query text.")],
        k: K = 20,
        offset: Offset = 0,
        rerank: Depth = min(32, settings.max_rerank_depth),
        captions: Captions = 0,
        sort: Sort = "relevance",
        flt: Filters = Depends(filter_dep),
    ) -> SearchResponse:
        """Text -> images: ITC top-N over the index, ITM re-rank of N, captions of the top hits."""
        timer = Timer(state)
        with timer.stage("text_encode"):
            vecs, cut = await state.worker.embed_texts([q])
            vec, truncated = vecs[0], cut[0]
        allowed = await allowed_ids(state, flt, timer)
        snapshot = state.watcher.handle()  # this search's index, whatever swaps happen meanwhile
        need = max(offset + k, rerank) + 1 + 8  # +1 tells whether a next page exists; +8 covers deletions
        if sort == "date":
            need = max(need, settings.date_sort_pool + 8)
        with timer.stage("vector_search"):
            hits = await asyncio.to_thread(snapshot.search, vec, need, allowed=allowed)
        if sort == "date":
            return await _by_date(state, snapshot, hits, q, truncated, k, offset, rerank, captions, timer)
        return await rank_and_page(
            state, snapshot, hits, text=q, k=k, offset=offset, rerank_depth=rerank,
            caption_hits=captions, timer=timer, query=q, query_truncated=truncated,
        )  # fmt: skip

    async def _by_date(
        state: AppState, snapshot: IndexHandle, hits: list[tuple[int, float]], text: str | None,
        truncated: bool, k: int, offset: int, rerank: int, captions: int, timer: Timer,
    ) -> SearchResponse:  # fmt: skip
        pool = await rank_and_page(
            state, snapshot, hits, text=text, k=settings.date_sort_pool, offset=0, rerank_depth=rerank,
            caption_hits=0, timer=timer, query=text, query_truncated=truncated,
        )  # fmt: skip
        page = order_by_date(pool, k=k, offset=offset)
        with timer.stage("captions"):
            await fill_captions(state, page.hits, captions)
        return page

    @router.get("/similar/{image_id}", response_model=SearchResponse, responses=problems(401, 404, 422))
    async def search_similar(
        state: State,
        image_id: IdPath,
        k: K = 20,
        offset: Offset = 0,
        captions: Captions = 0,
        sort: Sort = "relevance",
        flt: Filters = Depends(filter_dep),
    ) -> SearchResponse:
        """ "More like this": images closest to a catalog image (Chamfer similarity of the 32 vectors)."""
        timer = Timer(state)
        key = state.encoder.retrieval_key or ""
        with timer.stage("load_query_vectors"):
            vectors = await asyncio.to_thread(state.view.vectors, image_id, key)
        if vectors is None:
            raise ApiError(404, f"no indexed image with id {image_id}", code="unknown-image")
        allowed = await allowed_ids(state, flt, timer)
        snapshot = state.watcher.handle()
        need = offset + k + 1 + 8 if sort == "relevance" else settings.date_sort_pool + 8
        with timer.stage("vector_search"):
            hits = await asyncio.to_thread(
                snapshot.search_by_image, vectors, need, allowed=allowed, exclude=image_id
            )
        if sort == "date":
            return await _by_date(state, snapshot, hits, None, False, k, offset, 0, captions, timer)
        return await rank_and_page(
            state, snapshot, hits, text=None, k=k, offset=offset, rerank_depth=0, caption_hits=captions,
            timer=timer,
        )  # fmt: skip

    @router.post("/image", response_model=SearchResponse, responses=problems(401, 413, 415, 422))
    async def search_by_upload(state: State, form: Annotated[SearchUploadForm, File()]) -> SearchResponse:
        """Image -> images for an uploaded image (multipart form field ``file``)."""
        timer = Timer(state)
        k, offset, captions = form.k, form.offset, form.captions
        flt = filters(form.root, form.path_prefix, form.captured_after, form.captured_before, form.camera)
        with timer.stage("decode_upload"):
            data = await read_upload(form.file, settings.max_upload_bytes)
            image = await asyncio.to_thread(decode_upload, data, settings.max_upload_pixels)
            pixels = await asyncio.to_thread(preprocess, [image], state.encoder.spec)
        with timer.stage("image_encode"):
            vectors = (await state.worker.embed_images(pixels))[0]
        allowed = await allowed_ids(state, flt, timer)
        snapshot = state.watcher.handle()
        need = offset + k + 1 + 8 if form.sort == "relevance" else settings.date_sort_pool + 8
        with timer.stage("vector_search"):
            hits = await asyncio.to_thread(
                snapshot.search_by_image, np.asarray(vectors), need, allowed=allowed
            )
        if form.sort == "date":
            return await _by_date(state, snapshot, hits, None, False, k, offset, 0, captions, timer)
        return await rank_and_page(
            state, snapshot, hits, text=None, k=k, offset=offset, rerank_depth=0, caption_hits=captions,
            timer=timer,
        )  # fmt: skip

    return router

"""``SearchService``: the object the API's routes, the CLI, Python users and a Ray deployment call.

It owns the model worker, the catalog reader, the image store and the live index, and exposes each
operation as a typed coroutine. It knows no HTTP: failures are ``search_api.service.errors``.

    async with SearchService.running(settings) as service:
        page = await service.search_text("a dog on the beach", SearchOptions(k=10, rerank=32))

``search_once`` does the same from synchronous code (one search, no index polling).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from catalog.index_store import VectorIndexOptions, index_path
from catalog.repository import LibraryFacets
from search_api.service import browse, caption, embed, images, readiness, rerank, search
from search_api.service.catalog_reader import CatalogReader
from search_api.service.components import Components
from search_api.service.image_store import ImageStore
from search_api.service.index_watcher import IndexHandle, IndexWatcher
from search_api.service.inference import InferenceWorker
from search_api.service.metrics import Metrics
from search_api.service.types import (
    CaptionResult,
    ImageBytes,
    ImageDetail,
    ImageEmbedding,
    OriginalFile,
    Readiness,
    RerankResult,
    SearchOptions,
    SearchPage,
    TextEmbeddings,
)


def load_encoder(settings: Settings, *, caption: bool = True) -> Blip2Encoder:
    """The encoder these settings name (blocking; loads checkpoints)."""
    return Blip2Encoder.from_pretrained(**settings.encoder_options(caption=caption))


class SearchService:
    def __init__(self, settings: Settings, encoder: Blip2Encoder, *, metrics: Metrics | None = None) -> None:
        metrics = metrics or Metrics()
        catalog = CatalogReader(settings.resolved_database_url)
        key = encoder.retrieval_key or ""

        def on_change(handle: IndexHandle) -> None:
            metrics.index_generation.set(handle.generation)
            metrics.index_images.set(len(handle))

        index = IndexWatcher(
            catalog,
            key,
            index_path(settings.resolved_vector_index_dir, key),
            VectorIndexOptions(**settings.vector_index_options()),
            poll_seconds=settings.index_poll_seconds,
            on_change=on_change,
        )
        self.c = Components(
            settings=settings,
            encoder=encoder,
            worker=InferenceWorker(
                encoder, max_batch=settings.inference_max_batch, on_batch=metrics.on_batch
            ),
            catalog=catalog,
            images=ImageStore.from_settings(catalog, encoder.spec, settings),
            index=index,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, poll: bool = True) -> None:
        """Start the model worker and open the index (``poll``: keep following the catalog)."""
        self.c.worker.start()
        await self.c.index.start(poll=poll)

    async def stop(self) -> None:
        await self.c.index.stop()
        self.c.worker.stop()
        self.c.catalog.close()

    @classmethod
    @asynccontextmanager
    async def running(
        cls, settings: Settings, encoder: Blip2Encoder | None = None, *, poll: bool = True
    ) -> AsyncIterator[SearchService]:
        """A started service (the encoder loaded from ``settings`` unless given), stopped on exit."""
        if encoder is None:
            encoder = await asyncio.to_thread(load_encoder, settings)
        service = cls(settings, encoder)
        await service.start(poll=poll)
        try:
            yield service
        finally:
            await service.stop()

    # ------------------------------------------------------------------ parts (read-only)
    @property
    def settings(self) -> Settings:
        return self.c.settings

    @property
    def encoder(self) -> Blip2Encoder:
        return self.c.encoder

    @property
    def worker(self) -> InferenceWorker:
        return self.c.worker

    @property
    def catalog(self) -> CatalogReader:
        return self.c.catalog

    @property
    def images(self) -> ImageStore:
        return self.c.images

    @property
    def index(self) -> IndexWatcher:
        return self.c.index

    @property
    def metrics(self) -> Metrics:
        return self.c.metrics

    @property
    def has_captions(self) -> bool:
        return self.c.has_captions

    def caption_key(self) -> str:
        """The caption model's key; ``NotConfigured`` when the service runs without one."""
        return self.c.caption_key()

    # ------------------------------------------------------------------ search
    async def search_text(self, text: str, options: SearchOptions | None = None) -> SearchPage:
        return await search.search_text(self.c, text, options or SearchOptions())

    async def search_similar(self, image_id: int, options: SearchOptions | None = None) -> SearchPage:
        return await search.search_similar(self.c, image_id, options or SearchOptions())

    async def search_upload(self, data: bytes, options: SearchOptions | None = None) -> SearchPage:
        return await search.search_upload(self.c, data, options or SearchOptions())

    # ------------------------------------------------------------------ models for other services
    async def rerank(
        self, text: str, image_ids: Sequence[int], uploads: Sequence[bytes] = ()
    ) -> RerankResult:
        return await rerank.rerank(self.c, text, image_ids, uploads)

    async def caption(
        self, image_id: int, *, prompt: str | None = None, max_new_tokens: int | None = None
    ) -> CaptionResult:
        return await caption.caption_image(self.c, image_id, prompt=prompt, max_new_tokens=max_new_tokens)

    async def caption_upload(
        self, data: bytes, *, prompt: str | None = None, max_new_tokens: int | None = None
    ) -> CaptionResult:
        return await caption.caption_upload(self.c, data, prompt=prompt, max_new_tokens=max_new_tokens)

    async def embed_texts(self, texts: Sequence[str]) -> TextEmbeddings:
        return await embed.embed_texts(self.c, texts)

    async def embed_upload(self, data: bytes) -> ImageEmbedding:
        return await embed.embed_upload(self.c, data)

    async def stored_embedding(self, image_id: int) -> ImageEmbedding:
        return await embed.stored_embedding(self.c, image_id)

    # ------------------------------------------------------------------ catalog images
    async def image(self, image_id: int) -> ImageDetail:
        return await images.image_detail(self.c, image_id)

    async def thumbnail(self, image_id: int) -> ImageBytes:
        return await images.thumbnail(self.c, image_id)

    async def original(self, image_id: int) -> OriginalFile:
        return await images.original(self.c, image_id)

    async def display(self, image_id: int) -> ImageBytes:
        return await browse.display(self.c, image_id)

    # ------------------------------------------------------------------ browsing
    async def library(self) -> LibraryFacets:
        return await browse.library(self.c)

    async def near_duplicates(
        self, image_ids: Sequence[int], threshold: float | None = None
    ) -> browse.DuplicateGroups:
        return await browse.near_duplicates(self.c, list(image_ids), threshold)

    # ------------------------------------------------------------------ operations
    def readiness(self) -> Readiness:
        return readiness.readiness(self.c)

    async def refresh_index(self) -> Readiness:
        return await readiness.refresh_index(self.c)

    def metrics_exposition(self) -> tuple[bytes, str]:
        self.c.metrics.queue_depth.set(self.c.worker.pending)
        return self.c.metrics.exposition()


def search_once(
    settings: Settings, encoder: Blip2Encoder, text: str, options: SearchOptions | None = None
) -> SearchPage:
    """One text search from synchronous code: start the service, search, stop (no index polling)."""

    async def run() -> SearchPage:
        async with SearchService.running(settings, encoder, poll=False) as service:
            return await service.search_text(text, options)

    return asyncio.run(run())


__all__ = ["SearchService", "load_encoder", "search_once"]

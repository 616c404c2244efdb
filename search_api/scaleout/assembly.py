"""``ShardedSearchService``: the ``SearchService`` with its index in N shard actors and its models in
the ``blip2-models`` Ray Serve deployment; ``create_sharded_app``: the single-process FastAPI app
(every route, schema and error) in front of it, as the ingress. Needs Ray connected
(``indexer.ray_engine.connect``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from catalog.index_store import VectorIndexOptions
from search_api.http.app import create_app
from search_api.scaleout.models import ModelRecipe, ModelScaling, ServeModels
from search_api.scaleout.watcher import ShardedWatcher
from search_api.service import SearchService, load_encoder
from search_api.service.index_watcher import IndexHandle


@dataclass(frozen=True)
class ShardLayout:
    shards: int = 2
    models: ModelScaling = field(default_factory=ModelScaling)
    gpus_per_shard: float = 0.0


class ShardedSearchService(SearchService):
    """Every operation of ``SearchService`` unchanged; only where the index and the models live differs.
    ``encoder`` in this process only gives the checkpoint's facts (input size, model keys)."""

    def __init__(self, settings: Settings, encoder: Blip2Encoder, layout: ShardLayout) -> None:
        super().__init__(settings, encoder)
        metrics = self.c.metrics

        def on_change(handle: IndexHandle) -> None:
            metrics.index_generation.set(handle.generation)
            metrics.index_images.set(len(handle))

        recipe = ModelRecipe(dict(settings.encoder_options()), settings.inference_max_batch)
        self.c.worker = ServeModels(encoder, recipe, layout.models)
        options = VectorIndexOptions(**settings.vector_index_options())
        self.c.index = ShardedWatcher(
            self.c.catalog, encoder.retrieval_key or "", options,
            shards=layout.shards, database_url=settings.resolved_database_url,
            num_gpus=layout.gpus_per_shard, poll_seconds=settings.index_poll_seconds, on_change=on_change,
        )  # fmt: skip

    async def start(self, *, poll: bool = True) -> None:
        await asyncio.to_thread(self.c.worker.start)  # waits for the replicas' model loads
        await self.c.index.start(poll=poll)

    @classmethod
    @asynccontextmanager
    async def sharded(
        cls, settings: Settings, layout: ShardLayout, encoder: Blip2Encoder | None = None
    ) -> AsyncIterator[ShardedSearchService]:
        if encoder is None:
            encoder = await asyncio.to_thread(load_encoder, settings)
        service = cls(settings, encoder, layout)
        await service.start()
        try:
            yield service
        finally:
            await service.stop()


def create_sharded_app(
    settings: Settings, layout: ShardLayout, *, encoder: Blip2Encoder | None = None
) -> FastAPI:
    return create_app(settings, service=lambda: ShardedSearchService.sharded(settings, layout, encoder))

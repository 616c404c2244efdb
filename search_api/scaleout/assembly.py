"""``create_sharded_app``: the single-process app (every route, schema and error) as the ingress, with
the index in N shard actors and the models in replica actors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from catalog.index_store import IndexOptions
from search_api.app import create_app
from search_api.scaleout.models import ModelRecipe, RayModels
from search_api.scaleout.watcher import ShardedWatcher


def create_sharded_app(
    settings: Settings,
    *,
    shards: int,
    encoder: Blip2Encoder | None = None,
    model_replicas: int = 1,
    gpus_per_shard: float = 0.0,
    gpus_per_model: float = 0.0,
) -> FastAPI:
    """Needs Ray connected (``indexer.ray_engine.connect``). ``encoder`` in this process only gives the
    ingress the checkpoint's facts (input size, model keys); inference runs in the replicas."""
    recipe = ModelRecipe(
        retrieval=settings.retrieval_model,
        caption=settings.caption_model or None,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
        max_batch=settings.inference_max_batch,
    )

    def make_worker(enc: Blip2Encoder, metrics: Any) -> RayModels:
        return RayModels(recipe, replicas=model_replicas, num_gpus=gpus_per_model)

    def make_watcher(view: Any, key: str, on_change: Any) -> ShardedWatcher:
        return ShardedWatcher(
            view, key, IndexOptions.from_settings(settings), shards=shards,
            database_url=settings.resolved_database_url, num_gpus=gpus_per_shard,
            poll_seconds=settings.index_poll_seconds, on_change=on_change,
        )  # fmt: skip

    return create_app(settings, encoder=encoder, make_worker=make_worker, make_watcher=make_watcher)

"""Readiness (models loaded, index loaded, model worker alive) and the index catch-up on demand."""

from __future__ import annotations

import asyncio

from search_api.service.components import Components
from search_api.service.errors import Unavailable
from search_api.service.types import Readiness


def readiness(c: Components) -> Readiness:
    snap = c.index.handle()
    ready = c.index.loaded and c.worker.alive
    return Readiness(
        ready=ready,
        models_loaded=True,
        caption_model=c.has_captions,
        index_generation=snap.generation if c.index.loaded else None,
        published_generation=c.index.published,
        indexed_images=len(snap),
        inference_queue=c.worker.pending,
        detail=None if ready else (c.index.error or "index not loaded or model worker stopped"),
    )


async def refresh_index(c: Components) -> Readiness:
    """Catch the index up to the catalog's published generation now."""
    try:
        snap = await asyncio.to_thread(c.index.refresh)
    except Exception as exc:  # the catalog is unreachable: a server-side state, reported as such
        raise Unavailable(f"index refresh failed: {type(exc).__name__}", code="refresh-failed") from None
    return Readiness(
        ready=True,
        models_loaded=True,
        caption_model=c.has_captions,
        index_generation=snap.generation,
        published_generation=c.index.published,
        indexed_images=len(snap),
        inference_queue=c.worker.pending,
    )

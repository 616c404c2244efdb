"""Embeddings for other services: text -> (D,), image -> (32, D)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from search_api.service.components import Components
from search_api.service.errors import BadInput, NotFound
from search_api.service.types import ImageEmbedding, TextEmbeddings

# One call takes at most this many texts.
MAX_TEXTS = 64


async def embed_texts(c: Components, texts: Sequence[str]) -> TextEmbeddings:
    """ITC text embeddings (L2-normalised), one per text."""
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise BadInput(f"texts: give 1 to {MAX_TEXTS} texts (got {len(texts)})", code="validation-error")
    vecs, truncated = await c.worker.embed_texts(list(texts))
    return TextEmbeddings(c.retrieval_key, c.encoder.embed_dim, truncated, vecs)


async def embed_upload(c: Components, data: bytes) -> ImageEmbedding:
    """ITC image embedding of an uploaded image: 32 L2-normalised query vectors."""
    pixels = await c.upload_pixels(data)
    vecs = (await c.worker.embed_images(pixels))[0]
    return ImageEmbedding(c.retrieval_key, None, int(vecs.shape[1]), int(vecs.shape[0]), vecs)


async def stored_embedding(c: Components, image_id: int) -> ImageEmbedding:
    """The stored embedding of a catalog image (as indexed; float16 precision)."""
    vecs = await asyncio.to_thread(c.catalog.vectors, image_id, c.retrieval_key)
    if vecs is None:
        raise NotFound(f"no embedding for image id {image_id}", code="unknown-image")
    return ImageEmbedding(c.retrieval_key, image_id, int(vecs.shape[1]), int(vecs.shape[0]), vecs)

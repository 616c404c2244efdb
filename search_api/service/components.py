"""What every service operation works with: settings, the encoder, the model worker, the catalog
reader, the image store, the live index and the metrics. Built and owned by ``SearchService``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from search_api.service.catalog_reader import CatalogReader
from search_api.service.errors import NotConfigured
from search_api.service.image_store import LRU, ImageStore, upload_pixels
from search_api.service.index_watcher import IndexWatcher
from search_api.service.inference import InferenceWorker
from search_api.service.metrics import Metrics
from search_api.service.timing import Timer

Floats = npt.NDArray[np.float32]
TEXT_CACHE_ITEMS = 1024


@dataclass
class Components:
    settings: Settings
    encoder: Blip2Encoder
    worker: InferenceWorker
    catalog: CatalogReader
    images: ImageStore
    index: IndexWatcher
    metrics: Metrics
    # text -> (vector, truncated): paging through one query, or a popular query, encodes it once.
    text_cache: LRU[str, tuple[Floats, bool]] = field(default_factory=lambda: LRU(TEXT_CACHE_ITEMS))

    @property
    def has_captions(self) -> bool:
        return self.encoder.caption_model is not None

    @property
    def retrieval_key(self) -> str:
        return self.encoder.retrieval_key or ""

    def caption_key(self) -> str:
        """The caption model's key; ``NotConfigured`` when the service runs without one."""
        if not self.has_captions:
            raise NotConfigured("this server runs without a caption model", code="no-caption-model")
        return self.encoder.caption_key or ""

    def timer(self) -> Timer:
        return Timer(self.metrics.observe_stage)

    async def encode_text(self, text: str) -> tuple[Floats, bool]:
        """The (D,) ITC vector of ``text`` and whether it was cut to the token limit (cached)."""
        hit = self.text_cache.get(text)
        if hit is None:
            vecs, cut = await self.worker.embed_texts([text])
            hit = (vecs[0], cut[0])
            self.text_cache.put(text, hit)
        return hit

    async def upload_pixels(self, data: bytes) -> Floats:
        """(1, 3, S, S) model pixels of uploaded bytes, decoded off the event loop."""
        s = self.settings
        return await asyncio.to_thread(
            upload_pixels,
            data,
            self.encoder.spec,
            max_bytes=s.max_upload_bytes,
            max_pixels=s.max_upload_pixels,
        )

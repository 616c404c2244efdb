"""Typed inputs and outputs of :class:`search_api.service.SearchService` (plain dataclasses).

Callers build ``SearchOptions`` / ``SearchFilters`` and get ``SearchPage``, ``RerankResult``,
``CaptionResult`` ... back; the HTTP layer maps them to its response schemas, the CLI prints them.
A new filter (camera, say) is a field on ``SearchFilters`` plus its clause in
``CatalogReader.filter_ids``; a new option is a field on ``SearchOptions``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from search_api.service.errors import BadInput

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SearchFilters:
    """Restrict a search to images with a live file matching every given filter."""

    root: str | None = None  # a library root folder, as the indexer recorded it
    path_prefix: str | None = None  # below the root
    captured_after: dt.datetime | None = None  # camera wall-clock time, inclusive
    captured_before: dt.datetime | None = None
    camera: str | None = None  # EXIF make, model, or "make model" (CatalogReader.facets lists them)

    def active(self) -> bool:
        values = (self.root, self.path_prefix, self.captured_after, self.captured_before, self.camera)
        return any(v not in (None, "") for v in values)

    def check(self) -> None:
        after, before = self.captured_after, self.captured_before
        if (
            after is not None
            and before is not None
            and after.replace(tzinfo=None) > before.replace(tzinfo=None)
        ):
            raise BadInput("captured_after is later than captured_before", code="bad-date-range")


@dataclass(frozen=True)
class SearchOptions:
    """One page of a ranking: ``k`` hits from ``offset``; ``rerank`` ITC candidates re-scored by ITM
    (text searches only); the first ``captions`` hits of the page captioned."""

    k: int = 20
    offset: int = 0
    rerank: int = 0
    captions: int = 0
    filters: SearchFilters = field(default_factory=SearchFilters)
    # "relevance", or "date": the best ``date_sort_pool`` hits of the ranking, newest first.
    sort: str = "relevance"


@dataclass
class Hit:
    image_id: int
    path: str | None  # one file holding the image (display form, see catalog.paths.encode_path)
    width: int | None
    height: int | None
    captured_at: dt.datetime | None
    rank: int  # 1-based position in the whole ranking
    itc_score: float
    itm_prob: float | None
    itm_logit: float | None
    score: float
    reranked: bool
    caption: str | None


@dataclass
class SearchPage:
    query: str | None
    query_truncated: bool
    k: int
    offset: int
    rerank_depth: int
    generation: int
    indexed_images: int
    hits: list[Hit]
    next_offset: int | None
    timings_ms: dict[str, float]


@dataclass
class RerankItem:
    rank: int
    image_id: int | None
    upload_index: int | None
    itm_prob: float
    itm_logit: float
    itm_logits: list[float]


@dataclass
class RerankResult:
    text: str
    text_truncated: bool
    results: list[RerankItem]
    timings_ms: dict[str, float]


@dataclass
class CaptionResult:
    image_id: int | None
    prompt: str | None
    text: str
    cached: bool
    model_key: str
    timings_ms: dict[str, float]


@dataclass
class TextEmbeddings:
    model_key: str
    dim: int
    truncated: list[bool]
    vectors: Floats  # (M, D)


@dataclass
class ImageEmbedding:
    model_key: str
    image_id: int | None
    dim: int
    num_vectors: int
    vectors: Floats  # (32, D)


@dataclass
class FileRef:
    root: str
    relative_path: str
    path: str


@dataclass
class ImageDetail:
    image_id: int
    path: str
    width: int | None
    height: int | None
    captured_at: dt.datetime | None
    sha256: str
    byte_size: int
    camera_make: str | None
    camera_model: str | None
    files: list[FileRef]
    caption: str | None


@dataclass
class ImageBytes:
    data: bytes
    media_type: str


@dataclass
class OriginalFile:
    path: Path
    media_type: str
    filename: str


@dataclass
class Readiness:
    ready: bool
    models_loaded: bool
    caption_model: bool
    index_generation: int | None
    published_generation: int | None
    indexed_images: int
    inference_queue: int
    detail: str | None = None

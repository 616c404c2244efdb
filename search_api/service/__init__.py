"""The search service: every search, re-rank, caption and embedding operation, without HTTP.

``SearchService`` (``core.py``) is what the HTTP routes, the CLI and Python callers use; typed inputs
and outputs are in ``types.py``, deliberate failures in ``errors.py``. One module per job: ``search``
(text, similar, upload), ``rerank``, ``caption``, ``embed``, ``images`` (catalog images by id),
``readiness``; their parts: ``inference`` (the model thread), ``index_watcher`` (the live index),
``catalog_reader`` (short catalog sessions), ``image_store`` (thumbnails, model inputs, uploads),
``ranking`` (the score rule), ``timing`` and ``metrics``.
"""

from search_api.service.core import SearchService, load_encoder, search_once
from search_api.service.errors import (
    BadInput,
    InvalidInput,
    NotConfigured,
    NotFound,
    ServiceError,
    TooLarge,
    Unavailable,
    UnsupportedMedia,
)
from search_api.service.types import Hit, SearchFilters, SearchOptions, SearchPage

__all__ = [
    "BadInput",
    "Hit",
    "InvalidInput",
    "NotConfigured",
    "NotFound",
    "SearchFilters",
    "SearchOptions",
    "SearchPage",
    "SearchService",
    "ServiceError",
    "TooLarge",
    "Unavailable",
    "UnsupportedMedia",
    "load_encoder",
    "search_once",
]

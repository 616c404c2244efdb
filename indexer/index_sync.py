"""Bring the vector index file up to the catalog's published generation, after a run.

The index is derived data, kept by ``catalog.index_store``: the file is loaded, caught up from the
catalog's changes since its stamped generation (or rebuilt when missing, damaged or foreign) and saved
atomically. A run killed before this step leaves the old file, which the next run (or the search API's
own catch-up) brings up to date the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine

from catalog.index_store import VectorIndexOptions, index_path, open_vector_index

log = logging.getLogger(__name__)


def catch_up_index(
    engine: Engine, model_key: str, index_dir: Path, options: VectorIndexOptions | None = None
) -> Path:
    """Update (or build) the index file of ``model_key`` under ``index_dir``; returns its path."""
    path = index_path(index_dir, model_key)
    index = open_vector_index(engine, model_key, path, options)
    log.info("vector index %s: %d images at generation %d", path, len(index), index.generation)
    return path

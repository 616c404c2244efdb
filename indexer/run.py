"""``run_index``: one indexing run, with everything every caller needs around the phases.

In order: the one-indexer lock (``indexer.writer_lock``; a dry run writes nothing and takes none), the
schema brought to the newest revision (idempotent: a fresh data folder just works), the phases
(``indexer.phases``: scan, plan, embed, publish), the vector index caught up to what was published
(``indexer.index_sync``), then the backfill of model inputs older runs did not store
(``indexer.backfill``). The CLI, the demo, tests and benchmarks all call this, so none skips a step.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from catalog.db import make_engine, session_factory, upgrade
from catalog.index_store import VectorIndexOptions
from indexer.backfill import backfill_model_inputs
from indexer.index_sync import catch_up_index
from indexer.phases import Indexer, IndexOptions, default_workers
from indexer.progress import ProgressSink
from indexer.summary import RunSummary
from indexer.writer_lock import writer_lock

if TYPE_CHECKING:
    from blip2_embed.encoder import Blip2Encoder
    from blip2_search.settings import Settings

__all__ = ["IndexOptions", "IndexTarget", "ProgressSink", "RunSummary", "default_workers", "run_index"]


@dataclass(frozen=True)
class IndexTarget:
    """Where a run writes: the catalog, the lock of its data folder, and the vector index kept beside."""

    database_url: str
    lock_path: Path | None  # None: the caller holds the data folder's lock (``index --watch``, runs in a row)
    vector_index_dir: Path | None = None  # None: no catch-up here (a server catches up on its own)
    vector_index: VectorIndexOptions = field(default_factory=VectorIndexOptions)

    @classmethod
    def from_settings(cls, settings: Settings) -> IndexTarget:
        return cls(
            database_url=settings.resolved_database_url,
            lock_path=settings.resolved_indexer_lock,
            vector_index_dir=settings.resolved_vector_index_dir,
            vector_index=VectorIndexOptions(**settings.vector_index_options()),
        )


def run_index(
    target: IndexTarget,
    encoder: Blip2Encoder,
    options: IndexOptions,
    *,
    progress: ProgressSink | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Index ``options.roots`` into ``target`` once (see the module docstring). ``stop`` (set by a
    SIGINT handler) ends the run after the batch in hand, committed and published."""
    if target.lock_path is not None:
        target.lock_path.parent.mkdir(parents=True, exist_ok=True)  # the data folder (a dry run's SQLite)
    with contextlib.ExitStack() as held:
        if not options.dry_run and target.lock_path is not None:
            held.enter_context(writer_lock(target.lock_path))
        upgrade(target.database_url)  # a dry run too: it reads an (empty) schema
        engine = make_engine(target.database_url)
        held.callback(engine.dispose)
        indexer = Indexer(session_factory(engine), encoder, options, progress=progress, stop=stop)
        summary = indexer.run()
        if summary.dry_run:
            return summary
        if target.vector_index_dir is not None:
            # Also after an interrupted run: what it committed was published.
            catch_up_index(engine, indexer.model_key, target.vector_index_dir, target.vector_index)
        if not summary.interrupted:
            summary.model_inputs_backfilled = backfill_model_inputs(indexer, summary)
        return summary

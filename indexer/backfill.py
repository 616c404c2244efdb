"""Model inputs for images indexed before they were stored (an older catalog, or the store switched
off for a while): decode only, no model pass, no catalog write, no new generation.

Runs after a run has published, so the search side never waits for it; the search API meanwhile
re-creates a missing input from the original file with the indexer's own decode path, so answers are
the same before and after. A marker in the store (``ModelInputStore.mark_backfilled``) records the
generation up to which every live image has its input, so later runs look only at images embedded or
revived since. Interrupted, it leaves no marker, and the next run resumes it (written files are kept).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from catalog import repository as repo
from catalog.model_inputs import ModelInputStore
from indexer.decode import Decoded
from indexer.pipeline import DecodePool

if TYPE_CHECKING:
    from indexer.phases import Indexer
    from indexer.summary import RunSummary

log = logging.getLogger(__name__)


def missing_model_inputs(indexer: Indexer, store: ModelInputStore) -> tuple[list[tuple[str, Path]], str, int]:
    """(sha256, a live path) of each live image lacking its input, the catalog uid and the generation
    the check covers."""
    with indexer.sessions() as session:
        state = repo.generation_state(session)
        since = store.backfilled_through(state.catalog_uid)
        if since >= state.published_generation:
            return [], state.catalog_uid, since
        changed = repo.live_images_changed_after(session, indexer.model_key, since)
        missing = {i: sha for i, sha in changed.items() if not store.path(sha).exists()}
        paths = repo.image_paths(session, missing)
    work = [(sha, paths[i][0]) for i, sha in missing.items() if paths.get(i)]
    return work, state.catalog_uid, int(state.published_generation)


def backfill_model_inputs(indexer: Indexer, summary: RunSummary) -> int:
    """Write the missing model inputs; returns how many were written."""
    store = indexer.model_inputs
    if store is None or indexer.stop.is_set():
        return 0
    work, catalog_uid, generation = missing_model_inputs(indexer, store)
    if not work:
        if generation > store.backfilled_through(catalog_uid):
            store.mark_backfilled(catalog_uid, generation)
        return 0
    log.info("storing the model inputs of %d images indexed without them (decode only, no model)", len(work))
    written = 0
    progress = indexer.progress
    progress.start(len(work), summary)
    try:
        workers = min(indexer.options.workers, len(work))
        with DecodePool[tuple[str, Path]](indexer.decode_config(), workers) as pool:
            for (sha, path), result in pool.imap(work, lambda w: str(w[1])):
                if isinstance(result, Decoded) and result.sha256 == sha:
                    indexer.write_files(sha, result)
                    written += 1
                else:
                    # Changed or unreadable since it was indexed: the next run's plan deals with the file;
                    # until then the search API decodes its original, or leaves it out.
                    log.warning("%s no longer holds the indexed content; its model input is not stored", path)
                progress.advance(1, summary)
                if indexer.stop.is_set():
                    log.warning("interrupted: %d model inputs stored, the next run stores the rest", written)
                    summary.interrupted = True
                    return written
    finally:
        progress.stop()
    store.mark_backfilled(catalog_uid, generation)
    return written

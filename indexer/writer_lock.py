"""One indexer at a time per data folder: the catalog's generation protocol assumes a single writer."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from catalog.db import CatalogError


class IndexerBusyError(CatalogError):
    """Another indexer holds the lock (a CatalogError: the CLI prints it as one line, exit 1)."""


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block, or raise
    :class:`IndexerBusyError` at once. The OS drops the lock when the process dies, even by SIGKILL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexerBusyError(f"another indexer is running on this data folder (lock {path})") from None
        yield

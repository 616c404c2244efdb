"""``blip2-search index PATH --watch``: index once, then keep the catalog in step with the folders.

File-system events (watchfiles: inotify, FSEvents, ReadDirectoryChangesW; polling with
``WATCHFILES_FORCE_POLLING=1`` for network shares) are grouped into batches: a batch starts once the
folders have been quiet for ``quiet_seconds`` (a copy of many photos is one batch, not hundreds), or
after ``max_wait_seconds`` of continuous changes. Each batch is an ordinary incremental run
(``run_index``) over the folders the events touched, so it publishes one generation when something
changed and nothing when nothing did; a file still being copied is seen again by the next batch, since
its size and mtime change. Events under ``ignore`` (the data folder, when it lies inside a watched
folder) never start a batch: the run's own thumbnails would otherwise wake the watcher forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchfiles import DefaultFilter, watch

from indexer.scan import is_skipped_dir
from indexer.summary import RunSummary

log = logging.getLogger(__name__)


@dataclass
class WatchOptions:
    quiet_seconds: float = 2.0
    max_wait_seconds: float = 30.0
    ignore: list[Path] = field(default_factory=list)
    # More folders than this in one batch: rescan the roots instead (one walk beats many small ones).
    max_folders: int = 64
    force_polling: bool | None = None  # None: watchfiles decides (WATCHFILES_FORCE_POLLING)
    include_hidden: bool = False  # as the scan: changes in hidden and system folders start no batch


@dataclass
class WatchSummary:
    """Totals over the initial run and every batch of a watch session."""

    roots: list[str]
    batches: int = 0  # runs after the initial one
    generations: list[int] = field(default_factory=list)  # each generation a run published
    new: int = 0
    changed: int = 0
    moved: int = 0
    deleted: int = 0
    failed: int = 0
    embedded: int = 0
    captioned: int = 0
    seconds: float = 0.0

    def add(self, run: RunSummary) -> None:
        self.new += run.new
        self.changed += run.changed
        self.moved += run.moved
        self.deleted += run.deleted
        self.failed += sum(1 for f in run.failures if not f.known)
        self.embedded += run.embedded
        self.captioned += run.captioned
        if run.published and run.generation is not None:
            self.generations.append(run.generation)

    def as_dict(self) -> dict[str, Any]:
        return {"watch": True, **self.__dict__, "seconds": round(self.seconds, 3)}


def skipped_by_scan(path: Path, roots: Iterable[Path], include_hidden: bool = False) -> bool:
    """The scan would not look at ``path`` (a dot file, or under a hidden or system folder below its
    root): a change there is no reason for a batch."""
    if include_hidden:
        return False
    for root in roots:
        if root in path.parents:
            rel = path.relative_to(root).parts
            return rel[-1].startswith(".") or any(is_skipped_dir(part) for part in rel[:-1])
    return False


def folders_to_rescan(roots: Iterable[Path], changed: Iterable[Path], max_folders: int = 64) -> list[Path]:
    """The fewest folders whose scan covers every changed path: each path's nearest existing parent,
    inside the root that holds it; folders inside another chosen folder are dropped. Too many
    folders, or a path under no root, give the roots themselves."""
    roots = [Path(r) for r in roots]
    chosen: set[Path] = set()
    for path in changed:
        holders = [r for r in roots if path == r or r in path.parents]
        if not holders:
            return roots
        root = max(holders, key=lambda r: len(r.parts))  # the innermost root that holds the path
        folder = path.parent if path != root else root
        while folder != root and not folder.is_dir():
            folder = folder.parent  # a deleted folder: its parent's scan marks its photos deleted
        chosen.add(folder)
    cover = sorted(f for f in chosen if not any(c in f.parents for c in chosen))
    return roots if len(cover) > max_folders else cover


def watch_and_index(
    roots: list[Path],
    run: Callable[[list[Path]], RunSummary],
    options: WatchOptions,
    *,
    stop: threading.Event,
    on_run: Callable[[RunSummary, bool], None] | None = None,
    on_watching: Callable[[], None] | None = None,
) -> WatchSummary:
    """Run ``run(roots)`` once, then ``run(folders)`` per batch of changes until ``stop`` is set.

    ``run`` is one ``run_index`` call over those folders (it honours ``stop`` too: a batch in progress
    finishes its current model batch, commits and publishes). ``on_run(summary, is_initial)`` follows
    each run; ``on_watching`` is called once the watcher is running and the initial run is done.
    """
    started = time.perf_counter()
    roots = [Path(r).expanduser().resolve() for r in roots]
    total = WatchSummary(roots=[str(r) for r in roots])
    ignore = [Path(p).resolve() for p in options.ignore]
    events = watch(
        *roots,
        watch_filter=DefaultFilter(ignore_paths=[str(p) for p in ignore]),
        step=max(1, round(options.quiet_seconds * 1000)),
        debounce=max(1, round(max(options.max_wait_seconds, options.quiet_seconds) * 1000)),
        stop_event=stop,
        rust_timeout=1000,
        yield_on_timeout=True,  # wake up regularly, so the first yield comes without any change
        raise_interrupt=False,
        force_polling=options.force_polling,
    )
    next(events, None)  # the watcher now records changes, also those made during the initial run
    _do(run, roots, total, on_run, initial=True)
    if on_watching is not None and not stop.is_set():
        on_watching()
    for changes in events:
        if stop.is_set():
            break
        paths = {Path(p) for _, p in changes}
        paths = {p for p in paths if not skipped_by_scan(p, roots, options.include_hidden)}
        if not paths:
            continue
        folders = folders_to_rescan(roots, paths, options.max_folders)
        log.debug("%d changes: rescanning %s", len(changes), folders)
        total.batches += 1
        _do(run, folders, total, on_run, initial=False)
        if stop.is_set():
            break
    total.seconds = time.perf_counter() - started
    return total


def _do(
    run: Callable[[list[Path]], RunSummary],
    folders: list[Path],
    total: WatchSummary,
    on_run: Callable[[RunSummary, bool], None] | None,
    *,
    initial: bool,
) -> None:
    summary = run(folders)
    total.add(summary)
    if on_run is not None:
        on_run(summary, initial)

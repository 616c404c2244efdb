"""Progress of long training-side commands (``eval retrieval``, ``scenes``) on the terminal.

A Rich bar per phase when stdout is a terminal; otherwise (a log file, CI, a pipe) plain lines, one
when a phase starts, then at most one every ``interval`` seconds, and one when it ends, so a
redirected run still shows it is alive without flooding the file. Progress goes to stderr, so a
command's results on stdout (``--json``) stay parseable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressCallback(Protocol):
    """``progress(phase, done, total)``: ``done`` of ``total`` units of ``phase`` are finished."""

    def __call__(self, phase: str, done: int, total: int) -> None: ...


class PlainProgress:
    """Periodic plain lines; the first and last update of every phase are always printed."""

    def __init__(self, console: Console, interval: float = 5.0) -> None:
        self.console = console
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        first = phase not in self._last
        if first or done >= total or now - self._last[phase] >= self.interval:
            self._last[phase] = now
            pct = 100.0 * done / total if total else 100.0
            self.console.print(f"{phase}: {done}/{total} ({pct:.0f}%)", markup=False, highlight=False)


class RichBars:
    """One Rich progress bar per phase, kept on screen when done."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self._tasks[phase], completed=done, total=total)


@contextmanager
def console_progress(
    console: Console | None = None, *, plain: bool | None = None, interval: float = 5.0
) -> Iterator[ProgressCallback]:
    """A progress callback writing to ``console`` (default: stderr); ``plain`` lines by default when
    stdout is not a terminal."""
    console = console or Console(stderr=True)
    if plain is None:
        plain = not sys.stdout.isatty()
    if plain:
        yield PlainProgress(console, interval)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        yield RichBars(progress)

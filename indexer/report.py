"""How the CLI shows an indexing run: a Rich bar on a terminal, plain periodic lines elsewhere, the
final summary, and the lines of ``index --watch``."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from indexer.progress import ProgressSink
from indexer.summary import RunSummary
from indexer.watch import WatchSummary


class RateColumn(ProgressColumn):
    """Images per second over the whole run so far (steadier than Rich's windowed speed)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:6.1f} img/s", style="progress.data.speed")


def _counts(summary: RunSummary) -> str:
    return (
        f"new {summary.new}  changed {summary.changed}  unchanged {summary.unchanged}  "
        f"moved {summary.moved}  failed {summary.failed}  deleted {summary.deleted}"
    )


class RichProgress(ProgressSink):
    """A live bar: done/total, rate, time left and the counts so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, total: int, summary: RunSummary) -> None:
        self._progress = Progress(
            TextColumn("[bold]indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[counts]}"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("index", total=total, counts=_counts(summary))

    def advance(self, n: int, summary: RunSummary) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, counts=_counts(summary))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class PlainProgress(ProgressSink):
    """One line when the work starts, then one every ``interval`` seconds and one at the end: what a
    log file or a pipe can hold (no control codes, no redrawing)."""

    def __init__(self, stream: TextIO, interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self._total = self._done = 0
        self._started = self._last = 0.0
        self._summary: RunSummary | None = None

    def start(self, total: int, summary: RunSummary) -> None:
        self._total, self._done, self._summary = total, 0, summary
        self._started = self._last = time.monotonic()
        self._line("indexing")

    def advance(self, n: int, summary: RunSummary) -> None:
        self._done += n
        self._summary = summary
        if time.monotonic() - self._last >= self.interval:
            self._line("indexing")

    def stop(self) -> None:
        if self._summary is not None:
            self._line("indexed")
            self._summary = None

    def _line(self, verb: str) -> None:
        self._last = now = time.monotonic()
        elapsed = now - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        counts = _counts(self._summary) if self._summary is not None else ""
        self.stream.write(
            f"{verb} {self._done}/{self._total} ({rate:.1f} img/s, {elapsed:.0f} s)  {counts}\n"
        )
        self.stream.flush()


def _list(console: Console, title: str, columns: list[str], rows: list[tuple[str, ...]], limit: int) -> None:
    if not rows:
        return
    table = Table(title=f"{title} ({len(rows)})")
    for i, name in enumerate(columns):
        table.add_column(name, overflow="fold" if i == 0 else "ellipsis")
    for row in rows[:limit]:
        table.add_row(*(Text(cell) for cell in row))  # Text: a "[...]" in a file name is not markup
    if len(rows) > limit:
        table.add_row(f"... and {len(rows) - limit} more", *[""] * (len(columns) - 1))
    console.print(table)


def _count_rows(summary: object, *names: str) -> list[tuple[str, object]]:
    """Rows for counts shown under their field's name."""
    return [(name, getattr(summary, name)) for name in names]


def _print_rows(console: Console, title: str, rows: list[tuple[str, object]]) -> None:
    """A two-column table: bold names, values right-aligned."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


def render_summary(console: Console, summary: RunSummary, max_failures: int = 50) -> None:
    title = "dry run: nothing written" if summary.dry_run else "index run"
    if summary.interrupted:
        title += " (interrupted; committed batches kept)"
    rows = _count_rows(summary, "new", "changed", "unchanged", "moved", "deleted", "failed")
    if summary.dry_run:
        rows.append(("would embed", summary.to_embed))
    else:
        rows += [("embedded", summary.embedded), ("captioned", summary.captioned)]
        rows += [("seconds", f"{summary.seconds:.1f}"), ("images/s", f"{summary.images_per_second:.1f}")]
        if summary.generation is not None:
            rows.append(("generation", summary.generation))
    if summary.warnings:
        rows.append(("warnings", len(summary.warnings)))
    _print_rows(console, title, rows)
    # Paths and messages are already text forms (catalog.paths); markup=False keeps "[...]" literal.
    for note in summary.notes:
        console.print(note, markup=False, highlight=False)
    known = sum(1 for f in summary.failures if f.known)
    _list(
        console,
        "failed files" + (f", {known} known from earlier runs (unchanged; --retry-failed)" if known else ""),
        ["file", "reason", ""],
        [(f.path, f.reason, "known" if f.known else "new") for f in summary.failures],
        max_failures,
    )
    _list(
        console,
        "not indexed (scan warnings)",
        ["path", "reason"],
        [(w.path, w.reason) for w in summary.warnings],
        max_failures,
    )


def report_watch_run(console: Console, summary: RunSummary, initial: bool, as_json: bool) -> None:
    """The initial run of ``--watch`` as a full summary, each batch after it as one line (``--json``:
    one JSON object per run on stdout)."""
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
        sys.stdout.flush()
        return
    if initial:
        render_summary(console, summary)
        return
    what = f"generation {summary.generation}" if summary.published else "no change"
    fresh = [f for f in summary.failures if not f.known]
    console.print(
        f"{what}: new {summary.new}  changed {summary.changed}  moved {summary.moved}  "
        f"deleted {summary.deleted}  failed {len(fresh)}  ({summary.seconds:.1f} s)",
        markup=False,
        highlight=False,
    )
    for f in fresh:
        console.print(f"  failed: {f.path}: {f.reason}", markup=False, highlight=False)


def render_watch_summary(console: Console, watched: WatchSummary) -> None:
    generations = watched.generations
    rows: list[tuple[str, object]] = [
        ("batches", watched.batches),
        ("generations published", len(generations)),
        ("last generation", generations[-1] if generations else "-"),
        *_count_rows(watched, "new", "changed", "moved", "deleted", "failed", "embedded", "captioned"),
        ("seconds", f"{watched.seconds:.1f}"),
    ]
    _print_rows(console, "watch stopped", rows)

"""Rich progress bar and final summary of an indexing run, and the lines of ``index --watch``."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from indexer.run import ProgressSink, RunSummary
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
    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task = None

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
        if self._progress is not None:
            self._progress.update(self._task, advance=n, counts=_counts(summary))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


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


def render_summary(console: Console, summary: RunSummary, max_failures: int = 50) -> None:
    title = "dry run: nothing written" if summary.dry_run else "index run"
    if summary.interrupted:
        title += " (interrupted; committed batches kept)"
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("new", summary.new),
        ("changed", summary.changed),
        ("unchanged", summary.unchanged),
        ("moved", summary.moved),
        ("deleted", summary.deleted),
        ("failed", summary.failed),
    ]
    if summary.dry_run:
        rows.append(("would embed", summary.to_embed))
    else:
        rows += [("embedded", summary.embedded), ("captioned", summary.captioned)]
        rows += [("seconds", f"{summary.seconds:.1f}"), ("images/s", f"{summary.images_per_second:.1f}")]
        if summary.generation is not None:
            rows.append(("generation", summary.generation))
    if summary.warnings:
        rows.append(("warnings", len(summary.warnings)))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
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
    table = Table(title="watch stopped", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    generations = watched.generations
    rows = [
        ("batches", watched.batches),
        ("generations published", len(generations)),
        ("last generation", generations[-1] if generations else "-"),
        ("new", watched.new),
        ("changed", watched.changed),
        ("moved", watched.moved),
        ("deleted", watched.deleted),
        ("failed", watched.failed),
        ("embedded", watched.embedded),
        ("captioned", watched.captioned),
        ("seconds", f"{watched.seconds:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)

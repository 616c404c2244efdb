"""``blip2-search index PATH...``: index photo folders into the catalog."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from blip2_search.commands.common import DatabaseUrlOption, load_encoder, settings_from

if TYPE_CHECKING:
    from blip2_search.settings import Settings
    from indexer.run import IndexOptions

log = logging.getLogger(__name__)

# Exit codes: 0 done (some files may have failed: see the summary), 1 fatal error (database, I/O),
# 2 bad arguments, 3 model not found (from load_encoder), 130 interrupted by SIGINT.
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def index(
    paths: Annotated[list[Path], typer.Argument(help="Photo folders to index (recursively).")],
    caption: Annotated[bool, typer.Option("--caption", help="Store an OPT caption for each image.")] = False,
    caption_prompt: Annotated[str | None, typer.Option(help="Prompt for --caption captions.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; write nothing.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON, no progress bar.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per model batch.")] = None,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode worker processes.")] = None,
    include_hidden: Annotated[
        bool | None, typer.Option("--include-hidden/--skip-hidden", help="Hidden and system folders.")
    ] = None,
    thumbnail_dir: Annotated[Path | None, typer.Option(help="Thumbnail folder.")] = None,
    thumbnail_size: Annotated[int | None, typer.Option(min=0, help="Thumbnail longer side; 0: none.")] = None,
    database_url: DatabaseUrlOption = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Also retry files that failed before and have not changed (after installing a decoder "
            "or raising max_image_pixels).",
        ),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="After indexing, keep watching the folders and index changes in batches (one generation "
            "each) until Ctrl-C, which exits 0.",
        ),
    ] = False,
    debounce: Annotated[
        float,
        typer.Option(min=0.05, max=3600, help="--watch: seconds without changes before a batch runs."),
    ] = 2.0,
) -> None:
    """Index photo folders: new and changed photos are embedded, moved ones keep their embedding,
    deleted ones leave the index. Safe to interrupt; the next run continues."""
    from rich.console import Console

    from catalog.db import make_engine, session_factory, upgrade
    from catalog.paths import encode_path
    from indexer.index_sync import catch_up_index
    from indexer.report import RichProgress, render_summary, render_watch_summary, report_watch_run
    from indexer.run import IndexOptions, RunSummary, default_workers, run_index
    from indexer.watch import WatchOptions, watch_and_index

    settings = settings_from(
        database_url=database_url,
        batch_size=batch_size,
        index_workers=workers,
        index_include_hidden=include_hidden,
        thumbnail_dir=thumbnail_dir,
        thumbnail_size=thumbnail_size,
    )
    console = Console(stderr=True)
    for p in paths:
        if not p.is_dir():
            typer.secho(f"not a folder: {encode_path(p)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USAGE)
    if watch and dry_run:
        typer.secho("--watch and --dry-run do not go together", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_USAGE)

    encoder = load_encoder(settings, caption=caption)  # exits 3 when a model is missing
    options = IndexOptions(
        roots=list(paths),
        batch_size=settings.batch_size,
        workers=default_workers() if settings.index_workers is None else settings.index_workers,
        caption=caption,
        caption_prompt=caption_prompt,
        dry_run=dry_run,
        include_hidden=settings.index_include_hidden,
        thumbnail_dir=settings.thumbnail_dir or settings.data_dir / "thumbnails",
        thumbnail_size=settings.thumbnail_size,
        model_input_dir=settings.model_input_dir,
        fast_jpeg=settings.fast_jpeg,
        max_pixels=settings.max_image_pixels,
        hash_threads=settings.index_hash_threads,
        retry_failed=retry_failed,
    )

    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (committed batches are still safe)
        stop.set()
        what = "stopping" if watch else "stopping after the current batch"
        console.print(f"[yellow]{what} (Ctrl-C again to abort)[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    url = settings.resolved_database_url
    writer_lock = None
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if not dry_run:
            writer_lock = _hold_writer_lock(settings.data_dir / "indexer.lock")
        upgrade(url)  # idempotent; a fresh data dir just works (a dry run too: an empty schema)
        engine = make_engine(url)
        sessions = session_factory(engine)
        progress = None if as_json else RichProgress(console)

        def run(folders: list[Path]) -> RunSummary:
            return run_index(
                sessions,
                encoder,
                replace(options, roots=folders),
                progress=progress,
                stop=stop,
                after_publish=lambda s: catch_up_index(
                    engine, encoder.retrieval_key, settings.resolved_vector_index_dir, settings
                ),
            )

        if watch:
            watched = watch_and_index(
                list(paths),
                run,
                WatchOptions(
                    quiet_seconds=debounce,
                    ignore=_own_folders(settings, options),
                    include_hidden=options.include_hidden,
                ),
                stop=stop,
                on_run=lambda s, initial: report_watch_run(console, s, initial, as_json),
                on_watching=lambda: console.print(f"watching {len(paths)} folder(s); Ctrl-C stops"),
            )
        else:
            summary = run(list(paths))
    except typer.Exit:
        raise
    except Exception as exc:
        from blip2_search.failures import explain

        log.debug("fatal", exc_info=True)
        typer.secho(f"indexing failed: {explain(exc)[0]}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_FATAL) from None
    finally:
        signal.signal(signal.SIGINT, previous)
        if writer_lock is not None:
            writer_lock.close()

    if watch:
        if as_json:
            sys.stdout.write(json.dumps(watched.as_dict()) + "\n")
        else:
            render_watch_summary(Console(), watched)
        return  # Ctrl-C is how a watch ends: exit 0
    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
    else:
        render_summary(Console(), summary)
    if summary.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def _own_folders(settings: Settings, options: IndexOptions) -> list[Path]:
    """What the indexer writes (a watch must not wake up on its own output)."""
    own = [settings.data_dir, settings.resolved_vector_index_dir, options.thumbnail_dir]
    own.append(options.model_input_dir)
    return [p for p in own if p is not None]


def _hold_writer_lock(path: Path) -> TextIO:
    """The catalog takes one writer at a time (its generation protocol assumes it): hold an exclusive
    lock on a file in the data folder while the run lasts, or exit with a clear message."""
    import fcntl

    fh = open(path, "a+")  # noqa: SIM115 - held open for the run; closing it releases the lock
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        typer.secho(
            f"another indexer is running on this data folder (lock {path})", fg=typer.colors.RED, err=True
        )
        raise typer.Exit(EXIT_FATAL) from None
    return fh

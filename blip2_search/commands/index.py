"""``blip2-search index PATH...``: index photo folders into the catalog."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from blip2_search.commands.common import DatabaseUrlOption, fail, load_encoder, settings_from
from blip2_search.failures import EXIT_FATAL, EXIT_USAGE, explain

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from blip2_search.settings import Settings
    from indexer.run import IndexOptions, IndexTarget, RunSummary
    from indexer.watch import WatchOptions, WatchSummary

log = logging.getLogger(__name__)

# Exit codes: 0 done (some files may have failed: see the summary), 1 fatal error (database, I/O,
# another indexer running), 2 bad arguments, 3 model not found (from load_encoder), 130 interrupted.
EXIT_INTERRUPTED = 130


def index(
    ctx: typer.Context,
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
    engine_name: Annotated[
        str, typer.Option("--engine", help="Where decoding and the model run: local (this process) or ray.")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="--engine ray: join this cluster (default: start a local Ray).")
    ] = None,
    encoders: Annotated[
        int | None, typer.Option(min=1, help="--engine ray: encoder actors (default: from the cluster).")
    ] = None,
) -> None:
    """Index photo folders: new and changed photos are embedded, moved ones keep their embedding,
    deleted ones leave the index. Safe to interrupt; the next run continues.

    A program that runs this command in-process may pass a ``ProgressSink`` as the Click context object
    (``app(args, obj=sink)``) to observe the run's stages as well.
    """
    from rich.console import Console

    from catalog.paths import as_uri, encode_path, is_uri
    from indexer.progress import FanOut, ProgressSink
    from indexer.report import PlainProgress, RichProgress, render_summary, render_watch_summary
    from indexer.run import IndexOptions, IndexTarget, run_index
    from indexer.watch import WatchOptions

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
        if is_uri(p):  # s3://... (checked by the run; --engine ray reads it)
            if watch:
                fail(f"--watch follows local folders only, not {as_uri(p)}", EXIT_USAGE)
            continue
        if not p.is_dir():
            fail(f"not a folder: {encode_path(p)}", EXIT_USAGE)
    if watch and dry_run:
        fail("--watch and --dry-run do not go together", EXIT_USAGE)
    if engine_name not in ("local", "ray"):
        fail(f"--engine is local or ray, not {engine_name!r}", EXIT_USAGE)

    encoder = load_encoder(settings, caption=caption)  # exits 3 when a model is missing
    options = IndexOptions.from_settings(
        settings,
        list(paths),
        caption=caption,
        caption_prompt=caption_prompt,
        dry_run=dry_run,
        retry_failed=retry_failed,
    )
    if as_json:
        display: ProgressSink | None = None
    elif console.is_terminal and sys.stdout.isatty():
        display = RichProgress(console)
    else:  # a log file or a pipe: a live bar would be a mess of control codes
        display = PlainProgress(sys.stderr)
    progress = FanOut([display, ctx.find_object(ProgressSink)])

    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (committed batches are still safe)
        stop.set()
        what = "stopping" if watch else "stopping after the current batch"
        console.print(f"[yellow]{what} (Ctrl-C again to abort)[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    target = IndexTarget.from_settings(settings)

    model_engine = None

    def run(folders: list[Path], target: IndexTarget = target) -> RunSummary:
        return run_index(
            target, encoder, replace(options, roots=folders), progress=progress, stop=stop,
            model_engine=model_engine,
        )  # fmt: skip

    try:
        if engine_name == "ray" and not dry_run:
            from indexer.ray_engine import engine_from_settings

            # Joins (or starts) Ray; a refused token or a SQLite catalog on a cluster: one line, exit 1.
            model_engine = engine_from_settings(
                settings, caption=caption, address=ray_address, encoders=encoders
            )
        if watch:
            watched = _watch(
                target,
                list(paths),
                run,
                WatchOptions(
                    quiet_seconds=debounce,
                    ignore=_own_folders(settings, options),
                    include_hidden=options.include_hidden,
                ),
                stop,
                console,
                as_json,
            )
        else:
            summary = run(list(paths))
    except typer.Exit:
        raise
    except Exception as exc:
        log.debug("fatal", exc_info=True)
        fail(f"indexing failed: {explain(exc)[0]}", EXIT_FATAL)
    finally:
        signal.signal(signal.SIGINT, previous)

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


def _watch(
    target: IndexTarget,
    paths: list[Path],
    run: Callable[[list[Path], IndexTarget], RunSummary],
    options: WatchOptions,
    stop: threading.Event,
    console: Console,
    as_json: bool,
) -> WatchSummary:
    """``--watch``: the data folder's lock is held for the whole watch, not per batch, so a second
    indexer refuses to start instead of failing a batch later."""
    from indexer.report import report_watch_run
    from indexer.watch import watch_and_index
    from indexer.writer_lock import writer_lock

    assert target.lock_path is not None
    with writer_lock(target.lock_path):
        held = replace(target, lock_path=None)
        return watch_and_index(
            paths,
            lambda folders: run(folders, held),
            options,
            stop=stop,
            on_run=lambda s, initial: report_watch_run(console, s, initial, as_json),
            on_watching=lambda: console.print(f"watching {len(paths)} folder(s); Ctrl-C stops"),
        )


def _own_folders(settings: Settings, options: IndexOptions) -> list[Path]:
    """What the indexer writes (a watch must not wake up on its own output)."""
    own = [
        settings.data_dir,
        settings.resolved_vector_index_dir,
        options.thumbnail_dir,
        options.model_input_dir,
    ]
    return [p for p in own if p is not None]

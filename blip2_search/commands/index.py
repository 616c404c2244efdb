"""``blip2-search index PATH...``: index photo folders into the catalog."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, TextIO

import typer

from blip2_search.commands.common import DatabaseUrlOption, load_encoder, settings_from

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
    deleted ones leave the index. Safe to interrupt; the next run continues."""
    from rich.console import Console

    from catalog.db import make_engine, session_factory, upgrade
    from catalog.paths import encode_path
    from indexer.index_sync import catch_up_index
    from indexer.report import RichProgress, render_summary
    from indexer.run import IndexOptions, default_workers, run_index

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

    if engine_name not in ("local", "ray"):
        typer.secho(f"--engine is local or ray, not {engine_name!r}", fg=typer.colors.RED, err=True)
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
        console.print("[yellow]stopping after the current batch (Ctrl-C again to abort)[/]")

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
        model_engine = None
        if engine_name == "ray" and not dry_run:
            from indexer.ray_engine import engine_from_settings

            model_engine = engine_from_settings(
                settings, caption=caption, address=ray_address, encoders=encoders
            )
        summary = run_index(
            sessions,
            encoder,
            options,
            progress=progress,
            stop=stop,
            after_publish=lambda s: catch_up_index(
                engine, encoder.retrieval_key, settings.resolved_vector_index_dir, settings
            ),
            engine=model_engine,
        )
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

    if as_json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
    else:
        render_summary(Console(), summary)
    if summary.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


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

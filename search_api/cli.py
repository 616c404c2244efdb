"""Subcommands of ``blip2-search`` owned by this package: ``serve`` and ``search``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings api_host).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: settings api_port).")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: settings).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the search API and the web page (uvicorn, one process: the models load once)."""
    from blip2_search.cli import load_encoder, settings_with
    from blip2_search.failures import check_port_free
    from catalog.db import check_not_damaged

    settings = settings_with(api_host=host, api_port=port, database_url=database_url)
    # Cheap checks first: a taken port, a damaged catalog or a missing model must not cost a model
    # load or an index build. A catalog that does not exist yet is fine: the indexer creates it.
    check_port_free(settings.api_host, settings.api_port)
    check_not_damaged(settings.resolved_database_url)
    import uvicorn

    from search_api.app import create_app

    app = create_app(settings, encoder=load_encoder(settings))
    # One worker process: the model worker thread owns the accelerator; more processes would each load
    # the models. Concurrency comes from the event loop plus request batching.
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level=log_level, access_log=False)


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", "--limit", "--k", min=1, max=1000, help="Hits.")] = 10,
    rerank: Annotated[int, typer.Option(min=0, max=1024, help="ITM re-rank depth (0: off).")] = 0,
    captions: Annotated[int, typer.Option(min=0, max=100, help="Caption the top hits.")] = 0,
    root: Annotated[str | None, typer.Option(help="Only files under this library root.")] = None,
    path_prefix: Annotated[str | None, typer.Option(help="Only paths below the root starting so.")] = None,
    captured_after: Annotated[
        datetime | None, typer.Option(help="Captured at or after (camera local time).")
    ] = None,
    captured_before: Annotated[
        datetime | None, typer.Option(help="Captured at or before (camera local time).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: settings).")] = None,
) -> None:
    """Search the catalog from the terminal (the API's search service, in process)."""
    from blip2_search.cli import load_encoder, settings_with
    from catalog.db import require_schema

    settings = settings_with(database_url=database_url)
    # An unreachable, damaged or missing catalog is an error here, not an empty result (and is found
    # before torch is even imported).
    require_schema(settings.resolved_database_url)
    from search_api.service import SearchFilters, SearchOptions
    from search_api.terminal import run_search

    filters = SearchFilters(root, path_prefix, captured_after, captured_before)
    options = SearchOptions(k=k, rerank=rerank, captions=captions, filters=filters)
    run_search(
        settings, lambda: load_encoder(settings, caption=captions > 0), query, options, as_json=as_json
    )


def register(app: typer.Typer) -> None:
    """Add this package's commands to the ``blip2-search`` app."""
    app.command("serve")(serve)
    app.command("search")(search)

"""``blip2-search serve``: the search API and the web page under uvicorn."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from blip2_search.commands.common import DatabaseUrlOption, load_encoder, settings_from


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings api_host).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: settings api_port).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    log_level: Annotated[
        str | None, typer.Option(help="uvicorn log level (default: info with --verbose, else warning).")
    ] = None,
) -> None:
    """Serve the search API and the web page (uvicorn, one process: the models load once)."""
    from blip2_search.failures import check_port_free
    from catalog.db import check_not_damaged

    settings = settings_from(api_host=host, api_port=port, database_url=database_url)
    # Cheap checks first: a taken port, a damaged catalog or a missing model must not cost a model
    # load or an index build. A catalog that does not exist yet is fine: the indexer creates it.
    check_port_free(settings.api_host, settings.api_port)
    check_not_damaged(settings.resolved_database_url)
    import uvicorn

    from search_api.app import create_app

    app = create_app(settings, encoder=load_encoder(settings))
    # One worker process: the model worker thread owns the accelerator; more processes would each load
    # the models. Concurrency comes from the event loop plus request batching.
    if log_level is None:  # uvicorn's INFO lines, like ours, only with --verbose
        log_level = "info" if logging.getLogger().isEnabledFor(logging.INFO) else "warning"
    if settings.api_port:
        typer.echo(f"serving on http://{settings.api_host}:{settings.api_port}/  (Ctrl-C stops it)", err=True)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level=log_level, access_log=False)

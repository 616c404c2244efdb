"""``blip2-search serve``: the search API and the web page under uvicorn."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from blip2_search.commands.common import DatabaseUrlOption, fail, load_encoder, settings_from
from blip2_search.failures import EXIT_USAGE


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings api_host).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default: settings api_port).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    log_level: Annotated[
        str | None, typer.Option(help="uvicorn log level (default: info with --verbose, else warning).")
    ] = None,
    engine_name: Annotated[
        str, typer.Option("--engine", help="local (one process) or ray (sharded index, model replicas).")
    ] = "local",
    shards: Annotated[int, typer.Option(min=1, help="--engine ray: index shards.")] = 2,
    model_replicas: Annotated[
        int, typer.Option(min=1, help="--engine ray: model replicas (Serve autoscaling lower bound).")
    ] = 1,
    max_model_replicas: Annotated[
        int | None, typer.Option(min=1, help="--engine ray: autoscaling upper bound (default: the lower).")
    ] = None,
    model_gpus: Annotated[
        float | None,
        typer.Option(min=0, help="--engine ray: GPUs per model replica (default: 1 on a GPU cluster)."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="--engine ray: join this cluster (default: start a local Ray).")
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

    if engine_name not in ("local", "ray"):
        fail(f"--engine is local or ray, not {engine_name!r}", EXIT_USAGE)
    if engine_name == "ray":
        from indexer.ray_engine import connect
        from search_api.scaleout.assembly import ShardLayout, create_sharded_app
        from search_api.scaleout.models import ModelScaling

        connect(ray_address)  # a refused token or an unreachable cluster: one line (exit 1)
        top = max_model_replicas or model_replicas
        scaling = ModelScaling(min_replicas=model_replicas, max_replicas=top, num_gpus=model_gpus)
        layout = ShardLayout(shards=shards, models=scaling)
        app = create_sharded_app(settings, layout, encoder=load_encoder(settings))
    else:
        app = create_app(settings, encoder=load_encoder(settings))
    # One worker process: the model worker thread owns the accelerator; more processes would each load
    # the models. Concurrency comes from the event loop plus request batching.
    if log_level is None:  # uvicorn's INFO lines, like ours, only with --verbose
        log_level = "info" if logging.getLogger().isEnabledFor(logging.INFO) else "warning"
    if settings.api_port:
        typer.echo(f"serving on http://{settings.api_host}:{settings.api_port}/  (Ctrl-C stops it)", err=True)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_level=log_level, access_log=False)

"""Subcommands of ``blip2-search`` owned by this package: ``serve`` and ``search``."""

from __future__ import annotations

import json
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
    k: Annotated[int, typer.Option(min=1, max=1000, help="Hits.")] = 10,
    rerank: Annotated[int, typer.Option(min=0, max=1024, help="ITM re-rank depth (0: off).")] = 0,
    captions: Annotated[int, typer.Option(min=0, max=100, help="Caption the top hits.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the response as JSON.")] = False,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: settings).")] = None,
) -> None:
    """Search the catalog from the terminal (same pipeline as the API, in process)."""
    from blip2_search.cli import load_encoder, settings_with
    from catalog.db import display_url, require_schema

    settings = settings_with(database_url=database_url, api_keys="", api_auth_all=False).model_copy(
        update={"max_k": max(k, 1), "max_rerank_depth": max(rerank, 1), "max_caption_hits": max(captions, 1)}
    )
    # An unreachable, damaged or missing catalog is an error here, not an empty result (and is found
    # before torch is even imported).
    require_schema(settings.resolved_database_url)
    from fastapi.testclient import TestClient

    from search_api.app import create_app

    encoder = load_encoder(settings, caption=captions > 0)
    with TestClient(create_app(settings, encoder=encoder)) as client:
        resp = client.get("/api/search", params={"q": query, "k": k, "rerank": rerank, "captions": captions})
    body = resp.json()
    if resp.status_code != 200:
        typer.secho(body.get("detail", resp.text), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    if body["indexed_images"] == 0:
        typer.secho(
            f"the catalog at {display_url(settings.resolved_database_url)} has no indexed images yet: "
            "run `blip2-search index PATH...` first",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(body, indent=2, default=str))
        return
    for hit in body["hits"]:
        itm = f" itm={hit['itm_prob']:.3f}" if hit["itm_prob"] is not None else ""
        cap = f"  {hit['caption']}" if hit.get("caption") else ""
        typer.echo(f"{hit['rank']:>3}. {hit['score']:+.4f}{itm}  {hit['path']}{cap}")
    took = body["timings_ms"]["total"]
    typer.echo(f"({body['indexed_images']} images, generation {body['generation']}, {took:.0f} ms)")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the ``blip2-search`` app."""
    app.command("serve")(serve)
    app.command("search")(search)

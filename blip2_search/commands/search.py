"""``blip2-search search QUERY``: search the catalog from the terminal."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from blip2_search.commands.common import load_encoder, settings_from


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option(min=1, max=1000, help="Hits.")] = 10,
    rerank: Annotated[int, typer.Option(min=0, max=1024, help="ITM re-rank depth (0: off).")] = 0,
    captions: Annotated[int, typer.Option(min=0, max=100, help="Caption the top hits.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the response as JSON.")] = False,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: settings).")] = None,
) -> None:
    """Search the catalog from the terminal (same pipeline as the API, in process)."""
    from catalog.db import display_url, require_schema

    settings = settings_from(database_url=database_url, api_keys="", api_auth_all=False).model_copy(
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

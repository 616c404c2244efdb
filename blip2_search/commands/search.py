"""``blip2-search search QUERY``: search the catalog from the terminal, through ``SearchService`` in
process (no HTTP), with the API's page size, re-rank depth, captions and filters."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from blip2_search.commands.common import DatabaseUrlOption, fail, load_encoder, settings_from

if TYPE_CHECKING:
    from search_api.service import SearchPage

DateOption = typer.Option(help="Captured at or after / before (camera local time).")


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("-k", "--limit", "--k", min=1, max=1000, help="Hits.")] = 10,
    rerank: Annotated[int, typer.Option(min=0, max=1024, help="ITM re-rank depth (0: off).")] = 0,
    captions: Annotated[int, typer.Option(min=0, max=100, help="Caption the top hits.")] = 0,
    root: Annotated[str | None, typer.Option(help="Only files under this library root.")] = None,
    path_prefix: Annotated[str | None, typer.Option(help="Only paths below the root starting so.")] = None,
    captured_after: Annotated[datetime | None, DateOption] = None,
    captured_before: Annotated[datetime | None, DateOption] = None,
    camera: Annotated[str | None, typer.Option(help='EXIF camera: make, model, or "make model".')] = None,
    sort: Annotated[
        str, typer.Option(help="relevance, or date (the best hits, newest first).")
    ] = "relevance",
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Search the catalog from the terminal (the API's search service, in process)."""
    from catalog.db import display_url, require_schema

    # The terminal's limits are its flags' ranges, not the server's per-request ones.
    settings = settings_from(database_url=database_url).model_copy(
        update={"max_k": max(k, 1), "max_rerank_depth": max(rerank, 1), "max_caption_hits": max(captions, 1)}
    )
    # An unreachable, damaged or missing catalog is an error here, not an empty result (and is found
    # before torch is even imported).
    require_schema(settings.resolved_database_url)
    from search_api.service import SearchFilters, SearchOptions, ServiceError, search_once

    filters = SearchFilters(root, path_prefix, captured_after, captured_before, camera)
    options = SearchOptions(k=k, rerank=rerank, captions=captions, filters=filters, sort=sort)
    if sort not in ("relevance", "date"):
        fail(f"--sort: relevance or date (got {sort!r})", 2)
    try:
        filters.check()  # before the models load
        page = search_once(settings, load_encoder(settings, caption=captions > 0), query, options)
    except ServiceError as exc:
        fail(exc.detail, 1)
    if page.indexed_images == 0:
        url = display_url(settings.resolved_database_url)
        fail(f"the catalog at {url} has no indexed images yet: run `blip2-search index PATH...` first", 1)
    typer.echo(json.dumps(dataclasses.asdict(page), indent=2, default=str) if as_json else _lines(page))


def _lines(page: SearchPage) -> str:
    lines = []
    for hit in page.hits:
        itm = f" itm={hit.itm_prob:.3f}" if hit.itm_prob is not None else ""
        cap = f"  {hit.caption}" if hit.caption else ""
        lines.append(f"{hit.rank:>3}. {hit.score:+.4f}{itm}  {hit.path}{cap}")
    took = page.timings_ms["total"]
    lines.append(f"({page.indexed_images} images, generation {page.generation}, {took:.0f} ms)")
    return "\n".join(lines)

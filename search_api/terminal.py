"""``blip2-search search``'s body: one search through ``SearchService`` in process, printed for a
terminal (or as JSON). The command only parses its flags and calls ``run_search``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import NoReturn

import typer

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from catalog.db import display_url
from search_api.service import SearchOptions, SearchPage, ServiceError, search_once


def run_search(
    settings: Settings,
    load: Callable[[], Blip2Encoder],
    query: str,
    options: SearchOptions,
    *,
    as_json: bool = False,
) -> None:
    """Check the options, load the encoder, search, print; a failure is one red line and exit 1."""
    # The terminal's own limits are its flags' ranges, not the server's per-request ones.
    settings = settings.model_copy(
        update={
            "max_k": max(settings.max_k, options.k),
            "max_rerank_depth": max(settings.max_rerank_depth, options.rerank),
            "max_caption_hits": max(settings.max_caption_hits, options.captions),
        }
    )
    try:
        options.filters.check()  # before the models load
        page = search_once(settings, load(), query, options)
    except ServiceError as exc:
        _fail(exc.detail)
    if page.indexed_images == 0:
        _fail(
            f"the catalog at {display_url(settings.resolved_database_url)} has no indexed images yet: "
            "run `blip2-search index PATH...` first"
        )
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(page), indent=2, default=str))
        return
    for line in page_lines(page):
        typer.echo(line)


def page_lines(page: SearchPage) -> list[str]:
    lines = []
    for hit in page.hits:
        itm = f" itm={hit.itm_prob:.3f}" if hit.itm_prob is not None else ""
        cap = f"  {hit.caption}" if hit.caption else ""
        lines.append(f"{hit.rank:>3}. {hit.score:+.4f}{itm}  {hit.path}{cap}")
    took = page.timings_ms["total"]
    lines.append(f"({page.indexed_images} images, generation {page.generation}, {took:.0f} ms)")
    return lines


def _fail(message: str) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)

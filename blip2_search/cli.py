"""The ``blip2-search`` command. Each subcommand is a thin shell over a package function; heavy imports
(torch, transformers) happen inside the commands so ``--help`` stays instant."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

import blip2_search.demo as demo_cli
import blip2_train.cli as train_cli
import indexer.cli as indexer_cli
import search_api.cli as search_api_cli
from blip2_search.settings import Settings, get_settings

app = typer.Typer(help="Self-hosted semantic image search on BLIP-2.", no_args_is_help=True)
db_app = typer.Typer(help="Catalog database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def settings_with(**overrides: object) -> Settings:
    """The settings object with CLI flags applied on top (flags left as None keep the env/defaults)."""
    base = get_settings()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return base.model_copy(update=changes) if changes else base


def load_encoder(settings: Settings, *, retrieval: bool = True, caption: bool = True):
    """The encoder for these settings; a missing model exits with its message, not a traceback."""
    from blip2_embed.encoder import Blip2Encoder
    from blip2_embed.errors import ModelNotFoundError

    try:
        return Blip2Encoder.from_pretrained(
            retrieval=settings.retrieval_model if retrieval else None,
            caption=(settings.caption_model or None) if caption else None,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
        )
    except ModelNotFoundError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(3) from None


@db_app.command("upgrade")
def db_upgrade(
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: settings).")] = None,
) -> None:
    """Create or migrate the catalog schema to the newest revision (Alembic)."""
    from catalog.db import upgrade

    settings = settings_with(database_url=database_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    typer.echo(f"catalog at {settings.resolved_database_url} is at the newest revision")


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files.", exists=True, dir_okay=False)],
    prompt: Annotated[str | None, typer.Option(help='e.g. "Question: what is this? Answer:"')] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512)] = 30,
    num_beams: Annotated[int, typer.Option(min=1, max=16)] = 1,
    caption_model: Annotated[str | None, typer.Option(help="Hub id or folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
) -> None:
    """Caption images (or answer a prompt about them) with the OPT caption model."""
    from blip2_embed.errors import ImageError
    from blip2_embed.images import decode_for_model

    settings = settings_with(caption_model=caption_model)
    encoder = load_encoder(settings, retrieval=False)
    import numpy as np

    ok, pixels = [], []
    for path in images:
        try:
            pixels.append(
                decode_for_model(
                    path, encoder.spec, fast_jpeg=settings.fast_jpeg, max_pixels=settings.max_image_pixels
                )
            )
            ok.append(path)
        except ImageError as exc:
            typer.secho(f"{path}: {exc}", fg=typer.colors.YELLOW, err=True)
    if not ok:
        raise typer.Exit(1)
    texts = encoder.caption(np.stack(pixels), prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)
    for path, text in zip(ok, texts, strict=True):
        typer.echo(json.dumps({"path": str(path), "text": text}) if as_json else f"{path}: {text}")


# Each package owns its subcommands; registering them here keeps one CLI.
for _register in (indexer_cli.register, search_api_cli.register, train_cli.register, demo_cli.register):
    _register(app)


if __name__ == "__main__":
    app()

"""``blip2-search demo``: a photo folder, indexed with the bundled demo model, served with the web page.

Everything is offline: the photos are synthetic scenes (``blip2_train.scenes``) and the model is the
small BLIP-2 pair trained on such scenes that ships as package data in ``blip2_search/demo_model`` (see
docs/training.md for the command that regenerates it). The demo runs the same indexer and API as a real
deployment; only the settings differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from blip2_search.demo_model import DEMO_MODEL_DIR, demo_model_present


def demo(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Option(help="Where the demo photos, catalog and index go.")] = Path(
        "demo-data"
    ),
    photos: Annotated[int, typer.Option(min=1, max=100_000, help="Synthetic photos to generate.")] = 300,
    seed: Annotated[int, typer.Option(help="Scene generator seed (held out from training).")] = 20261127,
    model_dir: Annotated[
        Path, typer.Option(help="Folder with retrieval/ and caption/ checkpoints.")
    ] = DEMO_MODEL_DIR,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Start the API after indexing.")] = True,
) -> None:
    """Generate a demo photo folder, index it with the bundled demo model, and serve the search page."""
    from blip2_search.failures import check_port_free
    from blip2_search.settings import get_settings
    from blip2_train.scenes import generate_dataset

    retrieval, caption = model_dir / "retrieval", model_dir / "caption"
    if not demo_model_present(model_dir):
        typer.secho(
            f"the demo model is missing from {model_dir} (it ships in the package as "
            "blip2_search/demo_model; reinstall blip2-search, or regenerate it as docs/training.md says)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(3)

    if serve:
        check_port_free(host, port)  # before a minute of generating and indexing, not after
    data_dir = data_dir.resolve()
    photo_dir = data_dir / "photos"
    # The demo is self-contained: its own SQLite catalog and models, whatever the environment says.
    os.environ.update(
        {
            "BLIP2_DATA_DIR": str(data_dir),
            "BLIP2_DATABASE_URL": f"sqlite:///{data_dir / 'catalog.db'}",
            "BLIP2_RETRIEVAL_MODEL": str(retrieval),
            "BLIP2_CAPTION_MODEL": str(caption),
        }
    )
    get_settings.cache_clear()

    if not (photo_dir / "captions.jsonl").is_file():
        typer.echo(f"generating {photos} demo photos in {photo_dir} ...")
        # Single-object scenes: what the demo model was trained on (docs/training.md).
        generate_dataset(photo_dir, photos, seed, max_objects=1)
    else:
        typer.echo(f"using the demo photos already in {photo_dir}")

    from blip2_search.commands.index import index
    from blip2_search.commands.serve import serve as serve_api

    index(ctx, [photo_dir / "images"], caption=True)
    if serve:
        serve_api(host=host, port=port)

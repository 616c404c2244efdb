"""``blip2-search caption IMAGE...``: captions (or answers to a prompt) from the OPT caption model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from blip2_search.commands.common import load_encoder, settings_from


def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files.", exists=True, dir_okay=False)],
    prompt: Annotated[str | None, typer.Option(help='e.g. "Question: what is this? Answer:"')] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=512)] = 30,
    num_beams: Annotated[int, typer.Option(min=1, max=16)] = 1,
    caption_model: Annotated[str | None, typer.Option(help="Hub id or folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
) -> None:
    """Caption images (or answer a prompt about them) with the OPT caption model."""
    import numpy as np

    from blip2_embed.errors import ImageError
    from blip2_embed.images import decode_for_model

    settings = settings_from(caption_model=caption_model)
    encoder = load_encoder(settings, retrieval=False)
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

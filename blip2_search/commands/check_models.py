"""``blip2-search check-models``: are the configured models on disk? (nothing is loaded or downloaded)."""

from __future__ import annotations

import typer

from blip2_search.commands.common import settings_from


def check_models() -> None:
    """Check that the configured models are on disk, without loading them or asking the hub (exit 3
    names each missing one). Deployments run it before starting the API."""
    from blip2_embed.errors import ModelNotFoundError
    from blip2_embed.loading import locate_checkpoint
    from blip2_search.failures import EXIT_MODEL

    settings = settings_from()
    missing = False
    for role, name in (("retrieval", settings.retrieval_model), ("caption", settings.caption_model)):
        if not name:
            typer.echo(f"{role}: none (BLIP2_CAPTION_MODEL is empty: no captions)")
            continue
        try:
            typer.echo(f"{role}: {name} -> {locate_checkpoint(name, role)}")
        except ModelNotFoundError as exc:  # both models are checked: one message each
            typer.secho(str(exc), fg=typer.colors.RED, err=True)
            missing = True
    if missing:
        raise typer.Exit(EXIT_MODEL)

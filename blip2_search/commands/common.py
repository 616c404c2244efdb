"""What the subcommands share: option types, settings with flags applied, and one-line failures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from blip2_search.settings import Settings, get_settings

if TYPE_CHECKING:
    from blip2_embed.encoder import Blip2Encoder

DatabaseUrlOption = Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: settings).")]


def settings_from(**flags: object) -> Settings:
    """The settings (environment, ``.env``, defaults) with the command's flags on top."""
    return get_settings().with_overrides(**flags)


def load_encoder(settings: Settings, *, retrieval: bool = True, caption: bool = True) -> Blip2Encoder:
    """The encoder these settings name; a missing model or device fails with one line (exit 3 / 2)."""
    from blip2_embed.encoder import Blip2Encoder

    return Blip2Encoder.from_pretrained(**settings.encoder_options(retrieval=retrieval, caption=caption))


def fail(message: str, code: int) -> NoReturn:
    """Print ``message`` in red on stderr and exit with ``code``."""
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)

"""The ``blip2-search`` command: only the assembly of the subcommands (``blip2_search.commands``).

This module imports every command and is imported by nothing. Heavy imports (torch, transformers)
happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from blip2_search import __version__
from blip2_search.commands import caption, check_models, db, demo, index, search, serve, train
from blip2_search.failures import explain

log = logging.getLogger("blip2_search")


class _ReportingGroup(TyperGroup):
    """Every failure a command does not handle becomes one line and an exit code (see ``failures``)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # usage errors and exits: Typer reports them
            raise
        except Exception as exc:
            log.debug("command failed", exc_info=True)
            message, code = explain(exc)
            typer.secho(message, fg=typer.colors.RED, err=True)
            raise typer.Exit(code) from None


app = typer.Typer(
    help="Self-hosted semantic image search on BLIP-2.",
    no_args_is_help=True,
    cls=_ReportingGroup,
    # Subcommands inherit the context settings: `-h` works everywhere.
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"blip2-search {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log lines (INFO and DEBUG), tracebacks of failures.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    # Our own progress and results go to the terminal directly; log lines are for --verbose.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        # Libraries narrate every step at INFO; keep the terminal for our own progress and results.
        for noisy in ("alembic", "httpx", "httpx2", "transformers", "faiss"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # The per-tensor "Loading weights" bars of transformers (read when it is first imported).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


app.add_typer(db.app, name="db")
app.command("index")(index.index)
app.command("serve")(serve.serve)
app.command("search")(search.search)
app.command("caption")(caption.caption)
app.command("demo")(demo.demo)
app.command("check-models")(check_models.check_models)
train.register(app)  # scenes, train, eval retrieval (over blip2_train)


if __name__ == "__main__":
    app()

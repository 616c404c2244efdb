"""How the ``blip2-search`` command reports failures: one actionable line and an exit code, never a
traceback (``--verbose`` logs the traceback too).

Exit codes: 1 a runtime failure (database, I/O, an unexpected error), 2 bad settings or arguments,
3 a model that is not available.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_MODEL = 3


def _settings_message(exc: ValidationError) -> str:
    """A pydantic-settings ValidationError as 'invalid setting NAME=value: why'."""
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ())]
        name = loc[0] if loc else "?"
        env = name if name.isupper() else f"BLIP2_{name.upper()}"
        if env == "BLIP2_DATABASE_URL":
            env = "DATABASE_URL / BLIP2_DATABASE_URL"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        shown = err.get("input")
        value = f"={shown!r}" if isinstance(shown, str | int | float) and len(str(shown)) < 200 else ""
        parts.append(f"{env}{value}: {msg}")
    return "invalid setting " + "; ".join(parts)


def explain(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for a failure that reached the command line (always
    printable: a file name that is not UTF-8 shows as its catalog text form)."""
    from catalog.paths import safe_text

    message, code = _explain(exc)
    return safe_text(message), code


def _explain(exc: BaseException) -> tuple[str, int]:
    from pydantic import ValidationError

    from blip2_embed.errors import ConfigurationError, ModelNotFoundError
    from catalog.db import CatalogError

    if isinstance(exc, ValidationError) and exc.title in ("Settings", "Settings_"):
        return _settings_message(exc), EXIT_USAGE
    if isinstance(exc, ModelNotFoundError):
        return str(exc), EXIT_MODEL
    if isinstance(exc, ConfigurationError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, CatalogError | PortInUseError):
        return str(exc), EXIT_FATAL
    text = " ".join(str(exc).split())[:500]
    return f"failed: {type(exc).__name__}: {text} (run with --verbose for details)", EXIT_FATAL


class PortInUseError(RuntimeError):
    """The address ``serve`` would bind is taken."""


def check_port_free(host: str, port: int) -> None:
    """Fail before the models load (a minute on a GPU box) when ``host:port`` cannot be bound."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # uvicorn sets SO_REUSEADDR too, so a socket in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise PortInUseError(
                f"cannot serve on {host}:{port}: {why}; stop the other server or choose another port "
                "(--port or BLIP2_API_PORT)"
            ) from None

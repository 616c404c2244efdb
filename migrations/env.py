"""Alembic environment: runs the revisions on the connection that ``catalog.db`` hands over.

Run by hand (``alembic upgrade head`` with ``alembic.ini`` at the repository root), the URL comes from
``-x url=...``, else from ``BLIP2_DATABASE_URL`` / ``DATABASE_URL`` in the environment (a SQLAlchemy URL).
The project settings are not read here: the migrations sit below them; ``blip2-search db upgrade`` is
the command that applies every setting.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from catalog.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name)
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    url = url or os.environ.get("BLIP2_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit(
            "no database URL: run `alembic -x url=sqlite:////path/catalog.db upgrade head`, set "
            "DATABASE_URL, or use `blip2-search db upgrade` (which reads the project settings)"
        )
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table for later revisions.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from catalog.db import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

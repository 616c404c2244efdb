"""Engine and session setup, and the Alembic wrapper behind ``blip2-search db upgrade``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url
from sqlalchemy.exc import NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

# Seconds a SQLite writer waits for the other writer's lock before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


class CatalogError(RuntimeError):
    """A catalog database that cannot be used as it is; the message says which one and what to do."""


def display_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return text[0].strip() if text else type(inner).__name__


def describe_error(url: str, exc: BaseException) -> str:
    """One actionable line for a database failure on the catalog at ``url``."""
    shown = display_url(url)
    detail = _first_line(exc)
    is_sqlite = url.startswith("sqlite")
    where = f"the catalog file {make_url(url).database}" if is_sqlite else f"the catalog database {shown}"
    lowered = detail.lower()
    if isinstance(exc, NoSuchModuleError | ModuleNotFoundError):
        return f"no database driver for {shown}: {detail}; use postgresql://... or sqlite:///..."
    if is_sqlite and ("not a database" in lowered or "malformed" in lowered or "corrupt" in lowered):
        return (
            f"{where} is damaged ({detail}): restore it from a backup, or move it aside and rebuild the "
            "catalog from your photos with `blip2-search index PATH...`"
        )
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"{where} has no catalog schema yet: run `blip2-search db upgrade` (or index photos first)"
    if isinstance(exc, OperationalError) and not is_sqlite:
        return f"cannot reach {where} ({detail}); check DATABASE_URL and that the server is running"
    if isinstance(exc, OperationalError):
        return f"cannot open {where} ({detail}); check the path and its permissions"
    return f"{where} failed: {detail}"


@contextmanager
def catalog_errors(url: str) -> Iterator[None]:
    """Turn database failures on ``url`` into :class:`CatalogError` with one actionable line."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise CatalogError(describe_error(url, exc)) from exc
    except ModuleNotFoundError as exc:  # a driver named in the URL but not installed
        raise CatalogError(describe_error(url, exc)) from exc


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; for SQLite, creates the file's folder and sets the pragmas we rely on.

    SQLite pragmas (on every new connection):
    - ``journal_mode=WAL``: the search API reads while the indexer writes.
    - ``synchronous=FULL``: a committed batch survives a power cut, not only a process crash; the
      catalog is the system of record and the indexer commits in batches, so the fsync is cheap.
    - ``foreign_keys=ON``: SQLite ignores foreign keys otherwise.
    - ``busy_timeout``: wait for a concurrent writer (e.g. a caption write) instead of failing.
    """
    sa_url = make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(sa_url, **kwargs)

    database = sa_url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(sa_url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite (which would otherwise defer BEGIN and break
        # SAVEPOINTs); SQLAlchemy emits BEGIN itself in the "begin" hook below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    return engine


@contextmanager
def _connection(url: str, *, transaction: bool = False) -> Iterator[Connection]:
    """One short-lived connection to ``url`` (in a transaction if asked), its failures as CatalogError."""
    with catalog_errors(url):
        engine = make_engine(url)
        try:
            with engine.begin() if transaction else engine.connect() as connection:
                yield connection
        finally:
            engine.dispose()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (the callers commit per batch)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` that finds the revisions inside the installed package.

    It does not read ``alembic.ini`` (absent from an installed wheel); the ini at the repository root is
    for running the ``alembic`` command by hand.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's ini interpolation would read a '%' in a password as a placeholder.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest). Idempotent.

    What ``blip2-search db upgrade`` runs, with ``settings.resolved_database_url``.
    """
    with _connection(url, transaction=True) as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def check(url: str) -> None:
    """Raise ``alembic.util.exc.AutogenerateDiffsDetected`` if the models differ from the database,
    and :class:`CatalogError` if it is unreachable, damaged or not at the newest revision."""
    require_schema(url)
    with _connection(url) as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        try:
            command.check(config)
        except CommandError as exc:
            if "not up to date" in str(exc):
                raise CatalogError(
                    f"the catalog at {display_url(url)} is not at the newest schema revision: "
                    "run `blip2-search db upgrade`"
                ) from None
            raise


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at, or None before the first upgrade."""
    from alembic.runtime.migration import MigrationContext

    with _connection(url) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def sqlite_file_missing(url: str) -> bool:
    """True for a SQLite URL whose file does not exist (yet)."""
    if not url.startswith("sqlite"):
        return False
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return False
    return not Path(database).expanduser().is_file()


def check_not_damaged(url: str) -> None:
    """Raise :class:`CatalogError` when ``url`` is an existing SQLite file that is not a sound database.

    ``PRAGMA quick_check`` reads every page, so a file that opens but is damaged inside is found too.
    Servers call this at start-up; a missing file is fine there (the indexer creates it later).
    """
    if not url.startswith("sqlite") or sqlite_file_missing(url):
        return
    with _connection(url) as connection:
        problems = [str(r[0]) for r in connection.exec_driver_sql("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise CatalogError(
            f"the catalog file {make_url(url).database} is damaged ({problems[0] if problems else '?'}): "
            "restore it from a backup, or move it aside and rebuild the catalog from your photos with "
            "`blip2-search index PATH...`"
        )


def require_schema(url: str) -> None:
    """Raise :class:`CatalogError` unless ``url`` is reachable, sound and holds a catalog schema.

    For commands that only read the catalog: they must not create an empty one (a typo in the path
    would otherwise look like an empty library).
    """
    if sqlite_file_missing(url):
        raise CatalogError(
            f"there is no catalog at {make_url(url).database}: index photos first "
            "(`blip2-search index PATH...`) or point BLIP2_DATA_DIR / DATABASE_URL at an existing one"
        )
    check_not_damaged(url)
    with _connection(url) as connection:
        tables = set(inspect(connection).get_table_names())
    if "index_state" not in tables:
        raise CatalogError(
            f"the catalog at {display_url(url)} has no schema yet: run `blip2-search db upgrade` "
            "(or index photos first)"
        )

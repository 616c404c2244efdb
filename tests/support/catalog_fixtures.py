"""Catalog fixtures: a real SQLite file and a real Postgres schema per test, migrated with Alembic.

Postgres comes from ``BLIP2_TEST_DATABASE_URL`` (``.ci/run`` exports it). Without it the Postgres variants
are skipped with a loud reason, except under CI (``CI`` set), where that is a failure. Each Postgres test
gets a fresh schema (``search_path`` set through the URL's ``options``), dropped afterwards, so tests never
see each other's rows or the other users of the database.

Fixtures: ``pg_url``, ``catalog_url`` (parametrised: sqlite, postgres), ``catalog_engine`` (migrated).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.pool import NullPool

from catalog import db

__all__ = ["catalog_engine", "catalog_url", "pg_url"]

PG_URL_ENV = "BLIP2_TEST_DATABASE_URL"


def postgres_base_url() -> str | None:
    url = os.environ.get(PG_URL_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {PG_URL_ENV} is not: the Postgres catalog tests must run in CI")
    pytest.skip(
        f"!!! POSTGRES CATALOG TESTS SKIPPED: {PG_URL_ENV} is not set "
        f"(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test) !!!"
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty Postgres schema (dropped after the test)."""
    base = postgres_base_url()
    assert base is not None
    schema = f"t_catalog_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, poolclass=NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            make_url(base)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty database: a SQLite file, or a Postgres schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('catalog') / 'catalog.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def catalog_engine(catalog_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head."""
    db.upgrade(catalog_url)
    engine = db.make_engine(catalog_url)
    try:
        yield engine
    finally:
        engine.dispose()

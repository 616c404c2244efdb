"""Alembic revisions of the catalog schema; run them with ``blip2-search db upgrade``."""

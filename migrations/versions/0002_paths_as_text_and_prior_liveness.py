"""Paths in their lossless text form; each image's liveness before the open generation changed it.

- ``files.relative_path`` and ``library_roots.path`` hold the text form of ``catalog.paths``: a byte
  that is not UTF-8 as ``\\xHH`` and a literal backslash as two. Rows written before could only hold
  valid UTF-8 (other names failed the run), so the one rewrite is doubling their backslashes.
- ``images.prior_is_live`` / ``images.prior_liveness_generation``: the image's liveness before its first
  change in the open generation, so a vector-index build at the published generation is exact while an
  indexer run is under way. Existing rows start as "not live before" (exact for every image whose
  liveness last changed at or before the published generation, which is all of them unless a run was
  left half done at the upgrade).

Downgrading halves the backslashes again; names with ``\\xHH`` escapes keep them as plain text.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PATH_COLUMNS = (("files", "relative_path"), ("library_roots", "path"))


def _replace_in_paths(old: str, new: str) -> None:
    for table, column in _PATH_COLUMNS:
        col = sa.column(column, sa.Text())
        # Bound parameters: no backend-specific escaping of the backslash in SQL literals.
        op.execute(
            sa.table(table, col)
            .update()
            .where(sa.func.replace(col, old, "") != col)
            .values({column: sa.func.replace(col, old, new)})
        )


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite has both since 3.35): a batch "move and copy" of ``images`` would
    # drop the table under foreign keys that cascade into embeddings and captions.
    op.add_column(
        "images", sa.Column("prior_is_live", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column(
        "images", sa.Column("prior_liveness_generation", sa.Integer(), nullable=False, server_default="0")
    )
    _replace_in_paths("\\", "\\\\")


def downgrade() -> None:
    _replace_in_paths("\\\\", "\\")
    op.drop_column("images", "prior_liveness_generation")
    op.drop_column("images", "prior_is_live")

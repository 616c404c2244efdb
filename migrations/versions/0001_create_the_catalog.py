"""Create the catalog: library roots, images, files, embeddings, captions and the index state.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Revisions spell out their types instead of importing catalog.models, so that later changes to the models
# cannot rewrite history. catalog.models.UTCDateTime is stored as a plain (naive UTC) timestamp.
FILE_STATUSES = ("pending", "indexed", "failed", "deleted")


def upgrade() -> None:
    op.create_table(
        "library_roots",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_library_roots"),
        sa.UniqueConstraint("path", name="uq_library_roots_path"),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("captured_at", sa.DateTime(), nullable=True),
        sa.Column("camera_make", sa.String(length=255), nullable=True),
        sa.Column("camera_model", sa.String(length=255), nullable=True),
        sa.Column("is_live", sa.Boolean(), nullable=False),
        sa.Column("liveness_generation", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.UniqueConstraint("sha256", name="uq_images_sha256"),
    )
    op.create_index("ix_images_captured_at", "images", ["captured_at"])
    op.create_index("ix_images_liveness_generation", "images", ["liveness_generation"])
    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("root_id", sa.Integer(), nullable=False),
        sa.Column("relative_path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(*FILE_STATUSES, name="file_status", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["root_id"], ["library_roots.id"], name="fk_files_root_id_library_roots", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name="fk_files_image_id_images", ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
        sa.UniqueConstraint("root_id", "relative_path", name="uq_files_root_id_relative_path"),
    )
    op.create_index("ix_files_image_id", "files", ["image_id"])
    op.create_table(
        "embeddings",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_key", sa.String(length=255), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("num_vectors", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name="fk_embeddings_image_id_images", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", "model_key", name="pk_embeddings"),
    )
    op.create_index("ix_embeddings_model_key_generation", "embeddings", ["model_key", "generation"])
    op.create_table(
        "captions",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_key", sa.String(length=255), nullable=False),
        sa.Column("prompt", sa.String(length=1000), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name="fk_captions_image_id_images", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", "model_key", "prompt", name="pk_captions"),
    )
    op.create_table(
        "index_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("catalog_uid", sa.String(length=32), nullable=False),
        sa.Column("open_generation", sa.Integer(), nullable=False),
        sa.Column("published_generation", sa.Integer(), nullable=False),
        sa.Column("published_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_index_state"),
    )


def downgrade() -> None:
    op.drop_table("index_state")
    op.drop_table("captions")
    op.drop_index("ix_embeddings_model_key_generation", table_name="embeddings")
    op.drop_table("embeddings")
    op.drop_index("ix_files_image_id", table_name="files")
    op.drop_table("files")
    op.drop_index("ix_images_liveness_generation", table_name="images")
    op.drop_index("ix_images_captured_at", table_name="images")
    op.drop_table("images")
    op.drop_table("library_roots")

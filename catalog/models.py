"""SQLAlchemy models of the catalog, the system of record.

Content-addressed: an :class:`Image` is one distinct content (sha256); a :class:`File` is a path under a
:class:`LibraryRoot` that currently holds some image. Embeddings and captions hang off images, so the same
bytes at two paths are embedded once and found under both paths. Vector ids in the FAISS index are
image ids.

The schema is created by the Alembic revisions in ``migrations/``; ``alembic check`` (run by the tests
on SQLite and Postgres) keeps these models and the revisions identical.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so that migrations can name what they alter on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A UTC instant stored as a naive ``timestamp`` and returned timezone-aware.

    SQLite drops the offset of an aware datetime while Postgres keeps it; storing naive UTC and attaching
    UTC on the way out gives the same values on both backends.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class FileStatus(enum.StrEnum):
    PENDING = "pending"  # seen on disk, not yet embedded (or content changed since)
    INDEXED = "indexed"  # its image has an embedding; the file is findable
    FAILED = "failed"  # could not be read or decoded; ``error`` says why
    DELETED = "deleted"  # gone from disk; the row stays so a rescan need not re-hash everything


class LibraryRoot(Base):
    """A folder the indexer scans; files store paths relative to it."""

    __tablename__ = "library_roots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)  # absolute, text form of catalog.paths
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Image(Base):
    """One distinct content, whatever paths hold it."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    byte_size: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # EXIF DateTimeOriginal as the camera wrote it: local wall-clock time, no zone.
    captured_at: Mapped[dt.datetime | None] = mapped_column(DateTime, index=True)
    camera_make: Mapped[str | None] = mapped_column(String(255))
    camera_model: Mapped[str | None] = mapped_column(String(255))
    # True while at least one file with status "indexed" holds this content; only live images belong
    # in the vector index. Maintained by the repository functions that change files.
    is_live: Mapped[bool] = mapped_column(Boolean, default=False)
    # The generation in which ``is_live`` last changed, so a catch-up from generation G finds the images
    # that entered or left the index after G.
    liveness_generation: Mapped[int] = mapped_column(Integer, default=0, index=True)
    # ``is_live`` and ``liveness_generation`` as they were before the image's first liveness change in
    # ``liveness_generation``. Only one generation is open at a time, so while it is, these give every
    # image's state at the published generation: a rebuild of the vector index at that generation is
    # exact even while an indexer run is half done.
    prior_is_live: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    prior_liveness_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class File(Base):
    """A path under a root, and what the indexer made of it."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("root_id", "relative_path", name="uq_files_root_id_relative_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root_id: Mapped[int] = mapped_column(ForeignKey("library_roots.id", ondelete="CASCADE"))
    # POSIX separators, relative to the root, in the text form of catalog.paths (valid UTF-8 for any
    # byte name: a byte that is not UTF-8 as \xHH, a backslash as two).
    relative_path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    # Null until the content is hashed; several files may share one image.
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"), index=True)
    status: Mapped[FileStatus] = mapped_column(
        Enum(
            FileStatus,
            name="file_status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=FileStatus.PENDING,
    )
    error: Mapped[str | None] = mapped_column(Text)  # why the file failed (a short slug and a message)
    first_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Embedding(Base):
    """The (num_vectors, dim) float16 vectors of one image under one model, little-endian, row-major."""

    __tablename__ = "embeddings"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    model_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)
    num_vectors: Mapped[int] = mapped_column(Integer)
    # The generation this row was written in; a catch-up from generation G reads the rows after G.
    generation: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Last, because SQLite stores a row's columns in order and spills a long blob into overflow pages:
    # columns after it would cost reading the whole blob.
    vectors: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_embeddings_model_key_generation", "model_key", "generation"),)


class Caption(Base):
    """A generated caption; ``prompt`` is '' for a plain caption."""

    __tablename__ = "captions"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    model_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    prompt: Mapped[str] = mapped_column(String(1000), primary_key=True, default="")
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class IndexState(Base):
    """The generation counter (one row, id 1).

    Writers stamp every change with the open generation; ``published_generation`` is the newest
    generation whose rows are all committed. Readers catch up their vector index to it.
    ``catalog_uid`` identifies this catalog, so an index file built from another catalog is never
    mistaken for a current one.
    """

    __tablename__ = "index_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    catalog_uid: Mapped[str] = mapped_column(String(32))
    open_generation: Mapped[int] = mapped_column(Integer, default=0)
    published_generation: Mapped[int] = mapped_column(Integer, default=0)
    published_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

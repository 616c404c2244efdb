"""The typed catalog API that the indexer and the search API use instead of SQL.

Every function takes an open :class:`~sqlalchemy.orm.Session` and leaves the transaction to the caller:
the indexer commits once per batch (so a crash loses at most the batch in flight), the search API reads
in short sessions. Queries select plain columns rather than ORM objects, so a long-lived session never
serves a stale cached row.

Paths: callers pass and get OS paths (``str``/``Path`` as ``os.fsdecode`` makes them, so any byte name
works); the rows hold their text form (``catalog.paths``), which is valid UTF-8 on both backends.

Generation protocol (see docs/catalog.md): a writer calls :func:`open_generation`, passes that number to
every write, commits per batch, and calls :func:`publish_generation` when a run (or a periodic checkpoint)
is complete. Readers only trust what :func:`published_generation` covers. One writer at a time.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar, cast

import numpy as np
from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from catalog.models import Caption, Embedding, File, FileStatus, Image, IndexState, LibraryRoot, utcnow
from catalog.paths import ObjectURI, as_uri, decode_path, encode_path, is_uri, root_path, safe_text

# Rows per IN (...) list: well under SQLite's and Postgres's bound-parameter limits.
_CHUNK = 500
_STATE_ID = 1

T = TypeVar("T")


# --- value types -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileState:
    """What the catalog knows about a path, for diffing a scan against it."""

    size: int
    mtime_ns: int
    status: FileStatus
    image_id: int | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FileUpdate:
    """A path's new state, written by :func:`upsert_files`."""

    relative_path: str
    size: int
    mtime_ns: int
    image_id: int | None
    status: FileStatus
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image as the search API shows it: metadata plus the paths of its live files."""

    id: int
    sha256: str
    byte_size: int
    width: int | None
    height: int | None
    captured_at: dt.datetime | None
    camera_make: str | None
    camera_model: str | None
    paths: list[Path] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IndexChanges:
    """One batch of vector-index changes: images to (re)insert with their vectors, images to drop."""

    upsert_ids: np.ndarray  # int64 (n,)
    upsert_vectors: np.ndarray  # float32 (n, num_vectors, dim)
    removed_ids: np.ndarray  # int64 (m,)


@dataclass(frozen=True, slots=True)
class GenerationState:
    catalog_uid: str
    open_generation: int
    published_generation: int
    published_at: dt.datetime | None


# --- helpers -----------------------------------------------------------------------------------------


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _insert(session: Session, entity: Any) -> Any:
    """A dialect-specific INSERT, so that upserts (ON CONFLICT) read the same on SQLite and Postgres."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(entity)
    if dialect == "sqlite":
        return sqlite.insert(entity)
    raise NotImplementedError(f"the catalog supports SQLite and Postgres, not {dialect}")


def _as_posix(relative_path: str) -> str:
    """The stored text of a relative OS path."""
    return encode_path(PurePosixPath(relative_path).as_posix())


# --- roots -------------------------------------------------------------------------------------------


def get_or_create_root(session: Session, path: str | Path | ObjectURI) -> int:
    """The id of the library root at ``path`` (made absolute; a URI as it is), created on first use."""
    resolved = encode_path(as_uri(path) if is_uri(path) else Path(path).expanduser().resolve())
    session.execute(_insert(session, LibraryRoot).values(path=resolved).on_conflict_do_nothing())
    return session.execute(select(LibraryRoot.id).where(LibraryRoot.path == resolved)).scalar_one()


def list_roots(session: Session) -> dict[int, Path]:
    """id -> root; an object-store root is a ``catalog.paths.ObjectURI`` (a pure path, typed as a
    ``Path`` for the code that only joins and compares roots; only pyarrow opens it)."""
    rows = session.execute(select(LibraryRoot.id, LibraryRoot.path))
    return {row.id: cast(Path, root_path(decode_path(row.path))) for row in rows}


# --- files -------------------------------------------------------------------------------------------


def files_under_root(session: Session, root_id: int) -> dict[str, FileState]:
    """relative path -> state of every file row under the root, deleted ones included."""
    rows = session.execute(
        select(File.relative_path, File.size, File.mtime_ns, File.status, File.image_id, File.error).where(
            File.root_id == root_id
        )
    )
    return {
        decode_path(r.relative_path): FileState(r.size, r.mtime_ns, FileStatus(r.status), r.image_id, r.error)
        for r in rows
    }


def upsert_files(session: Session, root_id: int, updates: Iterable[FileUpdate], generation: int) -> None:
    """Insert or overwrite the rows of these paths, and update which images are live.

    ``generation`` is the open generation (:func:`open_generation`): an image that gains its first
    indexed file, or loses its last, is stamped with it so that vector-index catch-up sees the change.
    """
    updates = list(updates)
    if not updates:
        return
    now = utcnow()
    paths = [_as_posix(u.relative_path) for u in updates]
    touched = {u.image_id for u in updates if u.image_id is not None}
    for chunk in _chunks(paths):
        touched.update(
            session.scalars(
                select(File.image_id).where(
                    File.root_id == root_id, File.relative_path.in_(chunk), File.image_id.is_not(None)
                )
            )
        )
    rows = [
        {
            "root_id": root_id,
            "relative_path": path,
            "size": u.size,
            "mtime_ns": u.mtime_ns,
            "image_id": u.image_id,
            "status": FileStatus(u.status),
            "error": None if u.error is None else safe_text(u.error),
            "first_seen_at": now,
            "updated_at": now,
        }
        for path, u in zip(paths, updates, strict=True)
    ]
    stmt = _insert(session, File)
    stmt = stmt.on_conflict_do_update(
        index_elements=[File.root_id, File.relative_path],
        set_={
            "size": stmt.excluded.size,
            "mtime_ns": stmt.excluded.mtime_ns,
            "image_id": stmt.excluded.image_id,
            "status": stmt.excluded.status,
            "error": stmt.excluded.error,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    session.execute(stmt, rows)
    _refresh_liveness(session, touched, generation)


def upsert_file(
    session: Session,
    root_id: int,
    relative_path: str,
    *,
    size: int,
    mtime_ns: int,
    image_id: int | None,
    status: FileStatus,
    error: str | None = None,
    generation: int,
) -> None:
    """One-path form of :func:`upsert_files`."""
    upsert_files(
        session, root_id, [FileUpdate(relative_path, size, mtime_ns, image_id, status, error)], generation
    )


def mark_deleted(session: Session, root_id: int, relative_paths: Iterable[str], generation: int) -> int:
    """Mark these paths as gone from disk; returns how many rows changed.

    The rows stay (with their image id), so the image's embedding is kept: if the same content
    reappears anywhere, it is findable again without being embedded again.
    """
    paths = [_as_posix(p) for p in relative_paths]
    touched: set[int] = set()
    changed = 0
    now = utcnow()
    for chunk in _chunks(paths):
        rows = session.execute(
            select(File.id, File.image_id).where(
                File.root_id == root_id, File.relative_path.in_(chunk), File.status != FileStatus.DELETED
            )
        ).all()
        if not rows:
            continue
        session.execute(
            update(File)
            .where(File.id.in_([r.id for r in rows]))
            .values(status=FileStatus.DELETED, error=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        touched.update(r.image_id for r in rows if r.image_id is not None)
        changed += len(rows)
    _refresh_liveness(session, touched, generation)
    return changed


def _refresh_liveness(session: Session, image_ids: Iterable[int], generation: int) -> None:
    """Recompute ``images.is_live`` for these images; stamp the ones that changed with ``generation``.

    The first change of an image in a generation also keeps what it was before (``prior_is_live``,
    ``prior_liveness_generation``): that is its state at the published generation while this one is
    open, which a build or catch-up at the published generation reads (see :func:`_live_at`).
    """
    first_change = Image.liveness_generation != generation
    ids = sorted(set(image_ids))
    for chunk in _chunks(ids):
        live = set(
            session.scalars(
                select(File.image_id)
                .where(File.image_id.in_(chunk), File.status == FileStatus.INDEXED)
                .distinct()
            )
        )
        current = {
            r.id: r.is_live
            for r in session.execute(select(Image.id, Image.is_live).where(Image.id.in_(chunk)))
        }
        for value, targets in (
            (True, [i for i, was in current.items() if not was and i in live]),
            (False, [i for i, was in current.items() if was and i not in live]),
        ):
            if targets:
                session.execute(
                    update(Image)
                    .where(Image.id.in_(targets))
                    .values(
                        # SET expressions read the row as it was before this UPDATE (both backends).
                        prior_is_live=case((first_change, Image.is_live), else_=Image.prior_is_live),
                        prior_liveness_generation=case(
                            (first_change, Image.liveness_generation), else_=Image.prior_liveness_generation
                        ),
                        is_live=value,
                        liveness_generation=generation,
                        updated_at=utcnow(),
                    )
                    .execution_options(synchronize_session=False)
                )


# --- images ------------------------------------------------------------------------------------------


def get_or_create_image(session: Session, sha256: str, byte_size: int) -> int:
    """The id of the image with this content hash (lowercase hex), created on first sight."""
    return get_or_create_images(session, [(sha256, byte_size)])[sha256.lower()]


def get_or_create_images(session: Session, items: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Batch form of :func:`get_or_create_image`: sha256 -> image id."""
    by_hash = {sha.lower(): size for sha, size in items}
    if not by_hash:
        return {}
    now = utcnow()
    rows = [
        {
            "sha256": sha,
            "byte_size": size,
            "is_live": False,
            "liveness_generation": 0,
            "created_at": now,
            "updated_at": now,
        }
        for sha, size in by_hash.items()
    ]
    session.execute(_insert(session, Image).on_conflict_do_nothing(index_elements=[Image.sha256]), rows)
    found: dict[str, int] = {}
    for chunk in _chunks(list(by_hash)):
        found.update(
            (r.sha256, r.id)
            for r in session.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(chunk)))
        )
    return found


def image_hashes(session: Session, image_ids: Iterable[int]) -> dict[int, str]:
    """image id -> sha256, for the ids that exist."""
    ids = sorted({int(i) for i in image_ids})
    out: dict[int, str] = {}
    for chunk in _chunks(ids):
        out.update(
            (r.id, r.sha256)
            for r in session.execute(select(Image.id, Image.sha256).where(Image.id.in_(chunk)))
        )
    return out


def image_ids_by_hash(session: Session, hashes: Iterable[str]) -> dict[str, int]:
    """sha256 -> image id, for the hashes the catalog knows (creates nothing)."""
    keys = sorted({h.lower() for h in hashes})
    out: dict[str, int] = {}
    for chunk in _chunks(keys):
        rows = session.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(chunk)))
        out.update((r.sha256, r.id) for r in rows)
    return out


def find_image(session: Session, sha256: str) -> int | None:
    return session.execute(select(Image.id).where(Image.sha256 == sha256.lower())).scalar_one_or_none()


def set_image_metadata(
    session: Session,
    image_id: int,
    *,
    width: int | None,
    height: int | None,
    captured_at: dt.datetime | None = None,
    camera_make: str | None = None,
    camera_model: str | None = None,
) -> None:
    """Record what decoding the image told us (size after EXIF orientation, EXIF capture time, camera)."""
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(
            width=width,
            height=height,
            captured_at=captured_at,
            camera_make=camera_make,
            camera_model=camera_model,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )


def image_paths(session: Session, image_ids: Iterable[int]) -> dict[int, list[Path]]:
    """image id -> absolute paths of its live (indexed) files, sorted; ids with none are left out.

    Turns search hits into paths; a hit that maps to no path was deleted after the index caught up, and
    the caller should drop it.
    """
    ids = sorted({int(i) for i in image_ids})
    out: dict[int, list[Path]] = {}
    for chunk in _chunks(ids):
        rows = session.execute(
            select(File.image_id, LibraryRoot.path, File.relative_path)
            .join(LibraryRoot, LibraryRoot.id == File.root_id)
            .where(File.image_id.in_(chunk), File.status == FileStatus.INDEXED)
            .order_by(File.image_id, LibraryRoot.path, File.relative_path)
        )
        for image_id, root, rel in rows:
            if image_id is not None:  # the query selects indexed files, which always have an image
                out.setdefault(image_id, []).append(Path(decode_path(root)) / decode_path(rel))
    return out


def image_details(session: Session, image_ids: Iterable[int]) -> dict[int, ImageInfo]:
    """image id -> metadata and live paths, for the ids that exist."""
    ids = sorted({int(i) for i in image_ids})
    paths = image_paths(session, ids)
    out: dict[int, ImageInfo] = {}
    for chunk in _chunks(ids):
        rows = session.execute(
            select(
                Image.id,
                Image.sha256,
                Image.byte_size,
                Image.width,
                Image.height,
                Image.captured_at,
                Image.camera_make,
                Image.camera_model,
            ).where(Image.id.in_(chunk))
        )
        for r in rows:
            out[r.id] = ImageInfo(*r, paths=paths.get(r.id, []))
    return out


def filter_image_ids(
    session: Session,
    *,
    root_id: int | None = None,
    path_prefix: str | None = None,
    captured_after: dt.datetime | None = None,
    captured_before: dt.datetime | None = None,
    camera: str | None = None,
) -> np.ndarray:
    """Ids (int64, sorted) of live images with a file matching every given condition.

    ``camera`` matches the EXIF make, the model, or "make model" (as ``library_facets`` lists them).

    ``path_prefix`` is matched literally and case-sensitively against the start of the path relative
    to the root ('2023/' or '2023/trip', POSIX separators), in the text form users are shown
    (``catalog.paths``: a backslash as two, a byte that is not UTF-8 as ``\\xHH``); the capture-time
    bounds are inclusive and compare with the camera's wall-clock time.
    Pass the result as ``allowed_ids`` to :meth:`catalog.vector_index.MultiVectorIndex.search`.
    """
    stmt: Select[Any] = (
        select(File.image_id)
        .join(Image, Image.id == File.image_id)
        .where(File.status == FileStatus.INDEXED)
        .distinct()
    )
    conditions: list[ColumnElement[bool]] = []
    if root_id is not None:
        conditions.append(File.root_id == root_id)
    if path_prefix:
        # substr, not LIKE: literal and case-sensitive on both backends (SQLite's LIKE ignores case).
        conditions.append(func.substr(File.relative_path, 1, len(path_prefix)) == path_prefix)
    if captured_after is not None:
        conditions.append(Image.captured_at >= captured_after)
    if captured_before is not None:
        conditions.append(Image.captured_at <= captured_before)
    if camera:
        conditions.append(_camera_matches(camera))
    if conditions:
        stmt = stmt.where(and_(*conditions))
    ids = np.fromiter(session.scalars(stmt), dtype=np.int64)
    ids.sort()
    return ids


def _camera_name() -> ColumnElement[str]:
    return func.trim(func.coalesce(Image.camera_make, "") + " " + func.coalesce(Image.camera_model, ""))


def _camera_matches(camera: str) -> ColumnElement[bool]:
    return or_(Image.camera_make == camera, Image.camera_model == camera, _camera_name() == camera)


@dataclass(frozen=True, slots=True)
class LibraryFacets:
    """What the filters can choose from: roots, folders below them, cameras, the capture-date range."""

    images: int
    roots: list[Path]
    folders: list[str]  # POSIX folder paths relative to a root ("2023", "2023/trip"), sorted
    cameras: list[tuple[str, int]]  # ("make model", live images), most used first
    captured_min: dt.datetime | None
    captured_max: dt.datetime | None


def library_facets(session: Session, *, folder_depth: int = 2, max_folders: int = 500) -> LibraryFacets:
    """Filter choices over the live (indexed) files: folders up to ``folder_depth`` levels deep."""
    live = File.status == FileStatus.INDEXED
    live_images = select(File.image_id).where(live).distinct().subquery()
    images = session.scalar(select(func.count()).select_from(live_images)) or 0
    roots = [p for _, p in sorted(list_roots(session).items())]
    folders: set[str] = set()
    # Distinct parent folders in SQL would need dialect-specific string functions; paths stream instead.
    for rel in session.scalars(select(File.relative_path).where(live).distinct()):
        parts = PurePosixPath(rel).parts[:-1]
        for depth in range(1, min(folder_depth, len(parts)) + 1):
            folders.add("/".join(parts[:depth]))
        if len(folders) >= max_folders:
            break
    name = _camera_name()
    cams = session.execute(
        select(name, func.count(Image.id))
        .where(Image.id.in_(select(live_images.c.image_id)), name != "")
        .group_by(name)
        .order_by(func.count(Image.id).desc(), name)
    ).all()
    lo, hi = session.execute(
        select(func.min(Image.captured_at), func.max(Image.captured_at)).where(
            Image.id.in_(select(live_images.c.image_id))
        )
    ).one()
    return LibraryFacets(
        images=int(images),
        roots=roots,
        folders=sorted(folders)[:max_folders],
        cameras=[(str(n), int(c)) for n, c in cams],
        captured_min=lo,
        captured_max=hi,
    )


# --- embeddings --------------------------------------------------------------------------------------


def _encode(vectors: np.ndarray) -> bytes:
    with np.errstate(over="ignore"):  # overflow becomes inf, refused below
        half = np.ascontiguousarray(vectors, dtype="<f2")
    if not np.isfinite(half).all():
        raise ValueError("embedding has non-finite values (or values beyond float16 range)")
    return half.tobytes()


def _decode(blob: bytes, num_vectors: int, dim: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f2").reshape(num_vectors, dim).astype(np.float32)


def store_embeddings(
    session: Session, image_ids: Sequence[int], model_key: str, vectors: np.ndarray, generation: int
) -> None:
    """Store (or replace) the vectors of each image under ``model_key``, as float16.

    ``vectors``: float32 (N, num_vectors, dim), row i for ``image_ids[i]``. Stamped with ``generation``
    so that vector-index catch-up picks them up once it is published.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 3 or vectors.shape[0] != len(image_ids):
        raise ValueError(
            f"expected vectors of shape ({len(image_ids)}, num_vectors, dim), got {vectors.shape}"
        )
    if len(image_ids) == 0:
        return
    _, num_vectors, dim = vectors.shape
    now = utcnow()
    rows = [
        {
            "image_id": int(image_id),
            "model_key": model_key,
            "dim": dim,
            "num_vectors": num_vectors,
            "generation": generation,
            "created_at": now,
            "vectors": _encode(vec),
        }
        for image_id, vec in zip(image_ids, vectors, strict=True)
    ]
    stmt = _insert(session, Embedding)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Embedding.image_id, Embedding.model_key],
        set_={
            name: getattr(stmt.excluded, name)
            for name in ("dim", "num_vectors", "generation", "created_at", "vectors")
        },
    )
    session.execute(stmt, rows)


def load_embeddings(session: Session, image_ids: Iterable[int], model_key: str) -> dict[int, np.ndarray]:
    """image id -> float32 (num_vectors, dim) for the ids that have an embedding under ``model_key``."""
    ids = sorted({int(i) for i in image_ids})
    out: dict[int, np.ndarray] = {}
    for chunk in _chunks(ids):
        rows = session.execute(
            select(Embedding.image_id, Embedding.num_vectors, Embedding.dim, Embedding.vectors).where(
                Embedding.model_key == model_key, Embedding.image_id.in_(chunk)
            )
        )
        for image_id, num_vectors, dim, blob in rows:
            out[image_id] = _decode(blob, num_vectors, dim)
    return out


def image_has_embedding(session: Session, image_id: int, model_key: str) -> bool:
    return not images_missing_embedding(session, [image_id], model_key)


def images_missing_embedding(session: Session, image_ids: Iterable[int], model_key: str) -> set[int]:
    """The ids among ``image_ids`` that have no embedding under ``model_key`` (what still needs the GPU)."""
    ids = sorted({int(i) for i in image_ids})
    have: set[int] = set()
    for chunk in _chunks(ids):
        have.update(
            session.scalars(
                select(Embedding.image_id).where(
                    Embedding.model_key == model_key, Embedding.image_id.in_(chunk)
                )
            )
        )
    return set(ids) - have


def count_index_members(session: Session, model_key: str, until: int | None = None) -> int:
    """How many images belong in the vector index of ``model_key`` (live, with an embedding), now or,
    with ``until``, at that generation (what a full build at ``until`` holds)."""
    members = (
        Image.is_live.is_(True) if until is None else and_(_live_at(until), Embedding.generation <= until)
    )
    return session.execute(
        select(func.count())
        .select_from(Embedding)
        .join(Image, Image.id == Embedding.image_id)
        .where(Embedding.model_key == model_key, members)
    ).scalar_one()


def embedding_shape(session: Session, model_key: str) -> tuple[int, int] | None:
    """(num_vectors, dim) of the embeddings stored under ``model_key``, or None if there are none."""
    row = session.execute(
        select(Embedding.num_vectors, Embedding.dim).where(Embedding.model_key == model_key).limit(1)
    ).one_or_none()
    return None if row is None else (int(row.num_vectors), int(row.dim))


def embeddings_changed_since(
    session: Session,
    model_key: str,
    since: int,
    until: int | None = None,
    *,
    batch_size: int = 1024,
    sample_every: int = 1,
) -> Iterator[IndexChanges]:
    """What a vector index stamped with generation ``since`` must apply to reflect ``until``.

    ``until`` defaults to the published generation. Otherwise this is every image whose embedding was
    written, or whose liveness changed, in generations (since, until], with its state at ``until``:
    live ones come back as upserts with their vectors, the others as removals. With ``since <= 0`` it
    is a full build: every image live at ``until`` with an embedding written by then.

    Liveness at ``until`` is exact for ``until`` >= the published generation: a change made in the
    still-open generation is read back from the ``prior_*`` columns (:func:`_live_at`). An embedding
    replaced after ``until`` cannot be read as it was (the indexer never replaces one). Batches are
    ordered by image id; ``sample_every`` > 1 keeps every n-th image of a full build (a training
    sample for IVF).
    """
    if until is None:
        until = published_generation(session)
    if since <= 0:
        yield from _full_build(session, model_key, until, batch_size, sample_every)
        return
    changed: set[int] = set(
        session.scalars(
            select(Embedding.image_id).where(
                Embedding.model_key == model_key, Embedding.generation > since, Embedding.generation <= until
            )
        )
    )
    # Images that entered or left the live set; only those with an embedding of this model matter.
    changed.update(
        session.scalars(
            select(Image.id)
            .join(Embedding, and_(Embedding.image_id == Image.id, Embedding.model_key == model_key))
            .where(_liveness_changed_in(since, until))
        )
    )
    ids = sorted(changed)
    for chunk in _chunks(ids, batch_size):
        yield _changes_of(session, model_key, chunk, until)


def _live_at(until: int) -> ColumnElement[bool]:
    """Whether an image was live at generation ``until`` (>= every generation but the open one).

    An image whose liveness last changed after ``until`` changed in the open generation (only one is
    open at a time), so its state at ``until`` is the one it had before that change.
    """
    return or_(
        and_(Image.liveness_generation <= until, Image.is_live.is_(True)),
        and_(Image.liveness_generation > until, Image.prior_is_live.is_(True)),
    )


def _liveness_changed_in(since: int, until: int) -> ColumnElement[bool]:
    """The image's liveness, as of ``until``, last changed in (since, until]."""
    return or_(
        and_(Image.liveness_generation > since, Image.liveness_generation <= until),
        and_(
            Image.liveness_generation > until,
            Image.prior_liveness_generation > since,
            Image.prior_liveness_generation <= until,
        ),
    )


def live_images_changed_after(session: Session, model_key: str, generation: int) -> dict[int, str]:
    """image id -> sha256 of the live images with an embedding of ``model_key`` whose embedding was
    written, or whose liveness changed, after ``generation`` (all live embedded images for 0)."""
    rows = session.execute(
        select(Image.id, Image.sha256)
        .join(Embedding, and_(Embedding.image_id == Image.id, Embedding.model_key == model_key))
        .where(
            Image.is_live.is_(True),
            or_(Embedding.generation > generation, Image.liveness_generation > generation),
        )
        .order_by(Image.id)
    )
    return {r.id: r.sha256 for r in rows}


def _full_build(
    session: Session, model_key: str, until: int, batch_size: int, sample_every: int
) -> Iterator[IndexChanges]:
    ids = np.fromiter(
        session.scalars(
            select(Image.id)
            .join(Embedding, and_(Embedding.image_id == Image.id, Embedding.model_key == model_key))
            .where(_live_at(until), Embedding.generation <= until)
            .order_by(Image.id)
        ),
        dtype=np.int64,
    )[:: max(1, sample_every)]
    for chunk in _chunks(ids.tolist(), batch_size):
        yield _changes_of(session, model_key, chunk, until)


def _changes_of(session: Session, model_key: str, image_ids: Sequence[int], until: int) -> IndexChanges:
    """The index changes for these images: their vectors when live at ``until``, their removal otherwise."""
    live_at = case((_live_at(until), True), else_=False).label("is_live")
    rows = session.execute(
        select(Image.id, live_at, Embedding.num_vectors, Embedding.dim, Embedding.vectors)
        .join(Embedding, and_(Embedding.image_id == Image.id, Embedding.model_key == model_key))
        .where(Image.id.in_(image_ids))
        .order_by(Image.id)
    ).all()
    return _changes(rows)


def _changes(rows: Sequence[Any]) -> IndexChanges:
    live = [r for r in rows if r.is_live]
    dead = [r.id for r in rows if not r.is_live]
    if live:
        vectors = np.stack([_decode(r.vectors, r.num_vectors, r.dim) for r in live])
    else:
        vectors = np.zeros((0, 0, 0), dtype=np.float32)
    return IndexChanges(
        upsert_ids=np.array([r.id for r in live], dtype=np.int64),
        upsert_vectors=vectors,
        removed_ids=np.array(dead, dtype=np.int64),
    )


# --- captions ----------------------------------------------------------------------------------------


def store_caption(session: Session, image_id: int, model_key: str, text: str, prompt: str = "") -> None:
    """Store (or replace) the caption of an image for (model, prompt); prompt '' is the plain caption."""
    stmt = _insert(session, Caption).values(
        image_id=image_id, model_key=model_key, prompt=prompt, text=text, created_at=utcnow()
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[Caption.image_id, Caption.model_key, Caption.prompt],
        set_={"text": stmt.excluded.text, "created_at": stmt.excluded.created_at},
    )
    session.execute(stmt)


def get_caption(session: Session, image_id: int, model_key: str, prompt: str = "") -> str | None:
    return get_captions(session, [image_id], model_key, prompt).get(image_id)


def get_captions(
    session: Session, image_ids: Iterable[int], model_key: str, prompt: str = ""
) -> dict[int, str]:
    """image id -> cached caption, for the ids that have one."""
    ids = sorted({int(i) for i in image_ids})
    out: dict[int, str] = {}
    for chunk in _chunks(ids):
        rows = session.execute(
            select(Caption.image_id, Caption.text).where(
                Caption.model_key == model_key, Caption.prompt == prompt, Caption.image_id.in_(chunk)
            )
        )
        out.update((r.image_id, r.text) for r in rows)
    return out


# --- generations -------------------------------------------------------------------------------------


def _state_row(session: Session, *, for_update: bool = False) -> Any:
    stmt = select(
        IndexState.catalog_uid,
        IndexState.open_generation,
        IndexState.published_generation,
        IndexState.published_at,
    ).where(IndexState.id == _STATE_ID)
    if for_update:
        stmt = stmt.with_for_update()
    row = session.execute(stmt).one_or_none()
    if row is None:
        # First use of this catalog; a concurrent first use inserts the same row, hence DO NOTHING.
        session.execute(
            _insert(session, IndexState)
            .values(id=_STATE_ID, catalog_uid=uuid.uuid4().hex, open_generation=0, published_generation=0)
            .on_conflict_do_nothing()
        )
        row = session.execute(stmt).one()
    return row


def generation_state(session: Session) -> GenerationState:
    row = _state_row(session)
    return GenerationState(row.catalog_uid, row.open_generation, row.published_generation, row.published_at)


def published_generation(session: Session) -> int:
    """The newest generation whose writes are all committed; what a vector index may catch up to."""
    return int(_state_row(session).published_generation)


def open_generation(session: Session) -> int:
    """The generation the caller's writes belong to; commit before other sessions rely on it.

    If the previous writer stopped before publishing (a crash), its generation is still open and is
    returned again, so a resumed run continues it. Otherwise a new one (published + 1) is opened.
    """
    row = _state_row(session, for_update=True)
    if row.open_generation > row.published_generation:
        return int(row.open_generation)
    generation = int(row.published_generation) + 1
    session.execute(update(IndexState).where(IndexState.id == _STATE_ID).values(open_generation=generation))
    return generation


def publish_generation(session: Session, generation: int) -> None:
    """Declare every write of ``generation`` (and before) committed; call after committing them.

    After this the writer must not write with ``generation`` again: it calls :func:`open_generation`
    for the next batch of work.
    """
    row = _state_row(session, for_update=True)
    if generation > max(row.open_generation, row.published_generation):
        raise ValueError(f"generation {generation} was never opened (open: {row.open_generation})")
    if generation <= row.published_generation:
        return
    session.execute(
        update(IndexState)
        .where(IndexState.id == _STATE_ID)
        .values(published_generation=generation, published_at=utcnow())
    )


# --- overview ----------------------------------------------------------------------------------------


def catalog_counts(session: Session) -> dict[str, int]:
    """Counts for health pages and logs: files per status, images, live images, embeddings per model."""
    counts: dict[str, int] = {f"files_{s.value}": 0 for s in FileStatus}
    for status, n in session.execute(select(File.status, func.count()).group_by(File.status)):
        counts[f"files_{FileStatus(status).value}"] = n
    counts["images"] = session.execute(select(func.count()).select_from(Image)).scalar_one()
    counts["images_live"] = session.execute(
        select(func.count()).select_from(Image).where(Image.is_live.is_(True))
    ).scalar_one()
    for model_key, n in session.execute(
        select(Embedding.model_key, func.count()).group_by(Embedding.model_key)
    ):
        counts[f"embeddings[{model_key}]"] = n
    return counts

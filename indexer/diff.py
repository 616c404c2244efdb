"""The plan of a run: what changed on disk since the catalog last looked, and what needs the model.

Pure logic over plain data: the caller supplies the scanned files, the catalog's view of the same
roots and a hash function, so every case (new, changed, moved, duplicated, deleted, resumed after a
crash) is testable without a database or a model.

Path categories (what the summary counts) and content work (what the model does) are separate: a
moved file is a new path with no model work; a file whose image lacks a caption is unchanged but
has caption work.

A file that failed before and has not changed (same size and mtime, and the same outcome where the
scan looks again: empty, unreadable, not an image) is a *known failure*: reported again, not
retried, not rewritten, so a quiet library with a few bad files stays quiet.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from catalog.paths import encode_path
from indexer.scan import ScannedFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogFile:
    """What the catalog holds about one path (status is the catalog's FileStatus value)."""

    rel: str
    size: int
    mtime_ns: int
    sha256: str | None
    status: str  # "pending" | "indexed" | "failed" | "deleted"
    error: str | None = None  # "<reason>: <message>" of a failed file


# Failures the scan finds again on every run by reading the file's first bytes; any other failure is
# the decoder's verdict on content that is still the same.
SCAN_FAILURES = frozenset({"empty", "unreadable", "not_an_image"})


@dataclass
class WorkItem:
    """One distinct content that needs model work, and every path (this run) that holds it."""

    sha256: str
    files: list[ScannedFile]
    embed: bool = True
    caption: bool = False

    @property
    def path(self) -> Path:
        return self.files[0].path


@dataclass
class Failure:
    file: ScannedFile
    reason: str
    message: str
    sha256: str | None = None
    known: bool = False  # failed the same way before, file unchanged: nothing is written


@dataclass
class Plan:
    """Everything a run will do, decided before the first decode."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    # Paths with content already embedded: their file rows become indexed without model work.
    link: list[tuple[ScannedFile, str]] = field(default_factory=list)
    # Paths whose stat changed but content did not (or that were never hashed): refresh the row.
    touch: list[tuple[ScannedFile, str]] = field(default_factory=list)
    work: list[WorkItem] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    known_failed: list[Failure] = field(default_factory=list)  # reported only
    deleted: list[tuple[Path, str]] = field(default_factory=list)  # (root, rel)
    deleted_count: int = 0  # gone paths whose content did not reappear elsewhere

    @property
    def is_empty(self) -> bool:
        """Nothing to write: every file is known and unchanged (indexed, or a known failure)."""
        return not (self.link or self.touch or self.work or self.failed or self.deleted)

    @property
    def images_to_embed(self) -> int:
        return sum(1 for w in self.work if w.embed)

    @property
    def files_to_process(self) -> int:
        return sum(len(w.files) for w in self.work)


def _known_failure(f: ScannedFile, old: CatalogFile | None) -> Failure | None:
    """The stored failure of ``f`` when it is unchanged and would fail the same way again, else None."""
    if old is None or old.status != "failed" or (f.size, f.mtime_ns) != (old.size, old.mtime_ns):
        return None
    reason, _, message = (old.error or "unknown: ").partition(": ")
    if f.error is not None:
        same = f.error == reason
    elif f.not_an_image:
        same = reason == "not_an_image"
    else:  # an image by its first bytes: the decoder would see the same bytes again
        same = reason not in SCAN_FAILURES
    return Failure(f, reason, message, old.sha256, known=True) if same else None


def _needs_hash(f: ScannedFile, old: CatalogFile | None) -> bool:
    # Size and mtime equal: trust them (the catalog stores mtime in nanoseconds). A never-hashed row
    # (a crash before its hash was stored) or a failed one is hashed again.
    return old is None or old.sha256 is None or (f.size, f.mtime_ns) != (old.size, old.mtime_ns)


def hash_files(
    files: Iterable[ScannedFile], hasher: Callable[[Path], str], threads: int = 4
) -> dict[str, str | BaseException]:
    """sha256 of each file by path string; hashlib and file reads release the GIL, so threads scale."""
    files = list(files)
    out: dict[str, str | BaseException] = {}
    if not files:
        return out

    def one(f: ScannedFile) -> tuple[str, str | BaseException]:
        try:
            return str(f.path), hasher(f.path)
        except OSError as exc:
            return str(f.path), exc

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for key, value in pool.map(one, files):
            out[key] = value
    return out


def make_plan(
    scanned: Mapping[Path, list[ScannedFile]],
    catalog: Mapping[Path, Mapping[str, CatalogFile]],
    *,
    embedded: Callable[[set[str]], set[str]],
    captioned: Callable[[set[str]], set[str]] | None = None,
    hasher: Callable[[Path], str],
    hash_threads: int = 4,
    retry_failed: bool = False,
) -> Plan:
    """Compare the files on disk with the catalog, root by root.

    Args:
        scanned: files found under each root (``scan.scan_root``).
        catalog: the catalog's files of each root that the scan covered, by relative path (deleted
            rows included); a covered row whose path was not scanned is deleted.
        embedded: given hashes, those whose image already has an embedding for the current model.
        captioned: given hashes, those already captioned; ``None`` when captions are not wanted.
        hasher: sha256 of a file's content.
        retry_failed: process known failures again (after installing a decoder, raising a limit).
    """
    plan = Plan()
    known_failures: dict[tuple[Path, str], Failure] = {}
    if not retry_failed:
        for root, files in scanned.items():
            old_files = catalog.get(root, {})
            for f in files:
                if (known := _known_failure(f, old_files.get(f.rel))) is not None:
                    known_failures[root, f.rel] = known
    plan.known_failed = list(known_failures.values())
    to_hash: list[ScannedFile] = []
    for root, files in scanned.items():
        old_files = catalog.get(root, {})
        for f in files:
            if (root, f.rel) in known_failures:
                continue
            if f.error is None and not f.not_an_image and _needs_hash(f, old_files.get(f.rel)):
                to_hash.append(f)
    hashes = hash_files(to_hash, hasher, hash_threads)

    # Content of every path that disappeared: a new path with one of these hashes is a move.
    gone_hashes: set[str] = set()
    present = {root: {f.rel for f in files} for root, files in scanned.items()}
    for root in scanned:
        for rel, row in catalog.get(root, {}).items():
            if rel not in present[root] and row.status != "deleted":
                plan.deleted.append((root, rel))
                if row.sha256:
                    gone_hashes.add(row.sha256)

    # Decide each path's content hash (or failure) first, then ask the catalog about all hashes at once.
    resolved: list[tuple[ScannedFile, CatalogFile | None, str]] = []
    for root, files in scanned.items():
        old_files = catalog.get(root, {})
        for f in files:
            if (root, f.rel) in known_failures:
                continue
            old: CatalogFile | None = old_files.get(f.rel)
            where = encode_path(f.path)
            if f.error is not None:
                plan.failed.append(Failure(f, f.error, f"{where}: {f.error}"))
                continue
            if f.not_an_image:
                plan.failed.append(
                    Failure(f, "not_an_image", f"{where}: content is not a known image format")
                )
                continue
            if _needs_hash(f, old):
                h = hashes.get(str(f.path))
                if isinstance(h, BaseException) or h is None:
                    plan.failed.append(Failure(f, "unreadable", f"{where}: {h}"))
                    continue
                sha = h
            else:
                # _needs_hash is False only for a catalog row with a hash.
                assert old is not None and old.sha256 is not None
                sha = old.sha256
            resolved.append((f, old, sha))

    all_hashes = {sha for _, _, sha in resolved}
    have_embedding = embedded(all_hashes) if all_hashes else set()
    have_caption = captioned(all_hashes) if (captioned is not None and all_hashes) else None

    work: dict[str, WorkItem] = {}
    for f, old, sha in resolved:
        if old is None or old.status == "deleted":
            if sha in gone_hashes:
                plan.moved += 1
            else:
                plan.new += 1
        elif old.sha256 is not None and old.sha256 != sha:
            plan.changed += 1
        elif old.status == "pending":
            plan.new += 1  # found before, never finished (e.g. the last run was killed)
        else:
            plan.unchanged += 1

        needs_embed = sha not in have_embedding
        needs_caption = have_caption is not None and sha not in have_caption
        # A failed path that is not a known failure (changed, readable again, or --retry-failed) lands
        # here: its content has no embedding.
        if needs_embed or needs_caption:
            item = work.get(sha)
            if item is None:
                item = work[sha] = WorkItem(sha, [], embed=needs_embed, caption=needs_caption)
            item.files.append(f)
        elif old is None or old.status != "indexed" or old.sha256 != sha:
            plan.link.append((f, sha))
        elif (f.size, f.mtime_ns) != (old.size, old.mtime_ns):
            plan.touch.append((f, sha))
    plan.work = list(work.values())
    # A path whose content reappeared at a new path was moved, not deleted (its row is still marked
    # deleted, but the summary should not count it twice).
    moved_hashes = {sha for f, old, sha in resolved if (old is None or old.status == "deleted")} & gone_hashes
    plan.deleted_count = sum(1 for root, rel in plan.deleted if catalog[root][rel].sha256 not in moved_hashes)
    return plan

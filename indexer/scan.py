"""Walking photo folders: which files are images (by content), and their size and mtime.

The scan does no hashing and no decoding, so it costs one ``stat`` and (for files the catalog does not
already know with the same size and mtime) one 32-byte read per file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from catalog.paths import ObjectURI, encode_path

log = logging.getLogger(__name__)

# Folders that photo managers, NAS boxes and operating systems fill with their own files (thumbnails,
# trash, metadata). Indexing them would add thousands of near-duplicates or system junk.
SYSTEM_DIRS = frozenset(
    {
        "@eadir",  # Synology thumbnails
        "#recycle",
        "$recycle.bin",
        "system volume information",
        "lost+found",
        "__macosx",
        "node_modules",
        "thumbs",
    }
)

# Extensions that announce an image. Formats are recognised by content; the extension only decides
# whether a file whose content is *not* an image is worth reporting (a broken "IMG_1.jpg" is a failure
# the user wants to see; a "notes.txt" beside the photos is not).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".heic", ".heif", ".hif", ".avif",
        ".tif", ".tiff", ".bmp", ".dib", ".gif",
    }
)  # fmt: skip

HEAD_BYTES = 32


@dataclass(frozen=True)
class ScannedFile:
    """One regular file found under a root.

    ``rel`` is the POSIX path relative to the root (the catalog key together with the root), ``path``
    the absolute path to open. ``format`` is the sniffed format (``None`` when not sniffed yet or not
    an image); ``error`` a reason slug when the file could not even be read for sniffing.
    """

    root: Path
    rel: str
    path: Path
    size: int
    mtime_ns: int
    format: str | None = None
    error: str | None = None
    sniffed: bool = False

    @property
    def not_an_image(self) -> bool:
        return self.sniffed and self.error is None and self.format is None


def is_skipped_dir(name: str, include_hidden: bool = False) -> bool:
    """Hidden (dot) folders and well-known system folders are skipped unless asked for."""
    if include_hidden:
        return False
    return name.startswith(".") or name.lower() in SYSTEM_DIRS


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ScanProblem:
    """Something under a root the scan could not look into. Reported in the run's summary, never fatal.

    ``reason``: ``dangling_symlink`` (a link whose target is gone, or a link loop), ``unreadable_folder``
    (a folder that exists but cannot be listed: permissions, a path too long, an I/O error) or
    ``unreadable`` (an entry that cannot even be stat'ed).
    """

    root: Path
    rel: str
    reason: str
    message: str

    @property
    def keeps_rows(self) -> bool:
        """Whether catalog rows at or under ``rel`` stay as they are: what an unreadable folder holds may
        well still be there, so it is not "deleted"; a dangling link's target is gone."""
        return self.reason != "dangling_symlink"


def _folder_problem(root: Path, rel: str, folder: Path, exc: OSError) -> ScanProblem | None:
    if isinstance(exc, FileNotFoundError):
        log.debug("folder %s vanished during the scan", folder)  # gone, so its files are gone too
        return None
    log.warning("cannot read folder %s: %s", folder, exc)
    return ScanProblem(
        root, rel, "unreadable_folder", f"{encode_path(folder)}: cannot read folder: {exc.strerror or exc}"
    )


def _entry_problem(root: Path, rel: str, entry: os.DirEntry[str], exc: OSError) -> ScanProblem | None:
    link = entry.is_symlink()
    if link and exc.errno in (errno.ENOENT, errno.ELOOP):
        try:
            target = encode_path(os.readlink(entry.path))
        except OSError:
            target = "?"
        log.info("dangling symlink %s -> %s", entry.path, target)
        message = f"{encode_path(entry.path)}: symlink to {target}, which does not exist"
        return ScanProblem(root, rel, "dangling_symlink", message)
    if exc.errno == errno.ENOENT:
        log.debug("%s vanished during the scan", entry.path)
        return None
    log.warning("cannot stat %s: %s", entry.path, exc)
    message = f"{encode_path(entry.path)}: cannot stat: {exc.strerror or exc}"
    return ScanProblem(root, rel, "unreadable", message)


def walk_files(
    root: Path,
    *,
    include_hidden: bool = False,
    folders: Sequence[str] = ("",),
    excluded: Collection[str] = (),
    problems: list[ScanProblem] | None = None,
) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Yield ``(rel, path, stat)`` of every regular file under ``root``, following symlinks.

    ``folders``: the folders to walk, relative to the root ("" is all of it); ``excluded``: relative
    folders not to enter (nested library roots). Each directory is entered once, identified by
    (device, inode), so symlink cycles and two links to the same folder cannot loop or double-count.
    Files reached through a symlinked folder are reported under the link's path (that is where the
    user put them). Dangling symlinks and folders that cannot be read are appended to ``problems``
    and skipped. Order is sorted per folder so runs are reproducible.
    """
    root = root.resolve()
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, str]] = [(root / f, f"{f}/" if f else "") for f in sorted(folders, reverse=True)]

    def report(problem: ScanProblem | None) -> None:
        if problem is not None and problems is not None:
            problems.append(problem)

    while stack:
        folder, prefix = stack.pop()
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                log.debug("already visited %s (symlink loop or second link)", folder)
                continue
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            report(_folder_problem(root, prefix.rstrip("/"), folder, exc))
            continue
        subdirs = []
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            hidden = not include_hidden and entry.name.startswith(".")
            try:
                est = entry.stat(follow_symlinks=True)
            except OSError as exc:
                if not hidden:
                    report(_entry_problem(root, rel, entry, exc))
                continue
            if stat_mod.S_ISDIR(est.st_mode):
                if not is_skipped_dir(entry.name, include_hidden) and rel not in excluded:
                    subdirs.append((Path(entry.path), rel + "/"))
            elif stat_mod.S_ISREG(est.st_mode):
                if hidden:
                    continue  # ._AppleDouble, .DS_Store and friends
                yield rel, Path(entry.path), est
        # Reversed so the stack pops them in sorted order.
        stack.extend(reversed(subdirs))


def sniff_file(path: Path, sniff: Callable[[bytes], str | None]) -> tuple[str | None, str | None]:
    """``(format, error)`` of a file from its first bytes; ``error`` is a reason slug."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except PermissionError:
        return None, "unreadable"
    except OSError:
        return None, "unreadable"
    if not head:
        return None, "empty"
    return sniff(head), None


def scan_root(
    root: Path | ObjectURI,
    *,
    include_hidden: bool = False,
    known: Callable[[str, int, int], bool] | None = None,
    sniff: Callable[[bytes], str | None],
    folders: Sequence[str] = ("",),
    excluded: Collection[str] = (),
    problems: list[ScanProblem] | None = None,
) -> Iterator[ScannedFile]:
    """Yield the candidate image files under ``root`` (under ``folders`` of it, skipping ``excluded``).

    ``known(rel, size, mtime_ns)`` says that the catalog already holds this file, not failed, with this
    size and mtime; such files are yielded without sniffing (their content was recognised before).
    Other files are sniffed: images by content are yielded whatever their extension; non-images,
    empty and unreadable files are yielded (with ``error`` or ``format=None``) only when their
    extension announces an image, so they are reported as failed. What could not be looked into is
    appended to ``problems`` (see :func:`walk_files`).
    """
    if isinstance(root, ObjectURI):
        yield from _scan_store(root, known=known, sniff=sniff, folders=folders, excluded=excluded)
        return
    root = root.resolve()
    for rel, path, st in walk_files(
        root, include_hidden=include_hidden, folders=folders, excluded=excluded, problems=problems
    ):
        size, mtime_ns = st.st_size, st.st_mtime_ns
        if known is not None and known(rel, size, mtime_ns):
            yield ScannedFile(root, rel, path, size, mtime_ns)
            continue
        fmt, error = sniff_file(path, sniff)
        if fmt is None and not has_image_extension(path.name):
            continue
        yield ScannedFile(root, rel, path, size, mtime_ns, format=fmt, error=error, sniffed=True)


def _scan_store(
    root: ObjectURI,
    *,
    known: Callable[[str, int, int], bool] | None,
    sniff: Callable[[bytes], str | None],
    folders: Sequence[str],
    excluded: Collection[str],
) -> Iterator[ScannedFile]:
    """``scan_root`` over an object-store prefix: the same rules, objects listed instead of walked."""
    from indexer import object_store

    as_path = cast(Path, root)  # the plan keys files by root; only pyarrow opens these
    for rel, uri, size, mtime_ns in object_store.list_objects(root, folders, excluded):
        path = cast(Path, uri)  # opened only through pyarrow (object_store, the Ray decode tasks)
        if known is not None and known(rel, size, mtime_ns):
            yield ScannedFile(as_path, rel, path, size, mtime_ns)
            continue
        fmt: str | None
        error: str | None = None
        if size == 0:
            fmt, error = None, "empty"
        else:
            try:
                fmt = sniff(object_store.read_head(uri, HEAD_BYTES))
            except OSError:
                fmt, error = None, "unreadable"
        if fmt is None and not has_image_extension(uri.name):
            continue
        yield ScannedFile(as_path, rel, path, size, mtime_ns, format=fmt, error=error, sniffed=True)

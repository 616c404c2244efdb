"""Walking photo folders: which files are images (by content), and their size and mtime.

The scan does no hashing and no decoding, so it costs one ``stat`` and (for files the catalog does not
already know with the same size and mtime) one 32-byte read per file.
"""

from __future__ import annotations

import logging
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


def walk_files(root: Path, *, include_hidden: bool = False) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Yield ``(rel, path, stat)`` of every regular file under ``root``, following symlinks.

    Each directory is entered once, identified by (device, inode), so symlink cycles and two links to
    the same folder cannot loop or double-count. Files reached through a symlinked folder are reported
    under the link's path (that is where the user put them). Unreadable folders are logged and skipped.
    Order is sorted per folder so runs are reproducible.
    """
    root = root.resolve()
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, str]] = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            st = folder.stat()
        except OSError as exc:
            log.warning("cannot stat folder %s: %s", folder, exc)
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            log.debug("already visited %s (symlink loop or second link)", folder)
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list folder %s: %s", folder, exc)
            continue
        subdirs = []
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            try:
                est = entry.stat(follow_symlinks=True)
            except OSError:
                # A dangling symlink or a file gone since listing: nothing to index.
                log.debug("cannot stat %s", entry.path)
                continue
            if stat_mod.S_ISDIR(est.st_mode):
                if not is_skipped_dir(entry.name, include_hidden):
                    subdirs.append((Path(entry.path), rel + "/"))
            elif stat_mod.S_ISREG(est.st_mode):
                if not include_hidden and entry.name.startswith("."):
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
    root: Path,
    *,
    include_hidden: bool = False,
    known: Callable[[str, int, int], bool] | None = None,
    sniff: Callable[[bytes], str | None],
) -> Iterator[ScannedFile]:
    """Yield the candidate image files under ``root``.

    ``known(rel, size, mtime_ns)`` says that the catalog already holds this file, not failed, with this
    size and mtime; such files are yielded without sniffing (their content was recognised before).
    Other files are sniffed: images by content are yielded whatever their extension; non-images,
    empty and unreadable files are yielded (with ``error`` or ``format=None``) only when their
    extension announces an image, so they are reported as failed.
    """
    root = root.resolve()
    for rel, path, st in walk_files(root, include_hidden=include_hidden):
        size, mtime_ns = st.st_size, st.st_mtime_ns
        if known is not None and known(rel, size, mtime_ns):
            yield ScannedFile(root, rel, path, size, mtime_ns)
            continue
        fmt, error = sniff_file(path, sniff)
        if fmt is None and not has_image_extension(path.name):
            continue
        yield ScannedFile(root, rel, path, size, mtime_ns, format=fmt, error=error, sniffed=True)

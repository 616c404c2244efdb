"""File paths as catalog text: lossless for every name Linux allows, valid UTF-8 for SQLite and Postgres.

A Linux file name is bytes; Python hands it over as ``str`` with each byte that is not UTF-8 as a lone
surrogate (``os.fsdecode``), which neither database accepts. The catalog stores the *text form*:

- ordinary characters as they are;
- each byte that is not part of valid UTF-8 as ``\\xHH`` (lowercase hex: ``caf\\xe9.jpg``);
- a literal backslash as ``\\\\``, so a real name spelled ``caf\\xe9.jpg`` cannot collide with the
  Latin-1 ``café.jpg``.

The form is injective and reversible (``decode_path(encode_path(p)) == p`` and the bytes on disk come
back with ``os.fsencode``), and it is what users see of a path in summaries, messages and the API.
The catalog repository encodes on every write and decodes on every read; nothing else stores paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

_BACKSLASH = b"\\"
_HEX = frozenset("0123456789abcdefABCDEF")


def encode_path(path: str | os.PathLike[str]) -> str:
    """The text form of a path (or of one relative path or name) as the OS gave it."""
    raw = os.fsencode(path)
    # A backslash byte (0x5C) is never part of a multi-byte UTF-8 sequence, so splitting on it first
    # leaves every other byte where backslashreplace sees it.
    return "\\\\".join(part.decode("utf-8", "backslashreplace") for part in raw.split(_BACKSLASH))


def decode_path(text: str) -> str:
    """The OS path (``str``, undecodable bytes as surrogates) of a text form made by :func:`encode_path`.

    Raises ``ValueError`` on a backslash that starts no escape (not a text form).
    """
    if "\\" not in text:
        return os.fsdecode(text.encode("utf-8"))
    out = bytearray()
    pos = 0
    while (at := text.find("\\", pos)) >= 0:
        out += text[pos:at].encode("utf-8")
        nxt = text[at + 1 : at + 2]
        if nxt == "\\":
            out += _BACKSLASH
            pos = at + 2
        elif nxt == "x" and len(hexa := text[at + 2 : at + 4]) == 2 and set(hexa) <= _HEX:
            out.append(int(hexa, 16))
            pos = at + 4
        else:
            raise ValueError(f"not a catalog path (stray backslash at {at}): {text!r}")
    out += text[pos:].encode("utf-8")
    return os.fsdecode(bytes(out))


def safe_text(message: str) -> str:
    """A message (which may quote OS paths) that both databases and any terminal accept: undecodable
    bytes become ``\\xHH`` and NUL becomes ``\\x00``; everything else is kept."""
    try:
        raw = message.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file name made
        raw = message.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\x00", "\\x00")


# --- object-store roots --------------------------------------------------------------------------
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:$")


class ObjectURI(PurePosixPath):
    """An object-store folder or object (``s3://bucket/prefix/a.jpg``) as a path: it joins, compares
    and relativises like a POSIX path (its parts are ``("s3:", "bucket", "prefix", ...)``), and its
    text form (``str``, ``os.fspath``, the catalog's root path) is the URI again. Read through
    pyarrow's filesystems; there is nothing to resolve."""

    def __str__(self) -> str:
        parts = self.parts
        if parts and _SCHEME.match(parts[0]):
            return f"{parts[0]}//{'/'.join(parts[1:])}"
        return super().__str__()

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ObjectURI({str(self)!r})"


def is_uri(path: str | os.PathLike[str]) -> bool:
    """``scheme://...`` text, or a ``Path`` made from it (which folds ``//`` into ``/``)."""
    if isinstance(path, ObjectURI):
        return True
    text = os.fspath(path)
    head = text.split("/", 1)[0]
    return bool(_SCHEME.match(head)) and len(head) > 2  # not a one-letter drive-like name


def as_uri(path: str | os.PathLike[str]) -> ObjectURI:
    text = os.fspath(path)
    scheme, _, rest = text.partition(":")
    return ObjectURI(f"{scheme}:", *[p for p in rest.split("/") if p])


def root_path(text: str) -> Path | ObjectURI:
    """A library root as the catalog stores it (its text form, decoded): a local path or a URI."""
    return as_uri(text) if is_uri(text) else Path(text)

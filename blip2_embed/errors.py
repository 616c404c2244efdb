"""Typed errors of ``blip2_embed``.

Image errors carry a short machine-readable ``reason`` slug, so the indexer can store *why* a file was
skipped without parsing messages, plus a message a person can read (naming the file when it is known).
Every error here survives a pickle round trip, because indexer worker processes raise them and
``multiprocessing`` ships them back to the parent.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigurationError",
    "CorruptImageError",
    "DecompressionBombError",
    "EmptyImageError",
    "ImageError",
    "ModelNotFoundError",
    "NotAnImageError",
    "TruncatedImageError",
    "UnreadableImageError",
    "UnsupportedImageError",
]


class ImageError(ValueError):
    """A file or buffer that cannot be turned into an image.

    Attributes:
        reason: slug naming the kind of failure (the subclass's ``default_reason``).
        path: the file, when the image came from one (else ``None``).
        detail: what went wrong, without the file name.
    """

    default_reason: ClassVar[str] = "invalid"
    summary: ClassVar[str] = "cannot be read as an image"

    def __init__(self, detail: str = "", path: str | None = None, reason: str | None = None) -> None:
        self.detail = detail
        self.path = None if path is None else str(path)
        self.reason = reason or self.default_reason
        super().__init__(self._message())

    def _message(self) -> str:
        what = f"{self.path!r}" if self.path else "image data"
        text = f"{what} {self.summary}"
        return f"{text}: {self.detail}" if self.detail else text

    def __reduce__(self) -> tuple[type, tuple[str, str | None, str]]:
        # The default exception pickling calls cls(*self.args), i.e. with the formatted message as
        # `detail`, which would lose `path`/`reason` and double the file name; rebuild from the parts.
        return (type(self), (self.detail, self.path, self.reason))


class EmptyImageError(ImageError):
    """The file or buffer holds zero bytes."""

    default_reason, summary = "empty", "is empty (0 bytes)"


class TruncatedImageError(ImageError):
    """The image header parses but the data ends early (an interrupted copy or download)."""

    default_reason, summary = "truncated", "is truncated"


class NotAnImageError(ImageError):
    """The content is not in any image format we (or Pillow) recognise."""

    default_reason, summary = "not_an_image", "is not an image"


class DecompressionBombError(ImageError):
    """The header declares more pixels than allowed; refused before decoding."""

    default_reason, summary = "decompression_bomb", "is too large to decode"


class UnreadableImageError(ImageError):
    """The file could not be read at all: missing, a directory, no permission, an I/O error."""

    default_reason, summary = "unreadable", "cannot be read"


class UnsupportedImageError(ImageError):
    """A recognised container that this installation cannot decode (missing codec, unsupported variant)."""

    default_reason, summary = "unsupported", "is in an unsupported format"


class CorruptImageError(ImageError):
    """A recognised format whose data is damaged in a way other than simply ending early."""

    default_reason, summary = "corrupt", "is corrupt"


class ModelNotFoundError(RuntimeError):
    """A model checkpoint that is neither a usable local folder nor obtainable from the hub.

    Attributes:
        model: the name or path that was asked for.
    """

    def __init__(self, model: str, message: str | None = None) -> None:
        self.model = str(model)
        self.message = message or (
            f"Model {self.model!r} was not found: it is not a folder with a checkpoint and not in the "
            f"Hugging Face cache. Download it where the hub is reachable (`hf download {self.model}`), "
            "then copy the folder or the cache here and point the setting at it."
        )
        super().__init__(self.message)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.model, self.message))


class ConfigurationError(ValueError):
    """A device, dtype or similar choice this machine cannot honour; the message says what to change."""

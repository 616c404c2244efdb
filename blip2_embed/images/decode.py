"""Bytes -> an upright RGB ``PIL.Image`` and what the catalog keeps about it (EXIF capture time, camera,
size as displayed): typed errors, the pixel limit, EXIF orientation, any mode to RGB, optional JPEG
DCT-scaled decoding."""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, TypeAlias

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from blip2_embed.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    NotAnImageError,
    TruncatedImageError,
    UnreadableImageError,
    UnsupportedImageError,
)
from blip2_embed.images import sniff
from blip2_embed.images.sniff import SNIFF_BYTES, decoder_available, looks_truncated, sniff_format

log = logging.getLogger(__name__)

ImageSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

# Pillow's own hard limit at its default setting (2 * MAX_IMAGE_PIXELS). Pillow refuses anything larger in
# Image.open regardless of what we allow, so a bigger default here would be a promise we cannot keep
# unless the application raises PIL.Image.MAX_IMAGE_PIXELS itself (a deliberate, process-wide decision).
DEFAULT_MAX_PIXELS = 178_956_970


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class ImageMetadata:
    """What the catalog keeps about a photo besides its pixels.

    ``width``/``height`` are the full-resolution size as displayed (after EXIF orientation), even when the
    pixels were decoded at reduced size. ``captured_at`` is EXIF DateTimeOriginal (else DateTimeDigitized,
    else DateTime); timezone-aware when the file records an offset, naive (camera local time) otherwise.
    """

    width: int
    height: int
    captured_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    format: str | None = None


# EXIF orientation -> the transpose that brings the stored pixels upright (EXIF 2.3, tag 0x0112).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_DRAFTABLE = frozenset({"JPEG", "MPO"})

_warned_truncated_loading = False


def _warn_if_lenient() -> None:
    # Some libraries switch ImageFile.LOAD_TRUNCATED_IMAGES on for the whole process; truncated files
    # would then decode with grey bands instead of raising TruncatedImageError. We do not flip the
    # global back (other code asked for it), but we refuse to let it happen silently.
    global _warned_truncated_loading
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_loading:
        _warned_truncated_loading = True
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process: truncated images will be decoded "
            "with missing areas filled instead of being reported as truncated"
        )


def _read_source(source: ImageSource) -> tuple[bytes, str | None]:
    """All bytes of the source and its file name if any. Reading everything first separates I/O
    failures (unreadable) from decode failures (truncated/corrupt), which Pillow reports alike as OSError."""
    if isinstance(source, bytes):
        return source, None
    if isinstance(source, bytearray | memoryview):
        return bytes(source), None
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        try:
            with open(path, "rb") as fh:
                return fh.read(), path
        except OSError as exc:
            raise UnreadableImageError(exc.strerror or str(exc), path) from exc
    name = getattr(source, "name", None)
    name = name if isinstance(name, str) else None
    try:
        data = source.read()
    except OSError as exc:
        raise UnreadableImageError(exc.strerror or str(exc), name) from exc
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"expected a binary stream, got one yielding {type(data).__name__}")
    return bytes(data), name


def _decode_failure(exc: Exception, data: bytes, fmt: str | None, path: str | None) -> ImageError:
    """Classify an exception raised while opening/decoding a file whose content looked like `fmt`."""
    if isinstance(exc, UnidentifiedImageError):
        # Pillow's message only repeats the file object's repr; say what it means instead.
        detail = f"it starts like {fmt or 'an image'} but its header cannot be parsed"
    else:
        detail = str(exc).strip() or type(exc).__name__
    text = detail.lower()
    if fmt is not None and not decoder_available(fmt):
        return UnsupportedImageError(f"no {fmt} decoder is installed ({detail})", path)
    if (
        isinstance(exc, EOFError)
        or any(s in text for s in ("truncat", "end of file", "premature end", "unexpected end"))
        or looks_truncated(data, fmt)
    ):
        return TruncatedImageError(detail, path)
    if "unsupported" in text or "not supported" in text or "not available" in text:
        return UnsupportedImageError(detail, path)
    return CorruptImageError(detail, path)


def _identify_other_format(data: bytes) -> str | None:
    """Name a format Pillow knows but we do not accept (header parse only, no pixel decode)."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return other.format
    except Exception:
        return None


def _open(data: bytes, fmt: str | None, path: str | None) -> ImageFile.ImageFile:
    try:
        return Image.open(io.BytesIO(data), formats=sniff.pil_formats())
    except Image.DecompressionBombError as exc:
        raise DecompressionBombError(str(exc), path) from exc
    except UnidentifiedImageError as exc:
        if fmt is None:
            other = _identify_other_format(data)
            if other:
                raise UnsupportedImageError(f"{other} images are not accepted", path) from exc
            raise NotAnImageError("the content matches no supported image format", path) from exc
        raise _decode_failure(exc, data, fmt, path) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_failure(exc, data, fmt, path) from exc


def _read_exif(image: Image.Image) -> Image.Exif | None:
    # Corrupt EXIF is common (editors, phones, broken transfers) and must never cost us the pixels.
    try:
        return image.getexif()
    except Exception:
        return None


def _orientation(exif: Image.Exif | None) -> int:
    if exif is None:
        return 1
    try:
        value = exif.get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 with rounding (not clipping the top off, as convert('L') does)."""
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float grayscale -> 8-bit "L", using the full range of the source."""
    arr = np.asarray(image)
    if image.mode.startswith("I;16"):
        # exact integer rounding of v * 255 / 65535: 65535 -> 255, 32768 -> 128
        out = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.mode == "I":
        # Pillow uses "I" for 16-bit PNG/TIFF/PPM data; anything outside 0..65535 is not, so stretch it.
        lo, hi = float(arr.min()), float(arr.max())  # integers, exactly (int32 fits a float64)
        if lo >= 0 and hi <= 65535:
            out = ((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        else:
            out = _to_uint8(arr, lo, hi)
    else:  # "F": [0, 1] and [0, 255] are the conventions in the wild; stretch anything else
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            out = _to_uint8(arr, 0.0, 1.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = _to_uint8(arr, 0.0, 255.0)
        else:
            out = _to_uint8(arr, lo, hi)
    return Image.fromarray(out)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB"; transparency is composited onto white, as BlipImageProcessor does."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if image.mode == "La":  # premultiplied; Pillow converts it only to "LA"
        image = image.convert("LA")
    has_alpha = any(band in ("A", "a") for band in image.getbands()) or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # CMYK (Adobe's inverted variant is undone by Pillow's JPEG reader), YCbCr, LAB (via LittleCMS),
    # HSV, L, 1, P, RGBX: Pillow's own conversions are right for these.
    return image.convert("RGB")


def _clean_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", " ").strip()
    return value[:128] or None


_EXIF_DATETIME = re.compile(r"^\s*(\d{4})[:\-/.](\d{2})[:\-/.](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")


def _parse_exif_datetime(value: Any, offset: Any = None, subsec: Any = None) -> datetime | None:
    text = _clean_text(value)
    match = _EXIF_DATETIME.match(text) if text else None
    if not match:
        return None
    try:
        year, month, day, hour, minute, second = (int(g) for g in match.groups())
        moment = datetime(year, month, day, hour, minute, second)  # "0000:00:00 00:00:00" raises here
    except ValueError:
        return None
    sub = _clean_text(subsec)
    if sub and sub.isdigit():
        moment = moment.replace(microsecond=int(sub[:6].ljust(6, "0")))
    off = _clean_text(offset)
    off_match = _EXIF_OFFSET.match(off) if off else None
    if off_match:
        sign = -1 if off_match.group(1) == "-" else 1
        delta = timedelta(hours=int(off_match.group(2)), minutes=int(off_match.group(3)))
        if delta < timedelta(hours=24):
            moment = moment.replace(tzinfo=timezone(sign * delta))
    return moment


# (date tag, offset tag, sub-second tag), most to least trustworthy as "when the photo was taken".
_CAPTURE_TAGS = ((0x9003, 0x9011, 0x9291), (0x9004, 0x9012, 0x9292), (0x0132, 0x9010, 0x9290))


def _captured_at(exif: Image.Exif) -> datetime | None:
    try:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
    except Exception:
        sub = {}
    for date_tag, offset_tag, subsec_tag in _CAPTURE_TAGS:
        try:
            # IFD0 is a fallback for the Exif-IFD tags because some writers put them in the wrong place.
            value = sub.get(date_tag) or exif.get(date_tag)
            moment = _parse_exif_datetime(value, sub.get(offset_tag), sub.get(subsec_tag))
        except Exception:
            moment = None
        if moment is not None:
            return moment
    return None


def _format_name(image: Image.Image) -> str | None:
    if not image.format:
        return None
    name = image.format.lower()
    return "jpeg" if name == "mpo" else name


def _metadata(
    size: tuple[int, int], orientation: int, exif: Image.Exif | None, fmt: str | None
) -> ImageMetadata:
    width, height = size
    if orientation in (5, 6, 7, 8):  # the orientations that swap the axes
        width, height = height, width
    captured_at = make = model = None
    if exif is not None:
        captured_at = _captured_at(exif)
        try:
            make, model = _clean_text(exif.get(0x010F)), _clean_text(exif.get(0x0110))
        except Exception:
            make = model = None
    return ImageMetadata(width, height, captured_at, make, model, fmt)


def read_metadata(image: Image.Image) -> ImageMetadata:
    """Size as displayed, capture time and camera of an image as opened (before any conversion)."""
    exif = _read_exif(image)
    return _metadata(image.size, _orientation(exif), exif, _format_name(image))


def load_image_with_metadata(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> tuple[Image.Image, ImageMetadata]:
    """Decode `source` into an upright RGB image, plus its metadata.

    Args:
        source: a path, the file's bytes, or a binary stream.
        max_pixels: refuse images whose header declares more pixels than this, before decoding.
        draft_size: for JPEG, decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
            >= draft_size; other formats decode at full size. Metadata always has the full size.

    Raises:
        ImageError subclasses: EmptyImageError, UnreadableImageError, NotAnImageError,
        UnsupportedImageError, TruncatedImageError, CorruptImageError, DecompressionBombError.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    data, path = _read_source(source)
    if not data:
        raise EmptyImageError("", path)
    _warn_if_lenient()
    fmt = sniff_format(data[:SNIFF_BYTES])
    # The context manager detaches the in-memory file from the image on exit without destroying the
    # decoded pixels (unlike close()), so the returned image does not pin the compressed bytes.
    with _open(data, fmt, path) as raw:
        full_size = raw.size
        pixels = full_size[0] * full_size[1]
        if pixels > max_pixels:
            raise DecompressionBombError(
                f"{full_size[0]}x{full_size[1]} = {pixels:,} pixels, over the limit of {max_pixels:,}", path
            )
        if draft_size and raw.format in _DRAFTABLE:
            # A square request keeps both sides >= draft_size whatever the orientation turns out to be.
            raw.draft("RGB", (draft_size, draft_size))
        try:
            raw.load()  # force the full decode here, so damage surfaces as a typed error, not later
        except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than its screen
            raise DecompressionBombError(str(exc), path) from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise _decode_failure(exc, data, fmt, path) from exc
        # EXIF after load: for PNG the eXIf chunk may follow the pixel data, and getexif() would load.
        exif = _read_exif(raw)
        orientation = _orientation(exif)
        metadata = _metadata(full_size, orientation, exif, _format_name(raw))
        try:
            image = to_rgb(raw)
        except MemoryError:
            raise
        except Exception as exc:
            raise UnsupportedImageError(f"cannot convert mode {raw.mode} to RGB ({exc})", path) from exc
    if orientation != 1:
        image = image.transpose(_UPRIGHT[orientation])
        # transpose() copies info; drop the EXIF block so nobody rotates these pixels a second time.
        image.info.pop("exif", None)
    return image, metadata


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode `source` into an upright RGB image (first frame); see ``load_image_with_metadata``."""
    return load_image_with_metadata(source, max_pixels=max_pixels, draft_size=draft_size)[0]

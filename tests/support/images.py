"""Builders of real (and deliberately broken) image files for the image tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image


def asymmetric_rgb(width: int = 48, height: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 with no symmetry, so every flip and rotation gives different pixels.

    Smooth ramps plus one bright corner block: distinct under all 8 orientations yet gentle enough for
    JPEG at quality 100 to reproduce within a few levels.
    """
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [
            255 * x / max(width - 1, 1),
            255 * y / max(height - 1, 1),
            128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0),
        ],
        axis=-1,
    )
    rgb[: height // 4, : width // 3] = (250, 250, 20)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 resembling a photo: smooth gradients, soft shapes and mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    base = np.stack([90 + 120 * x, 60 + 150 * y, 140 - 80 * x * y], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.random(), rng.random(), 0.05 + 0.2 * rng.random()
        colour = rng.uniform(-90, 90, size=3).astype(np.float32)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (r * r)))
        base += blob[..., None] * colour
    base += rng.normal(0, 4, size=base.shape).astype(np.float32)
    return np.clip(base, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def exif_bytes(
    *,
    orientation: int | None = None,
    make: str | None = None,
    model: str | None = None,
    original: str | None = None,
    offset: str | None = None,
    subsec: str | None = None,
    datetime_ifd0: str | None = None,
) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if make is not None:
        exif[0x010F] = make
    if model is not None:
        exif[0x0110] = model
    if datetime_ifd0 is not None:
        exif[0x0132] = datetime_ifd0
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    if original is not None:
        sub[0x9003] = original
    if offset is not None:
        sub[0x9011] = offset
    if subsec is not None:
        sub[0x9291] = subsec
    return exif.tobytes()


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that a viewer honouring `orientation` shows `upright`.

    Written from the EXIF definitions (where the stored 0th row/column belong when displayed), with
    numpy, independently of the code under test.
    """
    if orientation == 1:
        return upright
    if orientation == 2:  # mirrored horizontally
        return upright[:, ::-1]
    if orientation == 3:  # rotated 180
        return upright[::-1, ::-1]
    if orientation == 4:  # mirrored vertically
        return upright[::-1, :]
    if orientation == 5:  # mirrored along the main diagonal
        return upright.transpose(1, 0, 2)
    if orientation == 6:  # viewer rotates 90 clockwise, so the camera stored it 90 counter-clockwise
        return np.rot90(upright, k=1)
    if orientation == 7:  # mirrored along the anti-diagonal
        return np.rot90(upright, k=2).transpose(1, 0, 2)
    if orientation == 8:  # viewer rotates 90 counter-clockwise
        return np.rot90(upright, k=-1)
    raise ValueError(orientation)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height, cut off a few bytes into its pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    start_of_pixels = _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + start_of_pixels


def with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 (EXIF) segment with arbitrary `payload` right after the SOI marker."""
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


CORRUPT_EXIF_PAYLOADS = {
    "random": b"Exif\x00\x00" + bytes(np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8)),
    "ifd_offset_past_end": b"Exif\x00\x00MM\x00*\xff\xff\xff\xf0",
    "entry_count_past_end": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"
    + b"\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00" * 3,
    # one entry: tag 0x0112 typed ASCII, 4 bytes, "ABC"
    "orientation_as_text": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00"
    + b"\x12\x01\x02\x00\x04\x00\x00\x00ABC\x00\x00\x00\x00\x00",
    "header_only": b"Exif\x00\x00",
}

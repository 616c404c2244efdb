"""What a file is, by content: image formats by their first bytes (``sniff_format``), whether a decoder
for a format is installed (Pillow plus the pillow-heif plugins), and whether bytes end early."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Literal

from PIL import Image, features

log = logging.getLogger(__name__)

# Enough for every signature below, including the ISO-BMFF `ftyp` brand list of HEIF/AVIF files.
SNIFF_BYTES = 64


# --------------------------------------------------------------------------------------------------
# Plugins


def _register_plugins() -> None:
    """Teach Pillow HEIF (and AVIF where Pillow lacks it); runs once, at import."""
    try:
        import pillow_heif
    except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
        log.warning("pillow-heif is not installed: HEIC/HEIF photos will be reported as unsupported")
        return
    pillow_heif.register_heif_opener()
    # Pillow >= 11.3 decodes AVIF itself and pillow-heif 1.x dropped its AVIF opener; older pairs are the
    # other way round. Register pillow-heif's only when Pillow cannot, so exactly one decoder owns AVIF.
    try:
        native_avif = bool(features.check("avif"))
    except ValueError:  # Pillow versions that do not know the feature name at all
        native_avif = False
    if not native_avif and hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()


_register_plugins()

# The decoders we let loose on untrusted files. Pillow can open far more (EPS even shells out to
# Ghostscript on load); a photo index needs only these. Unknown names are skipped where a plugin is absent.
_ACCEPTED_PIL_FORMATS = (
    "JPEG",
    "PNG",
    "WEBP",
    "HEIF",
    "AVIF",
    "TIFF",
    "BMP",
    "DIB",
    "GIF",
    "JPEG2000",
    "PPM",
    "QOI",
    "ICO",
)

# sniff_format name -> Pillow format name, to tell "no decoder installed" from "damaged file".
_PIL_NAME = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "heif": "HEIF",
    "avif": "AVIF",
    "tiff": "TIFF",
    "bmp": "BMP",
    "gif": "GIF",
}


@lru_cache(maxsize=1)
def pil_formats() -> tuple[str, ...]:
    Image.init()  # import every plugin once, so OPEN is complete and Image.open never hits a KeyError
    return tuple(name for name in _ACCEPTED_PIL_FORMATS if name in Image.OPEN)


def decoder_available(fmt: str | None) -> bool:
    return fmt is not None and _PIL_NAME.get(fmt) in pil_formats()


# --------------------------------------------------------------------------------------------------
# Sniffing

_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEVC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
# Generic HEIF structure brands: they say "image in an ISO-BMFF box", not which codec.
_GENERIC_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"mif2", b"miaf"})
# Sizes of the BMP info headers in use (OS/2 1.x, 2.x and Windows v1-v5): "BM" alone matches plain text.
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _bmff_brands(head: bytes) -> list[bytes]:
    """Major brand then compatible brands of an ISO-BMFF `ftyp` box at the start of `head`."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return []
    box_end = min(int.from_bytes(head[0:4], "big"), len(head))
    brands = [head[8:12]]
    # bytes 12..16 hold the minor version; compatible brands follow in 4-byte steps
    brands += [head[i : i + 4] for i in range(16, box_end - 3, 4)]
    return brands


def sniff_format(head: bytes) -> str | None:
    """Name the image format of a file from its first ``SNIFF_BYTES`` bytes, or ``None``.

    Names: "jpeg", "png", "webp", "heif", "avif", "tiff", "bmp", "gif". Content decides, never the
    file extension. Never raises for any byte string.
    """
    head = bytes(head[:SNIFF_BYTES])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(head) >= 12 and head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # classic and BigTIFF
        return "tiff"
    if len(head) >= 18 and head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    brands = _bmff_brands(head)
    if brands:
        # A codec-specific major brand decides; a generic one ("mif1", common in AVIF files) defers to
        # the compatible brands.
        if brands[0] in _AVIF_BRANDS:
            return "avif"
        if brands[0] in _HEVC_BRANDS:
            return "heif"
        if any(b in _AVIF_BRANDS for b in brands[1:]):
            return "avif"
        if any(b in _HEVC_BRANDS or b in _GENERIC_HEIF_BRANDS for b in brands):
            return "heif"
    return None


def looks_truncated(data: bytes, fmt: str | None) -> bool:
    """Cheap structural evidence that a file that failed to decode was cut short."""
    n = len(data)
    if fmt == "png":
        return b"IEND" not in data[-12:]
    if fmt == "gif":
        return not data.rstrip(b"\x00").endswith(b";")
    if fmt == "jpeg":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "webp":
        return n < 12 or int.from_bytes(data[4:8], "little") + 8 > n
    if fmt == "tiff":
        # the first IFD must lie inside the file (classic TIFF: 4-byte offset at byte 4)
        order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
        return n < 8 or (data[2:4] in (b"*\x00", b"\x00*") and int.from_bytes(data[4:8], order) + 2 > n)
    if fmt == "bmp":
        return n < 26 or int.from_bytes(data[2:6], "little") > n
    if fmt in ("heif", "avif"):
        # Walk the top-level boxes: one that claims to extend past the end means the tail is missing.
        pos = 0
        while pos + 8 <= n:
            size = int.from_bytes(data[pos : pos + 4], "big")
            if size == 1:
                if pos + 16 > n:
                    return True
                size = int.from_bytes(data[pos + 8 : pos + 16], "big")
            elif size == 0:  # "extends to the end of the file"
                return False
            if size < 8 or pos + size > n:
                return size >= 8
            pos += size
        return pos != n
    return False

"""Small JPEG (or other format) copies of an image for the catalog and the web page."""

from __future__ import annotations

import io

from PIL import Image

from blip2_embed.images.decode import to_rgb


def make_thumbnail(image: Image.Image, max_side: int = 384, fmt: str = "JPEG", quality: int = 85) -> bytes:
    """Encode a copy of `image` with its longer side at most `max_side` (never upscaled)."""
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    fmt = fmt.upper()
    thumb = to_rgb(image) if fmt in ("JPEG", "JPG") or image.mode not in ("RGB", "RGBA", "L") else image
    width, height = thumb.size
    scale = min(1.0, max_side / max(width, height))
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if target != thumb.size:
        # reducing_gap: a cheap box pre-shrink before Lanczos; indistinguishable at thumbnail sizes.
        thumb = thumb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    if fmt in ("JPEG", "JPG", "WEBP", "AVIF"):
        thumb.save(buffer, format="JPEG" if fmt == "JPG" else fmt, quality=quality)
    else:
        thumb.save(buffer, format=fmt)
    return buffer.getvalue()

"""Each image's exact model input, kept beside its thumbnail so re-ranking and captions see what the
indexer embedded.

The model input is the resized image before normalisation (``blip2_embed.images.resize_for_model``):
S x S uint8 RGB. It is stored losslessly (WebP lossless, the fastest effort setting: smaller and faster
to encode and decode than PNG on photos, figures in docs/catalog.md) per content hash and per input
spec, because a 364 px checkpoint or another resize filter needs a different input:
``<root>/<S>px-<filter>/<sha[:2]>/<sha>.webp``. Mean and std are applied after, so they are not part of
the key.

The indexer writes these files before the catalog commit of their batch, so a committed image always
has its input (unless the store was switched off, or the catalog predates it: see
``indexer.backfill``). The search API reads them and normalises; this module needs only numpy and PIL,
so decode worker processes can encode with it.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from catalog.content_files import ContentFiles, write_atomic

log = logging.getLogger(__name__)

# libwebp lossless at method 0 / quality 0 (its least effort): on camera photos resized to 224 px this
# is 3-4x faster to encode than PNG at zlib level 1 and 20% smaller; more effort saves ~10% more bytes
# at 5-40x the encode time, which decode workers (the indexer's bottleneck) would pay.
_WEBP_OPTIONS = {"lossless": True, "method": 0, "quality": 0, "exact": True}
_MARKER = "backfill.json"


class InputSpec(Protocol):
    """What the store needs of a checkpoint's input spec (``blip2_embed.images.ImageSpec`` has it): the
    catalog knows no model code."""

    @property
    def size(self) -> int: ...

    @property
    def resample(self) -> int: ...


def spec_key(spec: InputSpec) -> str:
    """The folder name of one input spec, e.g. ``224px-bicubic``."""
    return f"{spec.size}px-{Image.Resampling(spec.resample).name.lower()}"


def encode_model_input(model_input: np.ndarray) -> bytes:
    """uint8 (S, S, 3) RGB -> WebP lossless bytes (decodes to exactly the same array)."""
    if model_input.dtype != np.uint8 or model_input.ndim != 3 or model_input.shape[2] != 3:
        raise ValueError(f"expected uint8 (S, S, 3), got {model_input.dtype} {model_input.shape}")
    buf = io.BytesIO()
    Image.fromarray(model_input, "RGB").save(buf, format="WEBP", **_WEBP_OPTIONS)
    return buf.getvalue()


class ModelInputStore(ContentFiles):
    """The model inputs of one spec under ``root``; ``load`` returns uint8 (S, S, 3) or None."""

    suffix = ".webp"

    def __init__(self, root: Path, spec: InputSpec) -> None:
        super().__init__(Path(root) / spec_key(spec))
        self.root = Path(root)
        self.spec = spec

    def load(self, sha256: str) -> np.ndarray | None:
        """The stored input, or None when it is missing or unusable (the caller decodes the original)."""
        data = self.read(sha256)
        if data is None:
            return None
        s = self.spec.size
        try:
            with Image.open(io.BytesIO(data), formats=["WEBP"]) as image:
                if image.mode != "RGB" or image.size != (s, s):
                    raise ValueError(f"{image.mode} {image.size[0]}x{image.size[1]}, expected RGB {s}x{s}")
                return np.asarray(image)
        except Exception as exc:  # a damaged file costs a decode of the original, never the request
            log.warning("ignoring damaged model input %s: %s", self.path(sha256), exc)
            return None

    # The backfill marker: every live image changed up to this generation of this catalog has its input,
    # so the indexer's backfill only looks at images changed after it.
    def backfilled_through(self, catalog_uid: str) -> int:
        try:
            marker = json.loads((self.folder / _MARKER).read_text(encoding="utf-8"))
            if marker.get("catalog_uid") == catalog_uid:
                return int(marker["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return 0

    def mark_backfilled(self, catalog_uid: str, generation: int) -> None:
        marker = {"catalog_uid": catalog_uid, "generation": int(generation)}
        write_atomic(self.folder / _MARKER, json.dumps(marker).encode())

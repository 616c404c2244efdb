"""Image bytes in and out: upload limits, thumbnails of catalog images, model pixels of candidates.

Catalog images are always found by id, and the path comes from the catalog (checked to lie inside a
library root), never from the request, so no request can name a file.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from fastapi import UploadFile
from PIL import Image

from blip2_embed.errors import DecompressionBombError, ImageError, NotAnImageError, UnsupportedImageError
from blip2_embed.images import SNIFF_BYTES, ImageSpec, load_image, make_thumbnail, preprocess, sniff_format
from catalog.thumbnails import thumbnail_path
from search_api.catalog_view import CatalogView
from search_api.errors import ApiError

K = TypeVar("K")
V = TypeVar("V")

THUMBNAIL_SIDE = 384


class LRU(Generic[K, V]):
    """A small thread-safe LRU (the decode threads and the event loop both touch it)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return None

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)


def image_error_to_api(exc: ImageError) -> ApiError:
    """Map a decode failure to its 4xx: too many pixels 413, not an accepted format 415, else 422."""
    if isinstance(exc, DecompressionBombError):
        return ApiError(413, f"image too large: {exc.detail}", code="image-too-large")
    if isinstance(exc, NotAnImageError | UnsupportedImageError):
        return ApiError(415, f"unsupported image type: {exc.detail or exc.reason}", code="unsupported-image")
    return ApiError(422, f"the image cannot be decoded ({exc.reason}): {exc.detail}", code="bad-image")


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refusing (413) once more than ``max_bytes`` arrive and (415) non-images."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await upload.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, f"upload larger than {max_bytes} bytes", code="upload-too-large")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise ApiError(422, "the uploaded file is empty", code="empty-upload")
    if sniff_format(data[:SNIFF_BYTES]) is None:
        raise ApiError(
            415,
            "unsupported image type: the content is not JPEG, PNG, WebP, HEIF, AVIF, TIFF, BMP or GIF",
            code="unsupported-image",
        )
    return data


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise image_error_to_api(exc) from None


class Media:
    """Thumbnails and model pixels of catalog images, cached by image id (content never changes)."""

    def __init__(
        self,
        view: CatalogView,
        spec: ImageSpec,
        *,
        max_pixels: int,
        thumbnail_dir: Path | None = None,
        cache_items: int = 512,
    ) -> None:
        self.view = view
        self.spec = spec
        self.max_pixels = max_pixels
        # The indexer's stored thumbnails (catalog.thumbnails). When one is missing (thumbnails off, or
        # written later) we make one from the original and keep it in memory.
        self.thumbnail_dir = thumbnail_dir
        self._thumbs: LRU[int, bytes] = LRU(cache_items)
        self._pixels: LRU[int, np.ndarray] = LRU(cache_items)

    def thumbnail(self, image_id: int) -> bytes | None:
        """JPEG bytes of the image's thumbnail, or None when the image has no readable file."""
        cached = self._thumbs.get(image_id)
        if cached is not None:
            return cached
        info = self.view.image_infos([image_id]).get(image_id)
        if info is None:
            return None
        if self.thumbnail_dir is not None:
            stored = thumbnail_path(self.thumbnail_dir, info.sha256)
            if stored.is_file():
                data = stored.read_bytes()
                self._thumbs.put(image_id, data)
                return data
        path = self.view.original_path(image_id)
        if path is None:
            return None
        try:
            image = load_image(path, max_pixels=self.max_pixels, draft_size=THUMBNAIL_SIDE)
        except ImageError:
            return None
        data = make_thumbnail(image, THUMBNAIL_SIDE)
        self._thumbs.put(image_id, data)
        return data

    def pixels(self, image_id: int) -> np.ndarray | None:
        """Model input (3, S, S) decoded from the thumbnail (cheap; it is larger than S), or None."""
        cached = self._pixels.get(image_id)
        if cached is not None:
            return cached
        thumb = self.thumbnail(image_id)
        if thumb is None:
            return None
        try:
            px = preprocess([load_image(thumb, max_pixels=self.max_pixels)], self.spec)[0]
        except ImageError:
            return None
        self._pixels.put(image_id, px)
        return px

    async def pixels_many(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Pixels of several images, decoded off the event loop; ids without a readable file are left out."""

        def work() -> dict[int, np.ndarray]:
            out = {}
            for i in ids:
                px = self.pixels(i)
                if px is not None:
                    out[i] = px
            return out

        return await asyncio.to_thread(work)

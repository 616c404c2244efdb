"""Image bytes in and out: upload limits, thumbnails of catalog images, model pixels of candidates.

Catalog images are always found by id, and the path comes from the catalog (checked to lie inside a
library root), never from the request, so no request can name a file.

The model pixels of a catalog image are what the indexer embedded: its stored model input
(``catalog.model_inputs``), normalised. An image indexed before inputs were stored has its original
decoded with the indexer's own decode path instead; with ``BLIP2_STORE_MODEL_INPUTS=false`` the stored
thumbnail is resized, an approximation (docs/catalog.md says by how much).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from fastapi import UploadFile
from PIL import Image

from blip2_embed.errors import DecompressionBombError, ImageError, NotAnImageError, UnsupportedImageError
from blip2_embed.images import (
    SNIFF_BYTES,
    ImageSpec,
    decode_model_input,
    load_image,
    make_thumbnail,
    normalise,
    resize_for_model,
    sniff_format,
)
from blip2_search.settings import Settings
from catalog.model_inputs import ModelInputStore
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
    """Thumbnails and model inputs of catalog images, cached by image id (content never changes)."""

    def __init__(
        self,
        view: CatalogView,
        spec: ImageSpec,
        *,
        max_pixels: int,
        thumbnail_dir: Path | None = None,
        model_inputs: ModelInputStore | None = None,
        fast_jpeg: bool = True,
        thumbnail_size: int = 256,
        cache_items: int = 512,
    ) -> None:
        self.view = view
        self.spec = spec
        self.max_pixels = max_pixels
        # The indexer's stored thumbnails (catalog.thumbnails). When one is missing (thumbnails off, or
        # written later) we make one from the original and keep it in memory.
        self.thumbnail_dir = thumbnail_dir
        # The indexer's stored model inputs, or None (store off: thumbnails stand in for them). A missing
        # one is decoded from the original as the indexer decodes: same fast_jpeg, same JPEG draft
        # (which depends on the thumbnail size), so the result is the input the indexer embedded.
        self.model_inputs = model_inputs
        self.fast_jpeg = fast_jpeg
        self.thumbnail_size = thumbnail_size
        self._thumbs: LRU[int, bytes] = LRU(cache_items)
        # uint8 (S, S, 3): a quarter of the float pixels' memory; normalising a batch costs ~0.5 ms/image.
        self._inputs: LRU[int, np.ndarray] = LRU(cache_items)

    @classmethod
    def from_settings(cls, view: CatalogView, spec: ImageSpec, settings: Settings) -> Media:
        inputs_dir = settings.resolved_model_input_dir
        return cls(
            view,
            spec,
            max_pixels=settings.max_image_pixels,
            thumbnail_dir=settings.resolved_thumbnail_dir,
            model_inputs=ModelInputStore(inputs_dir, spec) if inputs_dir is not None else None,
            fast_jpeg=settings.fast_jpeg,
            thumbnail_size=settings.thumbnail_size,
        )

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

    def model_input(self, image_id: int) -> np.ndarray | None:
        """The uint8 (S, S, 3) input the indexer gave the model for this image, or None when it has no
        stored input and no readable original (or, with the store off, no thumbnail)."""
        cached = self._inputs.get(image_id)
        if cached is not None:
            return cached
        if self.model_inputs is None:
            found = self._from_thumbnail(image_id)
        else:
            info = self.view.image_infos([image_id]).get(image_id)
            if info is None:
                return None
            found = self.model_inputs.load(info.sha256)
            if found is None:
                found = self._from_original(image_id, info.sha256)
        if found is not None:
            self._inputs.put(image_id, found)
        return found

    def _from_original(self, image_id: int, sha256: str) -> np.ndarray | None:
        path = self.view.original_path(image_id)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            return None  # rewritten since it was indexed: not the content its embedding came from
        try:
            return decode_model_input(
                data,
                self.spec,
                fast_jpeg=self.fast_jpeg,
                max_pixels=self.max_pixels,
                thumbnail_size=self.thumbnail_size,
            )
        except ImageError:
            return None

    def _from_thumbnail(self, image_id: int) -> np.ndarray | None:
        thumb = self.thumbnail(image_id)
        if thumb is None:
            return None
        try:
            return resize_for_model(load_image(thumb, max_pixels=self.max_pixels), self.spec)
        except ImageError:
            return None

    def pixels(self, image_id: int) -> np.ndarray | None:
        """Model pixels, float32 (3, S, S), of a catalog image (see ``model_input``), or None."""
        found = self.model_input(image_id)
        return None if found is None else normalise(found[None], self.spec)[0]

    async def pixels_many(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Pixels of several images, decoded off the event loop; ids without a readable file are left out."""

        def work() -> dict[int, np.ndarray]:
            found = {i: x for i in ids if (x := self.model_input(i)) is not None}
            if not found:
                return {}
            pixels = normalise(np.stack(list(found.values())), self.spec)
            return dict(zip(found, pixels, strict=True))

        return await asyncio.to_thread(work)

"""Image bytes in and out: upload decoding, thumbnails and originals of catalog images, model inputs.

Catalog images are always found by id, and the path comes from the catalog (checked to lie inside a
library root), never from the caller, so no request can name a file.

The model input of a catalog image is what the indexer embedded: its stored model input
(``catalog.model_inputs``). An image indexed before inputs were stored has its original decoded with
the indexer's own decode path instead; with ``BLIP2_STORE_MODEL_INPUTS=false`` the stored thumbnail is
resized, an approximation (docs/catalog.md says by how much). The batch methods take the
``ImageInfo`` rows the caller already read, so a re-rank reads the catalog once per id, not again here.
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from blip2_embed.errors import DecompressionBombError, ImageError, NotAnImageError, UnsupportedImageError
from blip2_embed.images import (
    SNIFF_BYTES,
    ImageSpec,
    decode_model_input,
    load_image,
    make_thumbnail,
    normalise,
    preprocess,
    resize_for_model,
    sniff_format,
)
from blip2_search.settings import Settings
from catalog.model_inputs import ModelInputStore
from catalog.repository import ImageInfo
from catalog.thumbnails import thumbnail_path
from search_api.service.catalog_reader import CatalogReader, readable_file
from search_api.service.errors import BadInput, ServiceError, TooLarge, UnsupportedMedia

K = TypeVar("K")
V = TypeVar("V")
Uint8 = npt.NDArray[np.uint8]
Floats = npt.NDArray[np.float32]

THUMBNAIL_SIDE = 384
MEDIA_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "tiff": "image/tiff",
    "bmp": "image/bmp", "heif": "image/heif", "avif": "image/avif",
}  # fmt: skip


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


def image_error(exc: ImageError) -> ServiceError:
    """A decode failure as the caller's error: too many pixels, not an accepted format, or broken."""
    if isinstance(exc, DecompressionBombError):
        return TooLarge(f"image too large: {exc.detail}", code="image-too-large")
    if isinstance(exc, NotAnImageError | UnsupportedImageError):
        return UnsupportedMedia(
            f"unsupported image type: {exc.detail or exc.reason}", code="unsupported-image"
        )
    return BadInput(f"the image cannot be decoded ({exc.reason}): {exc.detail}", code="bad-image")


def check_upload(data: bytes, max_bytes: int) -> None:
    """Refuse an upload that is too big, empty, or not an accepted image format (by content)."""
    if len(data) > max_bytes:
        raise TooLarge(f"upload larger than {max_bytes} bytes", code="upload-too-large")
    if not data:
        raise BadInput("the uploaded file is empty", code="empty-upload")
    if sniff_format(data[:SNIFF_BYTES]) is None:
        raise UnsupportedMedia(
            "unsupported image type: the content is not JPEG, PNG, WebP, HEIF, AVIF, TIFF, BMP or GIF",
            code="unsupported-image",
        )


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as exc:
        raise image_error(exc) from None


def upload_pixels(data: bytes, spec: ImageSpec, *, max_bytes: int, max_pixels: int) -> Floats:
    """Model pixels (1, 3, S, S) of an uploaded image, or the caller's error."""
    check_upload(data, max_bytes)
    return preprocess([decode_upload(data, max_pixels)], spec)


def media_type(head: bytes, name: str = "") -> str:
    """The image MIME type by content, else by file name."""
    found = MEDIA_TYPES.get(sniff_format(head[:SNIFF_BYTES]) or "")
    return found or mimetypes.guess_type(name)[0] or "application/octet-stream"


class ImageStore:
    """Thumbnails and model inputs of catalog images, cached by image id (content never changes)."""

    def __init__(
        self,
        catalog: CatalogReader,
        spec: ImageSpec,
        *,
        max_pixels: int,
        thumbnail_dir: Path | None = None,
        model_inputs: ModelInputStore | None = None,
        fast_jpeg: bool = True,
        thumbnail_size: int = 256,
        cache_items: int = 512,
    ) -> None:
        self.catalog = catalog
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
        self._inputs: LRU[int, Uint8] = LRU(cache_items)

    @classmethod
    def from_settings(cls, catalog: CatalogReader, spec: ImageSpec, settings: Settings) -> ImageStore:
        inputs_dir = settings.resolved_model_input_dir
        return cls(
            catalog,
            spec,
            max_pixels=settings.max_image_pixels,
            thumbnail_dir=settings.resolved_thumbnail_dir,
            model_inputs=ModelInputStore(inputs_dir, spec) if inputs_dir is not None else None,
            fast_jpeg=settings.fast_jpeg,
            thumbnail_size=settings.thumbnail_size,
        )

    # ------------------------------------------------------------------ what people see
    def thumbnail(self, image_id: int) -> bytes | None:
        """JPEG bytes of the image's thumbnail, or None when the image has no readable file."""
        cached = self._thumbs.get(image_id)
        if cached is not None:
            return cached
        info = self.catalog.image_infos([image_id]).get(image_id)
        return None if info is None else self._thumbnail_of(info, None)

    def _thumbnail_of(self, info: ImageInfo, roots: list[Path] | None) -> bytes | None:
        if (cached := self._thumbs.get(info.id)) is not None:
            return cached
        if self.thumbnail_dir is not None:
            stored = thumbnail_path(self.thumbnail_dir, info.sha256)
            if stored.is_file():
                data = stored.read_bytes()
                self._thumbs.put(info.id, data)
                return data
        path = readable_file(info.paths, self.catalog.roots().values() if roots is None else roots)
        if path is None:
            return None
        try:
            image = load_image(path, max_pixels=self.max_pixels, draft_size=THUMBNAIL_SIDE)
        except ImageError:
            return None
        data = make_thumbnail(image, THUMBNAIL_SIDE)
        self._thumbs.put(info.id, data)
        return data

    # ------------------------------------------------------------------ what the model sees
    def model_input(self, image_id: int) -> Uint8 | None:
        """The uint8 (S, S, 3) input the indexer gave the model for this image, or None when it has no
        stored input and no readable original (or, with the store off, no thumbnail)."""
        if (cached := self._inputs.get(image_id)) is not None:
            return cached
        return self.model_inputs_of(self.catalog.image_infos([image_id])).get(image_id)

    def model_inputs_of(self, infos: Mapping[int, ImageInfo]) -> dict[int, Uint8]:
        """``model_input`` of each image in ``infos`` (rows already read); unreadable ones left out."""
        found: dict[int, Uint8] = {}
        roots: list[Path] | None = None  # read once, and only when an original must be decoded
        for image_id, info in infos.items():
            arr = self._inputs.get(image_id)
            if arr is None and self.model_inputs is not None:
                arr = self.model_inputs.load(info.sha256)
            if arr is None:
                roots = list(self.catalog.roots().values()) if roots is None else roots
                if self.model_inputs is not None:
                    arr = self._from_original(info, roots)
                else:
                    arr = self._from_thumbnail(info, roots)
            if arr is not None:
                self._inputs.put(image_id, arr)
                found[image_id] = arr
        return found

    def pixels_of(self, infos: Mapping[int, ImageInfo]) -> dict[int, Floats]:
        """Normalised model pixels (3, S, S) of each readable image in ``infos``."""
        found = self.model_inputs_of(infos)
        if not found:
            return {}
        pixels = normalise(np.stack(list(found.values())), self.spec)
        return dict(zip(found, pixels, strict=True))

    def pixels(self, image_id: int) -> Floats | None:
        """Model pixels, float32 (3, S, S), of a catalog image (see ``model_input``), or None."""
        found = self.model_input(image_id)
        return None if found is None else normalise(found[None], self.spec)[0]

    def _from_original(self, info: ImageInfo, roots: list[Path]) -> Uint8 | None:
        path = readable_file(info.paths, roots)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != info.sha256:
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

    def _from_thumbnail(self, info: ImageInfo, roots: list[Path]) -> Uint8 | None:
        thumb = self._thumbnail_of(info, roots)
        if thumb is None:
            return None
        try:
            return resize_for_model(load_image(thumb, max_pixels=self.max_pixels), self.spec)
        except ImageError:
            return None

"""Catalog images by id: metadata, thumbnail bytes, the original file. Never by a caller's path."""

from __future__ import annotations

import asyncio
from pathlib import Path

from blip2_embed.images import SNIFF_BYTES
from catalog.paths import encode_path
from search_api.service.components import Components
from search_api.service.errors import NotFound
from search_api.service.image_store import media_type
from search_api.service.types import FileRef, ImageBytes, ImageDetail, OriginalFile


async def image_detail(c: Components, image_id: int) -> ImageDetail:
    """Metadata of a catalog image, its files, and its cached caption if any."""
    info = (await asyncio.to_thread(c.catalog.image_infos, [image_id])).get(image_id)
    if info is None:
        raise NotFound(f"no indexed image with id {image_id}", code="unknown-image")
    roots = list((await asyncio.to_thread(c.catalog.roots)).values())
    files = []
    for p in info.paths:
        root = next((r for r in roots if p.is_relative_to(r)), p.parent)
        rel = p.relative_to(root).as_posix()
        files.append(FileRef(root=encode_path(root), relative_path=encode_path(rel), path=encode_path(p)))
    caption = None
    if c.has_captions:
        caps = await asyncio.to_thread(c.catalog.captions, [image_id], c.encoder.caption_key or "", None)
        caption = caps.get(image_id)
    return ImageDetail(
        image_id=image_id, path=encode_path(info.paths[0]), width=info.width, height=info.height,
        captured_at=info.captured_at, sha256=info.sha256, byte_size=info.byte_size,
        camera_make=info.camera_make, camera_model=info.camera_model, files=files, caption=caption,
    )  # fmt: skip


async def thumbnail(c: Components, image_id: int) -> ImageBytes:
    """A JPEG thumbnail (longer side 384 px), or the indexer's stored one."""
    data = await asyncio.to_thread(c.images.thumbnail, image_id)
    if data is None:
        raise NotFound(f"no readable image with id {image_id}", code="unknown-image")
    return ImageBytes(data, media_type(data, "thumbnail.jpg"))


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(SNIFF_BYTES)


async def original(c: Components, image_id: int) -> OriginalFile:
    """The original file (the first live copy inside its library root, by root and path)."""
    path = await asyncio.to_thread(c.catalog.original_path, image_id)
    if path is None:
        raise NotFound(f"no readable image with id {image_id}", code="unknown-image")
    head = await asyncio.to_thread(_head, path)
    return OriginalFile(path, media_type(head, path.name), encode_path(path.name))

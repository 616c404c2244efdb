"""Catalog images by id: metadata, thumbnail, original. Never by a path from the request."""

import asyncio
import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from blip2_embed.images import SNIFF_BYTES, sniff_format
from blip2_search.settings import Settings
from catalog.paths import encode_path
from search_api.browse import display_image
from search_api.deps import State
from search_api.errors import ApiError
from search_api.routes.common import IdPath, api_router, problems
from search_api.schemas import FileRef, ImageDetail
from search_api.service import image_urls

_MEDIA_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "tiff": "image/tiff",
    "bmp": "image/bmp", "heif": "image/heif", "avif": "image/avif",
}  # fmt: skip
# Images never change under an id (ids are content hashes' rows), so clients may cache for long.
_CACHE = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/images", ["images"])

    @router.get("/{image_id}", response_model=ImageDetail, responses=problems(401, 404, 422))
    async def image_detail(state: State, image_id: IdPath) -> ImageDetail:
        """Metadata of a catalog image, its files, and its cached caption if any."""
        infos = await asyncio.to_thread(state.view.image_infos, [image_id])
        info = infos.get(image_id)
        if info is None:
            raise ApiError(404, f"no indexed image with id {image_id}", code="unknown-image")
        roots = await asyncio.to_thread(state.view.roots)
        files = []
        for p in info.paths:
            root = next((r for r in roots.values() if p.is_relative_to(r)), p.parent)
            rel = p.relative_to(root).as_posix()
            files.append(FileRef(root=encode_path(root), relative_path=encode_path(rel), path=encode_path(p)))
        caption = None
        if state.has_captions:
            caps = await asyncio.to_thread(
                state.view.captions, [image_id], state.encoder.caption_key or "", None
            )
            caption = caps.get(image_id)
        thumb, orig = image_urls(image_id)
        return ImageDetail(
            image_id=image_id, path=encode_path(info.paths[0]), thumbnail_url=thumb, original_url=orig,
            width=info.width, height=info.height, captured_at=info.captured_at, sha256=info.sha256,
            byte_size=info.byte_size, camera_make=info.camera_make, camera_model=info.camera_model,
            files=files, caption=caption,
        )  # fmt: skip

    @router.get(
        "/{image_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **problems(401, 404, 422)},
    )
    async def thumbnail(state: State, image_id: IdPath) -> Response:
        """A JPEG thumbnail (longer side 384 px)."""
        data = await asyncio.to_thread(state.media.thumbnail, image_id)
        if data is None:
            raise ApiError(404, f"no readable image with id {image_id}", code="unknown-image")
        media = _MEDIA_TYPES.get(sniff_format(data[:SNIFF_BYTES]) or "", "image/jpeg")
        return Response(content=data, media_type=media, headers=_CACHE)

    @router.get(
        "/{image_id}/display",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **problems(401, 404, 422)},
    )
    async def display(state: State, image_id: IdPath) -> Response:
        """A JPEG of the original for viewing (longer side at most ``display_max_side``), converted on the
        server whatever the original's format (HEIC, AVIF, TIFF, ... that browsers may not show)."""
        data = await asyncio.to_thread(display_image, state, image_id)
        if data is None:
            raise ApiError(404, f"no readable image with id {image_id}", code="unknown-image")
        return Response(content=data, media_type="image/jpeg", headers=_CACHE)

    @router.get(
        "/{image_id}/original",
        response_class=FileResponse,
        responses={200: {"content": {"image/*": {}}}, **problems(401, 404, 422)},
    )
    async def original(state: State, image_id: IdPath) -> FileResponse:
        """The original file (the first live copy, by root and path)."""
        path = await asyncio.to_thread(state.view.original_path, image_id)
        if path is None:
            raise ApiError(404, f"no readable image with id {image_id}", code="unknown-image")
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        media = _MEDIA_TYPES.get(sniff_format(head) or "") or mimetypes.guess_type(path.name)[0]
        return FileResponse(
            path, media_type=media or "application/octet-stream", headers=_CACHE,
            content_disposition_type="inline", filename=encode_path(path.name),
        )  # fmt: skip

    return router

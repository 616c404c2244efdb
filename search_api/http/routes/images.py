"""Catalog images by id: metadata, thumbnail, display image, original. Never by a path from the request."""

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from blip2_search.settings import Settings
from search_api.http.deps import Service
from search_api.http.routes.common import IdPath, api_router, problems
from search_api.http.schemas import ImageDetail

# Images never change under an id (ids are content hashes' rows), so clients may cache for long.
_CACHE = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}


def build(settings: Settings) -> APIRouter:
    router = api_router("/api/images", ["images"])

    @router.get("/{image_id}", response_model=ImageDetail, responses=problems(401, 404, 422))
    async def image_detail(service: Service, image_id: IdPath) -> ImageDetail:
        """Metadata of a catalog image, its files, and its cached caption if any."""
        return ImageDetail.of(await service.image(image_id))

    @router.get(
        "/{image_id}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **problems(401, 404, 422)},
    )
    async def thumbnail(service: Service, image_id: IdPath) -> Response:
        """A JPEG thumbnail (longer side 384 px)."""
        thumb = await service.thumbnail(image_id)
        return Response(content=thumb.data, media_type=thumb.media_type, headers=_CACHE)

    @router.get(
        "/{image_id}/display",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **problems(401, 404, 422)},
    )
    async def display(service: Service, image_id: IdPath) -> Response:
        """A JPEG of the original for viewing (longer side at most ``display_max_side``), converted on the
        server whatever the original's format (HEIC, AVIF, TIFF, ... that browsers may not show)."""
        image = await service.display(image_id)
        return Response(content=image.data, media_type=image.media_type, headers=_CACHE)

    @router.get(
        "/{image_id}/original",
        response_class=FileResponse,
        responses={200: {"content": {"image/*": {}}}, **problems(401, 404, 422)},
    )
    async def original(service: Service, image_id: IdPath) -> FileResponse:
        """The original file (the first live copy, by root and path)."""
        f = await service.original(image_id)
        return FileResponse(
            f.path,
            media_type=f.media_type,
            headers=_CACHE,
            content_disposition_type="inline",
            filename=f.filename,
        )

    return router

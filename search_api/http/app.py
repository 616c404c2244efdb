"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan starts a ``SearchService``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from search_api.http.errors import install_error_handlers
from search_api.http.middleware import (
    BodyLimitMiddleware,
    CatchAllMiddleware,
    ObserveMiddleware,
    PathGuardMiddleware,
)
from search_api.http.routes import caption, embed, health, images, library, rerank, search
from search_api.service import SearchService

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Swagger UI's files as the fastapi-offline wheel ships them (only its static folder is used).
SWAGGER_UI_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"


def create_app(
    settings: Settings,
    *,
    encoder: Blip2Encoder | None = None,
    service: Callable[[], AbstractAsyncContextManager[SearchService]] | None = None,
) -> FastAPI:
    """Build the app. ``encoder`` skips loading checkpoints (tests share one across apps); ``service``
    runs another ``SearchService`` behind the same routes (``search_api.scaleout``: shards on Ray)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = service() if service is not None else SearchService.running(settings, encoder)
        async with running as service_:
            app.state.blip2 = service_
            try:
                yield
            finally:
                app.state.blip2 = None

    app = FastAPI(
        title="blip2-search",
        version="0.1.0",
        description=(
            "Semantic image search on BLIP-2: ITC retrieval, ITM re-ranking, OPT captions. Errors are "
            "RFC 9457 problem details (application/problem+json)."
        ),
        lifespan=lifespan,
        # FastAPI's Swagger UI page loads its scripts from a CDN and runs an inline script, which an
        # offline, same-origin (CSP) server cannot allow: /docs below serves the bundled copy instead.
        docs_url=None,
        redoc_url=None,
        # An API answers the path it was asked: "/api/images/" is no route (404), not a 307 elsewhere.
        redirect_slashes=False,
    )
    app.state.blip2 = None
    install_error_handlers(app)
    for module in (search, rerank, caption, embed, images, library, health):
        app.include_router(module.build(settings))

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Swagger UI from a wheel: /docs works with no network.
    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")

    # Added innermost first: Observe -> CORS -> PathGuard -> CatchAll -> BodyLimit -> routes, so every
    # answer (a 413, a bad path, a 500) is counted, carries the security headers, and CORS headers.
    # The biggest legitimate body is a multipart upload of a few images.
    app.add_middleware(BodyLimitMiddleware, limit=2 * settings.max_upload_bytes + 65536)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(PathGuardMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", settings.api_key_header],
        )
    app.add_middleware(ObserveMiddleware)
    return app

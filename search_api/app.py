"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan loads models and index."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from catalog.index_store import IndexOptions, index_path
from search_api.catalog_view import CatalogView
from search_api.deps import AppState, parse_keys
from search_api.errors import install_error_handlers
from search_api.index_watcher import IndexWatcher
from search_api.inference import InferenceWorker
from search_api.media import Media
from search_api.metrics import Metrics
from search_api.middleware import (
    BodyLimitMiddleware,
    CatchAllMiddleware,
    ObserveMiddleware,
    PathGuardMiddleware,
)
from search_api.routes import caption, embed, health, images, library, rerank, search

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Swagger UI's files as the fastapi-offline wheel ships them (only its static folder is used).
SWAGGER_UI_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"


def create_app(settings: Settings, *, encoder: Blip2Encoder | None = None) -> FastAPI:
    """Build the app. ``encoder`` skips loading checkpoints (tests share one across apps)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        enc = encoder
        if enc is None:
            enc = await asyncio.to_thread(
                Blip2Encoder.from_pretrained,
                retrieval=settings.retrieval_model,
                caption=settings.caption_model or None,
                device=settings.device,
                dtype=settings.dtype,
                batch_size=settings.batch_size,
            )
        worker = InferenceWorker(enc, max_batch=settings.inference_max_batch, on_batch=metrics.on_batch)
        worker.start()
        view = CatalogView(settings.resolved_database_url)

        def on_change(handle: Any) -> None:
            metrics.index_generation.set(handle.generation)
            metrics.index_images.set(len(handle))

        key = enc.retrieval_key or ""
        watcher = IndexWatcher(
            view,
            key,
            index_path(settings.resolved_vector_index_dir, key),
            IndexOptions.from_settings(settings),
            poll_seconds=settings.index_poll_seconds,
            on_change=on_change,
        )
        await watcher.start()
        media = Media.from_settings(view, enc.spec, settings)
        app.state.blip2 = AppState(
            settings=settings, encoder=enc, worker=worker, view=view, watcher=watcher, media=media,
            metrics=metrics, api_keys=parse_keys(settings.api_keys),
        )  # fmt: skip
        try:
            yield
        finally:
            app.state.blip2 = None
            await watcher.stop()
            worker.stop()
            view.close()

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
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", settings.api_key_header],
        )
    app.add_middleware(ObserveMiddleware)
    return app

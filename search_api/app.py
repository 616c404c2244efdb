"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan loads models and index."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
from search_api.routes import caption, embed, health, images, rerank, search

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


def create_app(
    settings: Settings,
    *,
    encoder: Blip2Encoder | None = None,
    make_worker: Callable[[Blip2Encoder, Metrics], Any] | None = None,
    make_watcher: Callable[[CatalogView, str, Callable[[Any], None]], IndexWatcher] | None = None,
) -> FastAPI:
    """Build the app. ``encoder`` skips loading checkpoints (tests share one across apps);
    ``make_worker`` / ``make_watcher`` put the models and the index elsewhere (``search_api.scaleout``)."""

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
        if make_worker is not None:
            worker = await asyncio.to_thread(make_worker, enc, metrics)
        else:
            worker = InferenceWorker(enc, max_batch=settings.inference_max_batch, on_batch=metrics.on_batch)
        await asyncio.to_thread(worker.start)
        view = CatalogView(settings.resolved_database_url)

        def on_change(handle: Any) -> None:
            metrics.index_generation.set(handle.generation)
            metrics.index_images.set(len(handle))

        key = enc.retrieval_key or ""
        if make_watcher is not None:
            watcher = await asyncio.to_thread(make_watcher, view, key, on_change)
        else:
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
        # Swagger UI and ReDoc load their scripts from a CDN, which an offline, same-origin (CSP) server
        # cannot serve; the schema itself stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        # An API answers the path it was asked: "/api/images/" is no route (404), not a 307 elsewhere.
        redirect_slashes=False,
    )
    app.state.blip2 = None
    install_error_handlers(app)
    for module in (search, rerank, caption, embed, images, health):
        app.include_router(module.build(settings))

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

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

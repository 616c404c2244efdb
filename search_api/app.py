"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan loads models and index."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from catalog.index_store import IndexOptions, index_path
from search_api.catalog_view import CatalogView
from search_api.deps import AppState, parse_keys
from search_api.errors import install_error_handlers, problem
from search_api.index_watcher import IndexWatcher
from search_api.inference import InferenceWorker
from search_api.media import Media
from search_api.metrics import Metrics
from search_api.routes import caption, embed, health, images, rerank, search

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, before they are parsed or spooled.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = problem(413, f"request body larger than {self.limit} bytes", code="body-too-large")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size > self.limit:
                await too_big(scope, receive, send)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await too_big(scope, receive, send)


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


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
        # Swagger UI and ReDoc load their scripts from a CDN, which an offline, same-origin (CSP) server
        # cannot serve; the schema itself stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.blip2 = None
    install_error_handlers(app)
    for module in (search, rerank, caption, embed, images, health):
        app.include_router(module.build(settings))

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.middleware("http")
    async def observe(request: Any, call_next: Any) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        state = request.app.state.blip2
        if state is not None:
            label = _route_label(request.scope)
            state.metrics.requests.labels(label, request.method, str(response.status_code)).inc()
            state.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)
        # The page is same-origin only: no CDN, no inline script, no framing.
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", settings.api_key_header],
        )
    # Outermost: the biggest legitimate body is a multipart upload of a few images.
    app.add_middleware(BodyLimitMiddleware, limit=2 * settings.max_upload_bytes + 65536)
    return app

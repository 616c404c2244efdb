"""Liveness, readiness, Prometheus metrics, and the admin endpoint."""

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from blip2_search.settings import Settings
from search_api.deps import State, require_admin, require_reader
from search_api.errors import ApiError
from search_api.routes.common import problems
from search_api.schemas import Health, Readiness


def build(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process serves HTTP."""
        return Health(status="ok")

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(request: Request) -> Response:
        """Readiness: models loaded, the index loaded, the model worker alive. 503 until then."""
        state = getattr(request.app.state, "blip2", None)
        if state is None:
            body = Readiness(
                ready=False, models_loaded=False, caption_model=False, index_generation=None,
                published_generation=None, indexed_images=0, inference_queue=0, detail="starting",
            )  # fmt: skip
            return JSONResponse(body.model_dump(), status_code=503)
        snap = state.watcher.handle()
        ready = state.watcher.loaded and state.worker.alive
        body = Readiness(
            ready=ready,
            models_loaded=True,
            caption_model=state.has_captions,
            index_generation=snap.generation if state.watcher.loaded else None,
            published_generation=state.watcher.published,
            indexed_images=len(snap),
            inference_queue=state.worker.pending,
            detail=None if ready else (state.watcher.error or "index not loaded or model worker stopped"),
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @router.get(
        "/metrics",
        response_class=Response,
        dependencies=[Depends(require_reader)],
        responses={200: {"content": {"text/plain": {}}}, **problems(401)},
    )
    async def metrics(state: State) -> Response:
        """Prometheus metrics (text exposition format)."""
        state.metrics.queue_depth.set(state.worker.pending)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.post(
        "/api/admin/refresh-index",
        response_model=Readiness,
        tags=["admin"],
        dependencies=[Depends(require_admin)],
        responses=problems(401, 403),
    )
    async def refresh_index(state: State) -> Readiness:
        """Catch the index up to the catalog's published generation now (admin; needs an API key)."""
        try:
            snap = await asyncio.to_thread(state.watcher.refresh)
        except Exception as exc:  # the catalog is unreachable: a server-side state, reported as 503
            raise ApiError(
                503, f"index refresh failed: {type(exc).__name__}", code="refresh-failed"
            ) from None
        return Readiness(
            ready=True,
            models_loaded=True,
            caption_model=state.has_captions,
            index_generation=snap.generation,
            published_generation=state.watcher.published,
            indexed_images=len(snap),
            inference_queue=state.worker.pending,
        )

    return router

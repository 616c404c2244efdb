"""Liveness, readiness, Prometheus metrics, and the admin endpoint."""

import dataclasses

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from blip2_search.settings import Settings
from search_api.http.deps import Service, require_admin, require_reader
from search_api.http.routes.common import problems
from search_api.http.schemas import Health, Readiness

_STARTING = Readiness(
    ready=False, models_loaded=False, caption_model=False, index_generation=None, published_generation=None,
    indexed_images=0, inference_queue=0, detail="starting",
)  # fmt: skip


def build(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process serves HTTP."""
        return Health(status="ok")

    @router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(request: Request) -> Response:
        """Readiness: models loaded, the index loaded, the model worker alive. 503 until then."""
        service = getattr(request.app.state, "blip2", None)  # None while the lifespan starts
        body = _STARTING if service is None else service.readiness()
        return JSONResponse(dataclasses.asdict(body), status_code=200 if body.ready else 503)

    @router.get(
        "/metrics",
        response_class=Response,
        dependencies=[Depends(require_reader)],
        responses={200: {"content": {"text/plain": {}}}, **problems(401)},
    )
    async def metrics(service: Service) -> Response:
        """Prometheus metrics (text exposition format)."""
        data, media_type = service.metrics_exposition()
        return Response(data, media_type=media_type)

    @router.post(
        "/api/admin/refresh-index",
        response_model=Readiness,
        tags=["admin"],
        dependencies=[Depends(require_admin)],
        responses=problems(401, 403),
    )
    async def refresh_index(service: Service) -> Readiness:
        """Catch the index up to the catalog's published generation now (admin; needs an API key)."""
        return await service.refresh_index()

    return router

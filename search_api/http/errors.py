"""One error shape for every failure: RFC 9457 problem details (``application/problem+json``).

Every handler here answers with ``{"type", "title", "status", "detail"}`` (plus ``errors`` for
validation failures) and never with a stack trace. The search service's typed errors get their status
here, in ``SERVICE_STATUS``, the one place that maps them. Unexpected exceptions are not handled here
but in ``search_api.http.middleware.CatchAllMiddleware``, inside the metrics and security-header
middleware: it logs them server-side and the client sees only a generic 500 with a request id.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from search_api.service import errors as se
from search_api.service.errors import ServiceError

PROBLEM_JSON = "application/problem+json"

# Short slugs make the ``type`` field stable for clients that branch on it.
_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


# Service error -> HTTP status (the most specific class listed first wins).
SERVICE_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (se.BadInput, 422),  # InvalidInput (the model thread refused one job's input) included
    (se.NotFound, 404),
    (se.TooLarge, 413),
    (se.UnsupportedMedia, 415),
    (se.NotConfigured, 409),
    (se.Unavailable, 503),
)


def service_status(exc: ServiceError) -> int:
    return next((status for cls, status in SERVICE_STATUS if isinstance(exc, cls)), 500)


class ApiError(Exception):
    """An HTTP-only error (auth, start-up) a dependency raises; becomes problem+json with this status."""

    def __init__(
        self, status: int, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or _TITLES.get(status, "error").lower().replace(" ", "-")
        self.headers = headers


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        # ASCII with escapes: an error may quote a client's field name, and a lone surrogate in it
        # (JSON "\ud800") cannot be encoded as UTF-8.
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def problem(
    status: int, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    title = _TITLES.get(status, "Error")
    body: dict[str, Any] = {
        "type": f"urn:blip2-search:problem:{code or title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return ProblemResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _short_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Pydantic's raw errors may echo the whole input (e.g. a 10 MB string), and a client's field names
    # are input too: keep location + message, each short, and the first 20 errors.
    return [
        {"loc": [str(p)[:100] for p in err.get("loc", ())], "msg": str(err.get("msg", ""))[:300]}
        for err in exc.errors()[:20]
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.detail, code=exc.code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "Error")
        return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _short_errors(exc)
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc'][1:] or first['loc'])}: {first['msg']}"
        return problem(422, detail, code="validation-error", errors=errors)

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        retry = getattr(exc, "retry_after_seconds", None)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return problem(service_status(exc), exc.detail, code=exc.code, headers=headers)

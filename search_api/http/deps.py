"""Typed FastAPI dependencies: the running ``SearchService`` and the API-key checks."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from search_api.http.errors import ApiError
from search_api.service import SearchService


def get_service(request: Request) -> SearchService:
    service: SearchService | None = getattr(request.app.state, "blip2", None)
    if service is None:  # only between process start and the end of the lifespan start-up
        raise ApiError(503, "the service is starting", code="starting", headers={"Retry-After": "5"})
    return service


Service = Annotated[SearchService, Depends(get_service)]


def _check_key(request: Request, keys: tuple[str, ...], header: str) -> None:
    given = request.headers.get(header, "")
    # Constant-time comparison against every key, so timing reveals neither key nor match position.
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise ApiError(
            401,
            f"a valid API key is required in the {header} header",
            code="unauthorized",
            headers={"WWW-Authenticate": f'ApiKey header="{header}"'},
        )


def require_admin(request: Request, service: Service) -> None:
    """Admin/write endpoints: always need a key; with no keys configured they are disabled (403)."""
    keys = service.settings.api_keys
    if not keys:
        raise ApiError(403, "admin endpoints are disabled: configure BLIP2_API_KEYS", code="admin-disabled")
    _check_key(request, keys, service.settings.api_key_header)


def require_reader(request: Request, service: Service) -> None:
    """Read endpoints: need a key only when ``api_auth_all`` is on and keys are configured."""
    keys = service.settings.api_keys
    if service.settings.api_auth_all and keys:
        _check_key(request, keys, service.settings.api_key_header)

"""Dependencies shared by the routes: the app state and API-key checks."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from blip2_embed.encoder import Blip2Encoder
from blip2_search.settings import Settings
from search_api.catalog_view import CatalogView
from search_api.errors import ApiError
from search_api.index_watcher import IndexWatcher
from search_api.inference import InferenceWorker
from search_api.media import Media
from search_api.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    encoder: Blip2Encoder
    worker: InferenceWorker
    view: CatalogView
    watcher: IndexWatcher
    media: Media
    metrics: Metrics
    api_keys: tuple[str, ...]

    @property
    def has_captions(self) -> bool:
        return self.encoder.caption_model is not None


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "blip2", None)
    if state is None:  # only between process start and the end of the lifespan start-up
        raise ApiError(503, "the service is starting", code="starting", headers={"Retry-After": "5"})
    return state


State = Annotated[AppState, Depends(get_state)]


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


def require_admin(request: Request, state: State) -> None:
    """Admin/write endpoints: always need a key; with no keys configured they are disabled (403)."""
    if not state.api_keys:
        raise ApiError(403, "admin endpoints are disabled: configure BLIP2_API_KEYS", code="admin-disabled")
    _check_key(request, state.api_keys, state.settings.api_key_header)


def require_reader(request: Request, state: State) -> None:
    """Read endpoints: need a key only when ``api_auth_all`` is on and keys are configured."""
    if state.settings.api_auth_all and state.api_keys:
        _check_key(request, state.api_keys, state.settings.api_key_header)

"""Pure ASGI middleware around the app: metrics and security headers, path guard, catch-all, body limit.

Pure ASGI rather than ``BaseHTTPMiddleware``: an exception raised under ``call_next`` escapes to
Starlette's outermost ``ServerErrorMiddleware``, so its 500 skipped the metrics and the security headers.
Here ``CatchAllMiddleware`` turns it into a problem+json 500 *inside* ``ObserveMiddleware``, which counts
and heads every answer alike. Order, outermost first (``create_app`` adds them in reverse):
Observe -> CORS -> PathGuard -> CatchAll -> BodyLimit -> routes.
"""

from __future__ import annotations

import logging
import time
import uuid
from urllib.parse import unquote_to_bytes

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from search_api.http.errors import problem

log = logging.getLogger(__name__)

# The page is same-origin only: no CDN, no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


class _HttpMiddleware:
    """Passes anything but HTTP (lifespan) straight through; subclasses implement ``http``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class _TrackedSend:
    """``send``, remembering whether the answer has started (after that no other answer can be sent)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class ObserveMiddleware(_HttpMiddleware):
    """Count every answer by route, method and status, time it, and give it the security headers."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # what an exception that escapes every layer below becomes

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            state = getattr(scope["app"].state, "blip2", None)
            if state is not None:  # None only before the lifespan start-up finished
                label = _route_label(scope)
                state.metrics.requests.labels(label, scope["method"], str(status)).inc()
                state.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)


class CatchAllMiddleware(_HttpMiddleware):
    """An unexpected exception becomes a generic problem+json 500 with a request id, logged with it."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracked = _TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception:
            request_id = uuid.uuid4().hex[:12]
            log.exception("unhandled error %s on %s %s", request_id, scope["method"], scope["path"])
            if tracked.started:  # half an answer went out; the server can only drop the connection
                raise
            response = problem(
                500, f"internal error (request id {request_id})", code="internal",
                headers={"X-Request-ID": request_id},
            )  # fmt: skip
            await response(scope, receive, send)


def _bad_path(raw_path: bytes) -> bool:
    # Each raw segment decoded on its own: "%2e%2e%2f" is one segment "../", which names no id or file.
    for segment in raw_path.split(b"/"):
        decoded = unquote_to_bytes(segment)
        if decoded in (b".", b"..") or any(c in decoded for c in (b"/", b"\\", b"\x00")):
            return True
    return False


class PathGuardMiddleware(_HttpMiddleware):
    """422 for a path with a '.' or '..' segment, or an encoded '/', '\\' or NUL, before any routing.

    No id or file name has one, and without this Starlette decodes the path first and may answer a
    redirect (``/api/images/%2e%2e%2f`` -> 307 to ``/api/images/..``) or route to another resource.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        if _bad_path(raw):
            detail = "the path has a '.' or '..' segment or an encoded '/', '\\' or NUL"
            await problem(422, detail, code="bad-path")(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware(_HttpMiddleware):
    """Refuse request bodies over ``limit`` bytes with 413, before they are parsed or spooled.

    A declared Content-Length is checked up front; a chunked body is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
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

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        tracked = _TrackedSend(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except _BodyTooLarge:
            if not tracked.started:
                await too_big(scope, receive, send)

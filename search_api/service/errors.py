"""The failures the search service reports on purpose, typed by what the caller did or can do.

The service knows no HTTP: the HTTP layer maps each class to a status in one place
(``search_api.http.errors``), the CLI prints the message. ``code`` is a short stable slug (None: the
caller's generic one); the message says what was wrong, briefly, and never carries a traceback.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every deliberate service failure."""

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code


class BadInput(ServiceError, ValueError):
    """The request itself is unusable (a bad value, a bad combination, an undecodable image)."""


class InvalidInput(BadInput):
    """The model thread found this job's own input unusable; the other jobs of its batch ran."""

    def __init__(self, detail: str, *, code: str | None = "invalid-input") -> None:
        super().__init__(detail, code=code)


class NotFound(ServiceError, LookupError):
    """No such image (or no readable file / stored embedding for it)."""


class TooLarge(ServiceError):
    """An upload or an image over the configured limits."""


class UnsupportedMedia(ServiceError):
    """Content that is not one of the accepted image formats."""


class NotConfigured(ServiceError):
    """The service runs without what the request needs (e.g. no caption model)."""


class Unavailable(ServiceError):
    """A server-side state the caller can only wait out or report (the catalog unreachable)."""

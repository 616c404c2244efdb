"""``create_app``, where callers have always imported it (the app lives in ``search_api.http.app``)."""

from search_api.http.app import create_app

__all__ = ["create_app"]

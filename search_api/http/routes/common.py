"""Helpers shared by route modules: the API router, path ids and the documented error responses."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from search_api.http.deps import require_reader
from search_api.http.errors import PROBLEM_JSON
from search_api.http.schemas import Problem
from search_api.http.validation import ImageId, refuse_unknown_query

# The same id rule as JSON and form ids: 1..2**53, so no id can overflow a SQL integer.
IdPath = Annotated[ImageId, Path(description="Catalog image id.")]


def api_router(prefix: str, tags: list[str | Enum]) -> APIRouter:
    """A router of read endpoints: API key when required, and no undeclared query parameter."""
    return APIRouter(
        prefix=prefix, tags=tags, dependencies=[Depends(require_reader), Depends(refuse_unknown_query)]
    )


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, all with the problem+json shape."""
    return {
        code: {
            "model": Problem,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }

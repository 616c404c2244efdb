"""Helpers shared by route modules: text validation and the documented error responses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path

from search_api.errors import PROBLEM_JSON, ApiError
from search_api.schemas import MAX_ID, Problem

# Every image id in a path is bounded, so no id can overflow a SQL integer (a 500 otherwise).
IdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Catalog image id.")]


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, all with the problem+json shape."""
    return {
        code: {
            "model": Problem,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


def clean_text(value: str | None, max_chars: int, what: str = "text", *, required: bool = True) -> str | None:
    """Strip; refuse (422) empty text when required and text over ``max_chars`` characters."""
    if value is None:
        if required:
            raise ApiError(422, f"{what} is required", code="empty-text")
        return None
    text = value.strip()
    if "\x00" in text:
        raise ApiError(422, f"{what} contains a NUL character", code="bad-text")
    if not text:
        if required:
            raise ApiError(422, f"{what} is empty", code="empty-text")
        return None
    if len(text) > max_chars:
        raise ApiError(422, f"{what} is longer than {max_chars} characters", code="text-too-long")
    return text

"""The one rule for each kind of client value, used by every route and field that carries it.

Texts (JSON bodies, query parameters, form fields) go through ``text_type``; image ids (path, JSON,
form) are ``ImageId``. A bad value therefore gets the same 422 wherever it is sent, before any of it
reaches the tokenizer, the database or the model thread. ``refuse_unknown_fields`` does for query and
form fields what ``extra="forbid"`` does for JSON bodies: a misspelt field is an error, not a default.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any

from annotated_types import Interval
from fastapi import Request, params
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, Strict, StringConstraints
from pydantic_core import PydanticCustomError

# Ids beyond 2**53 are not exact in JavaScript and beyond 2**63 overflow SQL integers; refuse them early.
MAX_ID = 2**53
# Path and form values arrive as strings and are parsed; JSON ids must be JSON integers (not "2", 2.0, true).
ImageId = Annotated[int, Interval(ge=1, le=MAX_ID)]
JsonImageId = Annotated[ImageId, Strict()]
# Generated tokens per caption; the model may allow fewer (prompt + tokens must fit its positions).
MAX_NEW_TOKENS = 128
NewTokens = Annotated[int, Interval(ge=1, le=MAX_NEW_TOKENS)]

# NUL, the other C0/C1 controls except tab, newline and carriage return, and lone UTF-16 surrogates
# (JSON's "\ud800" escape, or a multipart charset such as raw_unicode_escape): none is text, and a
# surrogate makes the tokenizers raise.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(value: str) -> str:
    """``value`` unchanged, or a 422-bound error naming the first character that is not text."""
    bad = _NOT_TEXT.search(value)
    if bad is None:
        return value
    char = ord(bad.group())
    if char == 0:
        what = "a NUL character"
    elif 0xD800 <= char <= 0xDFFF:
        what = f"a lone surrogate (U+{char:04X}), which is not valid Unicode"
    else:
        what = f"the control character U+{char:04X}"
    raise PydanticCustomError("bad_text", "Text contains {what}", {"what": what})


def _blank_is_none(value: str) -> str | None:
    return check_text(value) or None


@cache
def text_type(max_chars: int, *, strip: bool = True, optional: bool = False) -> Any:
    """The text type for a field of at most ``max_chars`` characters (counted after stripping).

    Required texts must keep a character after stripping; ``optional`` ones turn blank into None.
    """
    constraints = StringConstraints(
        strip_whitespace=strip, min_length=None if optional else 1, max_length=max_chars
    )
    return Annotated[str, constraints, AfterValidator(_blank_is_none if optional else check_text)]


def _declared(route: Any) -> tuple[set[str], set[str]]:
    """The query and form field names a route (and its dependencies) declares (a short tree walk)."""
    query: set[str] = set()
    form: set[str] = set()
    pending = [route.dependant]
    while pending:
        dep = pending.pop()
        query.update(f.alias for f in dep.query_params)
        form.update(f.alias for f in dep.body_params if isinstance(f.field_info, params.Form))
        pending.extend(dep.dependencies)
    return query, form


async def refuse_unknown_fields(request: Request) -> None:
    """422 for a query parameter or form field the route does not declare (JSON: ``extra="forbid"``)."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    query, form = _declared(route)
    errors = [("query", name) for name in request.query_params if name not in query]
    if form:  # FastAPI parsed the form before the dependencies run; the request caches it
        errors += [("body", name) for name in (await request.form()) if name not in form]
    if errors:
        msg = "Extra inputs are not permitted"
        raise RequestValidationError([{"type": "extra_forbidden", "loc": loc, "msg": msg} for loc in errors])

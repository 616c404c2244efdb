"""The one rule for each kind of client value, used by every route and field that carries it.

Texts (JSON bodies, query parameters, form fields) go through ``text_type``; image ids (path, JSON,
form) are ``ImageId`` / ``JsonImageId``, one range. A bad value therefore gets the same 422 wherever it
is sent, before any of it reaches the tokenizer, the database or the model thread. Request bodies (JSON
and forms, ``search_api.http.schemas``) refuse unknown fields with ``extra="forbid"``;
``refuse_unknown_query`` does the same for query strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from annotated_types import Interval
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BeforeValidator, GetJsonSchemaHandler, StringConstraints
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

# Ids beyond 2**53 are not exact in JavaScript and beyond 2**63 overflow SQL integers; refuse them early.
MAX_ID = 2**53
# Generated tokens per caption; the model may allow fewer (prompt + tokens must fit its positions).
MAX_NEW_TOKENS = 128
_DECIMAL = re.compile("-?[0-9]+")


def _decimal(value: object) -> object:
    # Pydantic would read "1.0", " 1" and "１" (fullwidth) as 1; a path, query or form integer is digits.
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise PydanticCustomError("int_parsing", "Input should be a decimal integer")
    return value


def _json_number(value: object) -> object:
    # Pydantic would read "2" and true as 2 and 1; a JSON integer is a number (2.0 is one, 2.5 is not).
    if isinstance(value, str | bool):
        raise PydanticCustomError("int_type", "Input should be a JSON integer")
    return value


@cache
def int_type(ge: int, le: int, *, json: bool = False) -> Any:
    """Integers ``ge``..``le``: digits in a path, query or form field, a JSON integer with ``json``."""
    # The bounds come first so that the OpenAPI schema shows them as minimum/maximum.
    return Annotated[int, Interval(ge=ge, le=le), BeforeValidator(_json_number if json else _decimal)]


ImageId = int_type(1, MAX_ID)
JsonImageId = int_type(1, MAX_ID, json=True)
NewTokens = int_type(1, MAX_NEW_TOKENS)
JsonNewTokens = int_type(1, MAX_NEW_TOKENS, json=True)

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


@dataclass(frozen=True)
class _TextPattern:
    """Puts the text rule into the OpenAPI schema, so clients (and Schemathesis) know it."""

    # Escapes, not the characters: the schema itself must stay valid UTF-8 JSON.
    pattern: str = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F\uD800-\uDFFF]*$"

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "pattern": self.pattern}


@cache
def text_type(max_chars: int, *, strip: bool = True, optional: bool = False) -> Any:
    """The text type for a field of at most ``max_chars`` characters (counted after stripping).

    Required texts must keep a character after stripping; ``optional`` ones turn blank into None.
    """
    constraints = StringConstraints(
        strip_whitespace=strip, min_length=None if optional else 1, max_length=max_chars
    )
    check = AfterValidator(_blank_is_none if optional else check_text)
    return Annotated[str, constraints, check, _TextPattern()]


def _declared_query(route: Any) -> set[str]:
    """The query parameter names a route and its dependencies declare (a short tree walk)."""
    names: set[str] = set()
    pending = [route.dependant]
    while pending:
        dep = pending.pop()
        names.update(f.alias for f in dep.query_params)
        pending.extend(dep.dependencies)
    return names


async def refuse_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not declare (bodies: ``extra="forbid"``)."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    known = _declared_query(route)
    unknown = [name for name in request.query_params if name not in known]
    if unknown:
        msg = "Extra inputs are not permitted"
        raise RequestValidationError(
            [{"type": "extra_forbidden", "loc": ("query", n), "msg": msg} for n in unknown]
        )

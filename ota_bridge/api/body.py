"""Reading and validating request bodies: clear 400s that name what is wrong."""

from __future__ import annotations

import json
import math
from typing import TypeVar

import pydantic
from aiohttp import web

from ..errors import InvalidRequest

M = TypeVar("M", bound=pydantic.BaseModel)

MAX_BODY_BYTES = 1024 * 1024
MAX_NUMBER_CHARS = 40  # no field takes a longer number; Python would refuse ints past 4300 digits anyway
# Quotes that look like JSON's " or ' but are not: typographic ones from web pages, and their look-alikes.
_QUOTE_LOOKALIKES = "\u201c\u201d\u2018\u2019\u201e\u201f\u201a\u2033\u2032\uff02\u00ab\u00bb"
TYPOGRAPHIC_QUOTES = {c: f"U+{ord(c):04X}" for c in _QUOTE_LOOKALIKES}


class BadJson(InvalidRequest):
    title = "Malformed JSON"


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse the JSON body into model, or raise a 400 that says exactly what is wrong."""
    return validate(model, parse_json(await request.read()))


def parse_json(raw: bytes) -> object:
    if not raw.strip():
        raise BadJson("the request has no body; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadJson(f"the body is not UTF-8 (byte {e.start})") from e
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise BadJson(_describe(text, e)) from e
    except RecursionError as e:
        raise BadJson("the JSON is nested too deeply (arrays or objects inside each other about a thousand "
                      "levels deep); no request needs more than a few levels") from e


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise BadJson(f"field {key[:80]!r} appears more than once in one object; give each field once")
        found[key] = value
    return found


def _no_constant(name: str) -> object:
    raise BadJson(f"{name} is not a JSON value: JSON has no NaN or Infinity; send a number or null")


def _finite_float(literal: str) -> float:
    value = float(_short_number(literal))
    if not math.isfinite(value):
        raise BadJson(f"the number {literal} is too large for any field")
    return value


def _bounded_int(literal: str) -> int:
    return int(_short_number(literal))


def _short_number(literal: str) -> str:
    if len(literal) > MAX_NUMBER_CHARS:
        raise BadJson(f"a number of {len(literal)} characters ({literal[:20]}...) is too long for any field "
                      f"(at most {MAX_NUMBER_CHARS})")
    return literal


def _describe(text: str, e: json.JSONDecodeError) -> str:
    where = f"line {e.lineno} column {e.colno} (character {e.pos})"
    found = text[e.pos] if e.pos < len(text) else None
    bad = found if found in TYPOGRAPHIC_QUOTES else next((c for c in text if c in TYPOGRAPHIC_QUOTES), None)
    if bad is not None:
        at = where if found == bad else f"character {text.index(bad)}"
        return (f"typographic quote {bad} ({TYPOGRAPHIC_QUOTES[bad]}) at {at}: JSON needs straight double "
                f"quotes (\"). Examples copied from web pages often carry curly quotes; replace them all")
    shown = "end of input" if found is None else repr(found)
    return f"{e.msg} at {where}, found {shown}"


def validate(model: type[M], data: object) -> M:
    if not isinstance(data, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise InvalidRequest("; ".join(_field_error(err) for err in e.errors())) from e


def _field_error(err: object) -> str:
    err = dict(err)  # type: ignore[call-overload]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {where!r}"
    if err.get("type") == "missing":
        return f"missing field {where!r}"
    if err.get("type") == "string_unicode":
        return f"{where}: the string holds a lone surrogate escape (\\ud800 to \\udfff), which is not Unicode text"
    return f"{where}: {str(err.get('msg')).removeprefix('Value error, ')}"

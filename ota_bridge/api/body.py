"""Reading and validating request bodies: clear 400s that name what is wrong."""

from __future__ import annotations

import json
from typing import TypeVar

import pydantic
from aiohttp import web

from ..errors import InvalidRequest

M = TypeVar("M", bound=pydantic.BaseModel)

MAX_BODY_BYTES = 1024 * 1024
TYPOGRAPHIC_QUOTES = {"\u201c": "U+201C", "\u201d": "U+201D", "\u2018": "U+2018", "\u2019": "U+2019"}


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
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadJson(_describe(text, e)) from e


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
    return f"{where}: {str(err.get('msg')).removeprefix('Value error, ')}"

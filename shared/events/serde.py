"""orjson (de)serialisation of events, with errors a person can act on."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import ValidationError

from shared.events.errors import InvalidEventError
from shared.events.record import Event

E = TypeVar("E", bound=Event)


def encode(event: Event) -> bytes:
    """The JSON bytes of an event."""
    return orjson.dumps(event.model_dump(mode="json", exclude_none=False))


def decode(record: type[E], raw: bytes | str | None) -> E:
    """Parse and validate one message value.

    Raises:
        InvalidEventError: the value is empty, not JSON, not an object, or breaks the
            schema; the message says which field and why.
    """
    if raw is None or len(raw) == 0:
        raise InvalidEventError("empty message value")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEventError(f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidEventError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return record.model_validate(data)
    except ValidationError as exc:
        raise InvalidEventError(describe(exc, record)) from exc


MAX_ERRORS_DESCRIBED = 5
"""Failed fields named in an ``InvalidEventError`` message; the rest are only counted (a
movie with 60,000 unknown fields would otherwise give a message of megabytes)."""

_MAX_PART_CHARS = 120


def _short(text: str, limit: int = _MAX_PART_CHARS) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def describe(exc: ValidationError, record: type[Event]) -> str:
    """One part per failed field, e.g. ``rating: Input should be <= 5 (got 7.0)``; at most
    ``MAX_ERRORS_DESCRIBED`` of them, each part cut short, then how many more failed."""
    errors = exc.errors(include_url=False, include_context=False)
    parts = []
    for err in errors[:MAX_ERRORS_DESCRIBED]:
        where = _short(".".join(str(p) for p in err["loc"]) or "(root)")
        got = _short(repr(err.get("input")), 80)
        parts.append(f"{where}: {_short(err['msg'], 300)} (got {got})")
    more = len(errors) - MAX_ERRORS_DESCRIBED
    if more > 0:
        parts.append(f"and {more} more errors")
    return f"invalid {record.__name__}: " + "; ".join(parts)

"""orjson (de)serialisation of events, with errors a person can act on."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import ValidationError

from shared.events.record import Event
from shared.exceptions import InvalidEventError

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


def describe(exc: ValidationError, record: type[Event]) -> str:
    """One line per failed field, e.g. ``rating: Input should be <= 5 (got 7.0)``."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = repr(err.get("input"))
        parts.append(f"{where}: {err['msg']} (got {got[:80]})")
    return f"invalid {record.__name__}: " + "; ".join(parts)

"""Messages as the handlers see them: a validated event and where it came from."""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from shared.config import DEFAULT_DEAD_LETTER_MAX_BYTES
from shared.events import DEAD_LETTERS, DeadLetter, Event, TopicSpec, decode, encode
from shared.exceptions import InvalidEventError

E = TypeVar("E", bound=Event)

log = logging.getLogger(__name__)

DEAD_LETTER_ERROR_BYTES = 4 * 1024
"""Most bytes of a dead letter's ``error`` (as encoded, notes of what was cut included)."""

DEAD_LETTER_KEY_BYTES = 1024
"""Most bytes of a dead letter's ``key`` (as encoded); the payload gets the rest of the
letter's budget."""

_NOTES_BYTES = 256
"""Room kept at the end of ``error`` for the notes of what was cut."""


@dataclass(frozen=True)
class Source:
    """Where a raw message was read: topic, partition, offset, key, value and timestamp."""

    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    """Broker timestamp (CreateTime or LogAppendTime), ms since the epoch."""

    def published_at(self, default: datetime) -> datetime:
        """The broker timestamp as a UTC datetime; ``default`` when there is none."""
        if self.timestamp_ms is None:
            return default
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    @classmethod
    def of(cls, message: Message) -> Source:
        """The source of a confluent-kafka message."""
        kind, ts = message.timestamp()
        return cls(
            topic=message.topic() or "",
            partition=message.partition(),
            offset=message.offset(),
            key=message.key(),
            value=message.value(),
            timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
        )


@dataclass(frozen=True)
class Incoming(Generic[E]):
    """A valid event and the message that carried it."""

    event: E
    source: Source


@dataclass(frozen=True)
class Outgoing:
    """An event to publish on a topic of the contract."""

    spec: TopicSpec
    event: Event


def parse(spec: TopicSpec, source: Source, max_bytes: int) -> Incoming[Event]:
    """Validate a raw message of a contract topic.

    Raises:
        InvalidEventError: oversized, not a valid event, or a key that is not the
            event's entity id (per-key ordering and state depend on it).
    """
    size = len(source.value or b"")
    if size > max_bytes:
        raise InvalidEventError(f"message of {size} bytes exceeds the limit of {max_bytes}")
    event = decode(spec.record, source.value)
    expected = spec.key_of(event)
    if spec.key_field is not None and source.key != expected:
        got = None if source.key is None else source.key.decode("utf-8", errors="replace")
        raise InvalidEventError(
            f"message key {got!r} must be the {spec.key_field} {expected.decode()!r}"
            if expected is not None
            else f"message key {got!r} must be empty"
        )
    return Incoming(event, source)


def handle_isolating_failures(
    handler: Callable[[list[Incoming[Event]]], list[Outgoing]],
    batch: list[Incoming[Event]],
    service: str,
) -> list[Outgoing]:
    """Run ``handler`` over a batch; if it raises, run it on each event alone and
    dead-letter the events that still fail, so one bad event never blocks the rest."""
    if not batch:
        return []
    try:
        return handler(batch)
    except Exception:
        log.exception("service=%s batch of %d failed; retrying one by one", service, len(batch))
    out: list[Outgoing] = []
    for incoming in batch:
        try:
            out.extend(handler([incoming]))
        except Exception as exc:
            log.exception("service=%s offset=%s failed", service, incoming.source.offset)
            out.append(dead_letter(incoming.source, f"{type(exc).__name__}: {exc}", service))
    return out


def dead_letter(
    source: Source, error: str, service: str, max_bytes: int = DEFAULT_DEAD_LETTER_MAX_BYTES
) -> Outgoing:
    """The ``dead-letters`` message for a message that could not be processed; logs the
    failure with topic, partition and offset.

    The encoded letter is at most ``max_bytes`` (``Settings.dead_letter_max_bytes``,
    default 64 KiB) whatever the input: ``error`` keeps at most 4 KiB, ``key`` 1 KiB (a
    quarter and a sixteenth of ``max_bytes`` when it is smaller) and ``payload`` the
    rest; each one cut short says so, with its original size, at the end of ``error``.
    """
    error_limit = min(DEAD_LETTER_ERROR_BYTES, max_bytes // 4)
    notes: list[str] = []
    # An exception's text may hold lone surrogates, which JSON cannot carry.
    error = error.encode("utf-8", errors="replace").decode("utf-8")
    error_text, cut = _fit(error, error_limit - _NOTES_BYTES)
    if cut:
        notes.append(f"error of {_utf8_size(error)} bytes cut")
    key: str | None = None
    if source.key is not None:
        key, cut = _fit(
            source.key.decode("utf-8", errors="replace"),
            min(DEAD_LETTER_KEY_BYTES, max_bytes // 16),
        )
        if cut:
            notes.append(f"key of {len(source.key)} bytes cut")
    raw = source.value or b""
    encoding: Literal["utf-8", "base64"] = "utf-8"
    try:
        payload = raw.decode("utf-8")
    except UnicodeDecodeError:
        payload, encoding = "", "base64"

    def letter(payload: str, notes: list[str]) -> DeadLetter:
        return DeadLetter(
            source_topic=source.topic,
            partition=source.partition,
            offset=source.offset,
            key=key,
            payload=payload,
            payload_encoding=encoding,
            error=error_text + (f" ({'; '.join(notes)})" if notes else ""),
            service=service,
            failed_at=datetime.now(UTC),
        )

    notes_with_payload = [*notes, f"payload of {len(raw)} bytes cut"]
    # The payload may use what the rest of the letter leaves (its empty "" counted).
    room = max_bytes - len(encode(letter("", notes_with_payload))) + 2
    if encoding == "base64":
        # Base64 is 4 characters per 3 bytes, and never escaped.
        kept = raw[: max(0, (room - 2) // 4 * 3)]
        whole = len(kept) == len(raw)
        payload = base64.b64encode(kept).decode("ascii")
    else:
        payload, cut = _fit(payload, room)
        whole = not cut
    out = letter(payload, notes if whole else notes_with_payload)
    log.warning(
        "dead-letter service=%s topic=%s partition=%s offset=%s error=%s",
        service,
        source.topic,
        source.partition,
        source.offset,
        out.error,
    )
    return Outgoing(DEAD_LETTERS, out)


def refit(letter: DeadLetter, max_bytes: int) -> DeadLetter:
    """``letter`` cut to at most ``max_bytes`` encoded (unchanged when it fits): the cap
    a publisher applies to every dead letter, whoever made it."""
    if len(encode(letter)) <= max_bytes:
        return letter
    raw = (
        base64.b64decode(letter.payload)
        if letter.payload_encoding == "base64"
        else letter.payload.encode("utf-8")
    )
    key = None if letter.key is None else letter.key.encode("utf-8")
    source = Source(letter.source_topic, letter.partition, letter.offset, key, raw, None)
    cut = dead_letter(source, letter.error, letter.service, max_bytes).event
    assert isinstance(cut, DeadLetter)
    return cut


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", errors="replace"))


def _json_size(text: str) -> int:
    return len(orjson.dumps(text))


def _fit(text: str, limit: int) -> tuple[str, bool]:
    """The longest prefix of ``text`` whose JSON string (quotes and escapes included) is
    at most ``limit`` bytes, and whether it was cut."""
    if _json_size(text) <= limit:
        return text, False
    # Every character takes at least one byte: no prefix longer than ``limit`` fits.
    low, high = 0, min(len(text), max(0, limit))
    while low < high:
        middle = math.ceil((low + high) / 2)
        if _json_size(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return text[:low], True

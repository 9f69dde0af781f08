"""Messages as the handlers see them: a validated event and where it came from."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from shared.events import DEAD_LETTERS, DeadLetter, Event, TopicSpec, decode
from shared.exceptions import InvalidEventError

E = TypeVar("E", bound=Event)

log = logging.getLogger(__name__)

MAX_DEAD_LETTER_PAYLOAD = 100_000
"""Bytes of an oversized payload kept in its dead letter."""


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


def dead_letter(source: Source, error: str, service: str) -> Outgoing:
    """The ``dead-letters`` message for a message that could not be processed; logs the
    failure with topic, partition and offset."""
    log.warning(
        "dead-letter service=%s topic=%s partition=%s offset=%s error=%s",
        service,
        source.topic,
        source.partition,
        source.offset,
        error,
    )
    raw = source.value or b""
    if len(raw) > MAX_DEAD_LETTER_PAYLOAD:
        error = f"{error} (payload truncated to {MAX_DEAD_LETTER_PAYLOAD} of {len(raw)} bytes)"
        raw = raw[:MAX_DEAD_LETTER_PAYLOAD]
    encoding: Literal["utf-8", "base64"] = "utf-8"
    try:
        payload = raw.decode("utf-8")
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    key = None if source.key is None else source.key.decode("utf-8", errors="replace")
    letter = DeadLetter(
        source_topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        key=key,
        payload=payload,
        payload_encoding=encoding,
        error=error,
        service=service,
        failed_at=datetime.now(UTC),
    )
    return Outgoing(DEAD_LETTERS, letter)

"""Publishing contract events with confluent-kafka."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from shared.config import Settings
from shared.events import DeadLetter, encode
from shared.exceptions import ReelstreamError
from shared.kafka.client import make_producer
from shared.kafka.message import Outgoing, refit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A message the broker did not take."""

    topic: str
    error: KafkaError
    outgoing: Outgoing | None
    """The event it carried (None for raw bytes published with ``produce``)."""

    def __str__(self) -> str:
        return f"{self.topic}: {self.error}"


class DeliveryError(ReelstreamError):
    """The broker did not accept one or more messages (``failures``)."""

    def __init__(self, message: str, failures: Sequence[Failure] = ()) -> None:
        super().__init__(message)
        self.failures = tuple(failures)


class Publisher:
    """Encodes events, keys them by their entity id and produces them asynchronously.

    Delivery failures are collected and raised by ``flush``, so a caller that flushes
    before committing its input offsets never commits past a message that was lost.
    """

    def __init__(self, settings: Settings, producer: Producer | None = None, **overrides: Any):
        self._settings = settings
        self._producer = producer or make_producer(settings, **overrides)
        self._failures: list[Failure] = []

    @property
    def producer(self) -> Producer:
        return self._producer

    def publish(self, outgoing: Outgoing) -> None:
        """Produce one event; a dead letter is first cut to ``dead_letter_max_bytes``."""
        event = outgoing.event
        if isinstance(event, DeadLetter):
            event = refit(event, self._settings.dead_letter_max_bytes)
        self._produce(
            self._settings.topic(outgoing.spec.name),
            outgoing.spec.key_of(event),
            encode(event),
            None,
            outgoing,
        )

    def publish_all(self, outgoings: Iterable[Outgoing]) -> int:
        n = 0
        for outgoing in outgoings:
            self.publish(outgoing)
            n += 1
        return n

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> None:
        """Produce raw bytes (to ``partition`` when given, else by key); waits for queue
        space instead of failing when it is full."""
        self._produce(topic, key, value, partition, None)

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        outgoing: Outgoing | None,
    ) -> None:
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        on_delivery = partial(self._on_delivery, outgoing)
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, on_delivery=on_delivery, **extra
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued message; raise ``DeliveryError`` if any was refused."""
        remaining = self._producer.flush(timeout_s)
        self.raise_failures(
            f"{remaining} messages still queued after {timeout_s}s" if remaining else ""
        )

    def raise_failures(self, note: str = "") -> None:
        """Raise ``DeliveryError`` for the failures reported since the last call (and
        ``note``, if any); forget them either way."""
        failures, self._failures = self._failures, []
        if failures or note:
            shown = [str(f) for f in failures[:5]]
            raise DeliveryError("; ".join([*shown, note] if note else shown), failures)

    def _on_delivery(self, outgoing: Outgoing | None, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.error("delivery failed topic=%s error=%s", msg.topic(), err)
            self._failures.append(Failure(msg.topic() or "", err, outgoing))

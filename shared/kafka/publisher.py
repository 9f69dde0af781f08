"""Publishing contract events with confluent-kafka."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from shared.config import Settings
from shared.events import encode
from shared.exceptions import ReelstreamError
from shared.kafka.client import make_producer
from shared.kafka.message import Outgoing

log = logging.getLogger(__name__)


class DeliveryError(ReelstreamError):
    """The broker did not accept a message."""


class Publisher:
    """Encodes events, keys them by their entity id and produces them asynchronously.

    Delivery failures are collected and raised by ``flush``, so a caller that flushes
    before committing its input offsets never commits past a message that was lost.
    """

    def __init__(self, settings: Settings, producer: Producer | None = None, **overrides: Any):
        self._settings = settings
        self._producer = producer or make_producer(settings, **overrides)
        self._failures: list[str] = []

    @property
    def producer(self) -> Producer:
        return self._producer

    def publish(self, outgoing: Outgoing) -> None:
        self.produce(
            self._settings.topic(outgoing.spec.name),
            outgoing.spec.key_of(outgoing.event),
            encode(outgoing.event),
        )

    def publish_all(self, outgoings: Iterable[Outgoing]) -> int:
        n = 0
        for outgoing in outgoings:
            self.publish(outgoing)
            n += 1
        return n

    def produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Produce raw bytes; waits for queue space instead of failing when it is full."""
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued message; raise ``DeliveryError`` if any was refused."""
        remaining = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            failures.append(f"{remaining} messages still queued after {timeout_s}s")
        if failures:
            raise DeliveryError("; ".join(failures[:5]))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.error("delivery failed topic=%s error=%s", msg.topic(), err)
            self._failures.append(f"{msg.topic()}: {err}")

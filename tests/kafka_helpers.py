"""Small helpers for tests that publish to and read from the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from shared.config import Settings
from shared.events import Event, TopicSpec, decode
from shared.kafka.client import make_consumer, make_producer


def produce_raw(
    settings: Settings, spec: TopicSpec, value: bytes | None, key: bytes | None = None
) -> None:
    """Publish raw bytes, as any Kafka client could."""
    producer = make_producer(settings)
    producer.produce(settings.topic(spec.name), value=value, key=key)
    assert producer.flush(10) == 0


def read_topic(
    settings: Settings,
    spec: TopicSpec,
    until: Callable[[list[Event]], bool],
    timeout_s: float = 60.0,
) -> list[Event]:
    """Read a topic from the beginning until ``until(events)`` holds; fail on timeout."""
    topic = settings.topic(spec.name)
    consumer = make_consumer(settings, f"test-{uuid.uuid4().hex}")
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        events: list[Event] = []
        deadline = time.monotonic() + timeout_s
        while not until(events):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s}s reading {topic}; got {len(events)}: "
                    f"{[e.model_dump() for e in events][-3:]}"
                )
            for message in consumer.consume(500, timeout=0.2):
                error = message.error()
                if error is None:
                    events.append(decode(spec.record, message.value()))
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(str(error))
        return events
    finally:
        consumer.close()

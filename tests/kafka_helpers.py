"""Small helpers for tests that publish to and read from the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from shared.config import Settings
from shared.events import (
    NEWCOMERS_USER_ID,
    RECOMMENDATIONS,
    Event,
    RecommendationsGenerated,
    TopicSpec,
    decode,
)
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


def list_caused_by(settings: Settings, cause_event_id: str) -> RecommendationsGenerated:
    """The rating user's list caused by the rating ``cause_event_id``, read from
    ``recommendations`` (the newcomers' list may name the same cause: it is skipped)."""

    def users_list(events: list[Event]) -> RecommendationsGenerated | None:
        return next(
            (
                e
                for e in events
                if isinstance(e, RecommendationsGenerated)
                and e.cause_event_id == cause_event_id
                and e.user_id != NEWCOMERS_USER_ID
            ),
            None,
        )

    events = read_topic(settings, RECOMMENDATIONS, lambda ev: users_list(ev) is not None, 60)
    found = users_list(events)
    assert found is not None
    return found

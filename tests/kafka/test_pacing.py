"""IdlePacer on the real broker: it pauses only when there is nothing to read, and a
backlog or a message arriving during a rest is read in full."""

from __future__ import annotations

import time
import uuid

import pytest

from shared.config import Settings
from shared.events import RATINGS
from shared.kafka.client import make_consumer, make_producer
from shared.kafka.pacing import IdlePacer
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

MAX_REST_S = 0.05


def produce(settings: Settings, n: int, size: int) -> None:
    producer = make_producer(settings)
    for i in range(n):
        producer.produce(settings.topic(RATINGS.name), key=str(i).encode(), value=b"x" * size)
    assert producer.flush(10) == 0


def test_reads_a_backlog_rests_when_idle_and_wakes_for_news(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(topic_partitions=2)
    backlog = 20_000
    # Large enough that one fetch answer takes a while to arrive: a pacer that paused on
    # a merely empty poll would drop it again and again.
    produce(settings, backlog, 300)
    consumer = make_consumer(settings, f"test-{uuid.uuid4().hex}")
    consumer.subscribe([settings.topic(RATINGS.name)])
    pacer = IdlePacer(consumer, MAX_REST_S)
    try:
        got = 0
        rested_while_behind = False
        deadline = time.monotonic() + 60
        while got < backlog:
            assert time.monotonic() < deadline, f"read {got} of {backlog}"
            pacer.before_poll()
            messages = [m for m in consumer.consume(500, 0.02) if m.error() is None]
            got += len(messages)
            pacer.after_poll(found=bool(messages))
            rested_while_behind |= pacer.resting and got < backlog and bool(consumer.assignment())
        assert got == backlog
        assert not rested_while_behind
        # The last batch emptied both partitions: they stay paused while it is processed.
        topic = settings.topic(RATINGS.name)
        assert pacer.paused == {(topic, 0), (topic, 1)}
        assert not pacer.resting
        pacer.before_poll()
        assert not pacer.paused

        # Caught up: the next empty polls pause fetching.
        for _ in range(5):
            pacer.before_poll()
            messages = consumer.consume(500, 0.02)
            pacer.after_poll(found=bool(messages))
        assert pacer.resting

        # A message published while it rests is read within a few rests.
        produce(settings, 3, 10)
        started = time.monotonic()
        news = 0
        while news < 3:
            assert time.monotonic() - started < 10, "the resting consumer missed new messages"
            pacer.before_poll()
            messages = [m for m in consumer.consume(500, 0.02) if m.error() is None]
            news += len(messages)
            pacer.after_poll(found=bool(messages))
        assert not pacer.resting
    finally:
        consumer.close()


def test_off_never_pauses(make_settings: SettingsFactory) -> None:
    settings = make_settings(topic_partitions=2)
    consumer = make_consumer(settings, f"test-{uuid.uuid4().hex}")
    consumer.subscribe([settings.topic(RATINGS.name)])
    pacer = IdlePacer(consumer, 0.0)
    try:
        for _ in range(10):
            pacer.before_poll()
            pacer.after_poll(found=bool(consumer.consume(10, 0.05)))
            assert not pacer.paused
    finally:
        consumer.close()

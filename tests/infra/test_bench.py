"""The bench's pass-through pipeline (its ceiling) on the real broker, and its helpers."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from infra import bench, ceiling
from shared.config import Settings
from shared.events import RATINGS, RatingSubmitted
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.client import make_admin
from shared.kafka.message import Outgoing
from shared.kafka.publisher import Publisher
from tests.conftest import SettingsFactory
from tests.kafka_helpers import read_topic

T0 = datetime(1998, 1, 1, tzinfo=UTC)


def ratings(n: int) -> list[RatingSubmitted]:
    return [
        RatingSubmitted(
            user_id=str(i % 7),
            movie_id=str(i % 11),
            rating=1 + i % 5,
            occurred_at=T0 + timedelta(minutes=i),
        )
        for i in range(n)
    ]


@pytest.mark.integration
def test_ceiling_echoes_every_rating_once_keyed_by_user(make_settings: SettingsFactory) -> None:
    settings = make_settings(topic_partitions=2)
    ceiling.create_topics(settings)
    consumer = BatchConsumer(settings, ceiling.SERVICE, [RATINGS], ceiling.echo)
    worker = threading.Thread(target=consumer.run, daemon=True)
    worker.start()
    sent = ratings(60)
    try:
        publisher = Publisher(settings)
        for rating in sent:
            publisher.publish(Outgoing(RATINGS, rating))
        publisher.flush()
        echoed = read_topic(settings, ceiling.ECHO, lambda events: len(events) >= len(sent))
    finally:
        consumer.stop()
        worker.join(30)
    assert sorted(e.event_id for e in echoed if isinstance(e, RatingSubmitted)) == sorted(
        r.event_id for r in sent
    )

    ceiling.delete_topics(settings)
    left = make_admin(settings).list_topics(timeout=10).topics
    assert not [t for t in left if t.startswith(settings.topic_prefix)]


def test_deleting_the_stacks_own_namespace_is_refused() -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="")
    with pytest.raises(ValueError, match="own namespace"):
        ceiling.delete_topics(settings)


def test_steady_passes_send_new_events_even_past_the_dataset() -> None:
    base = ratings(5)
    again = bench.as_new(base, "r1000", 12)
    assert len(again) == 12
    assert len({r.event_id for r in again}) == 12
    assert not {r.event_id for r in again} & {r.event_id for r in base}
    assert [r.movie_id for r in again[5:10]] == [r.movie_id for r in base]


def test_percentiles() -> None:
    assert bench.percentiles([]) == {"p50": None, "p99": None, "max": None, "n": 0}
    result = bench.percentiles([float(v) for v in reversed(range(101))])
    assert result == {"p50": 50.0, "p99": 99.0, "max": 100.0, "n": 101}

"""Replaying a small MovieLens folder onto the real broker."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from shared.config import Settings
from shared.data import load_movielens
from shared.events import MOVIES, RATINGS, Event, MoviePublished, RatingSubmitted, TopicSpec, decode
from shared.exceptions import ConfigurationError
from shared.kafka.client import make_consumer
from shared.replay import ReplayStats, replay, schedule
from tests.conftest import SettingsFactory
from tests.data.ml100k_files import generated_ratings, write_recbole
from tests.kafka_helpers import produce_raw


def read_keyed(
    settings: Settings, spec: TopicSpec, n: int
) -> list[tuple[int | None, bytes | None, Event]]:
    """``(partition, key, event)`` of the first ``n`` messages of a topic, in partition
    order (the order within a partition is the order of publication)."""
    topic = settings.topic(spec.name)
    consumer = make_consumer(settings, f"test-{uuid.uuid4().hex}")
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        got: list[tuple[int | None, bytes | None, Event]] = []
        for _ in range(600):
            if len(got) >= n:
                break
            for message in consumer.consume(500, timeout=0.1):
                err = message.error()
                if err is None:
                    got.append(
                        (message.partition(), message.key(), decode(spec.record, message.value()))
                    )
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(str(err))
        assert len(got) == n, f"read {len(got)} of {n} messages from {topic}"
        return got
    finally:
        consumer.close()


@pytest.mark.integration
def test_replay_with_limit_publishes_movies_then_a_prefix_of_ratings(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    dataset = load_movielens(write_recbole(tmp_path / "ml", ratings=generated_ratings(60)))

    stats = replay(settings, dataset, limit=40, progress=False)

    assert (stats.movies, stats.ratings, stats.interrupted) == (5, 40, False)
    assert stats.events_per_s > 0
    movies = read_keyed(settings, MOVIES, 5)
    assert {key for _, key, _ in movies} == {m.movie_id.encode() for m in dataset.movies}
    for _, key, event in movies:
        assert isinstance(event, MoviePublished)
        assert key == event.movie_id.encode()

    ratings = read_keyed(settings, RATINGS, 40)
    expected = dataset.ratings[:40]
    assert sorted(e.event_id for _, _, e in ratings if isinstance(e, RatingSubmitted)) == sorted(
        r.event_id for r in expected
    )
    partition_of_user: dict[str, int | None] = {}
    per_user: dict[str, list[str]] = defaultdict(list)
    for partition, key, event in ratings:
        assert isinstance(event, RatingSubmitted)
        assert key == event.user_id.encode()
        # One user's ratings all land on one partition, so their order is kept.
        assert partition_of_user.setdefault(event.user_id, partition) == partition
        per_user[event.user_id].append(event.event_id)
    for user, ids in per_user.items():
        assert ids == [r.event_id for r in expected if r.user_id == user]


@pytest.mark.integration
def test_paced_replay_publishes_everything(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    dataset = load_movielens(write_recbole(tmp_path / "ml", ratings=generated_ratings(20)))

    stats = replay(settings, dataset, rate=200.0, progress=False, movies=False)

    assert (stats.movies, stats.ratings) == (0, 20)
    # The pacer never sends the 20th rating before its slot at 19/200 s.
    assert stats.wall_s >= 19 / 200
    assert len(read_keyed(settings, RATINGS, 20)) == 20


@pytest.mark.integration
def test_movies_only(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    dataset = load_movielens(write_recbole(tmp_path / "ml"))
    stats = replay(settings, dataset, ratings=False, progress=False)
    assert stats == ReplayStats(5, 0, stats.wall_s)
    assert len(read_keyed(settings, MOVIES, 5)) == 5


def test_schedule_follows_rate_or_scaled_event_time(tmp_path: Path) -> None:
    ratings = load_movielens(write_recbole(tmp_path)).ratings  # t = 940, 949, 949, 950, 960, 960

    assert schedule(ratings, rate=None, time_scale=None) is None
    assert schedule(ratings[:3], rate=2.0, time_scale=None) == [0.0, 0.5, 1.0]
    assert schedule(ratings, rate=None, time_scale=10.0) == pytest.approx(
        [0.0, 0.9, 0.9, 1.0, 2.0, 2.0]
    )


@pytest.mark.parametrize(
    ("limit", "rate", "time_scale"), [(-1, None, None), (None, 0.0, None), (None, 1.0, 1.0)]
)
def test_bad_replay_arguments_are_refused(
    tmp_path: Path, limit: int | None, rate: float | None, time_scale: float | None
) -> None:
    dataset = load_movielens(write_recbole(tmp_path))
    # Refused before any client is built, so an unreachable broker does not matter.
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1")
    with pytest.raises(ValueError):
        replay(settings, dataset, limit=limit, rate=rate, time_scale=time_scale, progress=False)


@pytest.mark.integration
def test_missing_topics_are_reported_before_publishing(bootstrap: str, tmp_path: Path) -> None:
    dataset = load_movielens(write_recbole(tmp_path))
    settings = Settings(
        kafka_bootstrap_servers=bootstrap, topic_prefix=f"absent{uuid.uuid4().hex}."
    )
    with pytest.raises(ConfigurationError, match=r"infra\.topics"):
        replay(settings, dataset, progress=False)


@pytest.mark.integration
def test_replay_waits_for_the_movies_vectors_before_the_ratings(
    make_settings: SettingsFactory,
) -> None:
    import numpy as np

    from shared.events import ITEM_EMBEDDINGS, ItemEmbedded, encode
    from shared.replay import wait_until_embedded

    settings = make_settings()
    for movie_id in ("1", "2"):
        item = ItemEmbedded(
            movie_id=movie_id,
            title=f"movie {movie_id}",
            vector=np.ones(4, dtype=np.float32) / 2,
            modalities=["text"],
            model_version="test",
            embedded_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        produce_raw(settings, ITEM_EMBEDDINGS, encode(item), movie_id.encode())

    assert wait_until_embedded(settings, {"1", "2"}, timeout_s=30, progress=False) == 0
    assert wait_until_embedded(settings, {"1", "3"}, timeout_s=1, progress=False) == 1

"""TopicReader on the real broker: catch-up, live follow, invalid messages."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pytest

from shared.events import ITEM_EMBEDDINGS, Event, ItemEmbedded, encode
from shared.kafka.message import Incoming, Source
from shared.kafka.topic_reader import TopicReader
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw

pytestmark = pytest.mark.integration


def item(movie_id: str) -> bytes:
    return encode(
        ItemEmbedded(
            movie_id=movie_id,
            title=f"movie {movie_id}",
            vector=np.full(4, 0.5, dtype=np.float32),
            modalities=["text"],
            model_version="test",
            embedded_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
    )


def test_reads_everything_then_follows_new_events(make_settings: SettingsFactory) -> None:
    settings = make_settings(topic_partitions=3)
    for movie_id in map(str, range(30)):
        produce_raw(settings, ITEM_EMBEDDINGS, item(movie_id), movie_id.encode())
    produce_raw(settings, ITEM_EMBEDDINGS, b"{broken", b"x")
    seen: list[str] = []
    invalid: list[tuple[Source, str]] = []
    changed = threading.Condition()

    def on_events(batch: list[Incoming[Event]]) -> None:
        with changed:
            seen.extend(i.event.movie_id for i in batch if isinstance(i.event, ItemEmbedded))
            changed.notify_all()

    def on_invalid(source: Source, reason: str) -> None:
        invalid.append((source, reason))

    reader = TopicReader(settings, ITEM_EMBEDDINGS, on_events, on_invalid, name="test").start()
    try:
        assert reader.wait_caught_up(30)
        assert sorted(seen, key=int) == [str(i) for i in range(30)]
        assert len(invalid) == 1 and "invalid JSON" in invalid[0][1]

        # After catch-up the reader holds no partitions; new events still arrive.
        for movie_id in ("new-1", "new-2"):
            produce_raw(settings, ITEM_EMBEDDINGS, item(movie_id), movie_id.encode())
        with changed:
            assert changed.wait_for(lambda: {"new-1", "new-2"} <= set(seen), timeout=30)
        assert len(seen) == 32, "nothing is handed over twice"
        assert reader.is_alive()
    finally:
        reader.stop()
    assert not reader.is_alive()


def test_sync_hands_over_everything_already_in_the_topic(make_settings: SettingsFactory) -> None:
    settings = make_settings(topic_partitions=2)
    seen: list[str] = []
    reader = TopicReader(
        settings,
        ITEM_EMBEDDINGS,
        lambda batch: seen.extend(
            i.event.movie_id for i in batch if isinstance(i.event, ItemEmbedded)
        ),
        lambda source, reason: None,
        name="test",
        follow_interval_s=60.0,  # only sync wakes it up after the first read
    ).start()
    try:
        assert reader.wait_caught_up(30)
        for round_ in range(3):
            published = [f"{round_}-{i}" for i in range(5)]
            for movie_id in published:
                produce_raw(settings, ITEM_EMBEDDINGS, item(movie_id), movie_id.encode())
            assert reader.sync(10)
            assert set(published) <= set(seen), f"round {round_}: not handed over at sync"
        assert len(seen) == 15
    finally:
        reader.stop()
    assert not reader.is_alive()

"""The item-embedding service: the handler on real models and Qdrant, then the whole
loop on the real broker, then the worker process itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest

from shared.config import Settings
from shared.convert import movies_of
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    ITEM_FEEDBACK,
    MOVIES,
    DeadLetter,
    ItemEmbedded,
    ItemFeaturesUpdated,
    ItemRated,
    MoviePublished,
    People,
    encode,
)
from shared.handlers.item_embedding import (
    RECENT_EVENTS,
    SERVICE,
    TABLE,
    ItemRecord,
    event_digest,
    handle_items,
)
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.message import Incoming, Outgoing, Source
from shared.kafka.table import ChangelogTable
from shared.models.item_encoder import ConcatItemEncoder
from shared.models.text import TextEncoder
from shared.retrieval.qdrant_store import QdrantStore
from shared.workers.item_embedding import make_handler
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw, read_topic

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def encoder() -> ConcatItemEncoder:
    return ConcatItemEncoder(TextEncoder())


def movie(movie_id: str, title: str, **fields: object) -> MoviePublished:
    return MoviePublished.model_validate({"movie_id": movie_id, "title": title, **fields})


def embedded(outgoings: list[Outgoing]) -> list[ItemEmbedded]:
    """The item embeddings among ``outgoings`` (the rest must be movies' statistics)."""
    assert all(o.spec in (ITEM_EMBEDDINGS, ITEM_FEATURES) for o in outgoings)
    return [o.event for o in outgoings if isinstance(o.event, ItemEmbedded)]


def statistics(outgoings: list[Outgoing]) -> list[ItemFeaturesUpdated]:
    """The movies' statistics among ``outgoings``."""
    return [o.event for o in outgoings if isinstance(o.event, ItemFeaturesUpdated)]


def handle_movies(
    batch: list[Incoming], encoder: ConcatItemEncoder, store: QdrantStore, now: datetime
) -> list[Outgoing]:
    """``handle_items`` over movies alone, from no stored record."""
    out, _ = handle_items(batch, {}, encoder, store, now)
    return out


def incoming(event: MoviePublished | ItemRated, offset: int, timestamp_ms: int | None) -> Incoming:
    source = Source(
        topic="movies" if isinstance(event, MoviePublished) else "item-feedback",
        partition=0,
        offset=offset,
        key=event.movie_id.encode(),
        value=encode(event),
        timestamp_ms=timestamp_ms,
    )
    return Incoming(event, source)


MOVIES_ = [
    movie("1", "Toy Story", year=1995, genres=["Animation", "Comedy"]),
    movie("2", "GoldenEye", year=1995, genres=["Action", "Thriller"]),
    movie(
        "3",
        "Four Rooms",
        year=1995,
        genres=["Thriller"],
        people=People(directors=["Quentin Tarantino"]),
    ),
]


# --- the handler ----------------------------------------------------------------------


def test_handle_movies_embeds_upserts_and_publishes(
    encoder: ConcatItemEncoder, tmp_path: Path
) -> None:
    batch = [incoming(m, offset, 1_700_000_000_000 + offset) for offset, m in enumerate(MOVIES_)]
    with QdrantStore(Settings(qdrant_path=tmp_path / "q"), encoder.dim) as store:
        events = embedded(handle_movies(batch, encoder, store, NOW))
        assert store.count() == 3
        assert store.search(events[1].vector, k=1)[0][0] == "2"
    assert len(events) == 3
    first = events[0]
    assert (first.movie_id, first.title, first.year) == ("1", "Toy Story", 1995)
    assert first.genres == ["Animation", "Comedy"]
    assert first.modalities == ["text", "metadata"]
    assert first.model_version == encoder.model_version
    assert first.published_at == datetime.fromtimestamp(1_700_000_000, tz=UTC)
    assert first.embedded_at == NOW
    # The concat encoder learned nothing from ratings: its vectors are content alone.
    assert not first.rated_in_training and first.online_ratings == 0
    assert first.vector.shape == (encoder.dim,)
    assert np.linalg.norm(first.vector) == pytest.approx(1.0, abs=1e-5)
    # Vectors equal the encoder's own output for the same movies.
    expected = encoder.encode(movies_of(MOVIES_))
    for event, item in zip(events, expected, strict=True):
        np.testing.assert_allclose(event.vector, item.vector, atol=1e-5)


def test_duplicates_in_a_batch_fold_to_the_last(encoder: ConcatItemEncoder, tmp_path: Path) -> None:
    old = movie("1", "Toy Stroy", year=1995)
    new = movie("1", "Toy Story", year=1995, genres=["Animation"])
    batch = [
        incoming(old, 0, 1000),
        incoming(MOVIES_[1], 1, 2000),
        incoming(new, 2, 3000),
    ]
    with QdrantStore(Settings(qdrant_path=tmp_path / "q"), encoder.dim) as store:
        events = embedded(handle_movies(batch, encoder, store, NOW))
        assert store.count() == 2
        points = store.client.scroll(Settings().qdrant_collection, with_payload=True)[0]
    assert [e.movie_id for e in events] == ["2", "1"]
    latest = events[1]
    assert latest.title == "Toy Story"
    assert latest.published_at == datetime.fromtimestamp(3, tz=UTC)
    assert {p.payload["title"] for p in points if p.payload} == {"Toy Story", "GoldenEye"}


def test_a_message_without_timestamp_has_no_published_at(
    encoder: ConcatItemEncoder, tmp_path: Path
) -> None:
    with QdrantStore(Settings(qdrant_path=tmp_path / "q"), encoder.dim) as store:
        (event,) = embedded(handle_movies([incoming(MOVIES_[0], 0, None)], encoder, store, NOW))
    assert event.published_at is None


def test_an_empty_batch_does_nothing(encoder: ConcatItemEncoder, tmp_path: Path) -> None:
    with QdrantStore(Settings(qdrant_path=tmp_path / "q"), encoder.dim) as store:
        assert handle_movies([], encoder, store, NOW) == []
        assert store.count() == 0


def rated(movie_id: str, taste: np.ndarray | None, n: int) -> ItemRated:
    return ItemRated(
        movie_id=movie_id,
        user_id=f"u{n}",
        rating=4.0,
        occurred_at=NOW,
        rating_event_id=f"e{n}",
        taste=taste,
        model_version="user-1",
        cause_published_at=NOW,
        co_rated=["9"],
    )


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_raters_tastes_move_a_new_movie_the_same_in_any_order_and_batching(
    encoder: ConcatItemEncoder, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    tastes = [rng.normal(size=encoder.dim).astype(np.float32) for _ in range(3)]
    with QdrantStore(Settings(qdrant_path=tmp_path / "q"), encoder.dim) as store:
        out, first = handle_items([incoming(MOVIES_[0], 0, 1000)], {}, encoder, store, NOW)
        (content,) = embedded(out)
        stored = {m: r.to_bytes() for m, r in first.items()}

        features: list[ItemFeaturesUpdated] = []

        def apply(
            *batches: list[int], as_read: bool = False
        ) -> tuple[list[ItemEmbedded], dict[str, bytes]]:
            # as_read: the records go from one batch to the next as read, not as bytes.
            records: dict[str, bytes | ItemRecord] = dict(stored)
            published: list[ItemEmbedded] = []
            offset = 10
            for batch in batches:
                events = [
                    incoming(rated("1", tastes[i], i), offset + j, None)
                    for j, i in enumerate(batch)
                ]
                offset += len(batch)
                out, updated = handle_items(events, records, encoder, store, NOW, item_pull=0.5)
                published += embedded(out)
                features.extend(statistics(out))
                records |= {m: r if as_read else r.to_bytes() for m, r in updated.items()}
            return published, {
                m: r.to_bytes() if isinstance(r, ItemRecord) else r for m, r in records.items()
            }

        one_batch, records = apply([0, 1, 2])
        # One statistics message per batch that rated the movie.
        (stats,) = features
        assert stats.movie_id == "1" and stats.n_ratings == 3 and stats.rating_sum == 12.0
        assert stats.last_rating_event_id == "e2"
        assert stats.co_rated == ["9"] and stats.co_counts == [3]
        (moved,) = one_batch
        expected = unit(content.vector + 0.5 * (tastes[0] + tastes[1] + tastes[2]))
        np.testing.assert_allclose(moved.vector, expected, atol=1e-6)
        assert moved.online_ratings == 3 and not moved.rated_in_training
        np.testing.assert_allclose(moved.content_vector, content.vector)
        # Qdrant serves what the catalogue gets.
        assert store.search(moved.vector, k=1)[0] == ("1", pytest.approx(1.0, abs=1e-5))
        # One batch at a time, and in another order: the same vector.
        one_by_one, _ = apply([2], [0], [1])
        assert [e.online_ratings for e in one_by_one] == [1, 2, 3]
        np.testing.assert_allclose(one_by_one[-1].vector, moved.vector, atol=1e-6)
        # ... and the same statistics.
        assert [f.n_ratings for f in features[1:]] == [1, 2, 3]
        last = features[-1]
        # Records handed on as read, not as bytes (the worker's way): the same again.
        as_read, read_records = apply([2], [0], [1], as_read=True)
        np.testing.assert_array_equal(as_read[-1].vector, one_by_one[-1].vector)
        assert read_records["1"] == apply([2], [0], [1])[1]["1"]
        assert last.model_dump(exclude={"event_id", "last_rating_event_id"}) == stats.model_dump(
            exclude={"event_id", "last_rating_event_id"}
        )

        # A copy (re-delivered, or sent again under another offset) changes nothing.
        again = [incoming(rated("1", tastes[0], 0), 12, None)]
        again.append(incoming(rated("1", tastes[1], 1), 99, None))
        out, updated = handle_items(again, records, encoder, store, NOW, item_pull=0.5)
        assert out == [] and updated == {}
        # A rating without a taste (a movie its encoder learned, a first rating) counts in
        # the statistics only.
        out, updated = handle_items(
            [incoming(rated("1", None, 7), 100, None)], records, encoder, store, NOW, item_pull=0.5
        )
        assert embedded(out) == [] and [f.n_ratings for f in statistics(out)] == [4]
        assert updated["1"].n_tastes == 3 and updated["1"].stats.count == 4
        records |= {m: r.to_bytes() for m, r in updated.items()}
        # A taste of another dimension is dead-lettered; the record keeps its sum.
        bad = [incoming(rated("1", np.ones(3, dtype=np.float32), 8), 101, None)]
        out, updated = handle_items(bad, records, encoder, store, NOW, item_pull=0.5)
        letters = [o.event for o in out if isinstance(o.event, DeadLetter)]
        assert len(letters) == 1 and "dimension 3" in letters[0].error
        assert updated["1"].n_tastes == 3
        # Without the pull the content vector is served, whatever was learned.
        record = ItemRecord.from_bytes(records["1"])
        served = record.served(0.0, NOW)
        assert served is not None and served is record.content
        np.testing.assert_array_equal(served.vector, content.vector)


def test_a_record_keeps_digests_of_its_recent_ratings_and_reads_the_older_form(
    encoder: ConcatItemEncoder, tmp_path: Path
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(RECENT_EVENTS + 10)]
    with QdrantStore(Settings(qdrant_path=tmp_path / "q"), encoder.dim) as store:
        records: dict[str, bytes] = {}
        for offset, event_id in enumerate(ids):
            event = rated("1", None, offset).model_copy(update={"rating_event_id": event_id})
            out, updated = handle_items(
                [incoming(event, offset, None)], records, encoder, store, NOW
            )
            records |= {m: r.to_bytes() for m, r in updated.items()}
        (stats,) = statistics(out)
        assert stats.last_rating_event_id == ids[-1] and stats.n_ratings == len(ids)
        record = ItemRecord.from_bytes(records["1"])
        assert record.recent == tuple(event_digest(e) for e in ids[-RECENT_EVENTS:])
        assert record.last_event_id == ids[-1]
        # 8 bytes per rating in the changelog, not the 36 characters of its id.
        assert len(records["1"]) < 8 * RECENT_EVENTS * 4 / 3 + 2_000
        # A copy sent again under a new offset is still recognised; an old one is not.
        copy = rated("1", None, 0).model_copy(update={"rating_event_id": ids[-5]})
        out, updated = handle_items([incoming(copy, 10_000, None)], records, encoder, store, NOW)
        assert out == [] and updated == {}

    # A record written with the event ids themselves reads as the same record.
    data = orjson.loads(records["1"])
    data["recent"] = ids[-RECENT_EVENTS:]
    del data["last"]
    older = ItemRecord.from_bytes(orjson.dumps(data))
    assert older.recent == record.recent and older.last_event_id == ids[-1]


# --- the loop on the real broker ------------------------------------------------------


@contextmanager
def running(settings: Settings, encoder: ConcatItemEncoder) -> Iterator[QdrantStore]:
    store = QdrantStore(settings, encoder.dim)
    table = ChangelogTable(settings, settings.changelog(SERVICE, TABLE))
    loop = BatchConsumer(
        settings,
        SERVICE,
        [MOVIES, ITEM_FEEDBACK],
        make_handler(settings, encoder, store, table),
        ready_file=settings.ready_file(SERVICE),
        table=table,
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield store
    finally:
        loop.stop()
        thread.join(30)
        assert not thread.is_alive()
        store.close()


@pytest.mark.integration
def test_movies_become_item_embeddings_and_points(
    make_settings: SettingsFactory, encoder: ConcatItemEncoder
) -> None:
    settings = make_settings()
    with running(settings, encoder) as store:
        for m in MOVIES_[:2]:
            produce_raw(settings, MOVIES, encode(m), m.movie_id.encode())
        produce_raw(settings, MOVIES, b'{"movie_id": "9", "title": ""}', b"9")
        produce_raw(settings, MOVIES, encode(MOVIES_[2]), b"3")
        events = read_topic(settings, ITEM_EMBEDDINGS, lambda events: len(events) >= 3)
        letters = read_topic(settings, DEAD_LETTERS, lambda events: len(events) >= 1)
        assert all(isinstance(e, ItemEmbedded) for e in events)
        by_id = {e.movie_id: e for e in events if isinstance(e, ItemEmbedded)}
        # Every embedding on the topic is in Qdrant by the time it is published.
        assert store.count() == 3
        for movie_id, event in by_id.items():
            assert store.search(event.vector, k=1)[0][0] == movie_id
    assert set(by_id) == {"1", "2", "3"}
    for event in by_id.values():
        assert event.model_version == encoder.model_version
        assert event.published_at is not None
        assert np.linalg.norm(event.vector) == pytest.approx(1.0, abs=1e-5)
    (letter,) = letters
    assert isinstance(letter, DeadLetter)
    assert letter.service == SERVICE
    assert letter.source_topic == settings.topic(MOVIES.name)
    assert letter.key == "9"
    assert "title" in letter.error and "at least 1 character" in letter.error
    # The valid movie published after the invalid one was embedded (checked above: "3").


@pytest.mark.integration
def test_ratings_move_a_new_movie_and_a_restart_builds_on_the_stored_sum(
    make_settings: SettingsFactory, encoder: ConcatItemEncoder
) -> None:
    settings = make_settings(item_pull=0.5)
    rng = np.random.default_rng(4)
    tastes = [rng.normal(size=encoder.dim).astype(np.float32) for _ in range(3)]

    def moved(n: int) -> ItemEmbedded:
        def done(events: list) -> bool:
            return any(isinstance(e, ItemEmbedded) and e.online_ratings == n for e in events)

        events = read_topic(settings, ITEM_EMBEDDINGS, done, timeout_s=60)
        return next(e for e in events if isinstance(e, ItemEmbedded) and e.online_ratings == n)

    with running(settings, encoder):
        produce_raw(settings, MOVIES, encode(MOVIES_[0]), b"1")
        content = moved(0)
        for i in (0, 1):
            produce_raw(settings, ITEM_FEEDBACK, encode(rated("1", tastes[i], i)), b"1")
        moved(2)
    # Restarted, the loop restores the movie's record from the changelog.
    with running(settings, encoder) as store:
        produce_raw(settings, ITEM_FEEDBACK, encode(rated("1", tastes[2], 2)), b"1")
        thrice = moved(3)
        assert store.search(thrice.vector, k=1)[0][0] == "1"
    expected = unit(content.vector + 0.5 * (tastes[0] + tastes[1] + tastes[2]))
    np.testing.assert_allclose(thrice.vector, expected, atol=1e-6)


# --- the worker process ---------------------------------------------------------------


# Settings the worker must not inherit from the caller's shell in these tests.
FOREIGN = ("CLIP_WEIGHTS", "CLIP_MODEL", "CLIP_MODEL_CONFIG", "TEXT_MODEL", "QDRANT_URL")


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k not in FOREIGN},
        "HF_HUB_OFFLINE": "1",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REELSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "REELSTREAM_VAR_DIR": str(settings.var_dir),
        "QDRANT_PATH": str(settings.qdrant_path),
        "REELSTREAM_DEVICE": "cpu",
        "REELSTREAM_TRAINED_MODELS": str(settings.trained_models).lower(),
    }


@pytest.mark.integration
@pytest.mark.slow
def test_worker_process_serves_and_stops_on_sigterm(
    make_settings: SettingsFactory, encoder: ConcatItemEncoder
) -> None:
    settings = make_settings()
    ready = settings.ready_file(SERVICE)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.item_embedding", "worker"],
        cwd=REPO,
        env=worker_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.2)
        produce_raw(settings, MOVIES, encode(MOVIES_[0]), b"1")
        (event,) = read_topic(settings, ITEM_EMBEDDINGS, lambda events: len(events) >= 1)
        assert isinstance(event, ItemEmbedded)
        assert event.movie_id == "1"
        assert event.model_version == "concat-v1+all-MiniLM-L6-v2+img-off"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-3000:]
    assert not ready.exists()
    assert "text on, metadata on, image off (CLIP_WEIGHTS not set)" in stderr
    # The worker closed Qdrant on exit: the storage can be opened again, with the point.
    with QdrantStore(settings, encoder.dim) as store:
        assert store.count() == 1


@pytest.mark.slow
def test_worker_refuses_to_start_on_a_bad_configuration(tmp_path: Path) -> None:
    env = {
        **worker_env(Settings(var_dir=tmp_path / "var", qdrant_path=tmp_path / "q")),
        "TEXT_MODEL": str(tmp_path / "no-model"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "services.item_embedding", "worker"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "not a local sentence-transformers" in result.stderr

"""The item-embedding service: the handler on real models and Qdrant, then the whole
loop on the real broker, then the worker process itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    MOVIES,
    DeadLetter,
    ItemEmbedded,
    MoviePublished,
    People,
    encode,
)
from shared.handlers.item_embedding import handle_movies, make_handler
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.message import Incoming, Outgoing, Source
from shared.models.item_encoder import ConcatItemEncoder
from shared.models.text import TextEncoder
from shared.retrieval.qdrant_store import QdrantStore
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw, read_topic

REPO = Path(__file__).resolve().parents[2]
SERVICE = "item-embedding"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def encoder() -> ConcatItemEncoder:
    return ConcatItemEncoder(TextEncoder())


def movie(movie_id: str, title: str, **fields: object) -> MoviePublished:
    return MoviePublished.model_validate({"movie_id": movie_id, "title": title, **fields})


def embedded(outgoings: list[Outgoing]) -> list[ItemEmbedded]:
    assert all(o.spec == ITEM_EMBEDDINGS for o in outgoings)
    events = [o.event for o in outgoings]
    assert all(isinstance(e, ItemEmbedded) for e in events)
    return [e for e in events if isinstance(e, ItemEmbedded)]


def incoming(event: MoviePublished, offset: int, timestamp_ms: int | None) -> Incoming:
    source = Source(
        topic="movies",
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
    expected = encoder.encode(MOVIES_)
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


# --- the loop on the real broker ------------------------------------------------------


@contextmanager
def running(settings: Settings, encoder: ConcatItemEncoder) -> Iterator[QdrantStore]:
    store = QdrantStore(settings, encoder.dim)
    loop = BatchConsumer(
        settings,
        SERVICE,
        [MOVIES],
        make_handler(encoder, store),
        ready_file=settings.ready_file(SERVICE),
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

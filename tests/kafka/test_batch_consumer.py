"""The micro-batch loop on the real broker: dead letters, error policy, commits."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from infra.stack import child_env
from shared.config import Settings
from shared.events import DEAD_LETTERS, MOVIES, RATINGS, DeadLetter, Event, RatingSubmitted
from shared.exceptions import UnprocessableEventError
from shared.kafka.batch_consumer import STALLED_EXIT, BatchConsumer, BatchHandler
from shared.kafka.client import make_producer
from shared.kafka.message import Incoming, Outgoing, Source
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw, read_topic

pytestmark = pytest.mark.integration


def rating(user: str, movie: str, stars: float = 4.0) -> bytes:
    return (
        f'{{"user_id": "{user}", "movie_id": "{movie}", "rating": {stars}, '
        f'"occurred_at": 881250949}}'
    ).encode()


@contextmanager
def running(settings: Settings, handler: BatchHandler) -> Iterator[BatchConsumer]:
    loop = BatchConsumer(
        settings, "test", [RATINGS], handler, ready_file=settings.ready_file("test")
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stop()
        thread.join(30)
        assert not thread.is_alive()


def dead_letters(settings: Settings, n: int) -> list[DeadLetter]:
    events = read_topic(settings, DEAD_LETTERS, lambda ev: len(ev) >= n)
    return [e for e in events if isinstance(e, DeadLetter)]


def test_bad_input_is_dead_lettered_and_the_next_valid_event_processed(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(max_message_bytes=2048)
    seen: list[RatingSubmitted] = []
    done = threading.Event()

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        for incoming in batch:
            assert isinstance(incoming.event, RatingSubmitted)
            seen.append(incoming.event)
            if incoming.event.movie_id == "last":
                done.set()
        return []

    with running(settings, handler):
        produce_raw(settings, RATINGS, b"{not json", b"1")
        produce_raw(settings, RATINGS, b'{"user_id": "1", "rating": "x"}', b"1")
        produce_raw(settings, RATINGS, rating("1", "9", stars=7), b"1")
        produce_raw(settings, RATINGS, rating("1", "9") + b" " * 3000, b"1")
        produce_raw(settings, RATINGS, rating("1", "9"), b"not-the-user")
        produce_raw(settings, RATINGS, rating("1", "last"), b"1")
        letters = dead_letters(settings, 5)
        assert done.wait(30)

    reasons = sorted(letter.error for letter in letters)
    assert any("invalid JSON" in r for r in reasons)
    assert any("rating: Input should be less than or equal to 5" in r for r in reasons)
    assert any("exceeds the limit" in r for r in reasons)
    assert any("must be the user_id" in r for r in reasons)
    assert all(
        letter.service == "test" and letter.source_topic.endswith("ratings") for letter in letters
    )
    assert [e.movie_id for e in seen] == ["last"]


def test_an_event_the_handler_cannot_process_is_dead_lettered_alone(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    handled: list[str] = []

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        movies = [i.event.movie_id for i in batch if isinstance(i.event, RatingSubmitted)]
        if "poison" in movies:
            raise UnprocessableEventError("movie poison cannot be rated")
        handled.extend(movies)
        return []

    with running(settings, handler):
        for movie in ("a", "poison", "b"):
            produce_raw(settings, RATINGS, rating("2", movie), b"2")
        letters = dead_letters(settings, 1)
    assert "UnprocessableEventError: movie poison cannot be rated" in letters[0].error
    assert letters[0].offset == 1
    assert "a" in handled and "b" in handled and "poison" not in handled


def test_sources_ahead_are_handled_in_a_batch_of_their_own_first(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    producer = make_producer(settings)
    for i in range(200):
        producer.produce(settings.topic(RATINGS.name), rating("3", f"m{i}"), b"3")
    producer.produce(settings.topic(MOVIES.name), b'{"movie_id": "new", "title": "New"}', b"new")
    assert producer.flush(10) == 0
    batches: list[list[str]] = []
    done = threading.Event()

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        batches.append([type(i.event).__name__ for i in batch])
        if sum(map(len, batches)) == 201:
            done.set()
        return []

    loop = BatchConsumer(settings, "test", [RATINGS, MOVIES], handler, ahead=[MOVIES])
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        assert done.wait(30)
    finally:
        loop.stop()
        thread.join(30)
    # Never in a batch with ratings.
    assert ["MoviePublished"] in batches
    assert all(len(set(batch)) == 1 for batch in batches), batches
    assert sum(batch.count("RatingSubmitted") for batch in batches) == 200
    # Fetched together, the movie goes first.
    fetched = [
        Source(settings.topic(topic.name), 0, offset, None, None, None)
        for topic, offset in [(RATINGS, 0), (MOVIES, 0), (RATINGS, 1), (MOVIES, 1)]
    ]
    first, rest = loop.batches(fetched)
    assert first == [fetched[1], fetched[3]] and rest == [fetched[0], fetched[2]]
    assert loop.batches(fetched[::2]) == [fetched[::2]]
    assert loop.batches([]) == [[]]


def test_offsets_are_committed_after_the_work_so_a_restart_resumes(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    seen: list[str] = []
    got = threading.Condition()

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        with got:
            seen.extend(i.event.movie_id for i in batch if isinstance(i.event, RatingSubmitted))
            got.notify_all()
        return []

    def wait_for(n: int) -> None:
        with got:
            assert got.wait_for(lambda: len(seen) >= n, timeout=30), seen

    with running(settings, handler) as loop:
        produce_raw(settings, RATINGS, rating("3", "m1"), b"3")
        wait_for(1)
        assert settings.ready_file("test").exists()
    assert not settings.ready_file("test").exists()
    with running(settings, handler):
        produce_raw(settings, RATINGS, rating("3", "m2"), b"3")
        wait_for(2)
    assert seen == ["m1", "m2"]
    assert loop.processed == 1


STALLING_WORKER = """
import time
from shared.config import Settings
from shared.events import RATINGS
from shared.kafka.batch_consumer import BatchConsumer

def handler(batch):
    print("handling", len(batch), flush=True)
    time.sleep(120)  # a call that never returns, as far as the loop can tell
    return []

BatchConsumer(Settings(), "stall", [RATINGS], handler).run()
"""


def test_a_loop_stuck_in_a_call_ends_its_process_to_be_restarted(
    make_settings: SettingsFactory,
) -> None:
    """A Kafka client call that hangs past its timeout (seen: send_offsets_to_transaction
    after a broker restart) must not leave a worker stuck while it looks alive."""
    settings = make_settings(stall_s=3.0)
    produce_raw(settings, RATINGS, rating("1", "9"), b"1")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", STALLING_WORKER],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )

    assert result.returncode == STALLED_EXIT, result.stderr[-2000:]
    assert "handling 1" in result.stdout
    assert "loop stalled" in result.stderr and "in handler" in result.stderr
    assert time.monotonic() - started < 60

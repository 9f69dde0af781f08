"""``run_stream`` against the running stack: the four real services (started by
``infra.stack`` as ``make up`` starts them) on the real broker, with the real text model
and embedded Qdrant, replaying a tiny TRAIN/TEST cut and reading the lists back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra import broker, stack
from infra.lab.evaluation.stream import StreamResult, run_stream
from infra.topics import ensure_topics
from shared.config import Settings
from shared.events import (
    MoviePublished,
    RatingSubmitted,
)
from shared.exceptions import ConfigurationError
from tests.kafka_helpers import list_caused_by

ANIMATION = ["Animation", "Children's", "Comedy"]
HORROR = ["Horror", "Thriller"]
MOVIES = [
    MoviePublished(movie_id="m1", title="Toy Story", genres=ANIMATION,
                   overview="A cowboy doll is threatened by a new spaceman action figure."),
    MoviePublished(movie_id="m2", title="Toy Story 2", genres=ANIMATION,
                   overview="Woody the toy cowboy is stolen by a toy collector."),
    MoviePublished(movie_id="m3", title="A Bug's Life", genres=ANIMATION,
                   overview="An ant recruits circus bugs to fight greedy grasshoppers."),
    MoviePublished(movie_id="m4", title="Finding Nemo", genres=ANIMATION,
                   overview="A clownfish crosses the ocean to find his son."),
    MoviePublished(movie_id="m5", title="The Shining", genres=HORROR,
                   overview="A caretaker of an isolated hotel descends into madness."),
    MoviePublished(movie_id="m6", title="Halloween", genres=HORROR,
                   overview="A masked killer stalks babysitters on Halloween night."),
    MoviePublished(movie_id="m7", title="The Exorcist", genres=HORROR,
                   overview="A priest tries to save a girl possessed by a demon."),
    MoviePublished(movie_id="m8", title="Alien", genres=HORROR,
                   overview="A deadly creature hunts the crew of a spaceship."),
]  # fmt: skip
BASE = {m.movie_id for m in MOVIES}
ARRIVING = [
    MoviePublished(movie_id="a1", title="Monsters, Inc.", genres=ANIMATION,
                   overview="Monsters who scare children find a little girl."),
    MoviePublished(movie_id="a2", title="Scream", genres=HORROR,
                   overview="A killer in a ghost mask murders teenagers."),
]  # fmt: skip

CATALOGUE = BASE | {m.movie_id for m in ARRIVING}

T0 = datetime(1998, 1, 1, tzinfo=UTC)

# u1 and u2 rate in TRAIN and TEST, u3 only in TEST (a cold user).
TRAIN_PAIRS = [
    ("u1", "m1"), ("u2", "m5"), ("u1", "m2"), ("u2", "m6"), ("u1", "m3"), ("u2", "m7"),
    ("u1", "m4"), ("u2", "m8"), ("u1", "m7"), ("u2", "m3"), ("u1", "m8"), ("u2", "m4"),
    ("u2", "m2"),
]  # fmt: skip
TEST_PAIRS = [("u1", "m5"), ("u3", "m1"), ("u1", "m6"), ("u2", "m1"), ("u3", "m2"), ("u3", "m3")]
# The arrivals variant: a1 and a2 are first rated in TEST, at index 1 and 4.
ARRIVAL_TEST_PAIRS = [
    ("u1", "m5"), ("u2", "a1"), ("u3", "m1"), ("u2", "m1"), ("u1", "a2"), ("u1", "m6"),
]  # fmt: skip
ARRIVALS = {"a1": 1, "a2": 4}


def ratings(pairs: list[tuple[str, str]]) -> list[RatingSubmitted]:
    return [
        RatingSubmitted(
            event_id=f"e{i}",
            user_id=user,
            movie_id=movie,
            rating=5.0 if (i) % 3 else 3.5,
            occurred_at=T0 + timedelta(hours=i),
        )
        for i, (user, movie) in enumerate(pairs)
    ]


def seventy_thirty(test_pairs: list[tuple[str, str]]) -> tuple[list[RatingSubmitted], ...]:
    stream = ratings(TRAIN_PAIRS + test_pairs)
    cut = len(stream) * 7 // 10
    assert cut == len(TRAIN_PAIRS)  # the 70/30 cut falls where the pairs say
    return stream[:cut], stream[cut:]


@pytest.fixture(scope="module")
def running(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A whole stack of our own: a fresh topic prefix on the session broker. Lists are
    longer than the catalogue, so every list holds every movie its user has not rated."""
    var: Path = tmp_path_factory.mktemp("stream-stack")
    settings = Settings(
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=f"s{uuid.uuid4().hex[:10]}.",
        topic_partitions=2,
        var_dir=var / "var",
        qdrant_path=var / "qdrant",
        ingest_http_port=broker.free_port(),
        api_http_port=broker.free_port(),
        top_k=20,
        rating_wait_s=30.0,
    )
    ensure_topics(settings)
    lines: list[str] = []
    try:
        stack.up(settings, timeout_s=420, out=lines.append)
        yield settings
    finally:
        stack.down(settings, out=lines.append)
        print("\n".join(lines))


def rated_before(test: list[RatingSubmitted], train: list[RatingSubmitted]) -> list[set[str]]:
    """For each TEST rating, the movies its user rated before it."""
    seen: dict[str, set[str]] = {}
    for r in train:
        seen.setdefault(r.user_id, set()).add(r.movie_id)
    out = []
    for r in test:
        out.append(set(seen.get(r.user_id, set())))
        seen.setdefault(r.user_id, set()).add(r.movie_id)
    return out


def check_lists(
    result: StreamResult, train: list[RatingSubmitted], test: list[RatingSubmitted]
) -> None:
    """Every TEST rating whose user rated before holds exactly the list of that history:
    every catalogue movie the user has not rated (the list is longer than the
    catalogue), never one they have."""
    assert [e.rating for e in result.events] == test
    assert (result.train_published, result.test_published) == (len(train), len(test))
    assert result.timeouts == 0
    for event, before in zip(result.events, rated_before(test, train), strict=True):
        if not before:
            # The newcomers' list last read, if one was published during the run.
            assert not event.exact, event
            assert event.recommended is None or set(event.recommended) <= CATALOGUE, event
            continue
        assert event.exact, event
        assert event.recommended is not None
        assert not before & set(event.recommended), (event, before)
        assert set(event.recommended) & BASE == BASE - before, (event, before)
        assert event.predicted is not None and 0.5 <= event.predicted <= 5.0


@pytest.mark.integration
@pytest.mark.slow
def test_each_test_rating_gets_the_list_caused_by_its_users_previous_rating(
    running: Settings,
) -> None:
    train, test = seventy_thirty(TEST_PAIRS)

    result = run_stream(running, MOVIES, train, test, list_timeout_s=60, progress=False)

    check_lists(result, train, test)
    # u1's first TEST rating holds the list caused by u1's last TRAIN rating, as the
    # topic has it; u3 rated nothing before.
    last_train_u1 = [r for r in train if r.user_id == "u1"][-1]
    published = list_caused_by(running, f"{result.run_id}.{last_train_u1.event_id}")
    assert published.user_id == f"{result.run_id}.u1"
    assert result.events[0].recommended == [item.movie_id for item in published.items]
    assert result.events[0].recommended is not None
    assert set(result.events[0].recommended) & BASE == {"m5", "m6"}
    assert not result.events[1].exact
    # Two lists per TEST user with history at least: the TRAIN one and the TEST ones.
    assert result.lists_read >= len(test)

    # A second run on the same (now used) stack starts every user afresh: were user
    # ids not namespaced, u1 would still hold the first run's movies as rated.
    again = run_stream(running, MOVIES, train, test, list_timeout_s=60, progress=False)

    assert again.run_id != result.run_id
    check_lists(again, train, test)


@pytest.mark.integration
@pytest.mark.slow
def test_movies_arriving_mid_stream_are_not_recommended_before_they_arrive(
    running: Settings,
) -> None:
    train, test = seventy_thirty(ARRIVAL_TEST_PAIRS)

    result = run_stream(
        running,
        MOVIES + ARRIVING,
        train,
        test,
        arrivals=ARRIVALS,
        list_timeout_s=60,
        progress=False,
    )

    check_lists(result, train, test)
    for movie_id, index in ARRIVALS.items():
        for event in result.events[:index]:
            assert movie_id not in (event.recommended or []), (movie_id, event)
    # The ratings of the arriving movies were applied (they waited for the vectors):
    # the next ratings of their users hold the lists they caused.
    assert result.events[3].exact and "a1" not in (result.events[3].recommended or [])
    assert result.events[5].exact and "a2" not in (result.events[5].recommended or [])

    # Now a1 and a2 are in the catalogue: the variant would be meaningless.
    with pytest.raises(ConfigurationError, match="fresh stack"):
        run_stream(running, MOVIES + ARRIVING, train, test, arrivals=ARRIVALS, progress=False)


def test_ids_too_long_once_namespaced_are_refused_before_publishing(tmp_path: Path) -> None:
    # Nothing listens on this address: the check must come before any broker call.
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9", var_dir=tmp_path)
    train, test = seventy_thirty(TEST_PAIRS)

    with pytest.raises(ValueError, match="too long"):
        run_stream(settings, MOVIES, train, test, run_id="r" * 62, progress=False)
    with pytest.raises(ValueError, match="outside the TEST stream"):
        run_stream(
            settings, MOVIES + ARRIVING, train, test, arrivals={"a1": len(test)}, progress=False
        )
    with pytest.raises(ValueError, match="not among the movies"):
        run_stream(settings, MOVIES, train, test, arrivals={"a1": 0}, progress=False)

"""Fuzz the running stack with bad input: over 10,000 generated events (hypothesis) that
the contract refuses, of every kind, interleaved with valid ratings, on the real
services (the ``running`` stack of tests/test_pipeline.py, built afresh for this module).

Checks: every bad message is dead-lettered with a reason (dead letters are matched to
messages by source topic, partition and offset), no service stops or restarts, and every
valid rating is applied (each fuzz user's last profile counts them all; their last
rating gets its list)."""

from __future__ import annotations

import itertools
import json
import random
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from infra import stack
from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    MOVIES,
    NEWCOMERS_USER_ID,
    RATINGS,
    USER_PROFILES,
    DeadLetter,
    Event,
    TopicSpec,
    UserProfileUpdated,
)
from shared.kafka.client import make_producer
from tests.kafka_helpers import list_caused_by, read_topic
from tests.test_pipeline import (
    CATALOGUE,
    running,  # noqa: F401  (the module's own whole stack)
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_BAD = 10_000
N_OVERSIZED = 8
N_VALID = 300
FUZZ_USERS = [f"fuzz-{i}" for i in range(5)]
MAX_MESSAGE_BYTES = 20_000  # the `running` fixture's max_message_bytes

# --- Generation ----------------------------------------------------------------------

ID_CHARS = string.ascii_letters + string.digits + "-_."
good_id = st.text(ID_CHARS, min_size=1, max_size=20)
catalogue_movie = st.sampled_from(sorted(CATALOGUE))
good_time: st.SearchStrategy[Any] = st.one_of(
    st.floats(0, 4e9, allow_nan=False),
    st.integers(0, 4_000_000_000),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
)
good_stars = st.floats(0.5, 5.0) | st.integers(1, 5)
_serial = itertools.count()
"""Suffixes that make each drawn event_id unique: hypothesis draws the same small values
again and again, and by contract a repeated event_id is a copy (skipped, not an error)."""


@st.composite
def valid_rating(draw: st.DrawFn, user: str) -> dict[str, Any]:
    event: dict[str, Any] = {
        "user_id": user,
        "movie_id": draw(catalogue_movie.flatmap(lambda m: st.sampled_from([m, int(m)]))),
        "rating": draw(good_stars),
        "occurred_at": draw(good_time),
    }
    if draw(st.booleans()):
        event["event_id"] = (
            f"v-{uuid.UUID(int=draw(st.integers(0, 2**128 - 1))).hex}-{next(_serial)}"
        )
    return event


@st.composite
def shaped_rating(draw: st.DrawFn) -> dict[str, Any]:
    """A rating that is valid in itself (a ghost user, a catalogue movie)."""
    return {
        "event_id": f"{draw(good_id)}-{next(_serial)}",
        "user_id": "ghost-" + draw(good_id),
        "movie_id": draw(catalogue_movie),
        "rating": draw(good_stars),
        "occurred_at": draw(good_time),
    }


@st.composite
def shaped_movie(draw: st.DrawFn) -> dict[str, Any]:
    """A movie that is valid in itself (ids far from the catalogue's)."""
    movie: dict[str, Any] = {
        "movie_id": "fz" + draw(good_id),
        "title": draw(st.text(string.ascii_letters + " ", min_size=1, max_size=30)).strip() or "T",
    }
    if draw(st.booleans()):
        movie["year"] = draw(st.integers(1870, 2100))
    if draw(st.booleans()):
        movie["genres"] = draw(st.lists(st.sampled_from(["Drama", "Horror"]), max_size=3))
    return movie


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
not_a_number = st.one_of(
    st.text(string.digits + ".", min_size=1, max_size=6),  # "4", "2000"
    st.booleans(),
    st.none(),
    st.lists(json_scalar, max_size=3),
    st.dictionaries(st.text(max_size=4), json_scalar, max_size=2),
)
not_an_id = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none(),
    st.lists(json_scalar, min_size=0, max_size=3),
    st.dictionaries(st.text(max_size=4), json_scalar, max_size=2),
    st.just(""),
    st.text(" \t\n", min_size=1, max_size=4),  # blank: empty once stripped
    st.text(ID_CHARS, min_size=65, max_size=90),  # too long
    st.integers(10**64, 10**70),  # a number of more than 64 digits
)
not_a_time = st.one_of(
    st.booleans(),
    st.none(),
    st.text(string.digits, min_size=1, max_size=10),  # epoch seconds as text
    st.text(string.ascii_letters, min_size=1, max_size=10),
    st.lists(st.integers(), max_size=2),
)
out_of_range_stars = st.one_of(
    st.floats(max_value=0.5, exclude_max=True, allow_nan=False, allow_infinity=False),
    st.floats(min_value=5.0, exclude_min=True, allow_nan=False, allow_infinity=False),
    st.integers(6, 2**63 - 1),
    st.integers(-(2**63), 0),
    st.sampled_from([1e308, -1e308, 5.000001, 0.4999999]),
)
unknown_key = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


def _one_field(
    base: st.SearchStrategy[dict[str, Any]], fields: list[str], bad: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(base, st.sampled_from(fields), bad).map(lambda t: {**t[0], t[1]: t[2]})


def _missing(
    base: st.SearchStrategy[dict[str, Any]], required: list[str]
) -> st.SearchStrategy[dict[str, Any]]:
    def drop(t: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
        return {k: v for k, v in t[0].items() if k not in t[1]}

    return st.tuples(base, st.lists(st.sampled_from(required), min_size=1, unique=True)).map(drop)


def _extra(
    base: st.SearchStrategy[dict[str, Any]], known: set[str]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(
        base,
        st.dictionaries(
            unknown_key.filter(lambda k: k not in known), json_value, min_size=1, max_size=3
        ),
    ).map(lambda t: {**t[0], **t[1]})


@dataclass(frozen=True)
class Bad:
    kind: str
    spec: TopicSpec
    value: bytes | None
    key: bytes | None


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False).encode()


def _keyed(kind: str, spec: TopicSpec, field: str) -> Callable[[dict[str, Any]], Bad]:
    """The message of an event keyed as the contract asks (the key is its id, as text)."""

    def build(event: dict[str, Any]) -> Bad:
        raw = event.get(field)
        key = (
            str(raw).strip().encode()
            if isinstance(raw, str | int) and not isinstance(raw, bool)
            else b"x"
        )
        return Bad(kind, spec, _dumps(event), key)

    return build


RATING_FIELDS = ["event_id", "user_id", "movie_id", "rating", "occurred_at"]
MOVIE_FIELDS = ["movie_id", "title", "year", "genres", "overview", "people", "poster", "metadata"]

bad_rating_events: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "rating-missing": _missing(shaped_rating(), ["user_id", "movie_id", "rating", "occurred_at"]),
    "rating-unknown-field": _extra(shaped_rating(), set(RATING_FIELDS)),
    "rating-stars-wrong-type": _one_field(shaped_rating(), ["rating"], not_a_number),
    "rating-stars-out-of-range": _one_field(shaped_rating(), ["rating"], out_of_range_stars),
    "rating-bad-id": _one_field(shaped_rating(), ["event_id", "user_id", "movie_id"], not_an_id),
    "rating-bad-time": _one_field(shaped_rating(), ["occurred_at"], not_a_time),
    "rating-newcomers": _one_field(shaped_rating(), ["user_id"], st.just(NEWCOMERS_USER_ID)),
}
bad_movie_events: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "movie-missing": _missing(shaped_movie(), ["movie_id", "title"]),
    "movie-unknown-field": _extra(shaped_movie(), set(MOVIE_FIELDS)),
    "movie-empty-title": _one_field(shaped_movie(), ["title"], st.text(" \t", max_size=3)),
    "movie-wrong-types": st.one_of(
        _one_field(shaped_movie(), ["title"], not_an_id.filter(lambda v: not isinstance(v, str))),
        _one_field(shaped_movie(), ["year"], not_a_number.filter(lambda v: v is not None)),
        _one_field(
            shaped_movie(), ["year"], st.integers(2101, 10**6) | st.integers(-(10**6), 1869)
        ),
        _one_field(
            shaped_movie(),
            ["genres"],
            st.text(min_size=1)
            | st.lists(st.just(""), min_size=1, max_size=2)
            | st.lists(st.integers(), min_size=1, max_size=3),
        ),
        _one_field(
            shaped_movie(),
            ["people"],
            st.dictionaries(
                unknown_key.filter(lambda k: k not in {"directors", "cast", "writers"}),
                json_value,
                min_size=1,
                max_size=2,
            )
            | st.lists(st.text(), max_size=2),
        ),
        _one_field(
            shaped_movie(),
            ["overview", "poster"],
            st.booleans() | st.integers() | st.lists(st.text(), min_size=1, max_size=2),
        ),
        _one_field(
            shaped_movie(),
            ["metadata"],
            st.lists(json_scalar, max_size=2)
            | st.dictionaries(
                st.text(max_size=4),
                st.dictionaries(st.text(max_size=3), json_scalar, min_size=1, max_size=2),
                min_size=1,
                max_size=2,
            ),
        ),
    ),
    "movie-bad-id": _one_field(shaped_movie(), ["movie_id"], not_an_id),
}


def _wrong_key(
    spec: TopicSpec, field: str, base: st.SearchStrategy[dict[str, Any]]
) -> st.SearchStrategy[Bad]:
    def build(t: tuple[dict[str, Any], bytes | None]) -> Bad:
        event, key = t
        return Bad(f"{spec.name}-wrong-key", spec, _dumps(event), key)

    keys = (
        st.none()
        | st.binary(max_size=12)
        | st.text(ID_CHARS, min_size=1, max_size=12).map(str.encode)
    )
    if spec.compacted:
        keys = st.binary(min_size=1, max_size=12)  # the broker refuses no key on these
    right = lambda t: t[1] != str(t[0][field]).encode()  # noqa: E731
    return st.tuples(base, keys).filter(right).map(build)


def _raw(kind: str, spec: TopicSpec) -> st.SearchStrategy[Bad]:
    values = st.one_of(
        st.none(),  # a tombstone
        st.just(b""),
        st.binary(min_size=1, max_size=40),
        st.text(max_size=40).map(str.encode).filter(lambda b: not _is_object(b)),
        json_value.filter(lambda v: not isinstance(v, dict)).map(_dumps),  # not an object
        st.just(b'{"rating": NaN}'),
    )
    keys = st.binary(min_size=1 if spec.compacted else 0, max_size=8)
    return st.tuples(values, keys).map(lambda t: Bad(kind, spec, t[0], t[1]))


def _truncated(spec: TopicSpec, base: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Bad]:
    def cut(t: tuple[dict[str, Any], int]) -> Bad:
        raw = _dumps(t[0])
        return Bad(f"{spec.name}-truncated", spec, raw[: max(1, t[1] % len(raw))], b"k")

    return st.tuples(base, st.integers(0, 10_000)).map(cut)


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


bad_message = st.one_of(
    *[st.builds(_keyed(k, RATINGS, "user_id"), s) for k, s in bad_rating_events.items()],
    *[st.builds(_keyed(k, MOVIES, "movie_id"), s) for k, s in bad_movie_events.items()],
    _wrong_key(RATINGS, "user_id", shaped_rating()),
    _wrong_key(MOVIES, "movie_id", shaped_movie()),
    _raw("ratings-not-json", RATINGS),
    _raw("movies-not-json", MOVIES),
    _truncated(RATINGS, shaped_rating()),
    _truncated(MOVIES, shaped_movie()),
    # Valid in shape, but the movie never gets a vector: parks, then dead-lettered.
    st.builds(
        _keyed("rating-unknown-movie", RATINGS, "user_id"),
        shaped_rating().map(lambda r: {**r, "movie_id": "nomovie-" + str(r["event_id"])}),
    ),
)


def _oversized(i: int) -> Bad:
    pad = "x" * (MAX_MESSAGE_BYTES + 1 + 5_000 * i)
    if i % 2:
        event = {
            "movie_id": f"big{i}",
            "title": "Big",
            "overview": pad[:19_000],
            "metadata": {"p": pad},
        }
        return Bad("movies-oversized", MOVIES, _dumps(event), f"big{i}".encode())
    rating: dict[str, Any] = {
        "user_id": f"big{i}",
        "movie_id": "1",
        "rating": 4.0,
        "occurred_at": 1.0,
        "x": pad,
    }
    return Bad("ratings-oversized", RATINGS, _dumps(rating), f"big{i}".encode())


def generate(n_bad: int, n_valid: int) -> tuple[list[Bad], list[tuple[str, dict[str, Any]]]]:
    """``n_bad`` bad messages and ``n_valid`` valid ratings of the fuzz users, drawn by
    hypothesis, deterministically (fixed seed, no database)."""
    bad: list[Bad] = []
    valid: list[tuple[str, dict[str, Any]]] = []
    per_example = 50

    @hsettings(
        max_examples=-(-n_bad // per_example) + 10,
        database=None,
        derandomize=True,  # the same examples every run
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        drawn = data.draw(st.lists(bad_message, min_size=per_example, max_size=per_example))
        for _ in range(2):
            user = data.draw(st.sampled_from(FUZZ_USERS))
            valid.append((user, data.draw(valid_rating(user))))
        bad.extend(drawn)

    collect()
    assert len(bad) >= n_bad and len(valid) >= n_valid, (len(bad), len(valid))
    return bad[-n_bad:], valid[-n_valid:]


# --- The test --------------------------------------------------------------------------

Where = tuple[str, int, int]
"""A message's topic (with prefix), partition and offset."""


def publish(
    settings: Settings, messages: list[tuple[TopicSpec, bytes | None, bytes | None]]
) -> list[Where]:
    """Publish in order with one producer; returns where each message landed."""
    producer = make_producer(settings)
    placed: list[Where | None] = [None] * len(messages)
    failures: list[str] = []

    def delivered(i: int) -> Callable[[Any, Any], None]:
        def report(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(f"message {i}: {error}")
            else:
                placed[i] = (message.topic(), message.partition(), message.offset())

        return report

    for i, (spec, value, key) in enumerate(messages):
        while True:
            try:
                producer.produce(
                    settings.topic(spec.name), value=value, key=key, on_delivery=delivered(i)
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, [(f, messages[int(f.split()[1][:-1])]) for f in failures[:5]]
    assert all(p is not None for p in placed)
    return [p for p in placed if p is not None]


def missing_letters(bad: dict[Where, Bad], letters: list[DeadLetter]) -> dict[Where, Bad]:
    """The bad messages with no dead letter naming them (with a non-empty error)."""
    named = {
        (letter.source_topic, letter.partition, letter.offset)
        for letter in letters
        if letter.error.strip() and letter.partition is not None and letter.offset is not None
    }
    return {where: b for where, b in bad.items() if where not in named}


def service_processes(settings: Settings) -> dict[str, tuple[int | None, str, int | None]]:
    """Each service's pid, supervisord state and restart count."""
    return {s.name: (s.pid, s.state, s.restarts) for s in stack.status(settings).services}


@pytest.fixture(scope="module")
def fuzz_input() -> Iterator[Future[tuple[list[Bad], list[tuple[str, dict[str, Any]]]]]]:
    """The generated messages, drawn in a thread while ``running`` starts the stack (it
    mostly waits on the services' start-up): generation alone takes half a minute."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(generate, N_BAD, N_VALID)


def test_fuzzed_bad_input_is_dead_lettered_and_valid_ratings_all_apply(
    fuzz_input: Future[tuple[list[Bad], list[tuple[str, dict[str, Any]]]]],
    running: Settings,  # noqa: F811  (requested after fuzz_input: set up after it)
) -> None:
    started = time.monotonic()
    bad, valid = fuzz_input.result(timeout=300)
    bad += [_oversized(i) for i in range(N_OVERSIZED)]
    generated_s = time.monotonic() - started  # waited for it after the stack was up

    # Interleave: the valid ratings at fixed random places among the bad messages. Each
    # user's last valid rating carries an event id, to find the list it causes.
    last_of: dict[str, str] = {}
    for n, (user, event) in reversed(list(enumerate(valid))):
        if user not in last_of:
            last_of[user] = event.setdefault("event_id", f"last-{n}-{uuid.uuid4().hex}")
    order: list[Bad | tuple[str, dict[str, Any]]] = [*bad, *valid]
    random.Random(20261205).shuffle(order)
    # The shuffle must keep each user's valid ratings in their generated order.
    per_user = iter(valid)
    order = [next(per_user) if isinstance(item, tuple) else item for item in order]

    messages: list[tuple[TopicSpec, bytes | None, bytes | None]] = [
        (item.spec, item.value, item.key)
        if isinstance(item, Bad)
        else (RATINGS, _dumps(item[1]), item[0].encode())
        for item in order
    ]
    before = service_processes(running)
    assert all(state == "RUNNING" for _, state, _ in before.values()), before
    published = time.monotonic()
    where = publish(running, messages)
    published_s = time.monotonic() - published

    bad_at = {w: item for w, item in zip(where, order, strict=True) if isinstance(item, Bad)}
    valid_at = {w for w, item in zip(where, order, strict=True) if not isinstance(item, Bad)}
    expected_ratings = Counter(user for user, _ in valid)

    # Every bad message gets a dead letter naming it, with a reason.
    seen: list[DeadLetter] = []

    def all_lettered(events: list[Event]) -> bool:
        seen[:] = [e for e in events if isinstance(e, DeadLetter)]
        return len(seen) >= len(bad_at) and not missing_letters(bad_at, seen)

    try:
        read_topic(running, DEAD_LETTERS, all_lettered, timeout_s=120)
    except AssertionError:
        missing = missing_letters(bad_at, seen)
        kinds = Counter(b.kind for b in missing.values())
        sample = [(w, b.kind, b.key, (b.value or b"")[:200]) for w, b in list(missing.items())[:5]]
        pytest.fail(f"{len(missing)} bad messages not dead-lettered: {kinds}; e.g. {sample}")
    lettered_s = time.monotonic() - published

    # The check itself: without the letters naming one bad message, it is reported.
    dropped = next(iter(bad_at))
    fewer = [s for s in seen if (s.source_topic, s.partition, s.offset) != dropped]
    assert list(missing_letters(bad_at, fewer)) == [dropped]

    # No valid rating is dead-lettered...
    wrongly = [
        letter
        for letter in seen
        if (letter.source_topic, letter.partition, letter.offset) in valid_at
    ]
    assert not wrongly, [(w.source_topic, w.offset, w.error, w.service) for w in wrongly[:5]]

    # ...each one is applied: each fuzz user's last list is caused by their last rating,
    # and the profile it came from counts every valid rating of theirs.
    for user, event_id in last_of.items():
        recs = list_caused_by(running, event_id)
        assert recs.user_id == user

    def last_profiles(events: list[Event]) -> dict[str, UserProfileUpdated]:
        found: dict[str, UserProfileUpdated] = {}
        for e in events:
            if isinstance(e, UserProfileUpdated) and e.user_id in last_of:
                found[e.user_id] = e
        return found

    profiles = last_profiles(
        read_topic(
            running,
            USER_PROFILES,
            lambda ev: (
                all(p.cause_event_id == last_of[u] for u, p in last_profiles(ev).items())
                and set(last_profiles(ev)) == set(last_of)
            ),
            timeout_s=60,
        )
    )
    counts = {user: profiles[user].n_ratings for user in last_of}
    assert counts == dict(expected_ratings)

    # ...and no service stopped or restarted along the way.
    after = service_processes(running)
    assert after == before, {"before": before, "after": after}

    kinds = Counter(b.kind for b in bad_at.values())
    print(
        f"\n{len(bad_at)} bad messages ({len(kinds)} kinds: {dict(kinds)}), {len(valid)} valid "
        f"ratings of {len(last_of)} users; generation awaited {generated_s:.1f} s, "
        f"published in {published_s:.1f} s, all dead-lettered {lettered_s:.1f} s after publishing; "
        f"{len(seen)} dead letters"
    )

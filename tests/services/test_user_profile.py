"""The user-profile service: the pure handler, the item-vector map, and the real worker
(``python -m services.user_profile worker``) on the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    ITEM_FEEDBACK,
    RATINGS,
    USER_PROFILES,
    DeadLetter,
    Event,
    ItemEmbedded,
    ItemRated,
    RatingSubmitted,
    TopicSpec,
    UserProfileUpdated,
    encode,
)
from shared.handlers.user_profile import (
    PROFILE_WINDOW,
    RECENT_EVENTS,
    SERVICE,
    TABLE,
    Rating,
    UserRecord,
    handle_ratings,
    taste,
)
from shared.kafka.client import make_admin, make_consumer, make_producer
from shared.kafka.item_vectors import ItemVectors
from shared.kafka.message import Incoming, Source, parse
from shared.models.updater import RatingWeightedMean
from shared.types import MovieId, UserId, Vector
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw, read_topic

REPO = Path(__file__).resolve().parents[2]
DIM = 12
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = datetime(2024, 5, 2, tzinfo=UTC)
UPDATER = RatingWeightedMean()


def catalogue(n: int, seed: int = 0) -> dict[MovieId, Vector]:
    """Seeded random unit vectors for movies ``m0`` .. ``m{n-1}``."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, DIM)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return {f"m{i}": m[i] for i in range(n)}


def rating_event(user: UserId, movie: MovieId, stars: float, minute: int = 0) -> RatingSubmitted:
    return RatingSubmitted(
        user_id=user, movie_id=movie, rating=stars, occurred_at=T0 + timedelta(minutes=minute)
    )


def incoming(event: RatingSubmitted, offset: int, partition: int = 0) -> Rating:
    """A rating as the agent hands it over: parsed from the bytes a producer sent."""
    source = Source(
        topic="ratings",
        partition=partition,
        offset=offset,
        key=event.user_id.encode(),
        value=encode(event),
        timestamp_ms=1_714_564_800_000 + offset,
    )
    parsed = parse(RATINGS, source, 1_000_000)
    assert isinstance(parsed.event, RatingSubmitted)
    return Incoming(parsed.event, source)


def by_hand(vectors: dict[MovieId, Vector], ratings: list[tuple[MovieId, float]]) -> Vector:
    total = np.sum([stars * vectors[m].astype(np.float64) for m, stars in ratings], axis=0)
    unit: Vector = (total / np.linalg.norm(total)).astype(np.float32)
    return unit


def profiles_of(out: list) -> dict[UserId, UserProfileUpdated]:
    found = [o.event for o in out if isinstance(o.event, UserProfileUpdated)]
    assert len(found) == len({p.user_id for p in found}), "one profile per user per batch"
    return {p.user_id: p for p in found}


def letters_of(out: list) -> list[DeadLetter]:
    return [o.event for o in out if isinstance(o.event, DeadLetter)]


def stored(updated: dict[UserId, UserRecord]) -> dict[UserId, bytes]:
    return {u: s.to_bytes() for u, s in updated.items()}


# --- handler -------------------------------------------------------------------------


def test_one_profile_per_user_per_batch_from_all_its_ratings() -> None:
    vectors = catalogue(6)
    rows = [("u1", "m0", 5.0), ("u2", "m1", 2.0), ("u1", "m2", 1.5), ("u1", "m3", 4.0)]
    rows += [("u2", "m4", 3.0)]
    batch = [incoming(rating_event(u, m, r, i), offset=i) for i, (u, m, r) in enumerate(rows)]

    out, updated = handle_ratings(batch, {}, vectors, UPDATER, NOW, item_model_version="enc-1")

    profiles = profiles_of(out)
    assert set(profiles) == {"u1", "u2"} and not letters_of(out)
    u1 = profiles["u1"]
    assert u1.n_ratings == 3
    assert u1.rated == ["m0", "m2", "m3"]
    assert u1.ratings == [5.0, 1.5, 4.0]
    assert u1.cause_event_id == batch[3].event.event_id
    assert u1.cause_published_at == datetime.fromtimestamp(
        (batch[3].source.timestamp_ms or 0) / 1000, UTC
    )
    assert u1.updated_at == NOW
    assert u1.model_version == f"{UPDATER.model_version}+enc-1"
    assert u1.mean_rating == pytest.approx(UPDATER.mean_rating(updated["u1"].state))
    np.testing.assert_allclose(
        u1.vector, by_hand(vectors, [("m0", 5.0), ("m2", 1.5), ("m3", 4.0)]), atol=1e-6
    )
    assert profiles["u2"].n_ratings == 2
    assert updated["u1"].state.last_offset == 3 and updated["u2"].state.last_offset == 4


def test_batches_continue_from_the_stored_state() -> None:
    vectors = catalogue(4)
    first = [incoming(rating_event("u", "m0", 4.0), 0), incoming(rating_event("u", "m1", 2.0), 1)]
    second = [incoming(rating_event("u", "m2", 5.0), 2), incoming(rating_event("u", "m0", 3.0), 3)]

    _, updated = handle_ratings(first, {}, vectors, UPDATER, NOW)
    out, updated = handle_ratings(second, stored(updated), vectors, UPDATER, NOW)

    profile = profiles_of(out)["u"]
    assert profile.n_ratings == 4
    assert profile.rated == ["m0", "m1", "m2"]  # a re-rated movie is listed once
    assert profile.ratings == [3.0, 2.0, 5.0]  # with its latest stars
    expected = by_hand(vectors, [("m0", 4.0), ("m1", 2.0), ("m2", 5.0), ("m0", 3.0)])
    np.testing.assert_allclose(profile.vector, expected, atol=1e-6)


def test_a_state_written_by_another_model_restarts_its_vector() -> None:
    """Regression: switching the deployed updater (mean -> trained residual) must not
    read the old model's vector as its own; counts and rated movies are kept."""
    vectors = catalogue(4)
    _, updated = handle_ratings(
        [incoming(rating_event("u", "m0", 4.0), 0)], {}, vectors, UPDATER, NOW
    )
    assert updated["u"].state.model == UPDATER.model_version
    foreign = {"u": replace(updated["u"].state, model="some-other-model-v9").to_bytes()}

    out, after = handle_ratings(
        [incoming(rating_event("u", "m1", 2.0), 1)], foreign, vectors, UPDATER, NOW
    )

    profile = profiles_of(out)["u"]
    assert profile.n_ratings == 2 and profile.rated == ["m0", "m1"]
    np.testing.assert_allclose(profile.vector, by_hand(vectors, [("m1", 2.0)]), atol=1e-6)
    assert after["u"].state.model == UPDATER.model_version


def test_a_redelivered_batch_is_not_applied_twice() -> None:
    vectors = catalogue(5)
    batch = [incoming(rating_event("u", f"m{i}", 4.0, i), offset=10 + i) for i in range(5)]
    # A crash after the first three ratings were stored, before the offsets were
    # committed: the whole batch comes again.
    _, partial = handle_ratings(batch[:3], {}, vectors, UPDATER, NOW)

    out, updated = handle_ratings(batch, stored(partial), vectors, UPDATER, NOW)

    profile = profiles_of(out)["u"]
    assert profile.n_ratings == 5
    assert profile.cause_event_id == batch[4].event.event_id
    assert updated["u"].state.n_ratings == 5 and updated["u"].state.last_offset == 14

    # Delivered yet again: nothing changes, the last profile is published again.
    again, unchanged = handle_ratings(batch, stored(updated), vectors, UPDATER, NOW)
    assert unchanged == {}
    republished = profiles_of(again)["u"]
    assert republished.n_ratings == 5
    assert republished.cause_event_id == batch[4].event.event_id
    np.testing.assert_allclose(republished.vector, profile.vector)


def test_old_ratings_before_the_stored_one_publish_nothing() -> None:
    vectors = catalogue(3)
    batch = [incoming(rating_event("u", f"m{i}", 3.0, i), offset=i) for i in range(3)]
    _, updated = handle_ratings(batch, {}, vectors, UPDATER, NOW)

    out, unchanged = handle_ratings(batch[:2], stored(updated), vectors, UPDATER, NOW)

    assert out == [] and unchanged == {}


def test_a_rating_without_item_vector_is_dead_lettered_and_the_rest_applied() -> None:
    vectors = catalogue(3)
    batch = [
        incoming(rating_event("u", "m0", 4.0), 0),
        incoming(rating_event("u", "unknown", 5.0), 1),
        incoming(rating_event("u", "m1", 2.0), 2),
        incoming(rating_event("v", "unknown", 1.0), 3),
    ]

    out, updated = handle_ratings(batch, {}, vectors, UPDATER, NOW)

    letters = letters_of(out)
    assert [(d.offset, d.service) for d in letters] == [(1, "user-profile"), (3, "user-profile")]
    assert all("'unknown'" in d.error and "no item vector" in d.error for d in letters)
    assert letters[0].payload == batch[1].source.value.decode()  # type: ignore[union-attr]
    profiles = profiles_of(out)
    assert set(profiles) == {"u"}  # v had nothing applied: no profile
    assert profiles["u"].n_ratings == 2
    assert set(updated) == {"u"}


def test_numerical_faults_are_dead_lettered_per_rating() -> None:
    vectors = catalogue(3)
    vectors["nan"] = np.full(DIM, np.nan, dtype=np.float32)
    vectors["short"] = vectors["m0"][:5]
    batch = [
        incoming(rating_event("a", "m0", 4.0), 0),
        incoming(rating_event("b", "m1", 4.0), 1),
        incoming(rating_event("a", "nan", 4.0), 2),
        incoming(rating_event("b", "short", 4.0), 3),
        incoming(rating_event("a", "m2", 4.0), 4),
    ]

    out, updated = handle_ratings(batch, {}, vectors, UPDATER, NOW)

    letters = letters_of(out)
    assert [d.offset for d in letters] == [2, 3]
    assert "NumericalError" in letters[0].error
    assert "dimension" in letters[1].error
    assert profiles_of(out)["a"].n_ratings == 2
    assert profiles_of(out)["b"].n_ratings == 1
    assert updated["a"].state.rated == ("m0", "m2")


def test_an_unreadable_stored_state_dead_letters_instead_of_resetting() -> None:
    vectors = catalogue(2)
    batch = [incoming(rating_event("u", "m0", 4.0), 5), incoming(rating_event("w", "m1", 4.0), 6)]

    out, updated = handle_ratings(batch, {"u": b"garbage"}, vectors, UPDATER, NOW)

    letters = letters_of(out)
    assert [d.offset for d in letters] == [5]
    assert "stored state of user is unreadable" in letters[0].error
    assert set(updated) == {"w"}


def test_ratings_without_offsets_are_always_applied() -> None:
    """No offset, no replay check: only a copy (same event_id) is skipped."""
    vectors = catalogue(2)
    event = rating_event("u", "m0", 4.0)
    source = Source("ratings", None, None, b"u", encode(event), None)

    def batch() -> list[Rating]:
        return [Incoming(rating_event("u", m, 3.0), source) for m in ("m0", "m1")]

    _, updated = handle_ratings(batch(), {}, vectors, UPDATER, NOW)

    out, updated = handle_ratings(batch(), stored(updated), vectors, UPDATER, NOW)

    profile = profiles_of(out)["u"]
    assert profile.n_ratings == 4
    assert profile.cause_published_at == NOW  # no broker timestamp: latency starts now


# --- item vectors --------------------------------------------------------------------


def embedded(
    movie: MovieId,
    vector: Vector,
    version: str = "enc-1",
    *,
    rated_in_training: bool = True,
    online_ratings: int = 0,
) -> ItemEmbedded:
    """An item embedding; by default one the encoder learned from ratings, which no
    rating moves (the tests of moving vectors say otherwise)."""
    return ItemEmbedded(
        movie_id=movie,
        title=movie,
        vector=vector,
        modalities=["text"],
        model_version=version,
        embedded_at=T0,
        rated_in_training=rated_in_training,
        online_ratings=online_ratings,
    )


def unit(vector: np.ndarray) -> Vector:
    out: Vector = (vector / np.linalg.norm(vector)).astype(np.float32)
    return out


def feedback_of(out: list) -> list[ItemRated]:
    found = [o.event for o in out if isinstance(o.event, ItemRated)]
    assert all(o.spec is ITEM_FEEDBACK for o in out if isinstance(o.event, ItemRated))
    return found


def test_each_applied_rating_goes_to_its_movie_with_the_raters_taste_for_a_new_movie() -> None:
    vectors = catalogue(5)
    _, before = handle_ratings(
        [
            incoming(rating_event("a", "m0", 5.0), 0),
            incoming(rating_event("a", "m1", 3.0), 1),
            incoming(rating_event("c", "m2", 4.0), 2),
        ],
        {},
        vectors,
        UPDATER,
        NOW,
    )
    batch = [
        incoming(rating_event("a", "m3", 4.0, 1), 3),  # round 0: a has a profile
        incoming(rating_event("b", "m3", 2.0, 1), 4),  # round 0: b's first rating
        incoming(rating_event("b", "m4", 1.0, 2), 5),  # round 1: m4 was learned
        incoming(rating_event("c", "m4", 3.0, 2), 6),  # round 0
        incoming(rating_event("c", "m3", 5.0, 3), 7),  # round 1
    ]

    out, _ = handle_ratings(batch, stored(before), vectors, UPDATER, NOW, content_only={"m3"})

    feedback = feedback_of(out)
    # One per applied rating, in the order applied (round by round), keyed by movie.
    assert [(f.user_id, f.movie_id) for f in feedback] == [
        ("a", "m3"),
        ("b", "m3"),
        ("c", "m4"),
        ("b", "m4"),
        ("c", "m3"),
    ]
    assert [f.rating_event_id for f in feedback] == [
        batch[i].event.event_id for i in (0, 1, 3, 2, 4)
    ]
    assert {f.model_version for f in feedback} == {UPDATER.model_version}
    # The taste is the profile before the rating, only for the content-only movie;
    # a user's first rating has none.
    a, b, c_m4, b_m4, c_m3 = feedback
    np.testing.assert_allclose(a.taste, by_hand(vectors, [("m0", 5.0), ("m1", 3.0)]), atol=1e-6)
    assert b.taste is None and c_m4.taste is None and b_m4.taste is None
    np.testing.assert_allclose(c_m3.taste, by_hand(vectors, [("m2", 4.0), ("m4", 3.0)]), atol=1e-6)
    # Ratings are learned from the vectors given (the movie's owner moves it, not us);
    # the feedback goes out before the profiles.
    profiles = profiles_of(out)
    np.testing.assert_allclose(
        profiles["c"].vector, by_hand(vectors, [("m2", 4.0), ("m4", 3.0), ("m3", 5.0)]), 1e-5
    )
    kinds = [type(o.event) for o in out]
    assert kinds.index(UserProfileUpdated) > max(i for i, k in enumerate(kinds) if k is ItemRated)
    assert not any(isinstance(o.event, ItemEmbedded) for o in out)


class CentredMean(RatingWeightedMean):
    """The baseline updater with a centre, as the residual updater has (its prior)."""

    def __init__(self, centre: Vector) -> None:
        super().__init__()
        self._centre = centre

    def centre(self) -> Vector:
        return self._centre


def test_the_taste_is_what_the_raters_profile_has_beyond_the_updaters_centre() -> None:
    vectors = catalogue(4)
    centre = vectors["m2"]
    updater = CentredMean(centre)
    _, before = handle_ratings(
        [incoming(rating_event("a", "m0", 5.0), 0), incoming(rating_event("a", "m1", 2.0), 1)],
        {},
        vectors,
        updater,
        NOW,
    )

    out, _ = handle_ratings(
        [incoming(rating_event("a", "m3", 4.0, 1), 2)],
        stored(before),
        vectors,
        updater,
        NOW,
        content_only={"m3"},
    )

    (feedback,) = feedback_of(out)
    expected = by_hand(vectors, [("m0", 5.0), ("m1", 2.0)]).astype(np.float64) - centre
    np.testing.assert_allclose(feedback.taste, expected, atol=1e-6)
    np.testing.assert_allclose(taste(centre, centre), np.zeros_like(centre))


def test_item_vectors_learn_from_the_encoders_vector_of_a_moved_movie() -> None:
    vectors = catalogue(3)
    items = ItemVectors(Settings())
    content = embedded("m0", vectors["m0"], rated_in_training=False)
    items.add(item_batch([content, embedded("m1", vectors["m1"])]))
    assert items.content_only(["m0", "m1", "x"]) == {"m0"} and items.n_content_only == 1

    # The movie's owner moved it: ratings still learn from its content vector, so a
    # profile does not depend on how far the other raters' moves had come.
    moved = content.model_copy(
        update={"vector": vectors["m2"], "online_ratings": 2, "content_vector": vectors["m0"]}
    )
    items.add(item_batch([moved]))
    np.testing.assert_array_equal(items["m0"], vectors["m0"])

    # An embedding learned from ratings is no longer content-only.
    items.add(item_batch([embedded("m0", vectors["m1"])]))
    np.testing.assert_array_equal(items["m0"], vectors["m1"])
    assert items.content_only(["m0"]) == set() and items.n_content_only == 0


def item_batch(events: list[ItemEmbedded]) -> list[Incoming[Event]]:
    return [
        Incoming(e, Source("item-embeddings", 0, i, e.movie_id.encode(), encode(e), None))
        for i, e in enumerate(events)
    ]


def test_item_vectors_keep_valid_embeddings_and_refuse_the_rest() -> None:
    vectors = catalogue(3)
    refused: list[str] = []
    # Never started: fed by hand here, by its TopicReader in the service.
    items = ItemVectors(Settings(), on_invalid=lambda _s, reason: refused.append(reason))
    items.add(item_batch([embedded(m, vectors[m]) for m in ("m0", "m1", "m2")]))

    assert set(items) == {"m0", "m1", "m2"}
    assert items.model_version == "enc-1"
    np.testing.assert_array_equal(items.get_many(["m1", "x"])["m1"], vectors["m1"])

    items.add(item_batch([embedded("bad", vectors["m0"] * 3)]))
    assert "bad" not in items
    assert refused and "not L2-normalised" in refused[0]


# --- parked ratings ------------------------------------------------------------------

PUBLISHED = T0  # the broker timestamp of ``incoming(..., offset=0)``
WAIT_S = 60.0


def test_a_rating_of_a_movie_without_vector_parks_and_holds_back_only_its_user() -> None:
    vectors = catalogue(4)
    batch = [
        incoming(rating_event("u", "m0", 4.0, 0), 0),
        incoming(rating_event("u", "late", 5.0, 1), 1),
        incoming(rating_event("u", "m1", 2.0, 2), 2),
        incoming(rating_event("v", "m2", 3.0, 3), 3),
    ]
    soon = PUBLISHED + timedelta(seconds=5)

    out, updated = handle_ratings(batch, {}, vectors, UPDATER, soon, wait_s=WAIT_S)

    assert not letters_of(out)
    assert profiles_of(out)["u"].n_ratings == 1 and profiles_of(out)["v"].n_ratings == 1
    # "m1" has a vector but waits behind "late": a user's ratings apply in order.
    assert [r.event.movie_id for r in updated["u"].parked] == ["late", "m1"]
    assert updated["v"].parked == ()

    # The vector arrives: the parked ratings apply, in order, with no new rating.
    vectors["late"] = catalogue(5, seed=9)["m4"]
    later = PUBLISHED + timedelta(seconds=20)
    out, after = handle_ratings(
        [], stored(updated), vectors, UPDATER, later, revisit={"u"}, wait_s=WAIT_S
    )

    profile = profiles_of(out)["u"]
    assert profile.n_ratings == 3 and profile.cause_event_id == batch[2].event.event_id
    expected = by_hand(vectors, [("m0", 4.0), ("late", 5.0), ("m1", 2.0)])
    np.testing.assert_allclose(profile.vector, expected, atol=1e-6)
    assert after["u"].parked == () and after["u"].state.last_offset == 2


def test_a_parked_rating_is_dead_lettered_when_its_wait_runs_out() -> None:
    vectors = catalogue(3)
    batch = [
        incoming(rating_event("u", "never", 5.0, 0), 0),
        incoming(rating_event("u", "m1", 2.0, 1), 1),
    ]
    _, parked = handle_ratings(batch, {}, vectors, UPDATER, PUBLISHED, wait_s=WAIT_S)
    assert len(parked["u"].parked) == 2

    too_late = PUBLISHED + timedelta(seconds=WAIT_S + 1)
    out, after = handle_ratings(
        [], stored(parked), vectors, UPDATER, too_late, revisit={"u"}, wait_s=WAIT_S
    )

    letters = letters_of(out)
    assert [d.offset for d in letters] == [0]
    assert "'never' has no item vector" in letters[0].error and "60 s" in letters[0].error
    assert letters[0].payload == batch[0].source.value.decode()  # type: ignore[union-attr]
    assert profiles_of(out)["u"].n_ratings == 1 and after["u"].parked == ()


def test_a_redelivered_parked_rating_is_not_parked_twice() -> None:
    vectors = catalogue(2)
    batch = [incoming(rating_event("u", "late", 5.0), 7)]
    _, parked = handle_ratings(batch, {}, vectors, UPDATER, PUBLISHED, wait_s=WAIT_S)

    out, unchanged = handle_ratings(
        batch, stored(parked), vectors, UPDATER, PUBLISHED, wait_s=WAIT_S
    )

    assert out == [] and unchanged == {}


def test_a_user_record_reads_back_what_it_wrote() -> None:
    vectors = catalogue(2)
    batch = [
        incoming(rating_event("u", "m0", 4.0), 3),
        incoming(rating_event("u", "late", 5.0), 4),
    ]
    _, updated = handle_ratings(batch, {}, vectors, UPDATER, PUBLISHED, wait_s=WAIT_S)
    record = updated["u"]

    again = UserRecord.from_bytes(record.to_bytes())

    assert again.parked == record.parked and again.seen_offset == 4
    assert again.state.last_offset == 3 and again.state.rated == ("m0",)
    np.testing.assert_array_equal(again.state.vector, record.state.vector)
    assert UserRecord.has_parked(record.to_bytes())
    assert again.recent == tuple(r.event.event_id for r in batch)
    # A record holding nothing but a state is the state's own bytes, as first written.
    bare = UserRecord(record.state)
    assert bare.to_bytes() == record.state.to_bytes()
    assert UserRecord.from_bytes(bare.to_bytes()).state.rated == ("m0",)


def test_a_copy_of_a_rating_is_applied_once() -> None:
    """A producer that sends a rating again after a broker error puts a second copy
    (same event_id, later offset) on the topic: in the same batch, in a later batch, or
    while the first still waits for its movie."""
    vectors = catalogue(3)
    first, second = rating_event("u", "m0", 4.0), rating_event("u", "m1", 2.0, 1)
    once, _ = handle_ratings(
        [incoming(first, 0), incoming(second, 1)], {}, vectors, UPDATER, PUBLISHED
    )
    expected = profiles_of(once)["u"]

    out, updated = handle_ratings(
        [incoming(first, 0), incoming(first, 1), incoming(second, 2)],
        {},
        vectors,
        UPDATER,
        PUBLISHED,
    )
    assert profiles_of(out)["u"].n_ratings == 2
    np.testing.assert_allclose(profiles_of(out)["u"].vector, expected.vector)
    later, _ = handle_ratings(
        [incoming(second, 3), incoming(first, 4)], stored(updated), vectors, UPDATER, PUBLISHED
    )
    assert profiles_of(later) == {} and letters_of(later) == []

    waiting = rating_event("u", "late", 5.0, 2)
    _, parked = handle_ratings(
        [incoming(waiting, 5)], stored(updated), vectors, UPDATER, PUBLISHED, wait_s=WAIT_S
    )
    _, again = handle_ratings(
        [incoming(waiting, 6)], stored(parked), vectors, UPDATER, PUBLISHED, wait_s=WAIT_S
    )
    assert again == {} or again["u"].parked == parked["u"].parked


def test_a_record_remembers_a_bounded_number_of_event_ids() -> None:
    vectors = catalogue(2)
    events = [rating_event("u", f"m{i % 2}", 3.0, i) for i in range(RECENT_EVENTS + 5)]
    _, updated = handle_ratings(
        [incoming(e, i) for i, e in enumerate(events)], {}, vectors, UPDATER, PUBLISHED
    )
    record = UserRecord.from_bytes(updated["u"].to_bytes())
    assert record.recent == tuple(e.event_id for e in events[-RECENT_EVENTS:])
    assert not UserRecord.has_parked(updated["u"].to_bytes())


# --- the real worker -----------------------------------------------------------------


@contextmanager
def worker(
    settings: Settings, log: Path, instance_id: str | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m services.user_profile worker`` with ``settings`` in its environment;
    waits for its ready file, stops it with SIGTERM and checks that it exits cleanly."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REELSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "REELSTREAM_PARTITIONS": str(settings.topic_partitions),
        "REELSTREAM_VAR_DIR": str(settings.var_dir),
        "REELSTREAM_RATING_WAIT_S": str(settings.rating_wait_s),
        "REELSTREAM_BATCH_TIMEOUT_S": str(settings.batch_timeout_s),
        "REELSTREAM_BATCH_SIZE": str(settings.batch_size),
        "REELSTREAM_TRAINED_MODELS": str(settings.trained_models).lower(),
    }
    if instance_id is not None:
        # Static membership: a restarted worker takes its partitions back at once (the
        # local broker never expires a killed member), but a stopped one stays in the
        # group, which then cannot be deleted.
        env["REELSTREAM_INSTANCE_ID"] = instance_id
    ready = settings.ready_file(SERVICE)
    ready.unlink(missing_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.user_profile", "worker"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not get ready:\n{log.read_text()[-5000:]}")
            time.sleep(0.1)
        yield process
    finally:
        # A test may have killed the worker itself; only a SIGTERM of ours must end cleanly.
        terminated = process.poll() is None
        if terminated:
            process.send_signal(signal.SIGTERM)
        try:
            rc = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    if terminated:
        assert rc == 0, log.read_text()[-5000:]
        assert not ready.exists(), "the ready file must go when the worker stops"


def publish(settings: Settings, spec: TopicSpec, events: list[Event]) -> None:
    """Publish events keyed by their entity id with one producer (a producer per message
    would take most of a test's time)."""
    producer = make_producer(settings)
    for event in events:
        producer.produce(settings.topic(spec.name), value=encode(event), key=spec.key_of(event))
    assert producer.flush(10) == 0


def publish_items(settings: Settings, vectors: dict[MovieId, Vector]) -> None:
    publish(settings, ITEM_EMBEDDINGS, [embedded(m, v) for m, v in vectors.items()])


def publish_ratings(settings: Settings, events: list[RatingSubmitted]) -> None:
    publish(settings, RATINGS, list(events))


def profiles_until(settings: Settings, expected: dict[UserId, int]) -> list[UserProfileUpdated]:
    """Read ``user-profiles`` until every user has a profile with its expected count;
    fails at once when a user's count goes past it (an update applied twice)."""

    def counts(events: list[Event]) -> set[tuple[UserId, int]]:
        return {(e.user_id, e.n_ratings) for e in events if isinstance(e, UserProfileUpdated)}

    def done(events: list[Event]) -> bool:
        seen = counts(events)
        overshoot = any(n > expected.get(u, n) for u, n in seen)
        return overshoot or all((u, n) in seen for u, n in expected.items())

    events = read_topic(settings, USER_PROFILES, done, timeout_s=60)
    over = sorted((u, n) for u, n in counts(events) if n > expected.get(u, n))
    assert not over, f"more ratings applied than published: {over}"
    return [e for e in events if isinstance(e, UserProfileUpdated)]


def letters_until(settings: Settings, n: int) -> list[DeadLetter]:
    events = read_topic(settings, DEAD_LETTERS, lambda ev: len(ev) >= n, timeout_s=60)
    return [e for e in events if isinstance(e, DeadLetter)]


@pytest.mark.integration
def test_worker_turns_ratings_into_profiles(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    vectors = catalogue(8, seed=1)
    publish_items(settings, vectors)
    plan = {
        "alice": [("m0", 5.0), ("m1", 4.0), ("m2", 1.0)],
        "bob": [("m3", 3.5), ("m4", 2.0)],
        "carol": [("m5", 0.5), ("m6", 5.0), ("m7", 4.5), ("m0", 3.0)],
    }
    events = [
        rating_event(user, movie, stars, i)
        for user, ratings in plan.items()
        for i, (movie, stars) in enumerate(ratings)
    ]
    with worker(settings, tmp_path / "worker.log"):
        publish_ratings(settings, events)
        profiles = profiles_until(settings, {u: len(r) for u, r in plan.items()})

    for user, ratings in plan.items():
        final = [p for p in profiles if p.user_id == user and p.n_ratings == len(ratings)][-1]
        np.testing.assert_allclose(final.vector, by_hand(vectors, ratings), atol=1e-5)
        assert final.rated == list(dict.fromkeys(m for m, _ in ratings))
        assert final.model_version == f"{UPDATER.model_version}+enc-1"
        assert final.cause_event_id == [e for e in events if e.user_id == user][-1].event_id
        assert final.cause_published_at <= final.updated_at
        counts = [p.n_ratings for p in profiles if p.user_id == user]
        assert counts == sorted(counts) and max(counts) == len(ratings)


@pytest.mark.integration
def test_bad_input_is_dead_lettered_and_the_next_rating_processed(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    vectors = catalogue(2, seed=2)
    publish_items(settings, vectors)
    # An item embedding that is not L2-normalised is refused too.
    produce_raw(settings, ITEM_EMBEDDINGS, encode(embedded("m9", vectors["m0"] * 2)), b"m9")
    with worker(settings, tmp_path / "worker.log"):
        produce_raw(settings, RATINGS, b"{not json", b"u")
        seven = encode(rating_event("u", "m0", 4.0)).replace(b'"rating":4.0', b'"rating":7')
        assert b'"rating":7' in seven
        produce_raw(settings, RATINGS, seven, b"u")
        produce_raw(settings, RATINGS, encode(rating_event("u", "m0", 4.0)), b"someone-else")
        publish_ratings(settings, [rating_event("u", "m1", 3.0)])

        profiles = profiles_until(settings, {"u": 1})
        letters = letters_until(settings, 4)

    assert profiles[-1].rated == ["m1"]
    by_error = {d.error: d for d in letters}
    assert len(letters) == 4
    assert any(e.startswith("invalid JSON") for e in by_error)
    assert any("rating: Input should be less than or equal to 5" in e for e in by_error)
    assert any("message key 'someone-else' must be the user_id 'u'" in e for e in by_error)
    assert any("not L2-normalised" in e for e in by_error)
    assert all(d.service == "user-profile" for d in letters)
    json_letter = next(d for e, d in by_error.items() if e.startswith("invalid JSON"))
    assert json_letter.payload == "{not json"
    assert json_letter.source_topic == settings.topic(RATINGS.name)


@pytest.mark.integration
@pytest.mark.slow
def test_ratings_wait_a_while_for_their_movie_vector(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings(rating_wait_s=5.0)
    vectors = catalogue(3, seed=3)
    publish_items(settings, {"m0": vectors["m0"]})
    with worker(settings, tmp_path / "worker.log"):
        publish_ratings(
            settings,
            [rating_event("early", "m1", 4.0), rating_event("lost", "never-embedded", 4.0)],
        )
        time.sleep(0.5)  # the vector arrives a moment after the rating
        publish_items(settings, {"m1": vectors["m1"]})

        profiles = profiles_until(settings, {"early": 1})
        letters = letters_until(settings, 1)
        # A rating of a known movie after the dead letter is still processed.
        publish_ratings(settings, [rating_event("lost", "m0", 2.0)])
        after = profiles_until(settings, {"lost": 1})

    assert next(p for p in profiles if p.user_id == "early").rated == ["m1"]
    assert len(letters) == 1
    assert "'never-embedded' has no item vector" in letters[0].error
    assert next(p for p in after if p.user_id == "lost").rated == ["m0"]


@pytest.mark.integration
def test_worker_sends_each_rating_to_its_movies_partition_with_the_taste_of_a_new_movie(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    vectors = catalogue(4, seed=5)
    new = embedded("new", vectors["m3"], rated_in_training=False)
    publish(
        settings, ITEM_EMBEDDINGS, [*(embedded(m, vectors[m]) for m in ("m0", "m1", "m2")), new]
    )
    ratings = [
        rating_event("ann", "m0", 5.0, 0),
        rating_event("ann", "new", 4.0, 1),
        rating_event("bob", "m1", 3.0, 2),
        rating_event("bob", "new", 2.0, 3),
    ]

    def all_in(events: list[Event]) -> bool:
        return len([e for e in events if isinstance(e, ItemRated)]) >= len(ratings)

    with worker(settings, tmp_path / "worker.log"):
        publish_ratings(settings, ratings)
        feedback = read_topic(settings, ITEM_FEEDBACK, all_in, timeout_s=60)

    by_event = {f.rating_event_id: f for f in feedback if isinstance(f, ItemRated)}
    assert set(by_event) == {r.event_id for r in ratings}
    ann_new = by_event[ratings[1].event_id]
    np.testing.assert_allclose(ann_new.taste, vectors["m0"], atol=1e-6)
    assert by_event[ratings[0].event_id].taste is None  # a first rating, a known movie
    assert by_event[ratings[2].event_id].taste is None
    # Keyed by movie, so every rating of a movie lands in the movie's one partition.
    placed = partitions_by_key(settings, settings.topic(ITEM_FEEDBACK.name))
    assert set(placed) == {"m0", "m1", "new"} and all(len(p) == 1 for p in placed.values())


def partitions_by_key(settings: Settings, topic: str) -> dict[str, set[int]]:
    """The partitions of ``topic`` that hold messages of each key (read to the end)."""
    consumer = make_consumer(settings, f"test-{time.time_ns()}")
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        found: dict[str, set[int]] = {}
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 2:
            for message in consumer.consume(500, timeout=0.2):
                key, partition = message.key(), message.partition()
                if message.error() is None and key is not None and partition is not None:
                    found.setdefault(key.decode(), set()).add(partition)
                    idle_since = time.monotonic()
        return found
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.slow
def test_restart_neither_loses_nor_repeats_an_update(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    settings = make_settings()
    vectors = catalogue(20, seed=4)
    publish_items(settings, vectors)
    users = [f"user-{i}" for i in range(6)]  # spread over both partitions
    n_first, n_second, n_third = 4, 3, 2
    log = tmp_path / "worker.log"

    def publish_round(round_: int, n: int) -> None:
        publish_ratings(
            settings,
            [
                rating_event(user, f"m{(round_ * 7 + k * 3 + j) % 20}", 1.0 + (k + j) % 5, k)
                for k in range(n)
                for j, user in enumerate(users)
            ],
        )

    with worker(settings, log):
        publish_round(0, n_first)
        profiles_until(settings, dict.fromkeys(users, n_first))
    # SIGTERM: a clean stop commits the offsets; the state comes back from the changelog.
    with worker(settings, log):
        publish_round(1, n_second)
        profiles_until(settings, dict.fromkeys(users, n_first + n_second))

    # As after a crash before the commit: the offsets are lost and every rating comes
    # again; the stored last_offset must keep them from being applied twice.
    admin = make_admin(settings)
    for future in admin.delete_consumer_groups([settings.group(SERVICE)]).values():
        future.result()
    with worker(settings, log):
        publish_round(2, n_third)
        total = n_first + n_second + n_third
        profiles = profiles_until(settings, dict.fromkeys(users, total))

    for user in users:
        counts = [p.n_ratings for p in profiles if p.user_id == user]
        assert max(counts) == total, f"{user}: {counts}"
    assert "skipped re-delivered ratings" in log.read_text()

    # The table's changelog is partitioned like the ratings: a user's state is
    # recovered by the instance that owns the user's ratings partition.
    changelog = partitions_by_key(settings, settings.changelog(SERVICE, TABLE))
    ratings = partitions_by_key(settings, settings.topic(RATINGS.name))
    assert set(changelog) == set(users)
    for user in users:
        assert changelog[user] == ratings[user], user
    assert len({p for parts in ratings.values() for p in parts}) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_restarts_while_ratings_wait_for_their_movie_lose_none(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Regression: a worker stopped while a batch waited for a movie vector lost that
    batch (its offsets were committed unapplied): 2 of 8 clean restarts and 1 of 1
    kill -9 each lost a rating. Each round here rates a movie that is not embedded yet,
    stops the worker while the ratings wait (SIGTERM or SIGKILL in turn), embeds the
    movie and checks every user's count once the next worker has caught up."""
    settings = make_settings(rating_wait_s=600.0)
    vectors = catalogue(12, seed=6)
    publish_items(settings, {m: v for m, v in vectors.items() if m != "m11"})
    users = [f"user-{i}" for i in range(4)]
    log = tmp_path / "worker.log"
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(users, 0)
    for round_ in range(4):
        late = f"late-{round_}"
        events = [
            rating_event(user, movie, 3.0, round_)
            for user in users
            for movie in (f"m{rng.integers(11)}", late, f"m{rng.integers(11)}")
        ]
        with worker(settings, log, instance_id="0") as process:
            publish_ratings(settings, events)
            time.sleep(rng.uniform(0.5, 2.0))
            if round_ % 2:
                process.kill()  # the context manager accepts a killed worker
                process.wait()
        publish_items(settings, {late: vectors["m11"]})
        counts = {user: n + 3 for user, n in counts.items()}
        with worker(settings, log, instance_id="0"):
            profiles = profiles_until(settings, counts)
        for user in users:
            assert max(p.n_ratings for p in profiles if p.user_id == user) == counts[user]


def test_a_profile_carries_a_window_of_the_latest_rated_movies() -> None:
    vectors = catalogue(PROFILE_WINDOW + 12)
    movies = list(vectors)
    first = [incoming(rating_event("u", m, 4.0, i), i) for i, m in enumerate(movies[:-1])]
    out, updated = handle_ratings(first, {}, vectors, UPDATER, NOW)
    # Everything rated in the batch, though more than the window.
    (profile,) = profiles_of(out).values()
    assert profile.rated == movies[:-1] and profile.n_rated == len(movies) - 1

    last = [incoming(rating_event("u", movies[-1], 2.0, 99), len(movies))]
    out, _ = handle_ratings(last, stored(updated), vectors, UPDATER, NOW)
    (profile,) = profiles_of(out).values()
    assert profile.rated == movies[-PROFILE_WINDOW:] and profile.n_rated == len(movies)
    assert profile.ratings[-1] == 2.0 and len(profile.ratings) == PROFILE_WINDOW

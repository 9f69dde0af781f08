"""Scale-out by partitions: two instances of each stream processor share the work and
end in the same state as one.

The same movies and ratings go through the three workers (item-embedding,
user-profile, recommender) on the real broker, once with one instance of each and once
with two, the second instances joining halfway through the ratings (a rebalance in the
middle of the replay). Every user's final vector and rating count, and every movie's
final vector (moved by its raters), must agree between the two runs: nothing lost,
nothing applied twice, whoever held which partition when. Every list must keep the
contract: at most ``top_k`` distinct catalogue movies, none the user had rated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from shared.config import Settings
from shared.events import (
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    MOVIES,
    RATINGS,
    RECOMMENDATIONS,
    USER_PROFILES,
    Event,
    ItemEmbedded,
    ItemFeaturesUpdated,
    MoviePublished,
    RatingSubmitted,
    RecommendationsGenerated,
    UserProfileUpdated,
    encode,
)
from shared.kafka.client import make_producer
from shared.models.item_encoder import ConcatItemEncoder
from shared.models.text import TextEncoder
from shared.workers.item_embedding import ItemEmbeddingWorker
from shared.workers.recommender import RecommenderWorker
from shared.workers.user_profile import UserProfileWorker
from tests.conftest import SettingsFactory
from tests.kafka_helpers import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_USERS = 24
N_MOVIES = 16
RATINGS_PER_USER = 12
T0 = datetime(1998, 1, 1, tzinfo=UTC)
TOP_K = 5


def movies() -> list[MoviePublished]:
    genres = ["Comedy", "Horror", "Drama", "Animation"]
    return [
        MoviePublished(
            movie_id=f"m{i}",
            title=f"Movie {i}",
            year=1990 + i % 8,
            genres=[genres[i % 4]],
            overview=f"A {genres[i % 4].lower()} story number {i}.",
        )
        for i in range(N_MOVIES)
    ]


def ratings() -> list[RatingSubmitted]:
    """Each user rates distinct movies; users interleave, in time order."""
    rng = np.random.default_rng(11)
    picks = {u: rng.permutation(N_MOVIES)[:RATINGS_PER_USER] for u in range(N_USERS)}
    out = []
    for step in range(RATINGS_PER_USER):
        for u in rng.permutation(N_USERS):
            out.append(
                RatingSubmitted(
                    event_id=f"e{u}-{step}",
                    user_id=f"u{u}",
                    movie_id=f"m{picks[u][step]}",
                    rating=float(rng.integers(1, 6)),
                    occurred_at=T0 + timedelta(minutes=len(out)),
                )
            )
    return out


def publish(settings: Settings, topic: str, events: list[MoviePublished | RatingSubmitted]) -> None:
    producer = make_producer(settings)
    for event in events:
        key = event.movie_id if isinstance(event, MoviePublished) else event.user_id
        producer.produce(settings.topic(topic), value=encode(event), key=key.encode())
    assert producer.flush(30) == 0


@pytest.fixture(scope="module")
def encoder() -> ConcatItemEncoder:
    """Content alone: every movie's vector is moved by its raters."""
    return ConcatItemEncoder(TextEncoder())


@contextmanager
def instances(
    settings: Settings, encoder: ConcatItemEncoder, instance: str
) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """One instance of each worker, in threads; yields a wait until each holds
    partitions, and a check that they still run and each processed messages of its own."""
    own = settings.model_copy(
        update={"instance_id": instance, "var_dir": settings.var_dir / instance}
    )
    item_side = ItemEmbeddingWorker(
        own.model_copy(update={"qdrant_path": settings.var_dir / instance / "qdrant"}), encoder
    )
    workers = [item_side, UserProfileWorker(own), RecommenderWorker(own)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()

    def alive() -> None:
        assert all(t.is_alive() for t in threads), "a worker stopped"
        processed = {type(w).__name__: w.consumer.processed for w in workers}
        assert all(processed.values()), f"instance {instance} was left idle: {processed}"

    def joined(timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(w.consumer.assignment for w in workers):
            assert time.monotonic() < deadline, f"instance {instance} got no partitions"
            time.sleep(0.1)

    try:
        yield joined, alive
    finally:
        for w in workers:
            w.stop()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)


@dataclass
class Outcome:
    users: dict[str, UserProfileUpdated]
    movies: dict[str, ItemEmbedded]
    statistics: dict[str, ItemFeaturesUpdated]
    lists: list[RecommendationsGenerated]


def expected_tastes(stream: list[RatingSubmitted]) -> dict[str, int]:
    """Ratings that move each movie: all but a user's first (no profile before it)."""
    seen: set[str] = set()
    moves = {f"m{i}": 0 for i in range(N_MOVIES)}
    for r in stream:
        if r.user_id in seen:
            moves[r.movie_id] += 1
        seen.add(r.user_id)
    return moves


def run(
    settings: Settings, encoder: ConcatItemEncoder, n_instances: int, stream: list[RatingSubmitted]
) -> Outcome:
    counts = {f"u{u}": RATINGS_PER_USER for u in range(N_USERS)}
    moves = expected_tastes(stream)

    def latest(events: list[Event], kind: type, key: str) -> dict:
        return {getattr(e, key): e for e in events if isinstance(e, kind)}

    def users_done(events: list[Event]) -> bool:
        last = latest(events, UserProfileUpdated, "user_id")
        return all(u in last and last[u].n_ratings == n for u, n in counts.items())

    def movies_done(events: list[Event]) -> bool:
        last = latest(events, ItemEmbedded, "movie_id")
        return all(m in last and last[m].online_ratings == n for m, n in moves.items())

    publish(settings, MOVIES.name, list(movies()))
    with instances(settings, encoder, "1") as (first_joined, first_alive):
        first_joined()
        read_topic(settings, ITEM_EMBEDDINGS, lambda e: len(e) >= N_MOVIES, timeout_s=120)
        half, three_quarters = len(stream) // 2, 3 * len(stream) // 4
        publish(settings, RATINGS.name, list(stream[:half]))
        if n_instances == 1:
            publish(settings, RATINGS.name, list(stream[half:]))
            users = read_topic(settings, USER_PROFILES, users_done, timeout_s=180)
            items = read_topic(settings, ITEM_EMBEDDINGS, movies_done, timeout_s=180)
        else:
            with instances(settings, encoder, "2") as (second_joined, second_alive):
                # A quarter goes out while the groups rebalance, the rest once the
                # second instances hold partitions of their own.
                publish(settings, RATINGS.name, list(stream[half:three_quarters]))
                second_joined()
                publish(settings, RATINGS.name, list(stream[three_quarters:]))
                users = read_topic(settings, USER_PROFILES, users_done, timeout_s=180)
                items = read_topic(settings, ITEM_EMBEDDINGS, movies_done, timeout_s=180)
                second_alive()
        first_alive()
        rated_per_movie = {m: sum(r.movie_id == m for r in stream) for m in moves}
        statistics = read_topic(
            settings,
            ITEM_FEATURES,
            lambda e: all(
                m in (last := latest(e, ItemFeaturesUpdated, "movie_id")) and last[m].n_ratings == n
                for m, n in rated_per_movie.items()
                if n
            ),
            timeout_s=120,
        )
        lists = read_topic(
            settings,
            RECOMMENDATIONS,
            lambda e: (
                {x.user_id for x in e if isinstance(x, RecommendationsGenerated)} >= set(counts)
            ),
            timeout_s=120,
        )
    return Outcome(
        latest(users, UserProfileUpdated, "user_id"),
        latest(items, ItemEmbedded, "movie_id"),
        latest(statistics, ItemFeaturesUpdated, "movie_id"),
        [e for e in lists if isinstance(e, RecommendationsGenerated)],
    )


def check_lists(outcome: Outcome, stream: list[RatingSubmitted]) -> None:
    """Every list: at most TOP_K distinct catalogue movies, none rated by its cause."""
    position = {r.event_id: i for i, r in enumerate(stream)}
    catalogue = {m.movie_id for m in movies()}
    assert outcome.lists
    for rec in outcome.lists:
        if rec.user_id.startswith("_"):
            continue
        listed = [i.movie_id for i in rec.items]
        assert len(listed) == len(set(listed)) <= TOP_K and set(listed) <= catalogue
        cause = position[rec.cause_event_id]
        rated = {r.movie_id for r in stream[: cause + 1] if r.user_id == rec.user_id}
        assert not rated & set(listed), (rec.user_id, rated & set(listed))


def test_two_instances_of_each_processor_end_where_one_does(
    make_settings: SettingsFactory, encoder: ConcatItemEncoder
) -> None:
    stream = ratings()
    common = {"topic_partitions": 4, "top_k": TOP_K, "n_candidates": 10, "item_pull": 0.5}
    one = run(make_settings(**common), encoder, 1, stream)
    two = run(make_settings(**common), encoder, 2, stream)

    assert set(one.users) == set(two.users) == {f"u{u}" for u in range(N_USERS)}
    for user, profile in one.users.items():
        other = two.users[user]
        assert (profile.n_ratings, profile.n_rated) == (other.n_ratings, other.n_rated)
        np.testing.assert_allclose(profile.vector, other.vector, atol=1e-5, err_msg=user)
    assert set(one.movies) == set(two.movies)
    for movie_id, item in one.movies.items():
        other = two.movies[movie_id]
        assert item.online_ratings == other.online_ratings
        np.testing.assert_allclose(item.vector, other.vector, atol=1e-5, err_msg=movie_id)
    assert set(one.statistics) == set(two.statistics)
    for movie_id, stats in one.statistics.items():
        other_stats = two.statistics[movie_id]
        assert (stats.n_ratings, stats.rating_sum) == (
            other_stats.n_ratings,
            other_stats.rating_sum,
        )
        assert stats.log_decayed == pytest.approx(other_stats.log_decayed, abs=1e-9)
        assert stats.log_fast_decayed == pytest.approx(other_stats.log_fast_decayed, abs=1e-9)
        assert dict(zip(stats.co_rated, stats.co_counts, strict=True)) == dict(
            zip(other_stats.co_rated, other_stats.co_counts, strict=True)
        ), movie_id
    check_lists(one, stream)
    check_lists(two, stream)

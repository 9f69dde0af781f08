"""Deterministic given the log: the same ratings, replayed twice in a closed loop through
the three workers (trained models, real broker) on fresh topics, give identical lists,
and those lists are the ones the in-process pipeline computes from the same ratings.

The closed loop is ``run_stream``'s: each rating is published once its user's previous
list has come back and the item side has published the statistics of every earlier
rating. A user's first rating holds the newcomers' list, whose version depends on when
it was read; every other rating holds the list caused by the user's previous one, and
those are compared.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from infra.lab.evaluation.pipeline import PipelineModel
from infra.lab.evaluation.stream import run_stream
from shared.config import Settings
from shared.events import MoviePublished, RatingSubmitted
from shared.models.deployed import build_deployed_item_encoder, build_reranker, build_user_updater
from shared.workers.item_embedding import ItemEmbeddingWorker
from shared.workers.recommender import RecommenderWorker
from shared.workers.user_profile import UserProfileWorker
from tests.conftest import SettingsFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GENRES = ["Comedy", "Horror", "Drama", "Animation", "Sci-Fi", "Romance"]
N_MOVIES = 30
N_USERS = 6
RATINGS_PER_USER = 7
T0 = datetime(1998, 1, 1, tzinfo=UTC)


def movies() -> list[MoviePublished]:
    return [
        MoviePublished(
            movie_id=str(i + 1),
            title=f"A {GENRES[i % 6].lower()} film number {i + 1}",
            year=1980 + i % 18,
            genres=[GENRES[i % 6], GENRES[(i * 5) % 6]],
            overview=f"The {i + 1}th story: {GENRES[i % 6].lower()} and more.",
        )
        for i in range(N_MOVIES)
    ]


def ratings() -> list[RatingSubmitted]:
    """Users interleave, each rating distinct movies, in time order."""
    rng = np.random.default_rng(5)
    picks = {u: rng.permutation(N_MOVIES)[:RATINGS_PER_USER] for u in range(N_USERS)}
    out: list[RatingSubmitted] = []
    for step in range(RATINGS_PER_USER):
        for u in rng.permutation(N_USERS):
            out.append(
                RatingSubmitted(
                    event_id=f"e{len(out)}",
                    user_id=f"u{u}",
                    movie_id=str(picks[u][step] + 1),
                    rating=float(rng.integers(1, 6)),
                    occurred_at=T0 + timedelta(hours=len(out)),
                )
            )
    return out


@contextmanager
def workers(settings: Settings) -> Iterator[None]:
    """One instance of each worker with the deployed models, in threads."""
    running = [
        ItemEmbeddingWorker(settings),
        UserProfileWorker(settings),
        RecommenderWorker(settings),
    ]
    threads = [threading.Thread(target=w.run, daemon=True) for w in running]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for worker in running:
            worker.stop()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads)


def through_the_stack(settings: Settings) -> list[list[str] | None]:
    """Per rating, the list caused by its user's previous rating (None for a first)."""
    with workers(settings):
        result = run_stream(settings, movies(), [], ratings(), list_timeout_s=60, progress=False)
    assert result.fresh and result.timeouts == 0
    assert sum(e.exact for e in result.events) == len(result.events) - N_USERS
    return [e.recommended if e.exact else None for e in result.events]


def in_process(settings: Settings) -> list[list[str] | None]:
    """The same, from the services' handlers called in process."""
    model = PipelineModel(
        settings,
        build_deployed_item_encoder(settings),
        build_user_updater(settings),
        reranker=build_reranker(settings),
        name="reelstream",
    )
    out: list[list[str] | None] = []
    seen: set[str] = set()
    try:
        for movie in movies():  # one at a time: not how the stack batched them
            model.add_movies([movie])
        for rating in ratings():
            first = rating.user_id not in seen
            out.append(None if first else model.recommend(rating.user_id, set(), settings.top_k))
            seen.add(rating.user_id)
            model.learn_one(rating)
    finally:
        model.close()
    return out


def test_two_closed_loop_runs_give_the_lists_of_the_in_process_pipeline(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    def fresh(name: str) -> Settings:
        return make_settings(
            trained_models=True,
            var_dir=tmp_path / name,
            qdrant_path=tmp_path / name / "qdrant",
            top_k=10,
        )

    first = through_the_stack(fresh("first"))
    second = through_the_stack(fresh("second"))
    local = in_process(fresh("local"))

    assert len(first) == len(second) == len(local) == N_USERS * RATINGS_PER_USER
    assert sum(lst is not None and len(lst) == 10 for lst in first) == len(first) - N_USERS
    assert first == second
    assert first == local

"""The ranker's training replay (``infra.lab.train.ranker_examples``): what an example holds
and which ratings give one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from infra.lab.train import ranker_examples
from infra.lab.training.ranker import RankerExamples
from shared.events import ItemEmbedded, RatingSubmitted
from shared.models.item_stats import ItemStats
from shared.models.recommend import CandidateSources
from shared.models.updater import RatingWeightedMean
from shared.retrieval.catalogue import Catalogue

DIM = 8
T0 = datetime(1998, 1, 1, tzinfo=UTC)


def catalogue(n: int) -> tuple[Catalogue, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"m{i}" for i in range(n)]
    built = Catalogue()
    refused = built.apply(
        [
            ItemEmbedded(
                movie_id=m,
                title=f"Title {m}",
                year=1990,
                genres=["Drama"],
                vector=vectors[i],
                modalities=["text"],
                model_version="test-v1",
                embedded_at=T0,
            )
            for i, m in enumerate(ids)
        ]
    )
    assert refused == []
    return built, vectors, ids


def stream(n: int, n_users: int, n_movies: int) -> list[RatingSubmitted]:
    rng = np.random.default_rng(1)
    return [
        RatingSubmitted(
            user_id=f"u{k % n_users}",
            movie_id=f"m{int(rng.integers(n_movies))}",
            rating=float(rng.integers(1, 6)),
            occurred_at=T0 + timedelta(minutes=k),
        )
        for k in range(n)
    ]


def replay(
    ratings: list[RatingSubmitted], first: int
) -> tuple[RankerExamples, list[int], ItemStats]:
    built, vectors, ids = catalogue(30)
    stats = ItemStats()
    sources = CandidateSources(stats, n_trending=5, n_new=3)
    examples, positions = ranker_examples(
        ratings,
        RatingWeightedMean(),
        built,
        {m: i for i, m in enumerate(ids)},
        vectors,
        sources,
        10,
        first=first,
    )
    return examples, positions, stats


def test_every_rating_of_a_known_user_gives_an_example_of_the_rated_movie() -> None:
    ratings = stream(60, 4, 30)
    examples, positions, _ = replay(ratings, first=0)
    # A user's first rating has no profile to score with yet: 4 users, 56 examples.
    assert positions == list(range(4, 60))
    assert len(examples) == 56
    rows = examples.item_rows
    assert [f"m{r}" for r in rows] == [ratings[p].movie_id for p in positions]


def test_ratings_before_first_warm_the_state_but_give_no_example() -> None:
    ratings = stream(60, 4, 30)
    examples, positions, stats = replay(ratings, first=40)
    assert positions == list(range(40, 60))
    assert len(examples) == 20
    # The online features learned every rating, the skipped ones included.
    assert sum(stats.count(f"m{i}") for i in range(30)) == 60
    # The same examples as in the full replay: the state before them is the same.
    full, full_positions, _ = replay(ratings, first=0)
    tail = full.subset(slice(full_positions.index(40), None))
    np.testing.assert_array_equal(tail.user_vectors, examples.user_vectors)
    np.testing.assert_array_equal(tail.candidate_rows, examples.candidate_rows)

"""A small synthetic catalogue and ratings for the fusion item encoder's tests
(``tests/models`` and ``tests/lab/training``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from infra.lab.training.fusion import FusionConfig
from shared.convert import movies_of
from shared.events import MoviePublished, People, RatingSubmitted
from shared.models.item_encoder import ItemEncoder

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]
N_MOVIES = 40
SMALL = FusionConfig(
    epochs=8,
    batch_size=64,
    triplet_batch=32,
    hidden_dim=64,
    out_dim=32,
    people_buckets=512,
    lr=1e-2,
)


def make_movie(i: int, **fields: object) -> MoviePublished:
    values: dict[str, object] = {
        "movie_id": str(i),
        "title": f"Movie number {i}",
        "year": 1950 + i % 50,
        "genres": [GENRES[i % len(GENRES)], GENRES[(i // 5) % len(GENRES)]],
        "people": People(
            directors=[f"director {i % 7}"],
            cast=[f"actor {i % 11}", f"actor {(i + 3) % 13}", f"actor {i}"],
            writers=[f"writer {i % 4}"],
        ),
    }
    values.update(fields)
    return MoviePublished.model_validate(values)


MOVIES = [make_movie(i) for i in range(N_MOVIES)]
GROUPS = [list(range(0, N_MOVIES, 2)), list(range(1, N_MOVIES, 2))]
"""Users of group g rate only the movies of GROUPS[g]: even and odd ids, which content
(genres, people) does not tell apart, so only the interaction objective can."""


def make_ratings(n_users: int = 24, per_user: int = 12, seed: int = 0) -> list[RatingSubmitted]:
    rng = np.random.default_rng(seed)
    start = datetime(1998, 1, 1, tzinfo=UTC)
    ratings = []
    for user in range(n_users):
        movies = rng.choice(GROUPS[user % 2], size=per_user, replace=False)
        for step, movie in enumerate(movies):
            ratings.append(
                RatingSubmitted(
                    user_id=str(user),
                    movie_id=str(movie),
                    rating=float(rng.integers(3, 6)),
                    occurred_at=start + timedelta(minutes=user * 100 + step),
                )
            )
    return ratings


RATINGS = make_ratings()


def vectors(encoder: ItemEncoder, movies: list[MoviePublished]) -> np.ndarray:
    return np.stack([item.vector for item in encoder.encode(movies_of(movies))])

"""The temporal TRAIN/TEST split of protocol T1.

Ratings are ordered by ``occurred_at`` with ties kept in input order (a stable sort), so
the split of the same file is the same on every machine. The first part is TRAIN
(everything offline training may see), the rest is the TEST stream, replayed in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.events import RatingSubmitted
from shared.types import MovieId, UserId

DEFAULT_TRAIN_FRACTION = 0.8
"""Share of the ratings in TRAIN: 80,000 of ML-100K's 100,000."""

DEFAULT_VALIDATION_FRACTION = 0.1
"""Share of TRAIN held out by ``Split.validation``: the last 8,000 of ML-100K's TRAIN."""


def _check_fraction(name: str, fraction: float) -> None:
    # ``not 0 < x < 1`` also rejects NaN, which compares false with everything.
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {fraction!r}")


def _train_size(n: int, train_fraction: float) -> int:
    """``floor(n * train_fraction)``, the number of ratings that go to TRAIN.

    The product is rounded to 9 decimals before the floor so that a float just below a
    whole number still counts as it (100 x 0.29 is 28.999999999999996 in binary floating
    point and must give 29, not 28). For ML-100K, 100,000 x 0.8 gives exactly 80,000.
    """
    return math.floor(round(n * train_fraction, 9))


@dataclass(frozen=True)
class Split:
    """A time-ordered TRAIN/TEST split of ratings.

    Build it with ``temporal_split``; ``train_users`` and ``train_items`` are the users and
    movies with at least one TRAIN rating.
    """

    train: tuple[RatingSubmitted, ...]
    """The first part of the ratings, in time order."""
    test: tuple[RatingSubmitted, ...]
    """The rest, in time order: the stream replayed one event at a time."""
    train_users: frozenset[UserId]
    train_items: frozenset[MovieId]

    def is_cold_user(self, user_id: UserId) -> bool:
        """True when the user has no TRAIN rating."""
        return user_id not in self.train_users

    def is_cold_item(self, movie_id: MovieId) -> bool:
        """True when the movie has no TRAIN rating."""
        return movie_id not in self.train_items

    def validation(self, fraction: float = DEFAULT_VALIDATION_FRACTION) -> Split:
        """A split of TRAIN alone, for tuning without touching TEST.

        Its TEST is the last ``fraction`` of TRAIN (default 0.1) and its TRAIN the rest,
        cut with the same rule as ``temporal_split(self.train, 1 - fraction)``: the
        validation TRAIN gets ``floor(len(train) * (1 - fraction))`` ratings.

        Raises:
            ValueError: ``fraction`` is not strictly between 0 and 1.
        """
        _check_fraction("fraction", fraction)
        return temporal_split(self.train, 1.0 - fraction)


def temporal_split(
    ratings: Sequence[RatingSubmitted], train_fraction: float = DEFAULT_TRAIN_FRACTION
) -> Split:
    """Split ratings in time: the earliest ``floor(n * train_fraction)`` are TRAIN.

    The ratings are sorted by ``(occurred_at, position in the input)``: ratings with the
    same timestamp keep their input order (ML-100K has many, since its timestamps are
    whole seconds). The product ``n * train_fraction`` is rounded to 9 decimals before
    the floor, so 100,000 x 0.8 gives exactly 80,000 TRAIN and 20,000 TEST ratings, and
    10 x 0.8 gives 8 and 2.

    Args:
        ratings: any order; not modified.
        train_fraction: share of the ratings in TRAIN, strictly between 0 and 1
            (default 0.8).

    Raises:
        ValueError: ``train_fraction`` is not strictly between 0 and 1.
    """
    _check_fraction("train_fraction", train_fraction)
    # sorted() is stable, which is exactly the tie rule of protocol T1.
    ordered = tuple(sorted(ratings, key=lambda rating: rating.occurred_at))
    cut = _train_size(len(ordered), train_fraction)
    train, test = ordered[:cut], ordered[cut:]
    return Split(
        train=train,
        test=test,
        train_users=frozenset(rating.user_id for rating in train),
        train_items=frozenset(rating.movie_id for rating in train),
    )


def arrivals(split: Split) -> dict[MovieId, int]:
    """For every cold movie rated in TEST, the index in ``split.test`` of its first rating.

    Used by the "items arrive mid-stream" variant: such a movie is added to the models
    just before that event. Keys are in order of arrival.
    """
    first: dict[MovieId, int] = {}
    for index, rating in enumerate(split.test):
        if rating.movie_id not in first and split.is_cold_item(rating.movie_id):
            first[rating.movie_id] = index
    return first

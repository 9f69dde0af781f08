"""Online features of items and users for the ranker, updated per rating in O(1).

``ItemStats`` follows every rating event (``learn_one``) and keeps, per movie, an
exponentially decayed rating count (recent popularity), the total count and the rating
sum, plus the global rating sum and count. ``features`` turns them into the ranker's
item-feature columns; ``user_features`` does the same for a user's rating count and
mean. Nothing here needs torch, so the recommender service can keep an ``ItemStats``
per process and snapshot it (``to_bytes``) cheaply.

Item feature columns (``ITEM_FEATURE_NAMES``, float32):

0. ``log_recent_share``: ``log1p(1000 * decayed count / decayed total) / FEATURE_SCALE``,
   i.e. the movie's share of the recent (decayed) ratings, per 1,000 ratings. A share
   rather than a raw decayed count, so that the value means the same at the start of a
   stream (little decayed mass) as in steady state (about ``half_life / ln 2`` events).
1. ``log_count``: ``log1p(ratings of the movie ever) / FEATURE_SCALE``.
2. ``mean_offset``: the movie's shrunk mean rating minus the global mean, in stars:
   ``(sum + k * mu) / (n + k) - mu = (sum - n * mu) / (n + k)`` with ``k`` the prior
   strength (pseudo-ratings at the global mean ``mu``); Koren's item bias.
3. ``unrated``: 1.0 for a movie with no rating yet, else 0.0.

A movie never seen gets the features of a movie with no ratings: ``[0, 0, 0, 1]``.

User feature columns (``USER_FEATURE_NAMES``, float32):

0. ``log_count``: ``log1p(ratings the user gave) / FEATURE_SCALE``.
1. ``mean_offset``: the user's mean rating (the caller's estimate, e.g. the shrunk mean
   of ``UserUpdater.mean_rating``) minus ``DEFAULT_PRIOR_RATING`` (3.5 stars).
2. ``new_user``: 1.0 while the user has given fewer than ``NEW_USER_RATINGS`` (5)
   ratings, else 0.0: early profiles are noisy and the ranker may trust them less.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from shared.exceptions import InvalidEventError, NumericalError
from shared.models.updater import DEFAULT_PRIOR_RATING
from shared.types import Matrix, MovieId

ITEM_FEATURE_NAMES: tuple[str, ...] = ("log_recent_share", "log_count", "mean_offset", "unrated")
"""The item feature columns, in order (see the module docstring)."""

N_ITEM_FEATURES = len(ITEM_FEATURE_NAMES)

USER_FEATURE_NAMES: tuple[str, ...] = ("log_count", "mean_offset", "new_user")
"""The user feature columns, in order (see the module docstring)."""

N_USER_FEATURES = len(USER_FEATURE_NAMES)

FEATURE_SCALE = 4.0
"""``log1p`` counts are divided by this so that typical values (0 to a few hundred
ratings) stay within about 0..2, the range of the other inputs."""

SHARE_PER = 1000.0
"""The recent share is expressed per this many recent ratings before ``log1p``."""

NEW_USER_RATINGS = 5
"""A user with fewer ratings than this has ``new_user = 1``."""

DEFAULT_HALF_LIFE = 5_000.0
"""Events after which a rating's weight in the decayed count halves (the half-life
chosen for ``OnlinePopularity`` on a validation split of TRAIN)."""

DEFAULT_PRIOR_STRENGTH = 10.0
"""Pseudo-ratings at the global mean in a movie's shrunk mean (as the bias baseline's
item shrinkage)."""

_RENORMALISE_AT = 1e100
"""When the growing increment passes this, every raw count is rescaled (before float
overflow); amortised O(1) per event."""


class ItemStats:
    """Online per-movie rating statistics and the ranker's item features.

    Decay is counted in events: before each rating every movie's decayed count is
    multiplied by ``gamma = 2^(-1/half_life)``, then the rated movie's grows by 1, so a
    rating ``half_life`` events old weighs 1/2. This is O(1) per event: instead of
    shrinking every count, the increment grows by ``1/gamma`` per event and raw counts
    are divided by it on read; all raw counts and the increment are rescaled together
    when it passes ``1e100``.

    Args:
        half_life: events after which a rating's weight halves (default 5,000, > 0).
        prior_strength: pseudo-ratings at the global mean in a movie's shrunk mean
            (default 10, >= 0).

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        half_life: float = DEFAULT_HALF_LIFE,
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    ) -> None:
        if not (math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be > 0 events, got {half_life!r}")
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")
        self.half_life = float(half_life)
        self.prior_strength = float(prior_strength)
        self._growth = 2.0 ** (1.0 / self.half_life)
        self._increment = 1.0
        self._raw_total = 0.0  # Σ of all raw increments: the decayed total times _increment
        self._n = 0
        self._sum = 0.0
        # movie -> [raw decayed count, count, rating sum]; lists so updates stay in place.
        self._items: dict[MovieId, list[float]] = {}

    # --- state ------------------------------------------------------------------------------

    def params(self) -> dict[str, float]:
        """The constructor arguments: ``ItemStats(**stats.params())`` starts an equal,
        empty one (stored in ranker checkpoints so services build the same features)."""
        return {"half_life": self.half_life, "prior_strength": self.prior_strength}

    @property
    def n_ratings(self) -> int:
        """Ratings learned so far."""
        return self._n

    @property
    def global_mean(self) -> float:
        """Mean of every rating learned, in stars (``DEFAULT_PRIOR_RATING`` before any)."""
        return self._sum / self._n if self._n else DEFAULT_PRIOR_RATING

    def count(self, movie_id: MovieId) -> int:
        """Ratings of the movie so far (0 when never seen)."""
        entry = self._items.get(movie_id)
        return 0 if entry is None else int(entry[1])

    def decayed_count(self, movie_id: MovieId) -> float:
        """Σ over the movie's ratings of ``gamma^(events since)`` (the newest weighs 1)."""
        entry = self._items.get(movie_id)
        return 0.0 if entry is None else entry[0] / self._increment

    def decayed_total(self) -> float:
        """``decayed_count`` summed over every movie."""
        return self._raw_total / self._increment

    def shrunk_mean(self, movie_id: MovieId) -> float:
        """The movie's mean rating in stars shrunk towards the global mean ``mu`` with
        ``prior_strength`` pseudo-ratings: ``(sum + k*mu) / (n + k)``; ``mu`` for a movie
        without ratings."""
        mu = self.global_mean
        entry = self._items.get(movie_id)
        if entry is None or entry[1] + self.prior_strength == 0:
            return mu
        return (entry[2] + self.prior_strength * mu) / (entry[1] + self.prior_strength)

    # --- learning ---------------------------------------------------------------------------

    def learn_one(self, movie_id: MovieId, rating: float) -> None:
        """Decay every count and add one rating of ``rating`` stars to the movie.

        Raises:
            NumericalError: ``rating`` is NaN or infinite (nothing is changed).
        """
        if not math.isfinite(rating):
            raise NumericalError(f"rating is not finite: {rating}")
        self._increment *= self._growth
        entry = self._items.get(movie_id)
        if entry is None:
            entry = self._items[movie_id] = [0.0, 0.0, 0.0]
        entry[0] += self._increment
        entry[1] += 1.0
        entry[2] += float(rating)
        self._raw_total += self._increment
        self._n += 1
        self._sum += float(rating)
        if self._increment > _RENORMALISE_AT:
            scale = self._increment
            for values in self._items.values():
                values[0] /= scale
            self._raw_total /= scale
            self._increment = 1.0

    def learn_many(self, movie_ids: Sequence[MovieId], ratings: Sequence[float]) -> None:
        """``learn_one`` for each (movie, rating) in order; the same result.

        Raises:
            ValueError: the sequences differ in length (nothing is changed).
            NumericalError: a rating is NaN or infinite (nothing is changed).
        """
        if len(movie_ids) != len(ratings):
            raise ValueError(f"{len(movie_ids)} movie ids but {len(ratings)} ratings")
        if not all(math.isfinite(r) for r in ratings):
            raise NumericalError("a rating is not finite")
        for movie_id, rating in zip(movie_ids, ratings, strict=True):
            self.learn_one(movie_id, rating)

    def trending(self, n: int) -> list[MovieId]:
        """The ``n`` movies with the highest decayed count, highest first (ties: the
        movie first rated earlier). Costs one pass over the rated movies."""
        if n <= 0 or not self._items:
            return []
        ids = list(self._items)
        counts = np.fromiter((v[0] for v in self._items.values()), dtype=np.float64, count=len(ids))
        n = min(n, len(ids))
        top = np.argpartition(-counts, n - 1)[:n] if n < len(ids) else np.arange(len(ids))
        order = top[np.lexsort((top, -counts[top]))]
        return [ids[i] for i in order]

    # --- features ---------------------------------------------------------------------------

    def features(self, movie_ids: Sequence[MovieId]) -> Matrix:
        """The item features of each movie as of now: ``(n, N_ITEM_FEATURES)`` float32,
        columns ``ITEM_FEATURE_NAMES``; an unknown movie gets ``[0, 0, 0, 1]``."""
        out = np.zeros((len(movie_ids), N_ITEM_FEATURES), dtype=np.float64)
        out[:, 3] = 1.0
        mu = self.global_mean
        k = self.prior_strength
        raw_total = self._raw_total
        for row, movie_id in enumerate(movie_ids):
            entry = self._items.get(movie_id)
            if entry is None:
                continue
            raw, n, total = entry
            # raw / raw_total: the increment cancels, so no division by it is needed.
            out[row, 0] = math.log1p(SHARE_PER * raw / raw_total) / FEATURE_SCALE
            out[row, 1] = math.log1p(n) / FEATURE_SCALE
            out[row, 2] = (total - n * mu) / (n + k) if n + k > 0 else 0.0
            out[row, 3] = 0.0
        return out.astype(np.float32)

    # --- snapshot ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact JSON: parameters, global sums and ``movie -> [raw, count, sum]``.
        Floats round-trip exactly (orjson writes the shortest exact form)."""
        return orjson.dumps(
            {
                "h": self.half_life,
                "k": self.prior_strength,
                "g": self._increment,
                "t": self._raw_total,
                "n": self._n,
                "s": self._sum,
                "i": self._items,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ItemStats:
        """Read ``to_bytes`` output.

        Raises:
            InvalidEventError: the bytes are not an item-stats snapshot.
        """
        try:
            data: Any = orjson.loads(raw)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            stats = cls(float(data["h"]), float(data["k"]))
            stats._increment = float(data["g"])
            stats._raw_total = float(data["t"])
            stats._n = int(data["n"])
            stats._sum = float(data["s"])
            items = data["i"]
            if not isinstance(items, dict):
                raise TypeError("items must be a JSON object")
            for movie_id, values in items.items():
                if len(values) != 3:
                    raise ValueError(f"movie {movie_id!r} needs [raw, count, sum]")
                stats._items[str(movie_id)] = [float(v) for v in values]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(
                f"not an item-stats snapshot: {type(exc).__name__}: {exc}"
            ) from exc
        return stats


def user_features(n_ratings: int, mean_rating: float) -> np.ndarray:
    """The user features of a user with ``n_ratings`` ratings and mean rating
    ``mean_rating`` stars: ``(N_USER_FEATURES,)`` float32, columns ``USER_FEATURE_NAMES``.

    Raises:
        ValueError: ``n_ratings < 0``.
        NumericalError: ``mean_rating`` is NaN or infinite.
    """
    return user_features_batch([n_ratings], [mean_rating])[0]


def user_features_batch(n_ratings: Sequence[int], mean_ratings: Sequence[float]) -> Matrix:
    """``user_features`` of each row: ``(n, N_USER_FEATURES)`` float32.

    Raises:
        ValueError: the sequences differ in length, or a count is negative.
        NumericalError: a mean rating is NaN or infinite.
    """
    if len(n_ratings) != len(mean_ratings):
        raise ValueError(f"{len(n_ratings)} counts but {len(mean_ratings)} mean ratings")
    counts = np.asarray(n_ratings, dtype=np.float64).reshape(-1)
    means = np.asarray(mean_ratings, dtype=np.float64).reshape(-1)
    if (counts < 0).any():
        raise ValueError("n_ratings must be >= 0")
    if not np.isfinite(means).all():
        raise NumericalError("a mean rating is not finite")
    out = np.empty((len(counts), N_USER_FEATURES), dtype=np.float64)
    out[:, 0] = np.log1p(counts) / FEATURE_SCALE
    out[:, 1] = means - DEFAULT_PRIOR_RATING
    out[:, 2] = (counts < NEW_USER_RATINGS).astype(np.float64)
    return out.astype(np.float32)

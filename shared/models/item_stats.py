"""Online features of items and users for the ranker, updated per rating in O(1).

``ItemStats`` follows every rating event (``learn_one``) and keeps, per movie, two
exponentially decayed rating counts (recent popularity over a long and a short
half-life), the total count and the rating sum, plus the global rating sum and count
and the stream's event time (the latest ``occurred_at`` seen). ``features`` turns them,
with the movies' release years, into the ranker's item-feature columns;
``user_features`` does the same for a user's rating count and mean and the item biases
of what they rated. Nothing here needs torch, so the recommender service can keep an
``ItemStats`` per process and snapshot it (``to_bytes``) cheaply.

Item feature columns (``ITEM_FEATURE_NAMES``, float32):

0. ``log_recent_share``: ``log1p(1000 * decayed count / decayed total) / FEATURE_SCALE``,
   i.e. the movie's share of the recent (decayed) ratings, per 1,000 ratings. A share
   rather than a raw decayed count, so that the value means the same at the start of a
   stream (little decayed mass) as in steady state (about ``half_life / ln 2`` events).
1. ``log_fast_share``: the same over the short half-life (default 500 events): what is
   being rated right now, e.g. a new release in its first days.
2. ``log_count``: ``log1p(ratings of the movie ever) / FEATURE_SCALE``.
3. ``mean_offset``: the movie's shrunk mean rating minus the global mean, in stars:
   ``(sum + k * mu) / (n + k) - mu = (sum - n * mu) / (n + k)`` with ``k`` the prior
   strength (pseudo-ratings at the global mean ``mu``); Koren's item bias.
4. ``unrated``: 1.0 for a movie with no rating yet, else 0.0.
5. ``log_age``: ``log1p(years from the release year to the stream's time, clipped to
   [0, 50]) / FEATURE_SCALE``; 0 when the year or the stream's time is unknown.
6. ``new_release``: 1.0 when the stream's time is less than a year past the start of the
   release year (this year's movies), else 0.0.

The stream's time is event time (the newest ``occurred_at`` learned), not the wall
clock, so a replay of 1998 ratings sees 1998's new releases as new. A movie never seen
gets the features of a movie with no ratings: ``[0, 0, 0, 0, 1, age, new]``.

User feature columns (``USER_FEATURE_NAMES``, float32):

0. ``log_count``: ``log1p(ratings the user gave) / FEATURE_SCALE``.
1. ``mean_offset``: the user's mean rating (the caller's estimate, e.g. the shrunk mean
   of ``UserUpdater.mean_rating``) minus ``DEFAULT_PRIOR_RATING`` (3.5 stars).
2. ``new_user``: 1.0 while the user has given fewer than ``NEW_USER_RATINGS`` (5)
   ratings, else 0.0: early profiles are noisy and the ranker may trust them less.
3. ``rated_offset``: the mean ``mean_offset`` (item bias) of the movies the user rated
   (``ItemStats.rated_offset``), so that ``mean_offset - rated_offset`` separates a
   generous user from one who picks good movies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from shared.exceptions import InvalidEventError, NumericalError
from shared.models.updater import DEFAULT_PRIOR_RATING
from shared.types import Matrix, MovieId

ITEM_FEATURE_NAMES: tuple[str, ...] = (
    "log_recent_share",
    "log_fast_share",
    "log_count",
    "mean_offset",
    "unrated",
    "log_age",
    "new_release",
)
"""The item feature columns, in order (see the module docstring)."""

N_ITEM_FEATURES = len(ITEM_FEATURE_NAMES)

PAIR_FEATURE_NAMES: tuple[str, ...] = ("cf_score",)
"""Feature columns of a (user, movie) pair rather than of the movie alone, appended to
the item features of each candidate: ``cf_score``, the user's online BPR score of the
movie standardised over the movies it knows (``shared.models.online_cf``)."""

N_PAIR_FEATURES = len(PAIR_FEATURE_NAMES)

CANDIDATE_FEATURE_NAMES: tuple[str, ...] = ITEM_FEATURE_NAMES + PAIR_FEATURE_NAMES
"""The ranker's feature columns per candidate: the item features, then the pair ones."""

N_CANDIDATE_FEATURES = len(CANDIDATE_FEATURE_NAMES)

USER_FEATURE_NAMES: tuple[str, ...] = ("log_count", "mean_offset", "new_user", "rated_offset")
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

DEFAULT_FAST_HALF_LIFE = 500.0
"""Half-life of the second, short-memory decayed count (``log_fast_share``)."""

MAX_AGE_YEARS = 50.0
"""Ages beyond this many years count as this old (``log_age``)."""

DEFAULT_PRIOR_STRENGTH = 10.0
"""Pseudo-ratings at the global mean in a movie's shrunk mean (as the bias baseline's
item shrinkage)."""

_RENORMALISE_AT = 1e100
"""When the growing increment passes this, every raw count is rescaled (before float
overflow); amortised O(1) per event."""


class _Decay:
    """An exponentially decayed counter per key, O(1) per event.

    Before each event every count is multiplied by ``gamma = 2^(-1/half_life)``, then the
    event's key grows by 1, so an event ``half_life`` events old weighs 1/2. Instead of
    shrinking every count, the increment grows by ``1/gamma`` per event and raw counts
    are divided by it on read; the caller's raw counts and the total are rescaled
    together (``rescale``) when the increment passes ``1e100``.
    """

    def __init__(self, half_life: float) -> None:
        self.half_life = half_life
        self.growth = 2.0 ** (1.0 / half_life)
        self.increment = 1.0
        self.raw_total = 0.0  # Σ of all raw increments: the decayed total times increment

    def step(self) -> float:
        """Advance one event; returns the raw amount to add to the event's key."""
        self.increment *= self.growth
        self.raw_total += self.increment
        return self.increment

    def share(self, raw: float) -> float:
        """``log_*_share`` of a key with raw count ``raw``."""
        # raw / raw_total: the increment cancels, so no division by it is needed.
        return math.log1p(SHARE_PER * raw / self.raw_total) / FEATURE_SCALE


def _fractional_year(moment: datetime) -> float:
    """``2024.5`` for the middle of 2024 (UTC)."""
    start = datetime(moment.year, 1, 1, tzinfo=moment.tzinfo)
    end = datetime(moment.year + 1, 1, 1, tzinfo=moment.tzinfo)
    return moment.year + (moment - start).total_seconds() / (end - start).total_seconds()


class ItemStats:
    """Online per-movie rating statistics and the ranker's item features.

    Decay is counted in events (``_Decay``): a rating ``half_life`` events old weighs 1/2
    in the long-memory count and a rating ``fast_half_life`` events old weighs 1/2 in the
    short one.

    Args:
        half_life: events after which a rating's weight halves (default 5,000, > 0).
        prior_strength: pseudo-ratings at the global mean in a movie's shrunk mean
            (default 10, >= 0).
        fast_half_life: the short-memory count's half-life (default 500, > 0).

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        half_life: float = DEFAULT_HALF_LIFE,
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
        fast_half_life: float = DEFAULT_FAST_HALF_LIFE,
    ) -> None:
        for name, value in (("half_life", half_life), ("fast_half_life", fast_half_life)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 events, got {value!r}")
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")
        self.half_life = float(half_life)
        self.fast_half_life = float(fast_half_life)
        self.prior_strength = float(prior_strength)
        self._slow = _Decay(self.half_life)
        self._fast = _Decay(self.fast_half_life)
        self._n = 0
        self._sum = 0.0
        self._now: float | None = None  # the stream's time: newest occurred_at, in years
        # movie -> [raw slow count, raw fast count, count, rating sum]; updated in place.
        self._items: dict[MovieId, list[float]] = {}

    # --- state ------------------------------------------------------------------------------

    def params(self) -> dict[str, float]:
        """The constructor arguments: ``ItemStats(**stats.params())`` starts an equal,
        empty one (stored in ranker checkpoints so services build the same features)."""
        return {
            "half_life": self.half_life,
            "prior_strength": self.prior_strength,
            "fast_half_life": self.fast_half_life,
        }

    @property
    def n_ratings(self) -> int:
        """Ratings learned so far."""
        return self._n

    @property
    def global_mean(self) -> float:
        """Mean of every rating learned, in stars (``DEFAULT_PRIOR_RATING`` before any)."""
        return self._sum / self._n if self._n else DEFAULT_PRIOR_RATING

    @property
    def stream_year(self) -> float | None:
        """The stream's time as a fractional year (newest ``occurred_at`` learned), or
        None before any rating with a time."""
        return self._now

    def count(self, movie_id: MovieId) -> int:
        """Ratings of the movie so far (0 when never seen)."""
        entry = self._items.get(movie_id)
        return 0 if entry is None else int(entry[2])

    def decayed_count(self, movie_id: MovieId) -> float:
        """Σ over the movie's ratings of ``gamma^(events since)`` (the newest weighs 1)."""
        entry = self._items.get(movie_id)
        return 0.0 if entry is None else entry[0] / self._slow.increment

    def decayed_total(self) -> float:
        """``decayed_count`` summed over every movie."""
        return self._slow.raw_total / self._slow.increment

    def fast_decayed_count(self, movie_id: MovieId) -> float:
        """``decayed_count`` over ``fast_half_life``."""
        entry = self._items.get(movie_id)
        return 0.0 if entry is None else entry[1] / self._fast.increment

    def shrunk_mean(self, movie_id: MovieId) -> float:
        """The movie's mean rating in stars shrunk towards the global mean ``mu`` with
        ``prior_strength`` pseudo-ratings: ``(sum + k*mu) / (n + k)``; ``mu`` for a movie
        without ratings."""
        return self.global_mean + self._offset(self._items.get(movie_id))

    def _offset(self, entry: list[float] | None) -> float:
        """``shrunk_mean - global_mean`` of a movie's entry (0 without ratings)."""
        if entry is None or entry[2] + self.prior_strength == 0:
            return 0.0
        return (entry[3] - entry[2] * self.global_mean) / (entry[2] + self.prior_strength)

    def offsets(self, movie_ids: Sequence[MovieId]) -> np.ndarray:
        """``shrunk_mean - global_mean`` of each movie (0.0 for a movie without ratings),
        float64 ``(len(movie_ids),)``."""
        items = self._items
        return np.fromiter(
            (self._offset(items.get(m)) for m in movie_ids), dtype=np.float64, count=len(movie_ids)
        )

    def rated_offset(self, movie_ids: Sequence[MovieId]) -> float:
        """Mean item bias (``mean_offset``) of the movies, 0.0 for none: the user feature
        ``rated_offset`` of a user who rated them."""
        if not movie_ids:
            return 0.0
        items = self._items
        return sum(self._offset(items.get(m)) for m in movie_ids) / len(movie_ids)

    # --- learning ---------------------------------------------------------------------------

    def learn_one(
        self, movie_id: MovieId, rating: float, occurred_at: datetime | None = None
    ) -> None:
        """Decay every count and add one rating of ``rating`` stars to the movie; an
        ``occurred_at`` later than the stream's time moves it forward.

        Raises:
            NumericalError: ``rating`` is NaN or infinite (nothing is changed).
        """
        if not math.isfinite(rating):
            raise NumericalError(f"rating is not finite: {rating}")
        entry = self._items.get(movie_id)
        if entry is None:
            entry = self._items[movie_id] = [0.0, 0.0, 0.0, 0.0]
        entry[0] += self._slow.step()
        entry[1] += self._fast.step()
        entry[2] += 1.0
        entry[3] += float(rating)
        self._n += 1
        self._sum += float(rating)
        if occurred_at is not None:
            year = _fractional_year(occurred_at)
            if self._now is None or year > self._now:
                self._now = year
        for column, decay in ((0, self._slow), (1, self._fast)):
            if decay.increment > _RENORMALISE_AT:
                scale = decay.increment
                for values in self._items.values():
                    values[column] /= scale
                decay.raw_total /= scale
                decay.increment = 1.0

    def learn_many(
        self,
        movie_ids: Sequence[MovieId],
        ratings: Sequence[float],
        occurred_at: Sequence[datetime | None] | None = None,
    ) -> None:
        """``learn_one`` for each (movie, rating[, time]) in order; the same result.

        Raises:
            ValueError: the sequences differ in length (nothing is changed).
            NumericalError: a rating is NaN or infinite (nothing is changed).
        """
        times = [None] * len(movie_ids) if occurred_at is None else list(occurred_at)
        if not len(movie_ids) == len(ratings) == len(times):
            raise ValueError(
                f"{len(movie_ids)} movie ids, {len(ratings)} ratings and {len(times)} times"
            )
        if not all(math.isfinite(r) for r in ratings):
            raise NumericalError("a rating is not finite")
        for movie_id, rating, moment in zip(movie_ids, ratings, times, strict=True):
            self.learn_one(movie_id, rating, moment)

    def trending(self, n: int) -> list[MovieId]:
        """The ``n`` movies with the highest (long-memory) decayed count, highest first
        (ties: the movie first rated earlier). Costs one pass over the rated movies."""
        return self._top(0, n)

    def rising(self, n: int) -> list[MovieId]:
        """``trending`` by the short-memory count: the movies rated most in the last few
        ``fast_half_life`` events, such as a new release that just came out."""
        return self._top(1, n)

    def _top(self, column: int, n: int) -> list[MovieId]:
        if n <= 0 or not self._items:
            return []
        ids = list(self._items)
        counts = np.fromiter(
            (v[column] for v in self._items.values()), dtype=np.float64, count=len(ids)
        )
        n = min(n, len(ids))
        top = np.argpartition(-counts, n - 1)[:n] if n < len(ids) else np.arange(len(ids))
        order = top[np.lexsort((top, -counts[top]))]
        return [ids[i] for i in order]

    # --- features ---------------------------------------------------------------------------

    def features(
        self, movie_ids: Sequence[MovieId], years: Sequence[int | None] | None = None
    ) -> Matrix:
        """The item features of each movie as of now: ``(n, N_ITEM_FEATURES)`` float32,
        columns ``ITEM_FEATURE_NAMES``. ``years`` are the movies' release years (None
        where unknown; all unknown when not given).

        Raises:
            ValueError: ``years`` does not have one entry per movie.
        """
        if years is not None and len(years) != len(movie_ids):
            raise ValueError(f"{len(movie_ids)} movies but {len(years)} years")
        out = np.zeros((len(movie_ids), N_ITEM_FEATURES), dtype=np.float64)
        out[:, 4] = 1.0
        items = self._items
        for row, movie_id in enumerate(movie_ids):
            entry = items.get(movie_id)
            if entry is None:
                continue
            out[row, 0] = self._slow.share(entry[0])
            out[row, 1] = self._fast.share(entry[1])
            out[row, 2] = math.log1p(entry[2]) / FEATURE_SCALE
            out[row, 3] = self._offset(entry)
            out[row, 4] = 0.0
        if years is not None and self._now is not None:
            for row, year in enumerate(years):
                if year is None:
                    continue
                age = min(max(self._now - year, 0.0), MAX_AGE_YEARS)
                out[row, 5] = math.log1p(age) / FEATURE_SCALE
                out[row, 6] = 1.0 if self._now - year < 1.0 else 0.0
        return out.astype(np.float32)

    # --- snapshot ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact JSON: parameters, decay state, global sums, the stream's time and
        ``movie -> [raw slow, raw fast, count, sum]``. Floats round-trip exactly (orjson
        writes the shortest exact form)."""
        return orjson.dumps(
            {
                "p": self.params(),
                "d": [
                    [self._slow.increment, self._slow.raw_total],
                    [self._fast.increment, self._fast.raw_total],
                ],
                "n": self._n,
                "s": self._sum,
                "now": self._now,
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
            params = data["p"]
            if not isinstance(params, dict):
                raise TypeError("params must be a JSON object")
            stats = cls(**{k: float(v) for k, v in params.items()})
            (slow_inc, slow_total), (fast_inc, fast_total) = data["d"]
            stats._slow.increment, stats._slow.raw_total = float(slow_inc), float(slow_total)
            stats._fast.increment, stats._fast.raw_total = float(fast_inc), float(fast_total)
            stats._n = int(data["n"])
            stats._sum = float(data["s"])
            stats._now = None if data["now"] is None else float(data["now"])
            items = data["i"]
            if not isinstance(items, dict):
                raise TypeError("items must be a JSON object")
            for movie_id, values in items.items():
                if len(values) != 4:
                    raise ValueError(f"movie {movie_id!r} needs [raw, raw fast, count, sum]")
                stats._items[str(movie_id)] = [float(v) for v in values]
            if stats._items and not (stats._slow.raw_total > 0 and stats._fast.raw_total > 0):
                raise ValueError("decayed totals must be > 0 when there are items")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(
                f"not an item-stats snapshot: {type(exc).__name__}: {exc}"
            ) from exc
        return stats


def user_features(n_ratings: int, mean_rating: float, rated_offset: float = 0.0) -> np.ndarray:
    """The user features of a user with ``n_ratings`` ratings, mean rating
    ``mean_rating`` stars and ``rated_offset`` (``ItemStats.rated_offset`` of what they
    rated): ``(N_USER_FEATURES,)`` float32, columns ``USER_FEATURE_NAMES``.

    Raises:
        ValueError: ``n_ratings < 0``.
        NumericalError: ``mean_rating`` or ``rated_offset`` is NaN or infinite.
    """
    return user_features_batch([n_ratings], [mean_rating], [rated_offset])[0]


def user_features_batch(
    n_ratings: Sequence[int],
    mean_ratings: Sequence[float],
    rated_offsets: Sequence[float] | None = None,
) -> Matrix:
    """``user_features`` of each row: ``(n, N_USER_FEATURES)`` float32 (``rated_offsets``
    all 0.0 when not given).

    Raises:
        ValueError: the sequences differ in length, or a count is negative.
        NumericalError: a mean rating or offset is NaN or infinite.
    """
    offsets = [0.0] * len(n_ratings) if rated_offsets is None else rated_offsets
    if not len(n_ratings) == len(mean_ratings) == len(offsets):
        raise ValueError(
            f"{len(n_ratings)} counts, {len(mean_ratings)} mean ratings and "
            f"{len(offsets)} rated offsets"
        )
    counts = np.asarray(n_ratings, dtype=np.float64).reshape(-1)
    means = np.asarray(mean_ratings, dtype=np.float64).reshape(-1)
    offs = np.asarray(offsets, dtype=np.float64).reshape(-1)
    if (counts < 0).any():
        raise ValueError("n_ratings must be >= 0")
    if not (np.isfinite(means).all() and np.isfinite(offs).all()):
        raise NumericalError("a mean rating or rated offset is not finite")
    out = np.empty((len(counts), N_USER_FEATURES), dtype=np.float64)
    out[:, 0] = np.log1p(counts) / FEATURE_SCALE
    out[:, 1] = means - DEFAULT_PRIOR_RATING
    out[:, 2] = (counts < NEW_USER_RATINGS).astype(np.float64)
    out[:, 3] = offs
    return out.astype(np.float32)

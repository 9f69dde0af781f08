"""Online features of items and users for the ranker.

A movie's online statistics (``MovieStats``) are its rating count and sum, two decayed
counts of its ratings in event time (over a long and a short half-life, in days) and
how often each other movie was among the recent movies of its raters (co-rating
counts). They depend only on the movie's own ratings, not on the order they arrive in
(up to float rounding), so the item side, where each movie's ratings are in one
partition, keeps them per movie and publishes them on ``item-features``; a reader
``put``s them into an ``ItemStats``. Offline, ``ItemStats.learn_one`` builds the same
from a rating stream. Nothing here needs torch.

``ItemStats`` derives what spans movies on read: the global rating mean and count, the
stream's time (the newest ``occurred_at`` of any rating) and the decayed totals. Its
``features`` turn a movie's statistics, with its release year, into the ranker's item
feature columns; ``user_features`` does the same for a user's rating count and mean
and the item biases of what they rated.

Item feature columns (``ITEM_FEATURE_NAMES``, float32):

0. ``log_recent_share``: ``log1p(1000 * decayed count / decayed total) / FEATURE_SCALE``:
   the movie's share of the recent ratings, per 1,000, where a rating ``half_life_days``
   older than the stream's time weighs 1/2. A share rather than a raw decayed count, so
   that it means the same whatever the stream's rate.
1. ``log_fast_share``: the same over the short half-life (default 1 day): what is being
   rated right now, e.g. a new release in its first days.
2. ``log_count``: ``log1p(ratings of the movie ever) / FEATURE_SCALE``.
3. ``mean_offset``: the movie's shrunk mean rating minus the global mean, in stars:
   ``(sum + k * mu) / (n + k) - mu = (sum - n * mu) / (n + k)`` with ``k`` the prior
   strength (pseudo-ratings at the global mean ``mu``); Koren's item bias.
4. ``unrated``: 1.0 for a movie with no rating yet, else 0.0.
5. ``log_age``: ``log1p(years from the release year to the stream's time, clipped to
   [0, 50]) / FEATURE_SCALE``; 0 when the year or the stream's time is unknown.
6. ``new_release``: 1.0 when the stream's time is less than a year past the start of the
   release year (this year's movies), else 0.0.

The stream's time is event time, not the wall clock, so a replay of 1998 ratings sees
1998's new releases as new. A movie never seen gets the features of a movie with no
ratings: ``[0, 0, 0, 0, 1, age, new]``.

The pair features (``PAIR_FEATURE_NAMES``), of a user and a candidate: ``co_score``, how
often the candidate was rated by users who had lately rated what this user lately rated
(``ItemStats.co_scores`` over the user's ``CO_RATED_WINDOW`` latest movies), standardised
over the user's candidates; ``co_score_long``, the same over the user's
``CO_LONG_WINDOW`` latest movies (their taste beyond the last few).

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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from shared.exceptions import NumericalError
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

PAIR_FEATURE_NAMES: tuple[str, ...] = ("co_score", "co_score_long")
"""Feature columns of a (user, movie) pair rather than of the movie alone, appended to
the item features of each candidate (see the module docstring)."""

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

DEFAULT_HALF_LIFE_DAYS = 10.0
"""Days after which a rating's weight in the decayed count halves: about the span of
5,000 ratings at MovieLens-100K's mean rate (465 a day)."""

DEFAULT_FAST_HALF_LIFE_DAYS = 1.0
"""Half-life of the second, short-memory decayed count (``log_fast_share``): about 500
MovieLens-100K ratings."""

CO_RATED_WINDOW = 10
"""How many of a rater's latest earlier-rated movies a rating counts as co-rated with
the movie (``ItemRated.co_rated``), and how many of a user's latest rated movies
``co_scores`` reads."""

CO_LONG_WINDOW = 50
"""How many of a user's latest rated movies ``co_score_long`` reads."""

CO_TOP = 50
"""How many co-rated movies a movie's published statistics keep: its most co-rated
(``MovieStats.top_co``)."""

EQUAL_SPREAD = 1e-12
"""``co_scores`` below this relative spread count as all equal (all 0 once standardised)."""

MAX_AGE_YEARS = 50.0
"""Ages beyond this many years count as this old (``log_age``)."""

DEFAULT_PRIOR_STRENGTH = 10.0
"""Pseudo-ratings at the global mean in a movie's shrunk mean (as the bias baseline's
item shrinkage)."""

SECONDS_PER_DAY = 86_400.0


def days(moment: datetime) -> float:
    """``moment`` as days since the Unix epoch (an aware datetime)."""
    return moment.timestamp() / SECONDS_PER_DAY


def co_rated(rated: Sequence[MovieId], movie_id: MovieId) -> list[MovieId]:
    """The ``CO_RATED_WINDOW`` latest of ``rated`` (a user's rated movies, oldest first,
    each once) other than ``movie_id``: what a rating of ``movie_id`` counts as co-rated
    with it."""
    # Each movie is in ``rated`` once, so one more than the window is enough.
    return [m for m in rated[-(CO_RATED_WINDOW + 1) :] if m != movie_id][-CO_RATED_WINDOW:]


def _log2_add(a: float, b: float) -> float:
    """``log2(2**a + 2**b)`` without overflow (``-inf`` is log2 of 0)."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a >= b else (b, a)
    return high + math.log2(1.0 + 2.0 ** (low - high))


def _fractional_year(day: float) -> float:
    """``2024.5`` for the middle of 2024 (UTC), from days since the epoch."""
    moment = datetime.fromtimestamp(day * SECONDS_PER_DAY, tz=UTC)
    start = datetime(moment.year, 1, 1, tzinfo=UTC)
    end = datetime(moment.year + 1, 1, 1, tzinfo=UTC)
    return moment.year + (moment - start).total_seconds() / (end - start).total_seconds()


@dataclass(frozen=True)
class MovieStats:
    """One movie's online rating statistics (see the module docstring).

    The decayed counts are kept as ``log2`` of ``Σ 2^(t_i / half_life)`` over the
    movie's ratings' times ``t_i`` (days since the epoch): a sum, so the order of the
    ratings does not matter, and a logarithm, so it never overflows. Read at the stream's
    time ``T`` the decayed count is ``2^(log - T / half_life)``.
    """

    count: int = 0
    rating_sum: float = 0.0
    log_decayed: float = -math.inf
    """``log2 Σ 2^(t_i / half_life_days)``; ``-inf`` without ratings."""
    log_fast_decayed: float = -math.inf
    """The same over ``fast_half_life_days``."""
    last_day: float | None = None
    """The newest rating's ``occurred_at`` in days since the epoch."""
    co: Mapping[MovieId, int] = field(default_factory=dict)
    """Per other movie, how many of this movie's raters had it among their
    ``CO_RATED_WINDOW`` latest earlier-rated movies (all of them, or the ``CO_TOP``
    most co-rated where the statistics were published)."""
    _top: tuple[MovieId, ...] | None = field(default=None, init=False, compare=False, repr=False)
    """The ``CO_TOP`` most co-rated movies in ``top_co``'s order, once asked for: ``co``
    only grows, so the next statistics' are found among these and the movies a rating
    added to (``added_many``) instead of among all of ``co``."""

    def added(
        self,
        rating: float,
        occurred_at: datetime,
        co_rated: Iterable[MovieId],
        half_life_days: float,
        fast_half_life_days: float,
    ) -> MovieStats:
        """These statistics with one more rating of ``rating`` stars.

        Raises:
            NumericalError: ``rating`` is NaN or infinite.
        """
        return self.added_many(
            [(rating, occurred_at, co_rated)], half_life_days, fast_half_life_days
        )

    def added_many(
        self,
        ratings: Iterable[tuple[float, datetime, Iterable[MovieId]]],
        half_life_days: float,
        fast_half_life_days: float,
    ) -> MovieStats:
        """``added`` of each ``(rating, occurred_at, co_rated)`` in turn (the very same
        statistics), with the co-rating counts copied once rather than per rating.

        Raises:
            NumericalError: a rating is NaN or infinite.
        """
        count, rating_sum, last_day = self.count, self.rating_sum, self.last_day
        log_decayed, log_fast = self.log_decayed, self.log_fast_decayed
        co = dict(self.co)
        counted: set[MovieId] = set()
        for rating, occurred_at, co_rated in ratings:
            if not math.isfinite(rating):
                raise NumericalError(f"rating is not finite: {rating}")
            day = days(occurred_at)
            for other in co_rated:
                co[other] = co.get(other, 0) + 1
                counted.add(other)
            count += 1
            rating_sum += float(rating)
            log_decayed = _log2_add(log_decayed, day / half_life_days)
            log_fast = _log2_add(log_fast, day / fast_half_life_days)
            last_day = day if last_day is None else max(last_day, day)
        stats = MovieStats(
            count=count,
            rating_sum=rating_sum,
            log_decayed=log_decayed,
            log_fast_decayed=log_fast,
            last_day=last_day,
            co=co,
        )
        if self._top is not None:
            # Counts only grow: a movie outside the old top whose count did not move
            # still ranks below every movie of the old top.
            stats._keep_top(_ranked(co, counted.union(self._top), CO_TOP))
        return stats

    def top_co(self, n: int = CO_TOP) -> dict[MovieId, int]:
        """The ``n`` most co-rated movies and their counts (ties: the smaller id first),
        most co-rated first."""
        co = self.co
        if n <= 0:
            return {}
        if n == CO_TOP and self._top is not None:
            return {movie: co[movie] for movie in self._top}
        if len(co) > n:
            # Only the movies counted at least the n-th highest count can make the list.
            cut = sorted(co.values(), reverse=True)[n - 1]
            top = _ranked(co, [movie for movie, count in co.items() if count >= cut], n)
        else:
            top = _ranked(co, co, n)
        if n == CO_TOP:
            self._keep_top(top)
        return {movie: co[movie] for movie in top}

    def _keep_top(self, top: tuple[MovieId, ...]) -> None:
        object.__setattr__(self, "_top", top)  # a cache of a frozen value

    def published(self) -> MovieStats:
        """These statistics with only the ``CO_TOP`` most co-rated movies, as they are
        published: reading them gives the same features as these."""
        return replace(self, co=self.top_co())


def _ranked(co: Mapping[MovieId, int], movies: Iterable[MovieId], n: int) -> tuple[MovieId, ...]:
    """The ``n`` most co-rated of ``movies`` (ties: the smaller id first)."""
    return tuple(sorted(movies, key=lambda movie: (-co[movie], movie))[:n])


class ItemStats:
    """Every movie's ``MovieStats`` and the ranker's features read from them.

    Args:
        half_life_days: days after which a rating's weight in the decayed count halves
            (default 10, > 0).
        prior_strength: pseudo-ratings at the global mean in a movie's shrunk mean
            (default 10, >= 0).
        fast_half_life_days: the short-memory count's half-life (default 1 day, > 0).

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        half_life_days: float = DEFAULT_HALF_LIFE_DAYS,
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
        fast_half_life_days: float = DEFAULT_FAST_HALF_LIFE_DAYS,
    ) -> None:
        for name, value in (
            ("half_life_days", half_life_days),
            ("fast_half_life_days", fast_half_life_days),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 days, got {value!r}")
        if not (math.isfinite(prior_strength) and prior_strength >= 0):
            raise ValueError(f"prior_strength must be >= 0, got {prior_strength!r}")
        self.half_life_days = float(half_life_days)
        self.fast_half_life_days = float(fast_half_life_days)
        self.prior_strength = float(prior_strength)
        self._items: dict[MovieId, MovieStats] = {}
        self._n = 0
        self._sum = 0.0
        self._last_day: float | None = None
        # Read-side reverse index of the top co-rated movies: per movie r, the movies m
        # that keep r among their most co-rated, weighted co(m, r) / sqrt(n_m). Movies
        # whose statistics changed since it was read are re-indexed on the next read.
        self._followers: dict[MovieId, dict[MovieId, float]] = {}
        self._indexed: dict[MovieId, tuple[MovieId, ...]] = {}
        self._stale: set[MovieId] = set()
        # The same per movie r as arrays (columns of the followers, their weights), built
        # when first read after a change; a column per movie ever indexed.
        self._follower_arrays: dict[MovieId, tuple[np.ndarray, np.ndarray]] = {}
        self._columns: dict[MovieId, int] = {}
        self._column_ids: list[MovieId] = []
        # Read-side caches of the decayed counts, rebuilt when a movie changes.
        self._decayed: tuple[list[MovieId], np.ndarray, np.ndarray] | None = None

    # --- state ------------------------------------------------------------------------------

    def params(self) -> dict[str, float]:
        """The constructor arguments: ``ItemStats(**stats.params())`` starts an equal,
        empty one (stored in ranker checkpoints so services build the same features)."""
        return {
            "half_life_days": self.half_life_days,
            "prior_strength": self.prior_strength,
            "fast_half_life_days": self.fast_half_life_days,
        }

    def __len__(self) -> int:
        """Movies with statistics."""
        return len(self._items)

    def get(self, movie_id: MovieId) -> MovieStats | None:
        """The movie's statistics (None when it has none)."""
        return self._items.get(movie_id)

    @property
    def n_ratings(self) -> int:
        """Ratings of every movie."""
        return self._n

    @property
    def global_mean(self) -> float:
        """Mean of every rating, in stars (``DEFAULT_PRIOR_RATING`` before any)."""
        return self._sum / self._n if self._n else DEFAULT_PRIOR_RATING

    @property
    def stream_day(self) -> float | None:
        """The stream's time in days since the epoch (the newest ``occurred_at`` of any
        rating), or None before any."""
        return self._last_day

    @property
    def stream_year(self) -> float | None:
        """The stream's time as a fractional year, or None before any rating."""
        return None if self._last_day is None else _fractional_year(self._last_day)

    def count(self, movie_id: MovieId) -> int:
        """Ratings of the movie so far (0 when never seen)."""
        entry = self._items.get(movie_id)
        return 0 if entry is None else entry.count

    def shrunk_mean(self, movie_id: MovieId) -> float:
        """The movie's mean rating in stars shrunk towards the global mean ``mu`` with
        ``prior_strength`` pseudo-ratings: ``(sum + k*mu) / (n + k)``; ``mu`` for a movie
        without ratings."""
        return self.global_mean + self._offset(self._items.get(movie_id))

    def _offset(self, entry: MovieStats | None) -> float:
        """``shrunk_mean - global_mean`` of a movie's statistics (0 without ratings)."""
        if entry is None or entry.count + self.prior_strength == 0:
            return 0.0
        return (entry.rating_sum - entry.count * self.global_mean) / (
            entry.count + self.prior_strength
        )

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

    # --- updates ----------------------------------------------------------------------------

    def put(self, movie_id: MovieId, stats: MovieStats) -> None:
        """Replace the movie's statistics (as read from ``item-features``)."""
        old = self._forget(movie_id)
        self._items[movie_id] = stats
        self._n += stats.count
        self._sum += stats.rating_sum
        if stats.last_day is not None and (
            self._last_day is None or stats.last_day > self._last_day
        ):
            self._last_day = stats.last_day
        elif (
            old is not None
            and old.last_day is not None
            and old.last_day == self._last_day
            and (stats.last_day is None or stats.last_day < old.last_day)
        ):
            self._last_day = self._newest_day()

    def remove(self, movie_id: MovieId) -> None:
        """Forget the movie's statistics (nothing when it has none)."""
        old = self._forget(movie_id)
        if old is not None:
            del self._items[movie_id]
            if old.last_day == self._last_day:
                self._last_day = self._newest_day()

    def _forget(self, movie_id: MovieId) -> MovieStats | None:
        """Take the movie's statistics out of the totals and caches; returns them."""
        old = self._items.get(movie_id)
        if old is not None:
            self._n -= old.count
            self._sum -= old.rating_sum
        self._stale.add(movie_id)
        self._decayed = None
        return old

    def _newest_day(self) -> float | None:
        """The newest ``last_day`` of any movie (None without any)."""
        return max(
            (s.last_day for s in self._items.values() if s.last_day is not None), default=None
        )

    def learn_one(
        self,
        movie_id: MovieId,
        rating: float,
        occurred_at: datetime,
        co_rated: Iterable[MovieId] = (),
    ) -> None:
        """Add one rating of ``rating`` stars to the movie; ``co_rated``: the rater's
        latest earlier-rated movies (``CO_RATED_WINDOW`` of them).

        Raises:
            NumericalError: ``rating`` is NaN or infinite (nothing is changed).
        """
        entry = self._items.get(movie_id) or MovieStats()
        self.put(
            movie_id,
            entry.added(
                rating, occurred_at, co_rated, self.half_life_days, self.fast_half_life_days
            ),
        )

    def learn_many(
        self,
        movie_ids: Sequence[MovieId],
        ratings: Sequence[float],
        occurred_at: Sequence[datetime],
        co_rated: Sequence[Iterable[MovieId]] | None = None,
    ) -> None:
        """``learn_one`` for each (movie, rating, time[, co-rated]) in order.

        Raises:
            ValueError: the sequences differ in length (nothing is changed).
            NumericalError: a rating is NaN or infinite (nothing is changed).
        """
        co = [()] * len(movie_ids) if co_rated is None else list(co_rated)
        if not len(movie_ids) == len(ratings) == len(occurred_at) == len(co):
            raise ValueError(
                f"{len(movie_ids)} movie ids, {len(ratings)} ratings, {len(occurred_at)} "
                f"times and {len(co)} co-rated lists"
            )
        if not all(math.isfinite(r) for r in ratings):
            raise NumericalError("a rating is not finite")
        for movie_id, rating, moment, others in zip(
            movie_ids, ratings, occurred_at, co, strict=True
        ):
            self.learn_one(movie_id, rating, moment, others)

    # --- reads ------------------------------------------------------------------------------

    def _decayed_counts(self) -> tuple[list[MovieId], np.ndarray, np.ndarray]:
        """Every movie and its two decayed counts at the stream's time."""
        if self._decayed is None:
            ids = list(self._items)
            now = self._last_day or 0.0
            slow = np.fromiter(
                (s.log_decayed for s in self._items.values()), dtype=np.float64, count=len(ids)
            )
            fast = np.fromiter(
                (s.log_fast_decayed for s in self._items.values()), dtype=np.float64, count=len(ids)
            )
            self._decayed = (
                ids,
                np.exp2(slow - now / self.half_life_days),
                np.exp2(fast - now / self.fast_half_life_days),
            )
        return self._decayed

    def decayed_count(self, movie_id: MovieId) -> float:
        """Σ over the movie's ratings of ``2^(-age / half_life_days)``, ages in days from
        the stream's time (a rating at the stream's time weighs 1)."""
        entry = self._items.get(movie_id)
        if entry is None or self._last_day is None:
            return 0.0
        return float(2.0 ** (entry.log_decayed - self._last_day / self.half_life_days))

    def decayed_total(self) -> float:
        """``decayed_count`` summed over every movie."""
        return float(self._decayed_counts()[1].sum())

    def fast_decayed_count(self, movie_id: MovieId) -> float:
        """``decayed_count`` over ``fast_half_life_days``."""
        entry = self._items.get(movie_id)
        if entry is None or self._last_day is None:
            return 0.0
        return float(2.0 ** (entry.log_fast_decayed - self._last_day / self.fast_half_life_days))

    def trending(self, n: int) -> list[MovieId]:
        """The ``n`` movies with the highest (long-memory) decayed count, highest first
        (ties: the smaller id first). Costs one pass over the rated movies."""
        return self._top(1, n)

    def rising(self, n: int) -> list[MovieId]:
        """``trending`` by the short-memory count: the movies rated most in the last few
        ``fast_half_life_days``, such as a new release that just came out."""
        return self._top(2, n)

    def _top(self, column: int, n: int) -> list[MovieId]:
        if n <= 0 or not self._items:
            return []
        ids, slow, fast = self._decayed_counts()
        counts = slow if column == 1 else fast
        if n < len(ids):
            # Every movie tied with the n-th, so that ties are broken by id, not position.
            cut = np.partition(counts, len(ids) - n)[len(ids) - n]
            chosen = np.flatnonzero(counts >= cut).tolist()
        else:
            chosen = list(range(len(ids)))
        order = sorted(chosen, key=lambda i: (-counts[i], ids[i]))
        return [ids[i] for i in order[:n]]

    def _reindex(self) -> None:
        """Bring the reverse co-rating index up to date with the changed movies."""
        followers, items, arrays = self._followers, self._items, self._follower_arrays
        for movie_id in self._stale:
            for other in self._indexed.pop(movie_id, ()):
                followed = followers[other]
                del followed[movie_id]
                arrays.pop(other, None)
                if not followed:
                    del followers[other]
            entry = items.get(movie_id)
            if entry is None or entry.count == 0:
                continue
            top = entry.top_co()
            scale = 1.0 / math.sqrt(entry.count)
            if movie_id not in self._columns:
                self._columns[movie_id] = len(self._column_ids)
                self._column_ids.append(movie_id)
            for other, co in top.items():
                followers.setdefault(other, {})[movie_id] = co * scale
                arrays.pop(other, None)
            self._indexed[movie_id] = tuple(top)
        self._stale.clear()

    def _followed_by(self, movie_id: MovieId) -> tuple[np.ndarray, np.ndarray] | None:
        """The columns of the movies that keep ``movie_id`` among their most co-rated
        and their weights ``co / sqrt(n)``, in the reverse index's order; None if none."""
        cached = self._follower_arrays.get(movie_id)
        if cached is not None:
            return cached
        followed = self._followers.get(movie_id)
        if not followed:
            return None
        columns = self._columns
        pair = (
            np.fromiter((columns[m] for m in followed), dtype=np.int64, count=len(followed)),
            np.fromiter(followed.values(), dtype=np.float64, count=len(followed)),
        )
        self._follower_arrays[movie_id] = pair
        return pair

    def _co_totals(self, recent: Sequence[MovieId], window: int) -> np.ndarray:
        """``Σ_r co(m, r) / sqrt(n_m * n_r)`` over the last ``window`` distinct movies
        ``r`` of ``recent``, by column (``_columns``) of every movie ``m``: 0 for one that
        keeps none of them among its ``CO_TOP`` most co-rated. From the reverse index;
        each movie's sum is added up in the order of ``recent``."""
        latest = list(dict.fromkeys(recent))[-window:]
        if self._stale:
            self._reindex()
        columns: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        items = self._items
        for r in latest:
            entry = items.get(r)
            followed = self._followed_by(r)
            if entry is None or entry.count == 0 or followed is None:
                continue
            columns.append(followed[0])
            weights.append(followed[1] * (1.0 / math.sqrt(entry.count)))
        size = len(self._column_ids)
        if not columns:
            return np.zeros(size, dtype=np.float64)
        return np.bincount(np.concatenate(columns), np.concatenate(weights), minlength=size)

    def co_candidates(
        self, recent: Sequence[MovieId], n: int, exclude: Collection[MovieId] = ()
    ) -> list[MovieId]:
        """The ``n`` movies with the highest ``co_scores`` (before standardising) for a
        user who lately rated ``recent``, highest first (ties: the smaller id first),
        leaving out ``exclude``; only movies co-rated with one of them can score, so
        fewer when few are."""
        if n <= 0:
            return []
        totals = self._co_totals(recent, CO_RATED_WINDOW)
        scored = np.flatnonzero(totals > 0)
        wanted = n + len(exclude)
        if len(scored) > wanted:
            # Only movies at least as high as the wanted-th highest can make the list.
            cut = np.partition(totals[scored], len(scored) - wanted)[len(scored) - wanted]
            scored = scored[totals[scored] >= cut]
        ids = self._column_ids
        ranked = sorted(
            (
                pair
                for pair in zip((ids[c] for c in scored), totals[scored].tolist(), strict=True)
                if pair[0] not in exclude
            ),
            key=lambda pair: (-pair[1], pair[0]),
        )
        return [movie_id for movie_id, _ in ranked[:n]]

    def co_scores(
        self,
        recent: Sequence[MovieId],
        movie_ids: Sequence[MovieId],
        window: int = CO_RATED_WINDOW,
    ) -> np.ndarray:
        """Per movie, ``Σ_r co(movie, r) / sqrt(n_movie * n_r)`` over ``recent`` (a user's
        latest rated movies; the last ``window`` distinct ones are read), with ``co`` the
        movie's ``CO_TOP`` most co-rated and ``n`` the rating counts; then standardised
        over ``movie_ids`` (zero mean, unit deviation; all 0 when they are all equal).
        float64 ``(len(movie_ids),)``."""
        if not movie_ids:
            return np.zeros(0, dtype=np.float64)
        totals = self._co_totals(recent, window)
        columns = self._columns
        rows = np.fromiter(
            (columns.get(m, -1) for m in movie_ids), dtype=np.int64, count=len(movie_ids)
        )
        out = np.where(rows >= 0, totals[np.maximum(rows, 0)] if len(totals) else 0.0, 0.0)
        # Equal scores carry no signal; float rounding may leave them a spread of ~1e-17.
        std = float(out.std())
        if not math.isfinite(std) or std <= EQUAL_SPREAD * max(1.0, float(np.abs(out).max())):
            return np.zeros_like(out)
        return (out - out.mean()) / std

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
        if items and self._last_day is not None:
            _, slow, fast = self._decayed_counts()
            slow_total, fast_total = float(slow.sum()), float(fast.sum())
            for row, movie_id in enumerate(movie_ids):
                entry = items.get(movie_id)
                if entry is None or entry.count == 0:
                    continue
                out[row, 0] = _share(self.decayed_count(movie_id), slow_total)
                out[row, 1] = _share(self.fast_decayed_count(movie_id), fast_total)
                out[row, 2] = math.log1p(entry.count) / FEATURE_SCALE
                out[row, 3] = self._offset(entry)
                out[row, 4] = 0.0
        now = self.stream_year
        if years is not None and now is not None:
            for row, year in enumerate(years):
                if year is None:
                    continue
                age = min(max(now - year, 0.0), MAX_AGE_YEARS)
                out[row, 5] = math.log1p(age) / FEATURE_SCALE
                out[row, 6] = 1.0 if now - year < 1.0 else 0.0
        return out.astype(np.float32)


def _share(decayed: float, total: float) -> float:
    """``log_*_share`` of a movie's decayed count out of ``total``."""
    return math.log1p(SHARE_PER * decayed / total) / FEATURE_SCALE if total > 0 else 0.0


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

"""The measures of protocol T1: HR@K, NDCG@K, ILD@K, coverage, RMSE and MAE.

Each test event has exactly one relevant movie (the one the user rated next), so the
ideal DCG is 1 and NDCG@K is ``1 / log2(rank + 1)`` when the movie is in the first K
of the list, else 0. ``Scoreboard`` accumulates these per event for one model and
reports them over the whole stream and its segments (liked, cold users, cold items).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.data.movielens import ML100K_GENRES
from shared.events import MoviePublished
from shared.exceptions import NumericalError
from shared.types import MovieId

K = 10
"""Length of the lists that are scored (HR@10, NDCG@10, ILD@10)."""

LIKED_THRESHOLD = 4.0
"""Stars from which a rating counts as "liked" (>= 4.0)."""

SEGMENTS = ("all", "liked", "cold_users", "cold_items")
"""The segments of the test stream reported by ``Scoreboard.summary``."""


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def _check_distinct(recommended: Sequence[MovieId]) -> None:
    if len(set(recommended)) != len(recommended):
        seen: set[MovieId] = set()
        for movie_id in recommended:
            if movie_id in seen:
                raise ValueError(f"recommended list has movie {movie_id!r} more than once")
            seen.add(movie_id)


def rank_of(recommended: Sequence[MovieId], target: MovieId) -> int | None:
    """The 1-based position of ``target`` in the list, or None when it is absent.

    Raises:
        ValueError: the list has a movie twice.
    """
    _check_distinct(recommended)
    for position, movie_id in enumerate(recommended, start=1):
        if movie_id == target:
            return position
    return None


def _ndcg_of_rank(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= k else 0.0


def hit_at_k(recommended: Sequence[MovieId], target: MovieId, k: int = K) -> float:
    """1.0 when ``target`` is among the first ``k`` (default 10) of the list, else 0.0.

    Raises:
        ValueError: ``k < 1`` or the list has a movie twice.
    """
    _check_k(k)
    rank = rank_of(recommended, target)
    return 1.0 if rank is not None and rank <= k else 0.0


def ndcg_at_k(recommended: Sequence[MovieId], target: MovieId, k: int = K) -> float:
    """``1 / log2(rank + 1)`` when ``target`` is at ``rank <= k`` (default 10), else 0.0.

    There is one relevant movie per event, so the ideal DCG is 1: rank 1 scores 1.0,
    rank 3 scores 0.5.

    Raises:
        ValueError: ``k < 1`` or the list has a movie twice.
    """
    _check_k(k)
    return _ndcg_of_rank(rank_of(recommended, target), k)


def top_k(
    scores: npt.ArrayLike,
    ids: Sequence[MovieId],
    k: int,
    exclude: Collection[MovieId] = (),
) -> list[MovieId]:
    """The ``k`` highest-scoring ids not in ``exclude``, best first.

    Equal scores are broken by position in ``ids`` (lower first), so the result is
    deterministic. Fewer than ``k`` ids come back when fewer are allowed; an empty list
    when every id is excluded. Infinite scores are ordered like any other (``-inf`` can
    mark "never"); NaN is refused.

    Cost: one ``argpartition`` over all ids plus a sort of about ``k + len(exclude)``
    candidates, not a sort of the whole catalogue.

    Args:
        scores: 1-D, one score per id (higher is better).
        ids: distinct movie ids, aligned with ``scores``; a duplicate that reaches the
            list raises ValueError.
        k: list length; 0 gives an empty list.
        exclude: ids never returned (e.g. what the user has rated); a set is fastest.

    Raises:
        ValueError: ``k < 1``, ``scores`` is not 1-D or not as long as ``ids``, or a
            duplicate id reaches the list.
        NumericalError: a score is NaN.
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] != len(ids):
        raise ValueError(
            f"scores must be 1-D with one score per id: shape {values.shape}, {len(ids)} ids"
        )
    n = values.shape[0]
    if n == 0 or k == 0:
        return []
    neg = -values
    if np.isnan(neg).any():
        raise NumericalError(f"NaN encountered in {int(np.isnan(neg).sum())} of {n} scores")
    excluded = exclude if isinstance(exclude, AbstractSet) else frozenset(exclude)
    # In (score desc, position asc) order the first k allowed ids lie within the first
    # k + |exclude| ids; take every id scoring at least as well as the m-th so that ties
    # at the cut are all present and the stable sort can pick them by position.
    m = min(n, k + len(excluded))
    if m < n:
        threshold = neg[np.argpartition(neg, m - 1)[:m]].max()
        candidates = np.flatnonzero(neg <= threshold)
    else:
        candidates = np.arange(n)
    # candidates are in ascending position, so a stable sort keeps ties in that order.
    order = candidates[np.argsort(neg[candidates], kind="stable")]
    chosen: list[MovieId] = []
    seen: set[MovieId] = set()
    for position in order.tolist():
        movie_id = ids[position]
        if movie_id in excluded:
            continue
        if movie_id in seen:
            raise ValueError(f"ids has movie {movie_id!r} more than once")
        seen.add(movie_id)
        chosen.append(movie_id)
        if len(chosen) == k:
            break
    return chosen


def genre_vectors(
    movies: Sequence[MoviePublished], genres: Sequence[str] = ML100K_GENRES
) -> dict[MovieId, npt.NDArray[np.float64]]:
    """Multi-hot genre vectors: entry j is 1.0 when the movie has ``genres[j]``.

    Names are matched exactly; a movie's genre that is not in ``genres`` is ignored, and
    a movie with none of them gets a zero vector. A movie listed twice keeps its last
    version (as ``EvalModel.add_movies`` does).

    Args:
        movies: the catalogue.
        genres: the vocabulary, in vector order (default the 19 of ML-100K).

    Raises:
        ValueError: ``genres`` is empty or names a genre twice.
    """
    if not genres:
        raise ValueError("genres must name at least one genre")
    column = {name: j for j, name in enumerate(genres)}
    if len(column) != len(genres):
        raise ValueError(f"genres names a genre more than once: {list(genres)}")
    vectors: dict[MovieId, npt.NDArray[np.float64]] = {}
    for movie in movies:
        vector = np.zeros(len(genres), dtype=np.float64)
        for name in movie.genres:
            j = column.get(name)
            if j is not None:
                vector[j] = 1.0
        vectors[movie.movie_id] = vector
    return vectors


def intra_list_diversity(
    recommended: Sequence[MovieId], vectors: Mapping[MovieId, npt.ArrayLike]
) -> float | None:
    """ILD: 1 - the mean cosine similarity over all unordered pairs of the list.

    A zero vector (a movie with no genre) has cosine 0 with everything, and so does a
    movie missing from ``vectors``. For multi-hot vectors the result lies in [0, 1]:
    0 when every movie has the same genres, 1 when no two share one.

    Returns:
        The ILD, or None for a list of fewer than 2 movies.

    Raises:
        ValueError: the list has a movie twice, or the vectors differ in length.
        NumericalError: a vector has a NaN or infinity.
    """
    _check_distinct(recommended)
    m = len(recommended)
    if m < 2:
        return None
    present = [
        np.asarray(vectors[movie_id], dtype=np.float64)
        for movie_id in recommended
        if movie_id in vectors
    ]
    pairs = m * (m - 1) / 2
    if len(present) < 2:
        # Every pair involves a missing movie, so every cosine is 0.
        return 1.0
    if len({vector.shape for vector in present}) != 1:
        raise ValueError(f"genre vectors differ in shape: {sorted({v.shape for v in present})}")
    matrix = np.stack(present)
    if not np.isfinite(matrix).all():
        raise NumericalError("NaN or infinity in a genre vector")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    # Zero rows stay zero, which gives them cosine 0 with every other movie.
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    gram = unit @ unit.T
    # Pairs with a missing movie contribute 0 but still count in the mean.
    upper_sum = (gram.sum() - np.trace(gram)) / 2.0
    return float(1.0 - upper_sum / pairs)


def rolling_mean(values: Sequence[float] | npt.ArrayLike, window: int) -> npt.NDArray[np.float64]:
    """Trailing mean over the last ``window`` values, one point per value.

    The first ``window - 1`` points average what is there so far (point i averages
    values 0..i), so the curve starts at the first value instead of being cut.

    Raises:
        ValueError: ``window < 1`` or ``values`` is not 1-D.
        NumericalError: a value is NaN or infinite.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise NumericalError("NaN or infinity in the values to average")
    sums = np.cumsum(array)
    sums[window:] = sums[window:] - sums[:-window]
    counts = np.minimum(np.arange(1, array.shape[0] + 1), window)
    return sums / counts


@dataclass(frozen=True)
class EventScore:
    """The scores of one test event."""

    rank: int | None
    """1-based position of the target in the first k of the list, None when absent."""
    hit: float
    """1.0 when the target is in the first k, else 0.0."""
    ndcg: float
    """``1 / log2(rank + 1)``, or 0.0 on a miss."""
    ild: float | None
    """ILD of the first k, None for fewer than 2 movies."""
    error: float | None
    """Predicted minus actual stars; None when no rating was predicted."""


@dataclass
class _Segment:
    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0

    def add(self, score: EventScore) -> None:
        self.n += 1
        self.hits += score.hit
        self.ndcg += score.ndcg

    def summary(self) -> dict[str, Any]:
        if self.n == 0:
            return {"n": 0, "hr": None, "ndcg": None}
        return {"n": self.n, "hr": self.hits / self.n, "ndcg": self.ndcg / self.n}


class Scoreboard:
    """Accumulates per-event scores of one model over a test stream.

    Args:
        k: list length that counts (default 10); longer lists are cut to their first k.
        catalogue_size: number of movies that could be recommended (1,682 for ML-100K),
            the denominator of coverage.
        genre_vectors: per movie, its genre vector for ILD (see ``genre_vectors``).
        liked_threshold: stars from which an event is in the "liked" segment (4.0).

    Raises:
        ValueError: ``k < 1`` or ``catalogue_size < 1``.
    """

    def __init__(
        self,
        *,
        k: int = K,
        catalogue_size: int,
        genre_vectors: Mapping[MovieId, npt.ArrayLike],
        liked_threshold: float = LIKED_THRESHOLD,
    ) -> None:
        _check_k(k)
        if catalogue_size < 1:
            raise ValueError(f"catalogue_size must be at least 1, got {catalogue_size}")
        self._k = k
        self._catalogue_size = catalogue_size
        self._vectors = genre_vectors
        self._liked_threshold = liked_threshold
        self._segments = {name: _Segment() for name in SEGMENTS}
        self._ndcg: list[float] = []
        self._ild_sum = 0.0
        self._n_ild = 0
        self._recommended: set[MovieId] = set()
        self._empty_lists = 0
        self._squared_error = 0.0
        self._absolute_error = 0.0
        self._n_predictions = 0

    @property
    def k(self) -> int:
        """List length that counts."""
        return self._k

    @property
    def n_events(self) -> int:
        """Events added so far."""
        return self._segments["all"].n

    def add(
        self,
        *,
        recommended: Sequence[MovieId],
        target: MovieId,
        rating: float,
        predicted: float | None,
        cold_user: bool,
        cold_item: bool,
    ) -> EventScore:
        """Score one test event and add it to the totals.

        Args:
            recommended: the model's list for the user before this event, best first;
                only its first k count (hit, NDCG, ILD and coverage).
            target: the movie the user rated in this event.
            rating: the stars given (decides the "liked" segment and the error).
            predicted: the stars predicted for (user, target), or None for no prediction
                (left out of RMSE and MAE, and out of ``n_predictions``).
            cold_user: the user has no TRAIN rating.
            cold_item: the movie has no TRAIN rating.

        Raises:
            ValueError: the list has a movie twice.
            NumericalError: ``rating`` or ``predicted`` is NaN or infinite.
        """
        _check_distinct(recommended)
        if not math.isfinite(rating):
            raise NumericalError(f"rating of {target!r} is {rating}")
        if predicted is not None and not math.isfinite(predicted):
            raise NumericalError(f"predicted rating of {target!r} is {predicted}")
        top = list(recommended[: self._k])
        rank: int | None = None
        for position, movie_id in enumerate(top, start=1):
            if movie_id == target:
                rank = position
                break
        score = EventScore(
            rank=rank,
            hit=0.0 if rank is None else 1.0,
            ndcg=_ndcg_of_rank(rank, self._k),
            ild=intra_list_diversity(top, self._vectors),
            error=None if predicted is None else float(predicted) - float(rating),
        )
        self._segments["all"].add(score)
        if rating >= self._liked_threshold:
            self._segments["liked"].add(score)
        if cold_user:
            self._segments["cold_users"].add(score)
        if cold_item:
            self._segments["cold_items"].add(score)
        self._ndcg.append(score.ndcg)
        if score.ild is not None:
            self._ild_sum += score.ild
            self._n_ild += 1
        if not top:
            self._empty_lists += 1
        self._recommended.update(top)
        if score.error is not None:
            self._squared_error += score.error * score.error
            self._absolute_error += abs(score.error)
            self._n_predictions += 1
        return score

    @property
    def ndcg_series(self) -> npt.NDArray[np.float64]:
        """Per-event NDCG@k in the order the events were added (a copy)."""
        return np.array(self._ndcg, dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """The totals as plain JSON-ready values (ints, floats, None, str keys).

        ``segments`` maps "all", "liked", "cold_users" and "cold_items" to their event
        count ``n`` and mean ``hr`` and ``ndcg`` (None when ``n`` is 0). ``ild`` is the
        mean ILD over events whose list had at least 2 movies (``n_ild`` of them);
        ``coverage`` is distinct movies in any list over ``catalogue_size``; ``rmse``
        and ``mae`` (stars) are over the ``n_predictions`` events with a prediction,
        None when there was none.
        """
        n_pred = self._n_predictions
        return {
            "k": self._k,
            "n_events": self.n_events,
            "segments": {name: segment.summary() for name, segment in self._segments.items()},
            "ild": self._ild_sum / self._n_ild if self._n_ild else None,
            "n_ild": self._n_ild,
            "coverage": len(self._recommended) / self._catalogue_size,
            "n_recommended": len(self._recommended),
            "empty_lists": self._empty_lists,
            "rmse": math.sqrt(self._squared_error / n_pred) if n_pred else None,
            "mae": self._absolute_error / n_pred if n_pred else None,
            "n_predictions": n_pred,
        }

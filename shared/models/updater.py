"""Online user models: one rating in, a new user state out.

Every user model follows the same tiny API (after ``river``'s ``learn_one``):
``initial_state`` → ``learn_one``/``learn_many`` → ``vector``. The user-profile service
only knows this ``UserUpdater`` protocol, so the rating-weighted mean below and the
trained residual network (a later issue) are interchangeable.

A ``UserState`` lives in the user-profile table and its changelog topic (one record per user per
update), so its byte form is compact: short JSON keys, the vector as base64 float32.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import numpy as np
import orjson

from shared.exceptions import InvalidEventError, NumericalError
from shared.types import MovieId, Vector

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

DEFAULT_PRIOR_RATING = 3.5
"""Stars a user is assumed to give before any rating (about the ML-100K mean, 3.53)."""

DEFAULT_PRIOR_STRENGTH = 5.0
"""How many phantom ratings of ``DEFAULT_PRIOR_RATING`` the shrunk mean starts from."""

MAX_STATE_DIM = 4096
"""Most entries of a stored state's vector."""


def _vector_text(vector: Vector) -> str:
    # Base64 of the little-endian float32 bytes.
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _vector_of(value: Any) -> Vector:
    # ``_vector_text`` output back: 1-D, at most MAX_STATE_DIM entries, finite.
    if not isinstance(value, str):
        raise ValueError("vector must be base64 float32 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"vector is not valid base64: {exc}") from exc
    if len(raw) % 4:
        raise ValueError("vector byte length is not a multiple of 4 (float32)")
    array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not 0 < array.size <= MAX_STATE_DIM:
        raise ValueError(f"vector must be 1-D with 1..{MAX_STATE_DIM} entries")
    if not np.isfinite(array).all():
        raise ValueError("vector contains NaN or infinity")
    return array


@dataclass(frozen=True, slots=True)
class UserState:
    """Everything an online user model keeps about one user.

    Attributes:
        vector: the model's vector, or None before any rating. For ``RatingWeightedMean``
            it is the unnormalised rating-weighted sum of item vectors; for a model
            whose state is the user vector itself, that vector. Read the user vector
            through ``UserUpdater.vector``, never from here.
        weight: total weight inside ``vector`` (stars for ``RatingWeightedMean``); 0.0
            for models that do not need it.
        n_ratings: ratings applied (a re-rating of a movie counts again).
        rating_sum: sum of the applied ratings in stars (for the shrunk mean rating).
        rated: every movie the user rated, first rating order, each once.
        ratings: the user's latest stars for each movie of ``rated``, same order.
        last_at: ``occurred_at`` of the last applied rating (UTC), None before any.
        last_offset: offset in its ``ratings`` partition of the last applied rating;
            a re-delivered rating at or below it is not applied again.
    """

    vector: Vector | None = None
    weight: float = 0.0
    n_ratings: int = 0
    rating_sum: float = 0.0
    rated: tuple[MovieId, ...] = ()
    ratings: tuple[float, ...] = ()
    last_at: datetime | None = None
    last_offset: int | None = None
    model: str | None = None
    """``model_version`` of the updater that wrote ``vector`` (None: unknown, from before
    states were tagged). Another model cannot read the vector (see ``for_model``)."""

    def after(self, movie_id: MovieId, rating: float, offset: int | None) -> UserState:
        """The same state with ``movie_id`` in ``rated`` (once; a re-rating keeps its
        place and replaces its stars in ``ratings``) and ``last_offset`` set: the
        caller's bookkeeping after a model applied that rating."""
        if movie_id in self.rated:
            at = self.rated.index(movie_id)
            ratings = (*self.ratings[:at], float(rating), *self.ratings[at + 1 :])
            return replace(self, ratings=ratings, last_offset=offset)
        return replace(
            self,
            rated=(*self.rated, movie_id),
            ratings=(*self.ratings, float(rating)),
            last_offset=offset,
        )

    def for_model(self, model_version: str) -> UserState:
        """This state as the updater ``model_version`` can use it: unchanged when that
        model wrote it (or it has no vector yet); otherwise the vector restarts from
        nothing (a mean's weighted sum means nothing to a residual network, and back),
        keeping the counts, ``rated`` and ``last_offset``."""
        if self.vector is None or self.model in (None, model_version):
            return replace(self, model=model_version)
        return replace(self, vector=None, weight=0.0, model=model_version)

    def to_bytes(self) -> bytes:
        """Compact JSON: one-letter keys, the vector as base64 little-endian float32."""
        data: dict[str, Any] = {
            "n": self.n_ratings,
            "s": self.rating_sum,
            "r": list(self.rated),
            "y": list(self.ratings),
        }
        if self.vector is not None:
            data["v"] = _vector_text(self.vector)
            data["w"] = self.weight
        if self.last_at is not None:
            data["t"] = (self.last_at - _EPOCH) // _MICROSECOND
        if self.last_offset is not None:
            data["o"] = self.last_offset
        if self.model is not None:
            data["m"] = self.model
        return orjson.dumps(data)

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserState:
        """Read ``to_bytes`` output.

        Raises:
            InvalidEventError: the bytes are not a user state (corrupt table record).
        """
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            vector = _vector_of(data["v"]) if "v" in data else None
            micros = data.get("t")
            rated = tuple(str(m) for m in data["r"])
            if "y" in data:
                ratings = tuple(float(y) for y in data["y"])
            else:  # written before states kept ratings: the user's mean stands in
                mean = float(data["s"]) / int(data["n"]) if int(data["n"]) else 0.0
                ratings = (mean,) * len(rated)
            if len(ratings) != len(rated):
                raise ValueError(f"{len(rated)} rated movies but {len(ratings)} ratings")
            return cls(
                vector=vector,
                weight=float(data.get("w", 0.0)),
                n_ratings=int(data["n"]),
                rating_sum=float(data["s"]),
                rated=rated,
                ratings=ratings,
                last_at=None if micros is None else _EPOCH + int(micros) * _MICROSECOND,
                last_offset=None if data.get("o") is None else int(data["o"]),
                model=None if data.get("m") is None else str(data["m"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(f"not a user state: {type(exc).__name__}: {exc}") from exc


@runtime_checkable
class UserUpdater(Protocol):
    """An online user model. Every method is pure: states are never modified in place."""

    model_version: str
    """Names the model and its weights; published with every profile."""

    def initial_state(self) -> UserState:
        """The state of a user with no ratings."""
        ...

    def learn_one(
        self, state: UserState, item_vector: Vector, rating: float, occurred_at: datetime
    ) -> UserState:
        """The state after the user rated an item ``rating`` stars at ``occurred_at``.

        Updates the vector, weight, ``n_ratings``, ``rating_sum`` and ``last_at``;
        ``rated`` and ``last_offset`` are the caller's bookkeeping (``UserState.after``)
        and come back unchanged.

        Raises:
            NumericalError: a NaN or infinity in the input or the result.
            ValueError: the item vector does not fit the state (other dimension).
        """
        ...

    def learn_many(
        self,
        states: Sequence[UserState],
        item_vectors: Sequence[Vector],
        ratings: Sequence[float],
        times: Sequence[datetime],
    ) -> list[UserState]:
        """``learn_one`` over independent (state, item, rating, time) rows in one call;
        equal to ``[learn_one(*row) for row in zip(...)]``. Sequential ratings of one
        user take one call each. Same errors as ``learn_one``, for the whole call."""
        ...

    def vector(self, state: UserState) -> Vector | None:
        """The L2-normalised float32 user vector, or None before any rating."""
        ...

    def centre(self) -> Vector | None:
        """What every profile shares, float32 (None: nothing known). A profile pulls a
        new movie's vector by its difference from it (``services.user_profile``)."""
        ...

    def mean_rating(
        self,
        state: UserState,
        prior: float = DEFAULT_PRIOR_RATING,
        strength: float = DEFAULT_PRIOR_STRENGTH,
    ) -> float:
        """The user's predicted rating in stars (baseline: the shrunk mean rating)."""
        ...


def shrunk_mean_rating(
    state: UserState,
    prior: float = DEFAULT_PRIOR_RATING,
    strength: float = DEFAULT_PRIOR_STRENGTH,
) -> float:
    """The mean of the user's ratings shrunk towards ``prior`` stars, as if the user had
    given ``strength`` extra ratings of ``prior``: ``(sum + prior*strength) / (n + strength)``.
    ``prior`` before any rating; tends to the plain mean as ratings accumulate."""
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if state.n_ratings + strength == 0:
        return prior
    return (state.rating_sum + prior * strength) / (state.n_ratings + strength)


def _check_rating(rating: float) -> None:
    if not np.isfinite(rating):
        raise NumericalError(f"rating is not finite: {rating}")


def check_learn_rows(
    states: Sequence[UserState],
    item_vectors: Sequence[Vector],
    ratings: Sequence[float],
    times: Sequence[datetime],
    dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The checked inputs of a ``learn_many``: ``(items (n, dim) float32, stars (n,)
    float64)``; empty arrays for no rows.

    Raises:
        ValueError: the sequences differ in length, or the item vectors are not 1-D (of
            dimension ``dim`` when given).
        NumericalError: a rating or an item vector entry is NaN or infinite.
    """
    n = len(states)
    if not len(item_vectors) == len(ratings) == len(times) == n:
        raise ValueError("states, item_vectors, ratings and times must have one row each")
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32), np.zeros(0)
    items = np.stack([np.asarray(v, dtype=np.float32) for v in item_vectors])
    if items.ndim != 2 or (dim is not None and items.shape[1] != dim):
        size = "" if dim is None else f" of dimension {dim}"
        raise ValueError(f"item vectors must be 1-D{size}, got shape {items.shape[1:]}")
    stars = np.asarray(ratings, dtype=np.float64)
    if not np.isfinite(stars).all():
        raise NumericalError("rating is not finite")
    if not np.isfinite(items).all():
        raise NumericalError("NaN or infinity in item vector")
    return items, stars


class RatingWeightedMean:
    """Baseline: the user vector is the rating-weighted mean of the rated items' vectors.

    Each rating adds ``rating * item_vector`` to a running sum (weight = the rating in
    stars, 0.5 to 5.0): a 5-star movie pulls the user five times harder than a 1-star
    one, and no rating pushes the user away from an item. The state keeps the float32
    sum and the total weight; ``vector`` L2-normalises the sum on read (normalising the
    mean and the sum give the same direction). The dimension is the items'; nothing
    here fixes it.
    """

    model_version = "rating-weighted-mean-v1"

    def initial_state(self) -> UserState:
        return UserState()

    def learn_one(
        self,
        state: UserState,
        item_vector: Vector,
        rating: float,
        occurred_at: datetime,
    ) -> UserState:
        """Add one rating.

        Raises:
            NumericalError: NaN or infinity in ``rating``, ``item_vector`` or the sum.
            ValueError: ``item_vector`` is not 1-D or has another dimension than the state.
        """
        _check_rating(rating)
        item = np.asarray(item_vector, dtype=np.float32)
        if item.ndim != 1:
            raise ValueError(f"item vector must be 1-D, got shape {item.shape}")
        if not np.isfinite(item).all():
            raise NumericalError("NaN or infinity in item vector")
        if state.vector is None:
            total = np.float32(rating) * item
        else:
            if state.vector.shape != item.shape:
                raise ValueError(
                    f"item vector has dimension {item.shape[0]}, "
                    f"the user state {state.vector.shape[0]}"
                )
            total = state.vector + np.float32(rating) * item
        if not np.isfinite(total).all():
            raise NumericalError("NaN or infinity in the user's weighted sum")
        return UserState(
            vector=total.astype(np.float32, copy=False),
            weight=state.weight + float(rating),
            n_ratings=state.n_ratings + 1,
            rating_sum=state.rating_sum + float(rating),
            rated=state.rated,
            ratings=state.ratings,
            last_at=occurred_at,
            last_offset=state.last_offset,
        )

    def learn_many(
        self,
        states: Sequence[UserState],
        item_vectors: Sequence[Vector],
        ratings: Sequence[float],
        times: Sequence[datetime],
    ) -> list[UserState]:
        """``learn_one`` row by row, the vector arithmetic in one numpy call.

        Raises:
            NumericalError, ValueError: as ``learn_one``, for any row.
        """
        n = len(states)
        if n == 0:
            check_learn_rows(states, item_vectors, ratings, times)
            return []
        items, stars = check_learn_rows(states, item_vectors, ratings, times)
        dim = items.shape[1]
        for state in states:
            if state.vector is not None and state.vector.shape != (dim,):
                raise ValueError(
                    f"item vector has dimension {dim}, the user state {state.vector.shape[0]}"
                )
        sums = np.zeros((n, dim), dtype=np.float32)
        for i, state in enumerate(states):
            if state.vector is not None:
                sums[i] = state.vector
        # Same float32 operations as learn_one, so batch and single calls agree exactly.
        totals = sums + stars.astype(np.float32)[:, None] * items
        if not np.isfinite(totals).all():
            raise NumericalError("NaN or infinity in a user's weighted sum")
        return [
            UserState(
                vector=totals[i].copy(),
                weight=state.weight + float(ratings[i]),
                n_ratings=state.n_ratings + 1,
                rating_sum=state.rating_sum + float(ratings[i]),
                rated=state.rated,
                ratings=state.ratings,
                last_at=times[i],
                last_offset=state.last_offset,
            )
            for i, state in enumerate(states)
        ]

    def vector(self, state: UserState) -> Vector | None:
        """The normalised sum, float32; None before any rating.

        Raises:
            NumericalError: the sum is not finite or has (near) zero length, e.g. item
                vectors that cancel out exactly.
        """
        if state.vector is None:
            return None
        total = state.vector.astype(np.float64)
        norm = float(np.linalg.norm(total))
        if not np.isfinite(norm):
            raise NumericalError("NaN or infinity in the user's weighted sum")
        if norm < 1e-12:
            raise NumericalError("the user's weighted sum has zero length")
        return (total / norm).astype(np.float32)

    def centre(self) -> None:
        """None: a rating-weighted mean has no common starting point."""
        return None

    def mean_rating(
        self,
        state: UserState,
        prior: float = DEFAULT_PRIOR_RATING,
        strength: float = DEFAULT_PRIOR_STRENGTH,
    ) -> float:
        """The shrunk mean rating in stars (see ``shrunk_mean_rating``)."""
        return shrunk_mean_rating(state, prior, strength)

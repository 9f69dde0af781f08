"""The served rating predictor: item biases, a per-user fold-in and item-kNN residuals.

A user's predicted stars for movie ``i`` are built from what the stream already knows
(``ItemStats``: the global mean ``mu`` and the movie's shrunk offset ``b_i``) and the
user's own ratings so far, which the profile carries (``UserProfileUpdated.ratings``):

1. residuals ``y_j = r_j - mu - b_j`` of the user's rated movies, each weighted by
   recency ``w_j = exp(-recency * (ratings since j))``;
2. a user offset ``b_u = sum(w y) / (sum(w) + user_prior)``;
3. a fold-in of the user onto item factors ``q`` learned from TRAIN by alternating
   least squares (``fit_rating_factors``): ``p_u`` is the weighted ridge solution of
   ``y - b_u ~ q_j . p_u`` (``factor_ridge``), solved per user at prediction time, so a
   new rating counts at once and no per-user state is kept;
4. item-kNN on what is left (``e_j = y_j - b_u - q_j . p_u``): the ``neighbours`` rated
   movies most similar to ``i`` by cosine of their item vectors, weighted by
   ``max(cos, 0) ** knn_power``, ``sum(s e) / (sum(s) + knn_prior)``;
5. co-rating kNN on the residuals ``y_j`` less their plain shrunk mean
   ``sum(y) / (n + user_prior)`` (the user's level without recency): the same average over the
   ``corating_neighbours`` rated movies most similar to ``i`` by how TRAIN users rated
   both (``corating_similarity``: the shrunk correlation of the two movies' residuals
   over their common raters, fitted with the factors), times ``corating_weight``.

``mu + b_i + b_u + q_i . p_u + knn + corating`` is clipped to the TRAIN rating range. A
movie without TRAIN ratings has no factors (``q = 0``) and no co-raters but still gets
its content-vector neighbours, and a user without ratings gets the movie's shrunk mean.
Every step is closed form: only the item factors and similarities are fitted.

This is what the recommender publishes as ``predicted_rating`` when the profile carries
ratings; the two-tower ranker's rating head (profile vector and online features only)
is the fallback when it does not. On validation (the last 10% of TRAIN) the head
reached RMSE 0.944 and this predictor 0.903 (0.909 without the co-rating term;
``reports/train.json``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from shared.domain import Rating
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import check_shapes, load_checkpoint
from shared.models.item_stats import ItemStats
from shared.types import Matrix, MovieId

log = logging.getLogger(__name__)

KIND = "rating-model"
VERSION_PREFIX = "fold-in-v2"


@dataclass(frozen=True)
class RatingParams:
    """The predictor's closed-form settings (chosen on validation; stored in the
    checkpoint)."""

    user_prior: float = 5.0
    """Pseudo-ratings at residual 0 in the user offset ``b_u``."""
    factor_ridge: float = 5.0
    """Ridge penalty of the per-user fold-in onto the item factors."""
    recency: float = 0.03
    """Decay per later rating of a rating's weight (0: all ratings weigh the same)."""
    neighbours: int = 30
    """Rated movies most similar to the target that the kNN term averages over."""
    knn_power: float = 4.0
    """Exponent on the (non-negative) cosine: higher trusts the closest movies more."""
    knn_prior: float = 2.0
    """Added to the kNN weights' sum: shrinks the term when no rated movie is close."""
    corating_weight: float = 0.85
    """Weight of the co-rating kNN term (0: off)."""
    corating_neighbours: int = 30
    """Rated movies most similar to the target by co-rating that the term averages over."""
    corating_power: float = 3.0
    """Exponent on the (non-negative) co-rating similarity."""
    corating_prior: float = 0.3
    """Added to the co-rating weights' sum."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class RatingFit:
    """``fit_rating_factors`` output: the factors, each movie's co-rating neighbours
    (``corating_similarity``) and how they were fitted."""

    movie_ids: list[MovieId]
    factors: Matrix
    neighbour_rows: np.ndarray
    neighbour_similarity: Matrix
    config: dict[str, Any]


def corating_similarity(
    residual: np.ndarray, mask: np.ndarray, *, shrink: float, keep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each movie's ``keep`` most similar movies by co-rating: the correlation of two
    movies' residuals over the users who rated both, times ``n / (n + shrink)`` for ``n``
    such users (few common raters prove little).

    Args:
        residual: ``(users, movies)`` rating residuals, 0 where not rated.
        mask: ``(users, movies)``, 1 where rated.

    Returns:
        ``(rows, similarity)``, both ``(movies, min(keep, movies - 1))``, most similar
        first; a movie is not its own neighbour.
    """
    products = residual.T @ residual
    squares = (residual**2).T @ mask
    common = mask.T @ mask
    similarity = products / (np.sqrt(squares * squares.T) + 1e-9) * common / (common + shrink)
    np.fill_diagonal(similarity, -np.inf)
    keep = min(keep, len(similarity) - 1)
    rows = np.argsort(-similarity, axis=1, kind="stable")[:, :keep]
    return rows, np.take_along_axis(similarity, rows, axis=1)


def fit_rating_factors(
    ratings: Sequence[Rating],
    *,
    dim: int = 16,
    ridge: float = 10.0,
    iterations: int = 10,
    prior_strength: float = 10.0,
    similarity_shrink: float = 20.0,
    similarity_keep: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> RatingFit:
    """Item factors of the ratings' residuals ``r - mu - b_i - b_u`` (shrunk biases,
    ``prior_strength`` pseudo-ratings each) by alternating least squares with ridge
    ``ridge``, ``iterations`` sweeps from seeded random item factors; and each movie's
    ``similarity_keep`` nearest movies by co-rating of the same residuals
    (``corating_similarity`` with ``similarity_shrink``). The last rating of a (user,
    movie) pair counts.

    Raises:
        ValueError: no ratings, or a setting out of range.
        NumericalError: the factors are not finite.
    """
    if not ratings:
        raise ValueError("no ratings to fit item factors on")
    if (
        dim < 1
        or iterations < 1
        or not ridge > 0
        or prior_strength < 0
        or similarity_shrink < 0
        or similarity_keep < 1
    ):
        raise ValueError(
            f"bad settings dim={dim} ridge={ridge} iterations={iterations} "
            f"similarity_shrink={similarity_shrink} similarity_keep={similarity_keep}"
        )
    users = sorted({r.user_id for r in ratings})
    movies = sorted({r.movie_id for r in ratings})
    user_row = {u: k for k, u in enumerate(users)}
    movie_row = {m: k for k, m in enumerate(movies)}
    values = np.zeros((len(users), len(movies)))
    mask = np.zeros_like(values)
    for r in ratings:
        values[user_row[r.user_id], movie_row[r.movie_id]] = r.rating
        mask[user_row[r.user_id], movie_row[r.movie_id]] = 1.0
    mu = values.sum() / mask.sum()
    item_bias = ((values - mu) * mask).sum(0) / (mask.sum(0) + prior_strength)
    user_bias = ((values - mu - item_bias) * mask).sum(1) / (mask.sum(1) + prior_strength)
    residual = (values - mu - item_bias[None, :] - user_bias[:, None]) * mask

    rng = np.random.default_rng(seed)
    q = rng.normal(0.0, 0.1, (len(movies), dim))
    p = np.zeros((len(users), dim))
    eye = ridge * np.eye(dim)
    sweeps = tqdm(range(iterations), desc="rating factors (ALS)", disable=not progress)
    for _ in sweeps:
        for u in range(len(users)):
            seen = mask[u] > 0
            qs = q[seen]
            p[u] = np.linalg.solve(qs.T @ qs + eye, qs.T @ residual[u, seen])
        for i in range(len(movies)):
            seen = mask[:, i] > 0
            ps = p[seen]
            q[i] = np.linalg.solve(ps.T @ ps + eye, ps.T @ residual[seen, i])
        fitted = np.where(mask > 0, p @ q.T, 0.0)
        sweeps.set_postfix(rmse=f"{math.sqrt(((residual - fitted) ** 2).sum() / mask.sum()):.4f}")
    if not np.isfinite(q).all():
        raise NumericalError("NaN or infinity in the fitted item factors")
    rows, similarity = corating_similarity(
        residual, mask, shrink=similarity_shrink, keep=similarity_keep
    )
    config = {
        "dim": dim,
        "als_ridge": ridge,
        "als_iterations": iterations,
        "als_prior_strength": prior_strength,
        "similarity_shrink": similarity_shrink,
        "similarity_keep": int(rows.shape[1]),
        "seed": seed,
        "rating_min": float(min(r.rating for r in ratings)),
        "rating_max": float(max(r.rating for r in ratings)),
        "n_train_ratings": len(ratings),
    }
    return RatingFit(movies, q.astype(np.float32), rows, similarity.astype(np.float32), config)


class RatingModel:
    """Predicted stars of a user with these ratings (see the module docstring).

    Args:
        movie_ids: the movies that have factors, in the rows' order.
        factors: ``(len(movie_ids), dim)`` item factors.
        params: the closed-form settings.
        rating_range: predictions are clipped to it (stars).
        version: published as the model's version.
        neighbours: each movie's co-rating neighbours, ``(rows, similarity)`` as
            ``corating_similarity`` gives them; None: no co-rating term.

    Raises:
        ValueError: the shapes or the range do not fit.
    """

    def __init__(
        self,
        movie_ids: Sequence[MovieId],
        factors: Matrix,
        params: RatingParams,
        rating_range: tuple[float, float],
        version: str,
        neighbours: tuple[np.ndarray, Matrix] | None = None,
    ) -> None:
        factors = np.asarray(factors, dtype=np.float64)
        n = len(movie_ids)
        if factors.ndim != 2 or len(factors) != n:
            raise ValueError(f"{n} movies but factors of shape {factors.shape}")
        if not rating_range[0] < rating_range[1]:
            raise ValueError(f"empty rating range {rating_range}")
        self._row = {m: k for k, m in enumerate(movie_ids)}
        # One zero row at the end: the factors of a movie without TRAIN ratings.
        self._factors = np.vstack([factors, np.zeros((1, factors.shape[1]))])
        # Dense (n + 1, n + 1) co-rating similarities, 0 outside each movie's neighbours
        # and for a movie without TRAIN ratings (the last row and column).
        self._similarity: np.ndarray | None = None
        if neighbours is not None:
            rows = np.asarray(neighbours[0], dtype=np.int64)
            similarity = np.asarray(neighbours[1], dtype=np.float32)
            out_of_range = rows.size > 0 and (rows.min() < 0 or rows.max() >= n)
            if rows.shape != similarity.shape or len(rows) != n or out_of_range:
                raise ValueError(
                    f"{n} movies but co-rating neighbours of shape {rows.shape} / "
                    f"{similarity.shape}"
                )
            self._similarity = np.zeros((n + 1, n + 1), dtype=np.float32)
            np.put_along_axis(self._similarity[:n], rows, similarity, axis=1)
        self.params = params
        self.rating_range = (float(rating_range[0]), float(rating_range[1]))
        self.model_version = version

    @property
    def dim(self) -> int:
        """Factors per movie."""
        return int(self._factors.shape[1])

    def _index(self, movie_ids: Sequence[MovieId]) -> list[int]:
        """Each movie's row in the factors and similarities; a movie without TRAIN
        ratings gets the last row (zeros in both)."""
        missing = len(self._row)
        return [self._row.get(m, missing) for m in movie_ids]

    def predict(
        self,
        item_stats: ItemStats,
        rated: Sequence[MovieId],
        ratings: Sequence[float],
        rated_vectors: Matrix,
        targets: Sequence[MovieId],
        target_vectors: Matrix,
    ) -> np.ndarray:
        """Predicted stars for each target movie, float64 ``(len(targets),)``.

        Args:
            item_stats: the online item statistics (``mu`` and the shrunk offsets).
            rated: the user's rated movies, oldest first; ``ratings`` their stars.
            rated_vectors: ``(len(rated), dim)`` L2-normalised item vectors of ``rated``.
            targets: the movies to predict; ``target_vectors`` their item vectors.

        Raises:
            ValueError: the lengths or shapes do not agree.
            NumericalError: a rating is not finite.
        """
        rated_vectors = np.asarray(rated_vectors, dtype=np.float64)
        target_vectors = np.asarray(target_vectors, dtype=np.float64)
        if len(rated) != len(ratings) or len(rated_vectors) != len(rated):
            raise ValueError(
                f"{len(rated)} rated movies, {len(ratings)} ratings, {len(rated_vectors)} vectors"
            )
        if len(target_vectors) != len(targets):
            raise ValueError(f"{len(targets)} targets but {len(target_vectors)} vectors")
        stars = np.asarray(ratings, dtype=np.float64)
        if not np.isfinite(stars).all():
            raise NumericalError("a rating is not finite")
        mu = item_stats.global_mean
        base = mu + item_stats.offsets(targets)
        if len(rated) == 0:
            return np.clip(base, *self.rating_range)
        p = self.params
        residual = stars - mu - item_stats.offsets(rated)
        # Each rating against the user's plain (not recency-weighted) shrunk mean level:
        # what the co-rating term averages.
        deviation = residual - residual.sum() / (len(residual) + p.user_prior)
        weight = np.exp(-p.recency * np.arange(len(rated) - 1, -1, -1, dtype=np.float64))
        user_offset = float(weight @ residual) / (float(weight.sum()) + p.user_prior)
        residual = residual - user_offset
        rated_rows, target_rows = self._index(rated), self._index(targets)
        q = self._factors[rated_rows]
        weighted = q * weight[:, None]
        user = np.linalg.solve(
            weighted.T @ q + p.factor_ridge * np.eye(self.dim), weighted.T @ residual
        )
        left = residual - q @ user
        similarity = np.clip(target_vectors @ rated_vectors.T, 0.0, None)
        if similarity.shape[1] > p.neighbours > 0:
            cut = np.partition(similarity, -p.neighbours, axis=1)[:, -p.neighbours][:, None]
            similarity = np.where(similarity >= cut, similarity, 0.0)
        elif p.neighbours == 0:
            similarity = np.zeros_like(similarity)
        kernel = similarity**p.knn_power
        total = kernel.sum(axis=1) + p.knn_prior
        # No close rated movie and no prior: no kNN term (not 0/0).
        knn = np.divide(kernel @ left, total, out=np.zeros(len(targets)), where=total > 0)
        predicted = base + user_offset + self._factors[target_rows] @ user + knn
        predicted += p.corating_weight * self._corating(target_rows, rated_rows, deviation)
        return np.clip(predicted, *self.rating_range)

    def _corating(
        self, target_rows: list[int], rated_rows: list[int], deviation: np.ndarray
    ) -> np.ndarray:
        """The co-rating kNN term of each target: the rated movies' ``deviation`` from the
        user's mean level, averaged with weights ``similarity ** corating_power`` over the
        ``corating_neighbours`` most similar (module docstring, step 5)."""
        p = self.params
        if self._similarity is None or p.corating_weight == 0 or p.corating_neighbours == 0:
            return np.zeros(len(target_rows))
        similarity = self._similarity[np.ix_(target_rows, rated_rows)].astype(np.float64)
        similarity = np.clip(similarity, 0.0, None)
        keep = p.corating_neighbours
        if similarity.shape[1] > keep:
            cut = np.partition(similarity, -keep, axis=1)[:, -keep][:, None]
            similarity = np.where(similarity >= cut, similarity, 0.0)
        kernel = similarity**p.corating_power
        total = kernel.sum(axis=1) + p.corating_prior
        return np.divide(kernel @ deviation, total, out=np.zeros(len(target_rows)), where=total > 0)


def load_rating_model(directory: Path) -> RatingModel:
    """The ``RatingModel`` of a ``rating-model`` checkpoint.

    Raises:
        ConfigurationError: no such checkpoint, another kind, or a config or weights that
            do not describe one.
    """
    state, config = load_checkpoint(directory, KIND)
    try:
        movie_ids = [str(m) for m in config["movie_ids"]]
        n, dim, keep = len(movie_ids), int(config["dim"]), int(config["similarity_keep"])
        counts = ("neighbours", "corating_neighbours")
        settings: dict[str, Any] = {
            k: int(v) if k in counts else float(v) for k, v in dict(config["params"]).items()
        }
        params = RatingParams(**settings)
        rating_range = (float(config["rating_min"]), float(config["rating_max"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint {directory} config does not describe a rating model: {exc}"
        ) from exc
    check_shapes(
        state,
        {
            "factors": (n, dim),
            "neighbour_rows": (n, keep),
            "neighbour_similarity": (n, keep),
        },
        Path(directory),
    )
    try:
        return RatingModel(
            movie_ids,
            state["factors"],
            params,
            rating_range,
            str(config["version"]),
            (state["neighbour_rows"], state["neighbour_similarity"]),
        )
    except ValueError as exc:
        raise ConfigurationError(f"checkpoint {directory}: {exc}") from exc

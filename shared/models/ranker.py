"""The two-tower ranker: re-scores retrieved candidates and predicts the rating.

``TwoTowerNet`` has a user tower, an MLP over ``[user vector | user features]`` with a
constant 1 appended, and an item tower, the sum of an MLP over the item vector and a
small MLP over the item's online features (``shared.models.item_stats`` documents the
feature columns). The relevance of an item to a user is

    score(u, i) = <e_u, e_i> + w * <u, v_i> + <w_co, co(u, i)>

with a learned weight ``w`` on the plain cosine of the profile and item vectors: the
ranker starts from what retrieval already knows and learns corrections (popularity,
recency, activity) on top; the constant in ``e_u`` gives each item a user-independent
bias from its features. ``co(u, i)`` are the pair features ``co_score`` and
``co_score_long``, how often the movie was rated by users who had lately rated what the
user rated among their 10 and 50 latest movies, as z-scores (``ItemStats.co_scores``),
with learned weights ``w_co``: the collaborative signal of who rated what together,
which content vectors do not carry. Without them the score is one dot product of two towers
(``[e_u, w u]`` and ``[e_i, v]``), and the item tower is split so that the vector part
is computed once per item and only the cheap feature part per candidate.
The rating head is an MLP over ``(e_u * e_i, e_u, e_i, user features, item features,
<u, v>)`` added to the training ratings' global mean; predictions are clipped to
[0.5, 5] stars.

``Ranker`` runs a trained net's weights for the recommender, in numpy
(``shared.models.layers``); ``load_ranker`` loads it from a ``two-tower-ranker``
checkpoint. The net as a torch module (``TwoTowerNet``), its training (``train_ranker``,
``RankerConfig`` and the ``RankerExamples`` it learns from) and the checkpoint writer
(``save_ranker``) are the lab's, in ``infra.lab.training.ranker``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import check_shapes, load_checkpoint
from shared.models.item_stats import (
    CANDIDATE_FEATURE_NAMES,
    USER_FEATURE_NAMES,
    ItemStats,
)
from shared.models.layers import Mlp
from shared.types import Matrix, MovieId, Vector

log = logging.getLogger(__name__)

KIND = "two-tower-ranker"
"""Checkpoint kind of a ``TwoTowerNet``."""

VERSION_PREFIX = "two-tower-v4"
"""Versions read ``two-tower-v4-<8 hex of the weights' digest>``."""

MIN_RATING = 0.5
"""Lowest star rating; predicted ratings are clipped to [``MIN_RATING``, ``MAX_RATING``]."""
MAX_RATING = 5.0
"""Highest star rating."""


# --- inference ------------------------------------------------------------------------------


class _VectorPartMemo:
    """The item-vector tower's output per movie id, with the vector it was computed
    from (rows grow by doubling). A movie is computed when first seen and when its
    vector changes: about 20 microseconds each, once per catalogue movie."""

    def __init__(self, dim: int, width: int) -> None:
        self.rows: dict[MovieId, int] = {}
        self.vectors = np.zeros((64, dim), dtype=np.float32)
        self.outputs = np.zeros((64, width), dtype=np.float32)

    def parts(self, movie_ids: Sequence[MovieId], vectors: np.ndarray, tower: Mlp) -> np.ndarray:
        rows = np.fromiter(
            (self.rows.get(m, -1) for m in movie_ids), dtype=np.int64, count=len(movie_ids)
        )
        fresh = rows >= 0
        fresh[fresh] = (self.vectors[rows[fresh]] == vectors[fresh]).all(axis=1)
        stale = np.flatnonzero(~fresh)
        if len(stale):
            for i in stale.tolist():
                if rows[i] < 0:
                    rows[i] = self.rows.setdefault(movie_ids[i], len(self.rows))
            self._grow(len(self.rows))
            self.vectors[rows[stale]] = vectors[stale]
            # One row at a time: a movie's part does not depend on which movies shared
            # its call (BLAS rounds a batch otherwise), so lists stay deterministic.
            for i in stale.tolist():
                self.outputs[rows[i]] = tower(vectors[i : i + 1])[0]
        return self.outputs[rows]

    def _grow(self, size: int) -> None:
        if size <= len(self.vectors):
            return
        capacity = max(size, 2 * len(self.vectors))
        for name in ("vectors", "outputs"):
            old = getattr(self, name)
            grown = np.zeros((capacity, old.shape[1]), dtype=np.float32)
            grown[: len(old)] = old
            setattr(self, name, grown)


@dataclass(frozen=True)
class _Towers:
    """One call's checked inputs and tower outputs."""

    users: np.ndarray
    ufeats: np.ndarray
    cands: np.ndarray
    cfeats: np.ndarray
    user_emb: np.ndarray
    item_emb: np.ndarray
    cosine: np.ndarray


def _as_matrix(name: str, array: Any, width: int, rows: int | None = None) -> np.ndarray:
    matrix = np.asarray(array, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != width or (rows is not None and len(matrix) != rows):
        want = f"({rows if rows is not None else 'n'}, {width})"
        raise ValueError(f"{name} must have shape {want}, got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise NumericalError(f"NaN or infinity in {name}")
    return matrix


class Ranker:
    """A trained two-tower net's weights behind numpy calls, for the recommender and
    evaluation.

    ``score`` and ``predict_rating`` are ``score_batch`` / ``predict_rating_batch`` with
    one user, so a batch and single calls agree (up to float rounding).

    Args:
        state: the net's weights by ``state_dict`` name (``user_tower.N``,
            ``item_vector_tower.N``, ``item_feature_tower.N``, ``rating_head.N``,
            ``cosine_weight``, ``pair_weight``, ``global_mean``); every width is read
            from their shapes.
        model_version: published with every recommendation.
        item_stats_params: ``ItemStats`` parameters the net was trained with (default:
            ``ItemStats``'s defaults); ``new_item_stats`` builds a matching one.
        candidate_pools: how many candidates each extra pool added in training
            (``CandidateSources`` fields ``n_trending``, ``n_new``, ``n_rising``; default:
            its defaults); serving builds its sources with the same.

    Raises:
        ConfigurationError: the weights do not describe such a net.
    """

    def __init__(
        self,
        state: Mapping[str, np.ndarray],
        model_version: str,
        item_stats_params: dict[str, float] | None = None,
        candidate_pools: dict[str, int] | None = None,
    ) -> None:
        self.model_version = model_version
        self.item_stats_params = dict(item_stats_params or ItemStats().params())
        self.candidate_pools = dict(candidate_pools or {})
        try:
            self._cosine_weight = np.float32(state["cosine_weight"])
            self._pair_weight = np.asarray(state["pair_weight"], dtype=np.float32)
            self._global_mean = np.float32(state["global_mean"])
        except KeyError as exc:
            raise ConfigurationError(f"ranker weights lack {exc}") from exc
        self._user_tower = Mlp.from_state(state, "user_tower")
        self._item_vector_tower = Mlp.from_state(state, "item_vector_tower")
        self._item_feature_tower = Mlp.from_state(state, "item_feature_tower")
        self._rating_head = Mlp.from_state(state, "rating_head")
        self.dim = self._item_vector_tower.n_in
        """Item (and user) vector dimension the net takes."""
        self.n_user_features = self._user_tower.n_in - self.dim
        self.n_pair_features = len(self._pair_weight)
        self.n_item_features = self._item_feature_tower.n_in + self.n_pair_features
        width = self._item_vector_tower.n_out
        head_in = 3 * width + self.n_user_features + self.n_item_features + 1
        if (
            self._user_tower.n_out != width - 1
            or self._item_feature_tower.n_out != width
            or self._rating_head.n_in != head_in
            or self._rating_head.n_out != 1
        ):
            raise ConfigurationError("the ranker's towers and rating head do not fit each other")
        self._memo = _VectorPartMemo(self.dim, width)

    def item_vector_parts(self, movie_ids: Sequence[MovieId], vectors: Matrix) -> np.ndarray:
        """``(c, embed_dim + 1)``: the vector part of each movie's item-tower output
        (the item-vector MLP, the bulk of a candidate's cost), computed once per movie
        and vector and remembered by id; a movie whose vector changed is computed again.

        Raises:
            ValueError: ``vectors`` is not ``(len(movie_ids), dim)``.
        """
        vectors = _as_matrix("vectors", vectors, self.dim, len(movie_ids))
        return self._memo.parts(movie_ids, vectors, self._item_vector_tower)

    def new_item_stats(self) -> ItemStats:
        """An empty ``ItemStats`` with the parameters the net was trained with."""
        return ItemStats(**self.item_stats_params)

    def _inputs(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
    ) -> tuple[np.ndarray, ...]:
        users = _as_matrix("user_vectors", user_vectors, self.dim)
        n = len(users)
        ufeats = _as_matrix("user_features", user_features, self.n_user_features, n)
        cands = np.asarray(cand_vectors, dtype=np.float32)
        cfeats = np.asarray(cand_features, dtype=np.float32)
        if cands.ndim != 3 or cands.shape[0] != n or cands.shape[2] != self.dim:
            raise ValueError(
                f"cand_vectors must have shape ({n}, c, {self.dim}), got {cands.shape}"
            )
        want = (n, cands.shape[1], self.n_item_features)
        if cfeats.shape != want:
            raise ValueError(f"cand_features must have shape {want}, got {cfeats.shape}")
        if not (np.isfinite(cands).all() and np.isfinite(cfeats).all()):
            raise NumericalError("NaN or infinity in the candidates")
        return users, ufeats, cands, cfeats

    def score_and_rate_batch(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Relevance scores and predicted stars of each user's candidates, in one pass.

        Args:
            user_vectors: ``(n, dim)`` profile vectors.
            user_features: ``(n, N_USER_FEATURES)`` (``item_stats.user_features_batch``).
            cand_vectors: ``(n, c, dim)`` item vectors of each user's ``c`` candidates.
            cand_features: ``(n, c, N_CANDIDATE_FEATURES)`` (``ItemStats.features``).

        Returns:
            ``(scores, ratings)``, both ``(n, c)`` float32: scores are logits (higher is
            more relevant, only their order within a user matters); ratings are stars
            in [0.5, 5].

        Raises:
            ValueError: shapes that do not fit the net or each other.
            NumericalError: a NaN or infinity in the inputs or the outputs.
        """
        towers = self._towers(user_vectors, user_features, cand_vectors, cand_features)
        return self._scores(towers), self._ratings(towers)

    def score_batch(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
        vector_parts: np.ndarray | None = None,
    ) -> np.ndarray:
        """``(n, c)`` relevance scores (see ``score_and_rate_batch``), without running
        the rating head. ``vector_parts`` ``(n, c, embed_dim + 1)`` are the candidates'
        ``item_vector_parts`` when the caller has them."""
        return self._scores(
            self._towers(user_vectors, user_features, cand_vectors, cand_features, vector_parts)
        )

    def predict_rating_batch(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
    ) -> np.ndarray:
        """``(n, c)`` predicted stars in [0.5, 5] (see ``score_and_rate_batch``)."""
        return self._ratings(self._towers(user_vectors, user_features, cand_vectors, cand_features))

    def _towers(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
        vector_parts: np.ndarray | None = None,
    ) -> _Towers:
        users, ufeats, cands, cfeats = self._inputs(
            user_vectors, user_features, cand_vectors, cand_features
        )
        n, c = cands.shape[:2]
        item_columns = self.n_item_features - self.n_pair_features
        user_out = self._user_tower(np.concatenate([users, ufeats], axis=-1))
        user_emb = np.concatenate([user_out, np.ones((n, 1), dtype=np.float32)], axis=-1)
        if vector_parts is None:
            vector_parts = self._item_vector_tower(cands)
        elif vector_parts.shape != (n, c, self._item_vector_tower.n_out):
            raise ValueError(f"vector_parts of shape {vector_parts.shape} for {n} x {c} candidates")
        item_emb = vector_parts + self._item_feature_tower(cfeats[..., :item_columns])
        cosine = (cands @ users[:, :, None])[..., 0]
        return _Towers(users, ufeats, cands, cfeats, user_emb, item_emb, cosine)

    def _scores(self, t: _Towers) -> np.ndarray:
        """Towers' dot product + weighted cosine + weighted pair columns, ``(n, c)``."""
        item_columns = self.n_item_features - self.n_pair_features
        scores = (
            (t.item_emb @ t.user_emb[:, :, None])[..., 0]
            + self._cosine_weight * t.cosine
            + t.cfeats[..., item_columns:] @ self._pair_weight
        )
        if not np.isfinite(scores).all():
            raise NumericalError("NaN encountered in ranker outputs")
        return scores.astype(np.float32)

    def _ratings(self, t: _Towers) -> np.ndarray:
        """The rating head's stars, clipped to [0.5, 5], ``(n, c)``."""
        n, c = t.cands.shape[:2]
        user_rows = np.broadcast_to(t.user_emb[:, None, :], t.item_emb.shape)
        head_in = np.concatenate(
            [
                user_rows * t.item_emb,
                user_rows,
                t.item_emb,
                np.broadcast_to(t.ufeats[:, None, :], (n, c, t.ufeats.shape[1])),
                t.cfeats,
                t.cosine[..., None],
            ],
            axis=-1,
        )
        ratings = np.clip(
            self._global_mean + self._rating_head(head_in)[..., 0], MIN_RATING, MAX_RATING
        )
        if not np.isfinite(ratings).all():
            raise NumericalError("NaN encountered in ranker outputs")
        return ratings.astype(np.float32)

    def score(
        self,
        user_vector: Vector,
        user_features: np.ndarray,
        cand_vectors: Matrix,
        cand_features: Matrix,
    ) -> np.ndarray:
        """``(c,)`` relevance scores of one user's candidates: ``user_vector (dim,)``,
        ``user_features (N_USER_FEATURES,)``, ``cand_vectors (c, dim)``,
        ``cand_features (c, N_CANDIDATE_FEATURES)``."""
        return self.score_batch(*_one(user_vector, user_features, cand_vectors, cand_features))[0]

    def predict_rating(
        self,
        user_vector: Vector,
        user_features: np.ndarray,
        cand_vectors: Matrix,
        cand_features: Matrix,
    ) -> np.ndarray:
        """``(c,)`` predicted stars in [0.5, 5] of one user's candidates (as ``score``)."""
        return self.predict_rating_batch(
            *_one(user_vector, user_features, cand_vectors, cand_features)
        )[0]


def _one(
    user_vector: Vector, user_features: np.ndarray, cand_vectors: Matrix, cand_features: Matrix
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cands = np.asarray(cand_vectors, dtype=np.float32)
    cfeats = np.asarray(cand_features, dtype=np.float32)
    if cands.ndim != 2 or cfeats.ndim != 2:
        raise ValueError("cand_vectors and cand_features must be 2-D (c, width)")
    return (
        np.asarray(user_vector, dtype=np.float32).reshape(1, -1),
        np.asarray(user_features, dtype=np.float32).reshape(1, -1),
        cands[None],
        cfeats[None],
    )


# --- checkpoints ----------------------------------------------------------------------------


def load_ranker(directory: Path, expected_dim: int | None = None) -> Ranker:
    """The ``Ranker`` of a ``two-tower-ranker`` checkpoint.

    Args:
        directory: the checkpoint folder.
        expected_dim: the deployed item encoder's dimension; None skips the check.

    Raises:
        ConfigurationError: no such checkpoint, another kind, a config that does not
            describe a net, feature layouts other than this code's, weights that do not
            fit, or another item dimension.
    """
    state, config = load_checkpoint(directory, KIND)
    try:
        dim = int(config["dim"])
        shapes = state_shapes(
            dim,
            int(config["n_user_features"]),
            int(config["n_item_features"]),
            int(config["n_pair_features"]),
            embed_dim=int(config["embed_dim"]),
            hidden=int(config["hidden"]),
            feature_hidden=int(config["feature_hidden"]),
            rating_hidden=int(config["rating_hidden"]),
        )
        stats_params = {k: float(v) for k, v in dict(config["item_stats"]).items()}
        ItemStats(**stats_params)
        pools = {str(k): int(v) for k, v in dict(config.get("candidate_pools", {})).items()}
        names = (tuple(config["user_feature_names"]), tuple(config["item_feature_names"]))
        version = str(config["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint {directory} config does not describe a ranker: {exc}"
        ) from exc
    if names != (USER_FEATURE_NAMES, CANDIDATE_FEATURE_NAMES):
        raise ConfigurationError(
            f"checkpoint {directory} was trained on features {names}; this code computes "
            f"{(USER_FEATURE_NAMES, CANDIDATE_FEATURE_NAMES)}"
        )
    if expected_dim is not None and dim != expected_dim:
        raise ConfigurationError(
            f"checkpoint {directory} was trained on {dim}-d item vectors; "
            f"the item encoder gives {expected_dim}-d"
        )
    check_shapes(state, shapes, Path(directory))
    ranker = Ranker(state, version, stats_params, pools)
    log.info("ranker loaded version=%s dim=%d dir=%s", ranker.model_version, dim, directory)
    return ranker


def state_shapes(
    dim: int,
    n_user_features: int,
    n_item_features: int,
    n_pair_features: int,
    *,
    embed_dim: int,
    hidden: int,
    feature_hidden: int,
    rating_hidden: int,
) -> dict[str, tuple[int, ...]]:
    """The ``state_dict`` of a two-tower net of this config, name by name (each tower
    an ``nn.Sequential`` of ``Linear``, ``GELU``, ``Dropout``, ``Linear``)."""
    width = embed_dim + 1  # the bias column
    head_in = 3 * width + n_user_features + n_item_features + 1
    towers = {
        "user_tower": (dim + n_user_features, hidden, embed_dim),
        "item_vector_tower": (dim, hidden, width),
        "item_feature_tower": (n_item_features - n_pair_features, feature_hidden, width),
        "rating_head": (head_in, rating_hidden, 1),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (n_in, n_hidden, n_out) in towers.items():
        shapes |= {
            f"{name}.0.weight": (n_hidden, n_in),
            f"{name}.0.bias": (n_hidden,),
            f"{name}.3.weight": (n_out, n_hidden),
            f"{name}.3.bias": (n_out,),
        }
    shapes |= {"cosine_weight": (), "pair_weight": (n_pair_features,), "global_mean": ()}
    return shapes

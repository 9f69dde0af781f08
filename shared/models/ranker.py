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

``Ranker`` wraps a trained net for inference (numpy in, numpy out); ``load_ranker``
loads it from a ``two-tower-ranker`` checkpoint. Training (``train_ranker``,
``RankerConfig`` and the ``RankerExamples`` it learns from) and the checkpoint writer
(``save_ranker``) are the lab's, in ``infra.lab.training.ranker``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import load_checkpoint, load_into, state_digest
from shared.models.item_stats import (
    CANDIDATE_FEATURE_NAMES,
    N_CANDIDATE_FEATURES,
    N_PAIR_FEATURES,
    N_USER_FEATURES,
    USER_FEATURE_NAMES,
    ItemStats,
)
from shared.models.updater import DEFAULT_PRIOR_RATING
from shared.types import Matrix, Vector

log = logging.getLogger(__name__)

KIND = "two-tower-ranker"
"""Checkpoint kind of a ``TwoTowerNet``."""

VERSION_PREFIX = "two-tower-v4"
"""Versions read ``two-tower-v4-<8 hex of the weights' digest>``."""

MIN_RATING = 0.5
"""Lowest star rating; predicted ratings are clipped to [``MIN_RATING``, ``MAX_RATING``]."""
MAX_RATING = 5.0
"""Highest star rating."""


# --- the net --------------------------------------------------------------------------------


def _mlp(n_in: int, hidden: int, layers: int, n_out: int, dropout: float) -> nn.Sequential:
    modules: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    modules.append(nn.Linear(width, n_out))
    return nn.Sequential(*modules)


class TwoTowerNet(nn.Module):
    """User and item towers, a weight on the plain cosine and a rating head (module
    docstring).

    Args:
        dim: item (and user) vector dimension, the item encoder's.
        n_user_features, n_item_features: feature widths (``item_stats`` layouts; the
            candidates' columns, ``CANDIDATE_FEATURE_NAMES``, end with the
            ``n_pair_features`` pair columns).
        n_pair_features: the trailing candidate columns that describe the (user, item)
            pair (``PAIR_FEATURE_NAMES``): they enter the score through learned weights
            (``pair_weight``), like the cosine, not through the item tower.
        embed_dim, hidden, feature_hidden, rating_hidden, init_cosine_weight,
            init_pair_weight, dropout: as in the lab's ``RankerConfig``.
        global_mean: the rating head's offset in stars (the training ratings' mean).
    """

    def __init__(
        self,
        dim: int,
        n_user_features: int = N_USER_FEATURES,
        n_item_features: int = N_CANDIDATE_FEATURES,
        n_pair_features: int = N_PAIR_FEATURES,
        *,
        embed_dim: int = 64,
        hidden: int = 256,
        feature_hidden: int = 64,
        rating_hidden: int = 64,
        init_cosine_weight: float = 10.0,
        init_pair_weight: float = 0.5,
        dropout: float = 0.0,
        global_mean: float = DEFAULT_PRIOR_RATING,
    ) -> None:
        super().__init__()
        if not 0 <= n_pair_features <= n_item_features:
            raise ValueError(f"{n_pair_features} pair columns of {n_item_features} features")
        self.dim = dim
        self.n_user_features = n_user_features
        self.n_item_features = n_item_features
        self.n_pair_features = n_pair_features
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.feature_hidden = feature_hidden
        self.rating_hidden = rating_hidden
        width = embed_dim + 1  # the bias column
        self.user_tower = _mlp(dim + n_user_features, hidden, 1, embed_dim, dropout)
        self.item_vector_tower = _mlp(dim, hidden, 1, width, dropout)
        self.item_feature_tower = _mlp(
            n_item_features - n_pair_features, feature_hidden, 1, width, dropout
        )
        self.cosine_weight = nn.Parameter(torch.tensor(float(init_cosine_weight)))
        self.pair_weight = nn.Parameter(torch.full((n_pair_features,), float(init_pair_weight)))
        head_in = 3 * width + n_user_features + n_item_features + 1
        self.rating_head = _mlp(head_in, rating_hidden, 1, 1, dropout)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    def describe(self) -> dict[str, Any]:
        """What a checkpoint config needs to rebuild this net."""
        return {
            "dim": self.dim,
            "n_user_features": self.n_user_features,
            "n_item_features": self.n_item_features,
            "n_pair_features": self.n_pair_features,
            "embed_dim": self.embed_dim,
            "hidden": self.hidden,
            "feature_hidden": self.feature_hidden,
            "rating_hidden": self.rating_hidden,
        }

    def user_embedding(self, vectors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(..., embed_dim + 1)`` user-tower outputs, the last column 1."""
        out = self.user_tower(torch.cat([vectors, features], dim=-1))
        return torch.cat([out, torch.ones_like(out[..., :1])], dim=-1)

    def item_embedding(
        self,
        vectors: torch.Tensor,
        features: torch.Tensor,
        vector_part: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(..., embed_dim + 1)`` item-tower outputs of the item vectors and the item
        feature columns of ``features`` (any pair columns at its end are not read);
        ``vector_part`` is ``item_vector_tower(vectors)`` when the caller already has it."""
        if vector_part is None:
            vector_part = self.item_vector_tower(vectors)
        items = features[..., : self.n_item_features - self.n_pair_features]
        return vector_part + self.item_feature_tower(items)

    def logits_all_pairs(
        self,
        user_emb: torch.Tensor,
        user_vectors: torch.Tensor,
        item_emb: torch.Tensor,
        item_vectors: torch.Tensor,
    ) -> torch.Tensor:
        """``(n_users, n_items)`` scores of every user row against every item row."""
        return user_emb @ item_emb.T + self.cosine_weight * (user_vectors @ item_vectors.T)

    def logits_candidates(
        self,
        user_emb: torch.Tensor,
        user_vectors: torch.Tensor,
        item_emb: torch.Tensor,
        item_vectors: torch.Tensor,
        features: torch.Tensor,
    ) -> torch.Tensor:
        """``(n, c)`` scores of user row ``b`` against its own candidates ``[b, :]``
        (``item_emb`` ``(n, c, e)``, ``item_vectors`` ``(n, c, dim)``, ``features``
        ``(n, c, n_item_features)``): towers, weighted cosine and weighted pair columns."""
        tower = (item_emb * user_emb[:, None, :]).sum(-1)
        cosine = (item_vectors * user_vectors[:, None, :]).sum(-1)
        pair = features[..., self.n_item_features - self.n_pair_features :] @ self.pair_weight
        return tower + self.cosine_weight * cosine + pair

    def rating(
        self,
        user_emb: torch.Tensor,
        user_features: torch.Tensor,
        item_emb: torch.Tensor,
        item_features: torch.Tensor,
        cosine: torch.Tensor,
    ) -> torch.Tensor:
        """Unclipped predicted stars for aligned rows (any leading shape; the user
        inputs broadcast against the item inputs)."""
        user_emb, item_emb = torch.broadcast_tensors(user_emb, item_emb)
        lead = item_emb.shape[:-1]
        user_features = user_features.expand(*lead, user_features.shape[-1])
        x = torch.cat(
            [
                user_emb * item_emb,
                user_emb,
                item_emb,
                user_features,
                item_features,
                cosine.unsqueeze(-1),
            ],
            dim=-1,
        )
        return self.global_mean + self.rating_head(x).squeeze(-1)


def weights_version(net: TwoTowerNet) -> str:
    """``two-tower-v4-<8 hex>``: a digest of the weights, so two trainings differ."""
    return f"{VERSION_PREFIX}-{state_digest(net)[:8]}"


# --- inference ------------------------------------------------------------------------------


def _as_matrix(name: str, array: Any, width: int, rows: int | None = None) -> np.ndarray:
    matrix = np.asarray(array, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != width or (rows is not None and len(matrix) != rows):
        want = f"({rows if rows is not None else 'n'}, {width})"
        raise ValueError(f"{name} must have shape {want}, got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise NumericalError(f"NaN or infinity in {name}")
    return matrix


class Ranker:
    """A trained ``TwoTowerNet`` behind numpy calls, for the recommender and evaluation.

    Every call runs the net in eval mode without gradients. ``score`` and
    ``predict_rating`` are ``score_batch`` / ``predict_rating_batch`` with one user, so
    a batch and single calls agree (up to float rounding).

    Args:
        net: the trained net.
        model_version: published with every recommendation (default: the weights' digest).
        item_stats_params: ``ItemStats`` parameters the net was trained with (default:
            ``ItemStats``'s defaults); ``new_item_stats`` builds a matching one.
        candidate_pools: how many candidates each extra pool added in training
            (``CandidateSources`` fields ``n_trending``, ``n_new``, ``n_rising``; default:
            its defaults); serving builds its sources with the same.
    """

    def __init__(
        self,
        net: TwoTowerNet,
        model_version: str | None = None,
        item_stats_params: dict[str, float] | None = None,
        candidate_pools: dict[str, int] | None = None,
    ) -> None:
        self.net = net.eval()
        self.model_version = model_version or weights_version(net)
        self.item_stats_params = dict(item_stats_params or ItemStats().params())
        self.candidate_pools = dict(candidate_pools or {})

    @property
    def dim(self) -> int:
        """Item (and user) vector dimension the net takes."""
        return self.net.dim

    def new_item_stats(self) -> ItemStats:
        """An empty ``ItemStats`` with the parameters the net was trained with."""
        return ItemStats(**self.item_stats_params)

    def _inputs(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
    ) -> tuple[torch.Tensor, ...]:
        net = self.net
        users = _as_matrix("user_vectors", user_vectors, net.dim)
        n = len(users)
        ufeats = _as_matrix("user_features", user_features, net.n_user_features, n)
        cands = np.asarray(cand_vectors, dtype=np.float32)
        cfeats = np.asarray(cand_features, dtype=np.float32)
        if cands.ndim != 3 or cands.shape[0] != n or cands.shape[2] != net.dim:
            raise ValueError(f"cand_vectors must have shape ({n}, c, {net.dim}), got {cands.shape}")
        want = (n, cands.shape[1], net.n_item_features)
        if cfeats.shape != want:
            raise ValueError(f"cand_features must have shape {want}, got {cfeats.shape}")
        if not (np.isfinite(cands).all() and np.isfinite(cfeats).all()):
            raise NumericalError("NaN or infinity in the candidates")
        return tuple(torch.from_numpy(a) for a in (users, ufeats, cands, cfeats))

    @torch.inference_mode()
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
        users, ufeats, cands, cfeats = self._inputs(
            user_vectors, user_features, cand_vectors, cand_features
        )
        n, c = cands.shape[:2]
        if n == 0 or c == 0:
            empty = np.zeros((n, c), dtype=np.float32)
            return empty, empty.copy()
        net = self.net
        user_emb = net.user_embedding(users, ufeats)
        item_emb = net.item_embedding(cands, cfeats)
        scores = net.logits_candidates(user_emb, users, item_emb, cands, cfeats)
        cosine = (cands * users[:, None, :]).sum(-1)
        ratings = net.rating(user_emb[:, None, :], ufeats[:, None, :], item_emb, cfeats, cosine)
        ratings = ratings.clamp(MIN_RATING, MAX_RATING)
        if not (torch.isfinite(scores).all() and torch.isfinite(ratings).all()):
            raise NumericalError("NaN encountered in ranker outputs")
        return scores.numpy().astype(np.float32), ratings.numpy().astype(np.float32)

    def score_batch(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
    ) -> np.ndarray:
        """``(n, c)`` relevance scores (see ``score_and_rate_batch``)."""
        return self.score_and_rate_batch(user_vectors, user_features, cand_vectors, cand_features)[
            0
        ]

    def predict_rating_batch(
        self,
        user_vectors: Matrix,
        user_features: Matrix,
        cand_vectors: np.ndarray,
        cand_features: np.ndarray,
    ) -> np.ndarray:
        """``(n, c)`` predicted stars in [0.5, 5] (see ``score_and_rate_batch``)."""
        return self.score_and_rate_batch(user_vectors, user_features, cand_vectors, cand_features)[
            1
        ]

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
        net = TwoTowerNet(
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
    load_into(net, state, Path(directory))
    ranker = Ranker(net, str(config["version"]), stats_params, pools)
    log.info("ranker loaded version=%s dim=%d dir=%s", ranker.model_version, dim, directory)
    return ranker

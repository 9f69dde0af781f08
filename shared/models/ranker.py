"""The two-tower ranker: re-scores retrieved candidates and predicts the rating.

``TwoTowerNet`` has a user tower, an MLP over ``[user vector | user features]``, and an
item tower, an MLP over ``[item vector | item features]`` (``shared.models.item_stats``
documents the feature columns). Each tower's output is L2-normalised to an
``embed_dim`` (default 64) embedding, and the relevance of an item to a user is

    score(u, i) = (<e_u, e_i> + w * <u, v_i>) / T

with a learned temperature ``T`` and, when ``cosine_skip`` is on (the default), a learned
weight ``w`` on the plain cosine of the profile and item vectors: the ranker starts from
what retrieval already knows and learns corrections (popularity, activity) on top. The
score is still one dot product of two towers (``[e_u, sqrt(w) u]`` and ``[e_i, sqrt(w) v]``).
The rating head is an MLP over ``(e_u * e_i, e_u, e_i, user features, item features,
<u, v>)`` added to the training ratings' global mean; predictions are clipped to
[0.5, 5] stars.

``train_ranker`` fits the net on ``RankerExamples``, one row per TRAIN rating event in
time order with the user's profile vector and features as they were just before the
event (``ExampleBuilder`` collects them while the caller replays TRAIN). The loss is a
sampled softmax over in-batch negatives with sampling-bias correction (Yi et al. 2019,
"Sampling-bias-corrected neural modeling for large corpus item recommendations"):
``log q_j``, the log-frequency of item ``j`` among the training examples, is subtracted
from every in-batch logit, so that popular items, which show up as negatives more
often, are not pushed down for it; other rows of the same item in a batch are masked.
An in-batch negative carries the item features of its own event (a slightly different
time than the row's): accepted, the features move slowly. Plus ``rating_weight`` times
the rating head's mean squared error.

``Ranker`` wraps a trained net for inference (numpy in, numpy out);
``save_ranker`` / ``load_ranker`` store it as a ``two-tower-ranker`` checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn
from tqdm import tqdm

from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import load_checkpoint, load_into, save_checkpoint
from shared.models.item_stats import (
    ITEM_FEATURE_NAMES,
    N_ITEM_FEATURES,
    N_USER_FEATURES,
    USER_FEATURE_NAMES,
    ItemStats,
)
from shared.models.training import BestEpoch
from shared.models.updater import DEFAULT_PRIOR_RATING
from shared.types import Matrix, Vector

log = logging.getLogger(__name__)

KIND = "two-tower-ranker"
"""Checkpoint kind of a ``TwoTowerNet``."""

VERSION_PREFIX = "two-tower-v1"
"""Versions read ``two-tower-v1-<8 hex of the weights' digest>``."""

MIN_RATING = 0.5
"""Lowest star rating; predicted ratings are clipped to [``MIN_RATING``, ``MAX_RATING``]."""
MAX_RATING = 5.0
"""Highest star rating."""

MIN_TEMPERATURE = 0.01
"""The learned temperature never goes below this (bounds the logits at 100x cosine)."""


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and training hyper-parameters of the two-tower ranker.

    Attributes:
        embed_dim: size of each tower's normalised output (default 64).
        hidden: width of each tower's hidden layers (default 256).
        layers: hidden layers per tower (default 1).
        rating_hidden: width of the rating head's hidden layer (default 64).
        cosine_skip: add a learned multiple of the plain cosine ``<u, v>`` to the
            score (default True).
        init_temperature: starting softmax temperature on the scores (default 0.1).
        learn_temperature: train the temperature (default True).
        logq_correction: subtract ``log q_j`` from in-batch logits (default True).
        rating_weight: weight of the rating head's MSE in the loss (default 0.5).
        epochs: passes over the examples (default 8); with validation examples the
            epoch with the lowest validation loss is kept, else the last.
        patience: epochs without a better validation loss before stopping (default 2).
        batch_size: examples per step, which are also each other's negatives
            (default 512).
        lr: Adam learning rate (default 1e-3).
        weight_decay: Adam weight decay (default 0).
        dropout: dropout in the towers and the rating head during training
            (default 0.1).
    """

    embed_dim: int = 64
    hidden: int = 256
    layers: int = 1
    rating_hidden: int = 64
    cosine_skip: bool = True
    init_temperature: float = 0.1
    learn_temperature: bool = True
    logq_correction: bool = True
    rating_weight: float = 0.5
    epochs: int = 8
    patience: int = 2
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        positive = ("embed_dim", "hidden", "rating_hidden", "init_temperature", "epochs", "lr")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RankerConfig.{name} must be positive, got {value!r}")
        for name in ("layers", "rating_weight", "patience", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RankerConfig.{name} must be >= 0, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"RankerConfig.batch_size must be >= 2, got {self.batch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RankerConfig.dropout must be in [0, 1), got {self.dropout}")


# --- examples -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankerExamples:
    """Training rows, one per rating event in time order.

    Attributes:
        user_vectors: ``(n, dim)`` float32, the user's profile vector just before the
            event (events of users without a profile yet are left out by the caller).
        user_features: ``(n, N_USER_FEATURES)`` float32, the user's features just before.
        item_rows: ``(n,)`` int64, the rated item's row in the item-vector matrix.
        item_features: ``(n, N_ITEM_FEATURES)`` float32, the rated item's features just
            before the event.
        ratings: ``(n,)`` float32 stars.

    Raises:
        ValueError: shapes that do not fit together or a negative item row.
        NumericalError: a NaN or infinity anywhere.
    """

    user_vectors: Matrix
    user_features: Matrix
    item_rows: npt.NDArray[np.int64]
    item_features: Matrix
    ratings: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        n = len(self.ratings)
        shapes: dict[str, tuple[np.ndarray, int, int | None]] = {
            "user_vectors": (self.user_vectors, 2, None),
            "user_features": (self.user_features, 2, N_USER_FEATURES),
            "item_rows": (self.item_rows, 1, None),
            "item_features": (self.item_features, 2, N_ITEM_FEATURES),
            "ratings": (self.ratings, 1, None),
        }
        for name, (array, ndim, width) in shapes.items():
            if array.ndim != ndim or array.shape[0] != n:
                raise ValueError(f"{name} has shape {array.shape}; expected {n} rows")
            if width is not None and array.shape[1] != width:
                raise ValueError(f"{name} has {array.shape[1]} columns, expected {width}")
        if n and int(self.item_rows.min()) < 0:
            raise ValueError("item_rows must be >= 0")
        for name in ("user_vectors", "user_features", "item_features", "ratings"):
            if not np.isfinite(getattr(self, name)).all():
                raise NumericalError(f"NaN or infinity in {name}")

    def __len__(self) -> int:
        return len(self.ratings)

    @property
    def dim(self) -> int:
        """Dimension of the user vectors."""
        return int(self.user_vectors.shape[1])

    def subset(self, rows: slice | npt.NDArray[np.integer[Any]]) -> RankerExamples:
        """The examples at ``rows`` (a slice keeps time order, e.g. ``[: n * 9 // 10]``)."""
        return RankerExamples(
            self.user_vectors[rows],
            self.user_features[rows],
            self.item_rows[rows],
            self.item_features[rows],
            self.ratings[rows],
        )


class ExampleBuilder:
    """Collects ``RankerExamples`` one event at a time.

    The caller replays TRAIN in time order through its user updater and an
    ``ItemStats``, and for each event calls ``add`` with the state just *before*
    applying the event, then applies it. The vector dimension is fixed by the first row.
    """

    def __init__(self) -> None:
        self._user_vectors: list[Vector] = []
        self._user_features: list[np.ndarray] = []
        self._item_rows: list[int] = []
        self._item_features: list[np.ndarray] = []
        self._ratings: list[float] = []

    def __len__(self) -> int:
        return len(self._ratings)

    def add(
        self,
        user_vector: Vector,
        user_features: np.ndarray,
        item_row: int,
        item_features: np.ndarray,
        rating: float,
    ) -> None:
        """One example: the user's profile vector and features before the event, the
        rated item's row in the item-vector matrix and its features before the event,
        and the rating in stars.

        Raises:
            ValueError: a shape that does not fit (the first row's dimension, the
                feature widths) or a negative item row.
            NumericalError: a NaN or infinity.
        """
        vector = np.asarray(user_vector, dtype=np.float32).reshape(-1)
        ufeats = np.asarray(user_features, dtype=np.float32).reshape(-1)
        ifeats = np.asarray(item_features, dtype=np.float32).reshape(-1)
        if self._user_vectors and vector.shape != self._user_vectors[0].shape:
            raise ValueError(
                f"user vector has dimension {vector.shape[0]}, "
                f"earlier ones {self._user_vectors[0].shape[0]}"
            )
        if ufeats.shape != (N_USER_FEATURES,):
            raise ValueError(f"user_features must have {N_USER_FEATURES} values")
        if ifeats.shape != (N_ITEM_FEATURES,):
            raise ValueError(f"item_features must have {N_ITEM_FEATURES} values")
        if item_row < 0:
            raise ValueError(f"item_row must be >= 0, got {item_row}")
        if not (
            np.isfinite(vector).all()
            and np.isfinite(ufeats).all()
            and np.isfinite(ifeats).all()
            and math.isfinite(rating)
        ):
            raise NumericalError("NaN or infinity in a ranker example")
        self._user_vectors.append(vector)
        self._user_features.append(ufeats)
        self._item_rows.append(int(item_row))
        self._item_features.append(ifeats)
        self._ratings.append(float(rating))

    def build(self) -> RankerExamples:
        """Everything added so far, in order.

        Raises:
            ValueError: nothing was added.
        """
        if not self._ratings:
            raise ValueError("no ranker example was added")
        return RankerExamples(
            np.stack(self._user_vectors),
            np.stack(self._user_features),
            np.asarray(self._item_rows, dtype=np.int64),
            np.stack(self._item_features),
            np.asarray(self._ratings, dtype=np.float32),
        )


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
    """User and item towers, a learned temperature and a rating head (module docstring).

    Args:
        dim: item (and user) vector dimension, the item encoder's.
        n_user_features, n_item_features: feature widths (``item_stats`` layouts).
        embed_dim, hidden, layers, rating_hidden, cosine_skip, init_temperature,
        learn_temperature, dropout: as in ``RankerConfig``.
        global_mean: the rating head's offset in stars (the training ratings' mean).
    """

    def __init__(
        self,
        dim: int,
        n_user_features: int = N_USER_FEATURES,
        n_item_features: int = N_ITEM_FEATURES,
        *,
        embed_dim: int = 64,
        hidden: int = 256,
        layers: int = 1,
        rating_hidden: int = 64,
        cosine_skip: bool = True,
        init_temperature: float = 0.1,
        learn_temperature: bool = True,
        dropout: float = 0.0,
        global_mean: float = DEFAULT_PRIOR_RATING,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.n_user_features = n_user_features
        self.n_item_features = n_item_features
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.layers = layers
        self.rating_hidden = rating_hidden
        self.cosine_skip = cosine_skip
        self.learn_temperature = learn_temperature
        self.user_tower = _mlp(dim + n_user_features, hidden, layers, embed_dim, dropout)
        self.item_tower = _mlp(dim + n_item_features, hidden, layers, embed_dim, dropout)
        log_t = torch.tensor(math.log(init_temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        # Starts at 1: the untrained score is cosine plus the (random) tower term.
        self.skip_weight = nn.Parameter(torch.ones(())) if cosine_skip else None
        head_in = 3 * embed_dim + n_user_features + n_item_features + 1
        self.rating_head = _mlp(head_in, rating_hidden, 1, 1, dropout)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    def describe(self) -> dict[str, Any]:
        """What a checkpoint config needs to rebuild this net."""
        return {
            "dim": self.dim,
            "n_user_features": self.n_user_features,
            "n_item_features": self.n_item_features,
            "embed_dim": self.embed_dim,
            "hidden": self.hidden,
            "layers": self.layers,
            "rating_hidden": self.rating_hidden,
            "cosine_skip": self.cosine_skip,
            "learn_temperature": self.learn_temperature,
        }

    def temperature(self) -> torch.Tensor:
        """The softmax temperature (>= ``MIN_TEMPERATURE``)."""
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def user_embedding(self, vectors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(n, embed_dim)`` normalised user-tower outputs."""
        return F.normalize(self.user_tower(torch.cat([vectors, features], dim=-1)), dim=-1)

    def item_embedding(self, vectors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``(..., embed_dim)`` normalised item-tower outputs."""
        return F.normalize(self.item_tower(torch.cat([vectors, features], dim=-1)), dim=-1)

    def _combine(self, tower: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
        if self.skip_weight is not None:
            tower = tower + self.skip_weight * cosine
        return tower / self.temperature()

    def logits_all_pairs(
        self,
        user_emb: torch.Tensor,
        user_vectors: torch.Tensor,
        item_emb: torch.Tensor,
        item_vectors: torch.Tensor,
    ) -> torch.Tensor:
        """``(n_users, n_items)`` scores of every user row against every item row."""
        return self._combine(user_emb @ item_emb.T, user_vectors @ item_vectors.T)

    def logits_candidates(
        self,
        user_emb: torch.Tensor,
        user_vectors: torch.Tensor,
        item_emb: torch.Tensor,
        item_vectors: torch.Tensor,
    ) -> torch.Tensor:
        """``(n, c)`` scores of user row ``b`` against its own candidates ``[b, :]``
        (``item_emb`` ``(n, c, e)``, ``item_vectors`` ``(n, c, dim)``)."""
        tower = (item_emb * user_emb[:, None, :]).sum(-1)
        cosine = (item_vectors * user_vectors[:, None, :]).sum(-1)
        return self._combine(tower, cosine)

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
    """``two-tower-v1-<8 hex>``: a digest of the weights, so two trainings differ."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{VERSION_PREFIX}-{digest.hexdigest()[:8]}"


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
    """

    def __init__(
        self,
        net: TwoTowerNet,
        model_version: str | None = None,
        item_stats_params: dict[str, float] | None = None,
    ) -> None:
        self.net = net.eval()
        self.model_version = model_version or weights_version(net)
        self.item_stats_params = dict(item_stats_params or ItemStats().params())

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
            cand_features: ``(n, c, N_ITEM_FEATURES)`` (``ItemStats.features``).

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
        scores = net.logits_candidates(user_emb, users, item_emb, cands)
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
        ``cand_features (c, N_ITEM_FEATURES)``."""
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


def save_ranker(directory: Path, net: TwoTowerNet, config: dict[str, Any]) -> Path:
    """Write ``net`` as a ``two-tower-ranker`` checkpoint; returns the directory.

    ``config`` is the one ``train_ranker`` returns (anything JSON-serialisable is kept);
    the architecture, the feature layouts, ``kind`` and ``version`` are filled in from
    the net and this code, so the checkpoint always rebuilds it.
    """
    full = {
        "item_stats": ItemStats().params(),
        **config,
        **net.describe(),
        "user_feature_names": list(USER_FEATURE_NAMES),
        "item_feature_names": list(ITEM_FEATURE_NAMES),
        "kind": KIND,
        "version": weights_version(net),
    }
    return save_checkpoint(directory, net, full)


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
            embed_dim=int(config["embed_dim"]),
            hidden=int(config["hidden"]),
            layers=int(config["layers"]),
            rating_hidden=int(config["rating_hidden"]),
            cosine_skip=bool(config["cosine_skip"]),
            learn_temperature=bool(config["learn_temperature"]),
        )
        stats_params = {k: float(v) for k, v in dict(config["item_stats"]).items()}
        ItemStats(**stats_params)
        names = (tuple(config["user_feature_names"]), tuple(config["item_feature_names"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint {directory} config does not describe a ranker: {exc}"
        ) from exc
    if names != (USER_FEATURE_NAMES, ITEM_FEATURE_NAMES):
        raise ConfigurationError(
            f"checkpoint {directory} was trained on features {names}; this code computes "
            f"{(USER_FEATURE_NAMES, ITEM_FEATURE_NAMES)}"
        )
    if expected_dim is not None and dim != expected_dim:
        raise ConfigurationError(
            f"checkpoint {directory} was trained on {dim}-d item vectors; "
            f"the item encoder gives {expected_dim}-d"
        )
    load_into(net, state, Path(directory))
    ranker = Ranker(net, str(config["version"]), stats_params)
    log.info("ranker loaded version=%s dim=%d dir=%s", ranker.model_version, dim, directory)
    return ranker


# --- training -------------------------------------------------------------------------------


@dataclass
class _Tensors:
    users: torch.Tensor
    ufeats: torch.Tensor
    rows: torch.Tensor
    ifeats: torch.Tensor
    ratings: torch.Tensor


def _tensors(examples: RankerExamples) -> _Tensors:
    return _Tensors(
        torch.from_numpy(np.ascontiguousarray(examples.user_vectors, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(examples.user_features, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(examples.item_rows, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(examples.item_features, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(examples.ratings, dtype=np.float32)),
    )


def _batch_losses(
    net: TwoTowerNet,
    data: _Tensors,
    index: torch.Tensor,
    items: torch.Tensor,
    log_q: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled-softmax loss, rating squared error), each the mean over the batch."""
    users, ufeats = data.users[index], data.ufeats[index]
    rows, ifeats = data.rows[index], data.ifeats[index]
    vectors = items[rows]
    user_emb = net.user_embedding(users, ufeats)
    item_emb = net.item_embedding(vectors, ifeats)
    logits = net.logits_all_pairs(user_emb, users, item_emb, vectors)
    if log_q is not None:
        logits = logits - log_q[rows][None, :]
    # Another row of the same item is no negative: mask it out of the softmax.
    same = (rows[:, None] == rows[None, :]) & ~torch.eye(len(rows), dtype=torch.bool)
    logits = logits.masked_fill(same, -math.inf)
    softmax = F.cross_entropy(logits, torch.arange(len(rows)))
    cosine = (users * vectors).sum(-1)
    predicted = net.rating(user_emb, ufeats, item_emb, ifeats, cosine)
    squared = ((predicted - data.ratings[index]) ** 2).mean()
    return softmax, squared


@torch.no_grad()
def _validate(
    net: TwoTowerNet,
    data: _Tensors,
    items: torch.Tensor,
    log_q: torch.Tensor | None,
    config: RankerConfig,
) -> dict[str, float]:
    """Validation losses over fixed consecutive batches (time order), eval mode."""
    net.eval()
    n = len(data.ratings)
    softmax_sum = squared_sum = 0.0
    for lo in range(0, n, config.batch_size):
        index = torch.arange(lo, min(lo + config.batch_size, n))
        softmax, squared = _batch_losses(net, data, index, items, log_q)
        softmax_sum += float(softmax) * len(index)
        squared_sum += float(squared) * len(index)
    net.train()
    softmax_mean, mse = softmax_sum / n, squared_sum / n
    return {
        "val_loss": softmax_mean + config.rating_weight * mse,
        "val_softmax": softmax_mean,
        "val_rmse": math.sqrt(mse),
    }


def train_ranker(
    examples: RankerExamples,
    item_vectors: Matrix,
    *,
    validation: RankerExamples | None = None,
    config: RankerConfig | None = None,
    item_stats_params: dict[str, float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[TwoTowerNet, dict[str, Any], dict[str, list[float]]]:
    """Train a ``TwoTowerNet`` with in-batch sampled softmax (logQ-corrected) + rating MSE.

    Each epoch shuffles the examples (seeded) into batches of ``config.batch_size``;
    every batch's items are each other's negatives. ``q_j`` is item ``j``'s share of the
    training examples (an item only in validation counts as seen once). Adam; with
    ``validation`` the validation losses (same batches every epoch, in time order) are
    computed after each epoch and the epoch with the lowest ``val_loss`` is kept.

    Args:
        examples: training rows (``ExampleBuilder``), e.g. the first 90% of TRAIN.
        item_vectors: ``(n_items, dim)`` L2-normalised float32, the deployed item
            encoder's output; ``item_rows`` index it. Fixed inputs, never trained.
        validation: later rows for choosing the epoch, or None (the last is kept).
        config: hyper-parameters (default ``RankerConfig()``).
        item_stats_params: the ``ItemStats.params()`` the features were computed with,
            stored in the config so services rebuild them (default: the defaults).
        seed: seeds torch and numpy (initial weights, shuffling, dropout).
        progress: show a tqdm bar.

    Returns:
        ``(net, config, history)``: the net (eval mode), the checkpoint config (kind,
        version, architecture, feature layouts, hyper-parameters, a training record) and
        per-epoch lists ``train_loss``, ``train_softmax``, ``train_rmse``, and with
        validation ``val_loss``, ``val_softmax``, ``val_rmse``.

    Raises:
        ValueError: fewer than two examples, an item row outside ``item_vectors``, or
            another dimension.
        NumericalError: NaN in the item vectors or in the training loss.
    """
    config = config or RankerConfig()
    began = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items_np = np.asarray(item_vectors, dtype=np.float32)
    if items_np.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D, got shape {items_np.shape}")
    if not np.isfinite(items_np).all():
        raise NumericalError("NaN or infinity in the item vectors")
    n_items, dim = items_np.shape
    for name, part in (("examples", examples), ("validation", validation)):
        if part is None:
            continue
        if part.dim != dim:
            raise ValueError(f"{name} have {part.dim}-d user vectors, the items {dim}-d")
        if len(part) and int(part.item_rows.max()) >= n_items:
            raise ValueError(f"{name} refer to item rows beyond the {n_items} item vectors")
    if len(examples) < 2:
        raise ValueError("train_ranker needs at least two examples")

    counts = np.bincount(examples.item_rows, minlength=n_items).astype(np.float64)
    log_q_np = np.log(np.maximum(counts, 1.0) / len(examples))
    log_q = torch.from_numpy(log_q_np.astype(np.float32)) if config.logq_correction else None
    items = torch.from_numpy(items_np.copy())
    data = _tensors(examples)
    val_data = _tensors(validation) if validation is not None and len(validation) else None
    global_mean = float(examples.ratings.mean())

    net = TwoTowerNet(
        dim,
        embed_dim=config.embed_dim,
        hidden=config.hidden,
        layers=config.layers,
        rating_hidden=config.rating_hidden,
        cosine_skip=config.cosine_skip,
        init_temperature=config.init_temperature,
        learn_temperature=config.learn_temperature,
        dropout=config.dropout,
        global_mean=global_mean,
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: dict[str, list[float]] = {"train_loss": [], "train_softmax": [], "train_rmse": []}
    if val_data is not None:
        history.update(val_loss=[], val_softmax=[], val_rmse=[])
    n = len(examples)
    steps = math.ceil(n / config.batch_size)
    log.info(
        "training ranker examples=%d val=%d items=%d dim=%d config=%s",
        n,
        0 if val_data is None else len(val_data.ratings),
        n_items,
        dim,
        config,
    )
    best = BestEpoch(config.patience, maximise=False)
    bar = tqdm(total=config.epochs * steps, desc="ranker", unit="batch", disable=not progress)
    net.train()
    for epoch in range(config.epochs):
        order = torch.from_numpy(rng.permutation(n))
        softmax_sum = squared_sum = 0.0
        for lo in range(0, n, config.batch_size):
            index = order[lo : lo + config.batch_size]
            bar.update(1)
            if len(index) < 2:
                continue  # one row has no negative
            softmax, squared = _batch_losses(net, data, index, items, log_q)
            loss = softmax + config.rating_weight * squared
            if not torch.isfinite(loss):
                raise NumericalError(f"ranker training loss is not finite at epoch {epoch}")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            softmax_sum += float(softmax.detach()) * len(index)
            squared_sum += float(squared.detach()) * len(index)
            bar.set_postfix(softmax=f"{softmax_sum / (lo + len(index)):.3f}")
        history["train_softmax"].append(softmax_sum / n)
        history["train_rmse"].append(math.sqrt(squared_sum / n))
        history["train_loss"].append(softmax_sum / n + config.rating_weight * squared_sum / n)
        line = f"epoch={epoch} train_loss={history['train_loss'][-1]:.4f}"
        if val_data is not None:
            metrics = _validate(net, val_data, items, log_q, config)
            for key, value in metrics.items():
                history[key].append(value)
            line += " " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            best.update(net, epoch, metrics["val_loss"])
        log.info("ranker %s", line)
        if val_data is not None and best.should_stop():
            log.info("ranker early stop epoch=%d best_epoch=%d", epoch, best.best_epoch)
            break
    bar.close()
    best_epoch = best.restore(net, len(history["train_loss"]))
    net.eval()
    seconds = time.perf_counter() - began
    record: dict[str, Any] = {
        "seed": seed,
        "n_examples": n,
        "n_validation": 0 if val_data is None else len(val_data.ratings),
        "n_items": n_items,
        "global_mean": global_mean,
        "epochs_run": len(history["train_loss"]),
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
        "temperature": float(net.temperature().detach()),
        "skip_weight": None if net.skip_weight is None else float(net.skip_weight.detach()),
        "history": history,
    }
    out_config: dict[str, Any] = {
        **net.describe(),
        "user_feature_names": list(USER_FEATURE_NAMES),
        "item_feature_names": list(ITEM_FEATURE_NAMES),
        "item_stats": dict(item_stats_params or ItemStats().params()),
        "kind": KIND,
        "version": weights_version(net),
        "hyper": asdict(config),
        "training": record,
    }
    log.info(
        "ranker trained version=%s best_epoch=%d seconds=%.1f",
        out_config["version"],
        best_epoch,
        seconds,
    )
    return net, out_config, history

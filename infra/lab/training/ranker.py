"""The two-tower ranker as a torch module, its training and its checkpoint writer.

``TwoTowerNet`` is the net ``shared.models.ranker`` describes; the recommender runs its
weights in numpy (``Ranker``; ``ranker_of`` makes one of a net).

``train_ranker`` fits a ``TwoTowerNet`` on ``RankerExamples``, one row per TRAIN rating
event in time order with the user's profile vector and features as they were just
before the event, and the candidates the recommender would have scored for that user
then (``shared.models.recommend.retrieve_batch``: cosine neighbours, trending,
newest; ``ExampleBuilder`` collects them while the caller replays TRAIN). The loss has
three terms:

- a softmax over the row's own candidates against the rated one (rows whose rated item
  is among them): the hard negatives the ranker has to order at serving time;
- a sampled softmax over in-batch negatives (towers and cosine only: another row's
  item has no ``co_score`` for this user) with sampling-bias correction (Yi et al.
  2019, "Sampling-bias-corrected neural modeling for large corpus item
  recommendations"): ``log q_j``, the log-frequency of item ``j`` among the training
  examples, is subtracted from every in-batch logit, so that popular items, which show
  up as negatives more often, are not pushed down for it; other rows of the same item
  in a batch are masked. It keeps the towers meaningful beyond the candidates;
- ``rating_weight`` times the rating head's mean squared error.

The epoch kept is the one with the best validation NDCG@10 of the rated item among its
candidates, which is recorded next to plain cosine order's on the same rows.

``save_ranker`` writes the trained net as a ``two-tower-ranker`` checkpoint, which
``shared.models.ranker.load_ranker`` loads.
"""

from __future__ import annotations

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

from infra.lab.training.best_epoch import BestEpoch
from infra.lab.training.checkpoint import numpy_state, save_checkpoint
from shared.exceptions import NumericalError
from shared.models.checkpoint import state_digest
from shared.models.item_stats import (
    CANDIDATE_FEATURE_NAMES,
    N_CANDIDATE_FEATURES,
    N_PAIR_FEATURES,
    N_USER_FEATURES,
    USER_FEATURE_NAMES,
    ItemStats,
)
from shared.models.ranker import KIND, VERSION_PREFIX, Ranker
from shared.models.updater import DEFAULT_PRIOR_RATING
from shared.types import Matrix, Vector

log = logging.getLogger(__name__)

# --- the net (the recommender runs its weights in numpy: Ranker) ---------------------------


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
    return f"{VERSION_PREFIX}-{state_digest(numpy_state(net))[:8]}"


def ranker_of(
    net: TwoTowerNet,
    model_version: str | None = None,
    item_stats_params: dict[str, float] | None = None,
    candidate_pools: dict[str, int] | None = None,
) -> Ranker:
    """The service's numpy ``Ranker`` over a net's current weights."""
    return Ranker(
        numpy_state(net),
        model_version or weights_version(net),
        item_stats_params,
        candidate_pools,
    )


TOP_K = 10
"""The list length validation scores (HR@10, NDCG@10 among the candidates)."""


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and training hyper-parameters of the two-tower ranker.

    Attributes:
        embed_dim: size of each tower's output before the bias column (default 64).
        hidden: width of the user tower's and the item-vector tower's hidden layer
            (default 256).
        feature_hidden: width of the item-feature tower's hidden layer (default 64).
        rating_hidden: width of the rating head's hidden layer (default 64).
        init_cosine_weight: starting weight ``w`` of the plain cosine (default 10, the
            residual updater's softmax scale).
        init_pair_weight: starting weight of each pair column (``co_score``, a z-score;
            default 0.5, the weight that added the most to the first ranker's logits on
            validation).
        candidate_weight: weight of the softmax over each row's candidates (default 1).
        in_batch_weight: weight of the logQ-corrected in-batch softmax (default 0.2).
        logq_correction: subtract ``log q_j`` from in-batch logits (default True).
        rating_weight: weight of the rating head's MSE in the loss (default 0.5).
        epochs: passes over the examples (default 6); with validation examples the
            epoch with the best validation NDCG@10 is kept, else the last.
        patience: epochs without a better validation NDCG@10 before stopping (default 2).
        batch_size: examples per step, which are also each other's in-batch negatives
            (default 256).
        lr: Adam learning rate (default 1e-3).
        weight_decay: Adam weight decay (default 0).
        dropout: dropout in the towers and the rating head during training
            (default 0.1).
    """

    embed_dim: int = 64
    hidden: int = 256
    feature_hidden: int = 64
    rating_hidden: int = 64
    init_cosine_weight: float = 10.0
    init_pair_weight: float = 0.5
    candidate_weight: float = 1.0
    in_batch_weight: float = 0.2
    logq_correction: bool = True
    rating_weight: float = 0.5
    epochs: int = 6
    patience: int = 2
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        positive = ("embed_dim", "hidden", "feature_hidden", "rating_hidden", "epochs", "lr")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"RankerConfig.{name} must be positive, got {value!r}")
        non_negative = (
            "init_cosine_weight",
            "candidate_weight",
            "in_batch_weight",
            "rating_weight",
            "patience",
            "weight_decay",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RankerConfig.{name} must be >= 0, got {value!r}")
        if self.candidate_weight + self.in_batch_weight == 0:
            raise ValueError("RankerConfig needs a ranking loss: both softmax weights are 0")
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
        item_features: ``(n, N_CANDIDATE_FEATURES)`` float32, the rated item's features just
            before the event.
        ratings: ``(n,)`` float32 stars.
        candidate_rows: ``(n, c)`` int64, the rows of the candidates the recommender
            would have scored for the user just before the event; ``-1`` pads.
        candidate_features: ``(n, c, N_CANDIDATE_FEATURES)`` float16 (to halve the memory),
            their features then; zeros on padding.

    Raises:
        ValueError: shapes that do not fit together or a negative item row.
        NumericalError: a NaN or infinity anywhere.
    """

    user_vectors: Matrix
    user_features: Matrix
    item_rows: npt.NDArray[np.int64]
    item_features: Matrix
    ratings: npt.NDArray[np.float32]
    candidate_rows: npt.NDArray[np.int64]
    candidate_features: npt.NDArray[np.float16]

    def __post_init__(self) -> None:
        n = len(self.ratings)
        shapes: dict[str, tuple[np.ndarray, int, int | None]] = {
            "user_vectors": (self.user_vectors, 2, None),
            "user_features": (self.user_features, 2, N_USER_FEATURES),
            "item_rows": (self.item_rows, 1, None),
            "item_features": (self.item_features, 2, N_CANDIDATE_FEATURES),
            "ratings": (self.ratings, 1, None),
            "candidate_rows": (self.candidate_rows, 2, None),
            "candidate_features": (self.candidate_features, 3, None),
        }
        for name, (array, ndim, width) in shapes.items():
            if array.ndim != ndim or array.shape[0] != n:
                raise ValueError(f"{name} has shape {array.shape}; expected {n} rows")
            if width is not None and array.shape[1] != width:
                raise ValueError(f"{name} has {array.shape[1]} columns, expected {width}")
        want = (*self.candidate_rows.shape, N_CANDIDATE_FEATURES)
        if self.candidate_features.shape != want:
            raise ValueError(f"candidate_features has shape {self.candidate_features.shape}")
        if n and int(self.item_rows.min()) < 0:
            raise ValueError("item_rows must be >= 0")
        if self.candidate_rows.size and int(self.candidate_rows.min()) < -1:
            raise ValueError("candidate_rows must be >= 0, or -1 for padding")
        for name in (
            "user_vectors",
            "user_features",
            "item_features",
            "ratings",
            "candidate_features",
        ):
            if not np.isfinite(getattr(self, name)).all():
                raise NumericalError(f"NaN or infinity in {name}")

    def __len__(self) -> int:
        return len(self.ratings)

    @property
    def dim(self) -> int:
        """Dimension of the user vectors."""
        return int(self.user_vectors.shape[1])

    def positive_slots(self) -> npt.NDArray[np.int64]:
        """``(n,)``: where each row's rated item is among its candidates, ``-1`` where
        retrieval missed it."""
        if self.candidate_rows.shape[1] == 0:
            return np.full(len(self), -1, dtype=np.int64)
        hits = self.candidate_rows == self.item_rows[:, None]
        return np.where(hits.any(axis=1), hits.argmax(axis=1), -1).astype(np.int64)

    def subset(self, rows: slice | npt.NDArray[np.integer[Any]]) -> RankerExamples:
        """The examples at ``rows`` (a slice keeps time order, e.g. ``[: n * 9 // 10]``)."""
        return RankerExamples(
            self.user_vectors[rows],
            self.user_features[rows],
            self.item_rows[rows],
            self.item_features[rows],
            self.ratings[rows],
            self.candidate_rows[rows],
            self.candidate_features[rows],
        )


class ExampleBuilder:
    """Collects ``RankerExamples`` one event at a time.

    The caller replays TRAIN in time order through its user updater and an
    ``ItemStats``, and for each event calls ``add`` with the state just *before*
    applying the event, then applies it. The vector dimension is fixed by the first row;
    rows with fewer candidates than the most are padded.
    """

    def __init__(self) -> None:
        self._user_vectors: list[Vector] = []
        self._user_features: list[np.ndarray] = []
        self._item_rows: list[int] = []
        self._item_features: list[np.ndarray] = []
        self._ratings: list[float] = []
        self._candidate_rows: list[np.ndarray] = []
        self._candidate_features: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._ratings)

    def add(
        self,
        user_vector: Vector,
        user_features: np.ndarray,
        item_row: int,
        item_features: np.ndarray,
        rating: float,
        candidate_rows: npt.ArrayLike,
        candidate_features: np.ndarray,
    ) -> None:
        """One example: the user's profile vector and features before the event, the
        rated item's row in the item-vector matrix and its features before the event,
        the rating in stars, and the candidates' rows and features then.

        Raises:
            ValueError: a shape that does not fit (the first row's dimension, the
                feature widths) or a negative item row.
            NumericalError: a NaN or infinity.
        """
        vector = np.asarray(user_vector, dtype=np.float32).reshape(-1)
        ufeats = np.asarray(user_features, dtype=np.float32).reshape(-1)
        ifeats = np.asarray(item_features, dtype=np.float32).reshape(-1)
        crows = np.asarray(candidate_rows, dtype=np.int64).reshape(-1)
        cfeats = np.asarray(candidate_features, dtype=np.float32)
        if self._user_vectors and vector.shape != self._user_vectors[0].shape:
            raise ValueError(
                f"user vector has dimension {vector.shape[0]}, "
                f"earlier ones {self._user_vectors[0].shape[0]}"
            )
        if ufeats.shape != (N_USER_FEATURES,):
            raise ValueError(f"user_features must have {N_USER_FEATURES} values")
        if ifeats.shape != (N_CANDIDATE_FEATURES,):
            raise ValueError(f"item_features must have {N_CANDIDATE_FEATURES} values")
        if cfeats.shape != (len(crows), N_CANDIDATE_FEATURES):
            raise ValueError(
                f"candidate_features must have shape ({len(crows)}, {N_CANDIDATE_FEATURES})"
            )
        if item_row < 0 or (crows < 0).any():
            raise ValueError("item and candidate rows must be >= 0")
        if not (
            np.isfinite(vector).all()
            and np.isfinite(ufeats).all()
            and np.isfinite(ifeats).all()
            and np.isfinite(cfeats).all()
            and math.isfinite(rating)
        ):
            raise NumericalError("NaN or infinity in a ranker example")
        self._user_vectors.append(vector)
        self._user_features.append(ufeats)
        self._item_rows.append(int(item_row))
        self._item_features.append(ifeats)
        self._ratings.append(float(rating))
        self._candidate_rows.append(crows)
        self._candidate_features.append(cfeats.astype(np.float16))

    def build(self) -> RankerExamples:
        """Everything added so far, in order.

        Raises:
            ValueError: nothing was added.
        """
        if not self._ratings:
            raise ValueError("no ranker example was added")
        n, width = len(self._ratings), max(len(c) for c in self._candidate_rows)
        rows = np.full((n, width), -1, dtype=np.int64)
        feats = np.zeros((n, width, N_CANDIDATE_FEATURES), dtype=np.float16)
        for i, (crows, cfeats) in enumerate(
            zip(self._candidate_rows, self._candidate_features, strict=True)
        ):
            rows[i, : len(crows)] = crows
            feats[i, : len(crows)] = cfeats
        return RankerExamples(
            np.stack(self._user_vectors),
            np.stack(self._user_features),
            np.asarray(self._item_rows, dtype=np.int64),
            np.stack(self._item_features),
            np.asarray(self._ratings, dtype=np.float32),
            rows,
            feats,
        )


# --- training -------------------------------------------------------------------------------


@dataclass
class _Tensors:
    users: torch.Tensor
    ufeats: torch.Tensor
    rows: torch.Tensor
    ifeats: torch.Tensor
    ratings: torch.Tensor
    cand_rows: torch.Tensor
    cand_feats: torch.Tensor  # float16 at rest, float32 per batch
    slots: torch.Tensor


def _tensors(examples: RankerExamples) -> _Tensors:
    def tensor(array: np.ndarray, dtype: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))

    return _Tensors(
        tensor(examples.user_vectors, np.float32),
        tensor(examples.user_features, np.float32),
        tensor(examples.item_rows, np.int64),
        tensor(examples.item_features, np.float32),
        tensor(examples.ratings, np.float32),
        tensor(examples.candidate_rows, np.int64),
        tensor(examples.candidate_features, np.float16),
        tensor(examples.positive_slots(), np.int64),
    )


@dataclass
class _Batch:
    """One batch's forward pass: the candidate logits and every loss term."""

    cand_logits: torch.Tensor
    cand_cosine: torch.Tensor
    candidate: torch.Tensor
    in_batch: torch.Tensor
    squared: torch.Tensor


def _forward(
    net: TwoTowerNet,
    data: _Tensors,
    index: torch.Tensor,
    items: torch.Tensor,
    log_q: torch.Tensor | None,
) -> _Batch:
    """Candidate logits and the three loss terms (each a mean over the batch)."""
    users, ufeats = data.users[index], data.ufeats[index]
    rows, ifeats = data.rows[index], data.ifeats[index]
    cand_rows = data.cand_rows[index]
    padding = cand_rows < 0
    cand_rows = cand_rows.clamp(min=0)
    vector_part = net.item_vector_tower(items)  # once per item, not per candidate
    user_emb = net.user_embedding(users, ufeats)

    cand_vectors = items[cand_rows]
    cand_feats = data.cand_feats[index].float()
    cand_emb = net.item_embedding(cand_vectors, cand_feats, vector_part[cand_rows])
    cand_logits = net.logits_candidates(user_emb, users, cand_emb, cand_vectors, cand_feats)
    cand_logits = cand_logits.masked_fill(padding, -math.inf)
    cand_cosine = (cand_vectors * users[:, None, :]).sum(-1).masked_fill(padding, -math.inf)
    slots = data.slots[index]
    found = slots >= 0
    if found.any():
        candidate = F.cross_entropy(cand_logits[found], slots[found])
    else:
        candidate = cand_logits.new_zeros(())

    vectors = items[rows]
    item_emb = net.item_embedding(vectors, ifeats, vector_part[rows])
    # In-batch negatives are other rows' rated items, whose pair columns are of another
    # user: this term scores towers and cosine only.
    logits = net.logits_all_pairs(user_emb, users, item_emb, vectors)
    if log_q is not None:
        logits = logits - log_q[rows][None, :]
    # Another row of the same item is no negative: mask it out of the softmax.
    same = (rows[:, None] == rows[None, :]) & ~torch.eye(len(rows), dtype=torch.bool)
    in_batch = F.cross_entropy(logits.masked_fill(same, -math.inf), torch.arange(len(rows)))

    cosine = (users * vectors).sum(-1)
    predicted = net.rating(user_emb, ufeats, item_emb, ifeats, cosine)
    squared = ((predicted - data.ratings[index]) ** 2).mean()
    return _Batch(cand_logits, cand_cosine, candidate, in_batch, squared)


def _loss(batch: _Batch, config: RankerConfig) -> torch.Tensor:
    return (
        config.candidate_weight * batch.candidate
        + config.in_batch_weight * batch.in_batch
        + config.rating_weight * batch.squared
    )


def _hits(logits: torch.Tensor, slots: torch.Tensor) -> tuple[float, float]:
    """Summed HR@10 and NDCG@10 of the rated item (at ``slots``; -1 = not a candidate)
    when the candidates are ordered by ``logits`` (ties count against it)."""
    found = slots >= 0
    if logits.shape[1] == 0 or not found.any():
        return 0.0, 0.0
    positive = logits.gather(1, slots.clamp(min=0)[:, None])
    rank = (logits >= positive).sum(1) - 1
    hit = found & (rank < TOP_K)
    gain = hit.float() / torch.log2(rank.float() + 2.0)
    return float(hit.sum()), float(gain.sum())


@torch.no_grad()
def _validate(
    net: TwoTowerNet,
    data: _Tensors,
    items: torch.Tensor,
    log_q: torch.Tensor | None,
    config: RankerConfig,
) -> dict[str, float]:
    """Validation metrics over fixed consecutive batches (time order), eval mode:
    HR@10 / NDCG@10 of the rated item among its candidates, ranked by the net and by
    plain cosine, the loss terms and the rating RMSE."""
    net.eval()
    n = len(data.ratings)
    sums = dict.fromkeys(("hr", "ndcg", "cos_hr", "cos_ndcg", "loss", "squared"), 0.0)
    for lo in range(0, n, config.batch_size):
        index = torch.arange(lo, min(lo + config.batch_size, n))
        batch = _forward(net, data, index, items, log_q)
        slots = data.slots[index]
        hr, ndcg = _hits(batch.cand_logits, slots)
        cos_hr, cos_ndcg = _hits(batch.cand_cosine, slots)
        sums["hr"] += hr
        sums["ndcg"] += ndcg
        sums["cos_hr"] += cos_hr
        sums["cos_ndcg"] += cos_ndcg
        sums["loss"] += float(_loss(batch, config)) * len(index)
        sums["squared"] += float(batch.squared) * len(index)
    net.train()
    return {
        "val_ndcg": sums["ndcg"] / n,
        "val_hr": sums["hr"] / n,
        "val_cosine_ndcg": sums["cos_ndcg"] / n,
        "val_cosine_hr": sums["cos_hr"] / n,
        "val_loss": sums["loss"] / n,
        "val_rmse": math.sqrt(sums["squared"] / n),
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
    """Train a ``TwoTowerNet`` on candidate softmax + logQ-corrected in-batch softmax +
    rating MSE (module docstring).

    Each epoch shuffles the examples (seeded) into batches of ``config.batch_size``.
    ``q_j`` is item ``j``'s share of the training examples (an item only in validation
    counts as seen once). Adam; with ``validation`` its metrics (same batches every
    epoch, in time order) are computed after each epoch and the epoch with the best
    validation NDCG@10 among the candidates is kept.

    Args:
        examples: training rows (``ExampleBuilder``), e.g. the first 90% of TRAIN.
        item_vectors: ``(n_items, dim)`` L2-normalised float32, the deployed item
            encoder's output; ``item_rows`` and ``candidate_rows`` index it. Fixed inputs,
            never trained.
        validation: later rows for choosing the epoch, or None (the last is kept).
        config: hyper-parameters (default ``RankerConfig()``).
        item_stats_params: the ``ItemStats.params()`` the features were computed with,
            stored in the config so services rebuild them (default: the defaults).
        seed: seeds torch and numpy (initial weights, shuffling, dropout).
        progress: show a tqdm bar.

    Returns:
        ``(net, config, history)``: the net (eval mode), the checkpoint config (kind,
        version, architecture, feature layouts, hyper-parameters, a training record with
        the kept epoch's validation metrics) and per-epoch lists ``train_loss``,
        ``train_candidate``, ``train_in_batch``, ``train_rmse``, and with validation the
        ``_validate`` metrics.

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
        top = max(int(part.item_rows.max(initial=0)), int(part.candidate_rows.max(initial=0)))
        if len(part) and top >= n_items:
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
        feature_hidden=config.feature_hidden,
        rating_hidden=config.rating_hidden,
        init_cosine_weight=config.init_cosine_weight,
        init_pair_weight=config.init_pair_weight,
        dropout=config.dropout,
        global_mean=global_mean,
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    names = ("train_loss", "train_candidate", "train_in_batch", "train_rmse")
    history: dict[str, list[float]] = {name: [] for name in names}
    n = len(examples)
    steps = math.ceil(n / config.batch_size)
    log.info(
        "training ranker examples=%d (rated item among candidates: %.1f%%) val=%d items=%d "
        "dim=%d config=%s",
        n,
        100.0 * float((data.slots >= 0).float().mean()),
        0 if val_data is None else len(val_data.ratings),
        n_items,
        dim,
        config,
    )
    best = BestEpoch(config.patience, maximise=True)
    kept: dict[str, float] = {}
    bar = tqdm(total=config.epochs * steps, desc="ranker", unit="batch", disable=not progress)
    net.train()
    for epoch in range(config.epochs):
        order = torch.from_numpy(rng.permutation(n))
        sums = dict.fromkeys(("loss", "candidate", "in_batch", "squared"), 0.0)
        for lo in range(0, n, config.batch_size):
            index = order[lo : lo + config.batch_size]
            bar.update(1)
            if len(index) < 2:
                continue  # one row has no in-batch negative
            batch = _forward(net, data, index, items, log_q)
            loss = _loss(batch, config)
            if not torch.isfinite(loss):
                raise NumericalError(f"ranker training loss is not finite at epoch {epoch}")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            for key, value in (
                ("loss", loss),
                ("candidate", batch.candidate),
                ("in_batch", batch.in_batch),
                ("squared", batch.squared),
            ):
                sums[key] += float(value.detach()) * len(index)
            bar.set_postfix(loss=f"{sums['loss'] / (lo + len(index)):.3f}")
        history["train_loss"].append(sums["loss"] / n)
        history["train_candidate"].append(sums["candidate"] / n)
        history["train_in_batch"].append(sums["in_batch"] / n)
        history["train_rmse"].append(math.sqrt(sums["squared"] / n))
        line = f"epoch={epoch} train_loss={history['train_loss'][-1]:.4f}"
        if val_data is not None:
            metrics = _validate(net, val_data, items, log_q, config)
            for key, metric in metrics.items():
                history.setdefault(key, []).append(metric)
            line += " " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            if best.update(net, epoch, metrics["val_ndcg"]):
                kept = metrics
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
        "validation": kept,
        "train_seconds": round(seconds, 1),
        "cosine_weight": float(net.cosine_weight.detach()),
        "history": history,
    }
    out_config: dict[str, Any] = {
        **net.describe(),
        "user_feature_names": list(USER_FEATURE_NAMES),
        "item_feature_names": list(CANDIDATE_FEATURE_NAMES),
        "item_stats": dict(item_stats_params or ItemStats().params()),
        "kind": KIND,
        "version": weights_version(net),
        "hyper": asdict(config),
        "training": record,
    }
    log.info(
        "ranker trained version=%s best_epoch=%d seconds=%.1f validation=%s",
        out_config["version"],
        best_epoch,
        seconds,
        kept,
    )
    return net, out_config, history


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
        "item_feature_names": list(CANDIDATE_FEATURE_NAMES),
        "kind": KIND,
        "version": weights_version(net),
    }
    return save_checkpoint(directory, net, full)

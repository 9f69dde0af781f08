"""Training of the residual user updater and its checkpoint writer.

``ResidualNet`` is the updater as a torch module (the service runs its weights in
numpy, ``shared.models.residual.ResidualUpdater``; ``updater_of`` makes one of a net).
``train_residual`` fits a ``ResidualNet`` on TRAIN
histories in time order with a next-item objective, unrolled on its own outputs exactly
as it runs online: the current ``u`` scores every catalogue item (full softmax, items
the user already rated masked, as the evaluation excludes them) against the next rated
item, then that rating moves ``u``. The item vectors are fixed inputs (any item
encoder's output; none is trained here).

``save_residual`` writes the trained net as a ``residual-updater`` checkpoint, which
``shared.models.residual.load_residual_updater`` loads.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import nn
from tqdm import tqdm

from infra.lab.training.best_epoch import BestEpoch
from infra.lab.training.checkpoint import numpy_state, save_checkpoint
from shared.events import RatingSubmitted
from shared.exceptions import NumericalError
from shared.models.checkpoint import state_digest
from shared.models.residual import (
    FEATURE_SCALE,
    KIND,
    LIKED_STARS,
    NORM_EPS,
    VERSION_PREFIX,
    ResidualUpdater,
    n_inputs,
)
from shared.types import Matrix, MovieId

log = logging.getLogger(__name__)


def rating_features(ratings: torch.Tensor) -> torch.Tensor:
    """``[(r - 3) / 2, liked]`` per rating in stars: shape ``(n, 2)``."""
    centred = (ratings - 3.0) / 2.0
    liked = (ratings >= LIKED_STARS).to(ratings.dtype)
    return torch.stack([centred, liked], dim=-1)


class ResidualNet(nn.Module):
    """One online update ``u' = normalise(u + f(u, v, rating, gap, count))``.

    ``f``'s input is ``[sqrt(d) u, sqrt(d) v, d (u * v), (r-3)/2, liked,
    log1p(gap_h)/4, log1p(count)/4]`` (the gap and count only when enabled; the scaling
    makes unit vectors' entries order one). Its output layer gives a direction ``delta``
    (divided by ``sqrt(d)``) and a scalar ``a``: ``f = delta + a * v``, so a rating can
    pull the user towards (or push away from) the item directly and bend the vector
    elsewhere. That layer starts at zero: an untrained net is the identity.

    Args:
        dim: item (and user) vector dimension.
        hidden: hidden width (default 256).
        layers: hidden layers (default 2).
        use_gap: feed the time gap feature (default True).
        use_count: feed the rating-count feature (default True).
        init_scale: starting softmax scale used in training (default 10).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        layers: int = 2,
        *,
        use_gap: bool = True,
        use_count: bool = True,
        init_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"dim, hidden and layers must be >= 1, got {dim}, {hidden}, {layers}")
        self.dim = dim
        self.use_gap = use_gap
        self.use_count = use_count
        n_in = n_inputs(dim, use_gap=use_gap, use_count=use_count)
        blocks: list[nn.Module] = []
        width = n_in
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*blocks)
        self.out = nn.Linear(hidden, dim + 1)
        """f's output layer: ``delta`` (dim) and the pull ``a`` along the item (1)."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.prior = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        """Cold users' vector before normalisation."""
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        """Training only: logits = exp(log_scale) * cosine."""

    def prior_vector(self) -> torch.Tensor:
        """The normalised prior, shape ``(dim,)``."""
        return F.normalize(self.prior, dim=0, eps=NORM_EPS)

    def scale(self) -> torch.Tensor:
        """The softmax scale, clamped to [1, 100] so the loss cannot blow up."""
        return self.log_scale.exp().clamp(1.0, 100.0)

    def forward(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        rating: torch.Tensor,
        gap_hours: torch.Tensor,
        count: torch.Tensor,
    ) -> torch.Tensor:
        """The next user vectors.

        Args:
            user: ``(n, dim)`` unit user vectors.
            item: ``(n, dim)`` unit item vectors.
            rating: ``(n,)`` stars.
            gap_hours: ``(n,)`` hours since the user's previous rating (0 for the first).
            count: ``(n,)`` ratings the user gave before this one.

        Returns:
            ``(n, dim)``, L2-normalised (a zero-length result stays zero: callers check).
        """
        root = math.sqrt(self.dim)
        parts = [user * root, item * root, user * item * self.dim, rating_features(rating)]
        if self.use_gap:
            parts.append((torch.log1p(gap_hours.clamp_min(0.0)) / FEATURE_SCALE)[:, None])
        if self.use_count:
            parts.append((torch.log1p(count.clamp_min(0.0)) / FEATURE_SCALE)[:, None])
        out = self.out(self.mlp(torch.cat(parts, dim=-1)))
        delta, pull = out[:, : self.dim] / root, out[:, self.dim :]
        return F.normalize(user + delta + pull * item, dim=-1, eps=NORM_EPS)

    def describe(self) -> dict[str, Any]:
        """What rebuilds this module (goes into the checkpoint config)."""
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        return {
            "dim": self.dim,
            "hidden": first.out_features,
            "layers": sum(isinstance(m, nn.Linear) for m in self.mlp),
            "use_gap": self.use_gap,
            "use_count": self.use_count,
            "features": [
                "sqrt(d)*u",
                "sqrt(d)*v",
                "d*u*v",
                "(r-3)/2",
                f"r>={LIKED_STARS:g}",
                *(["log1p(gap_hours)/4"] if self.use_gap else []),
                *(["log1p(count)/4"] if self.use_count else []),
            ],
        }


def weights_version(net: ResidualNet) -> str:
    """``residual-v1-<8 hex>``: a digest of the weights, so two trainings differ."""
    return f"{VERSION_PREFIX}-{state_digest(numpy_state(net))[:8]}"


def updater_of(net: ResidualNet, model_version: str | None = None) -> ResidualUpdater:
    """The service's numpy ``ResidualUpdater`` over a net's current weights."""
    return ResidualUpdater(
        numpy_state(net),
        use_gap=net.use_gap,
        use_count=net.use_count,
        model_version=model_version or weights_version(net),
    )


@dataclass(frozen=True)
class ResidualConfig:
    """Architecture and training hyper-parameters of the residual updater.

    Attributes:
        hidden: width of the MLP's hidden layers (default 256).
        layers: hidden layers in the MLP (default 2).
        use_gap: feed ``log1p(hours since the user's previous rating)`` (default True).
        use_count: feed ``log1p(ratings the user gave before)``, so the step size can
            shrink as a profile matures, as a running mean's does (default True).
        epochs: passes over TRAIN (default 8); the epoch with the best validation
            NDCG@10 is kept when validation ratings are given, else the last.
        patience: epochs without a better validation NDCG@10 before stopping (default 3).
        lanes: users trained side by side; each lane plays users back to back
            (default 32).
        chunk: steps per truncated back-propagation-through-time window (default 16).
        lr: Adam learning rate (default 3e-3).
        weight_decay: Adam weight decay (default 0).
        clip: gradient-norm clip (default 1.0).
        init_scale: starting softmax scale (inverse temperature) on cosine scores;
            learned (default 10).
        early_weight: extra loss weight of a user's early steps: step ``t`` (0-based,
            over the ratings the user already gave) weighs
            ``1 + early_weight * exp(-t / early_horizon)``. Most test users are new, so
            their first ratings matter most (default 1.0).
        early_horizon: see ``early_weight`` (default 20 ratings).
        max_history: train on at most the first this many ratings of each user; 0 means
            all (default 0).
    """

    hidden: int = 256
    layers: int = 2
    use_gap: bool = True
    use_count: bool = True
    epochs: int = 8
    patience: int = 3
    lanes: int = 32
    chunk: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    init_scale: float = 10.0
    early_weight: float = 1.0
    early_horizon: float = 20.0
    max_history: int = 0

    def __post_init__(self) -> None:
        positive = ("hidden", "layers", "epochs", "lanes", "chunk", "lr", "clip", "init_scale")
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ResidualConfig.{name} must be positive, got {value!r}")
        for name in ("patience", "weight_decay", "early_weight", "max_history"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ResidualConfig.{name} must be >= 0, got {value!r}")
        if not self.early_horizon > 0:
            raise ValueError(f"ResidualConfig.early_horizon must be > 0, got {self.early_horizon}")


# --- training -------------------------------------------------------------------------------


@dataclass
class _History:
    """One user's ratings as row indices, in time order."""

    items: np.ndarray
    """int64 rows of the item matrix."""
    ratings: np.ndarray
    gaps: np.ndarray
    """Hours since the user's previous rating (0 for the first)."""
    scored: np.ndarray
    """bool: a validation rating (scored in validation; unused in training)."""


def _histories(
    ratings: Sequence[RatingSubmitted], rows: dict[MovieId, int], scored: bool
) -> tuple[dict[str, list[tuple[datetime, int, float, bool]]], int]:
    """Per user, ``(time, row, stars, scored)`` in input order; and how many were skipped
    because their movie has no item vector."""
    by_user: dict[str, list[tuple[datetime, int, float, bool]]] = {}
    skipped = 0
    for r in ratings:
        row = rows.get(r.movie_id)
        if row is None:
            skipped += 1
            continue
        by_user.setdefault(r.user_id, []).append((r.occurred_at, row, float(r.rating), scored))
    return by_user, skipped


def _to_history(events: list[tuple[datetime, int, float, bool]]) -> _History:
    events = sorted(events, key=lambda e: e[0])  # stable: ties keep the stream order
    gaps = np.zeros(len(events), dtype=np.float32)
    for i in range(1, len(events)):
        gaps[i] = max((events[i][0] - events[i - 1][0]).total_seconds() / 3600.0, 0.0)
    return _History(
        items=np.array([e[1] for e in events], dtype=np.int64),
        ratings=np.array([e[2] for e in events], dtype=np.float32),
        gaps=gaps,
        scored=np.array([e[3] for e in events], dtype=bool),
    )


@dataclass
class _Lanes:
    """Users packed back to back into ``lanes`` rows, padded to one length."""

    items: torch.Tensor  # (lanes, length) int64
    ratings: torch.Tensor  # (lanes, length) float32
    gaps: torch.Tensor
    counts: torch.Tensor  # ratings the user gave before this step
    start: torch.Tensor  # bool: a user's first step (u resets to the prior)
    valid: torch.Tensor  # bool: a real step (not padding)
    scored: torch.Tensor  # bool

    @property
    def length(self) -> int:
        return int(self.items.shape[1])


def _pack(histories: Sequence[_History], lanes: int) -> _Lanes:
    """Longest-first greedy packing (each user to the currently shortest lane)."""
    n_lanes = max(1, min(lanes, len(histories)))
    heap: list[tuple[int, int]] = [(0, lane) for lane in range(n_lanes)]
    members: list[list[_History]] = [[] for _ in range(n_lanes)]
    order = sorted(range(len(histories)), key=lambda i: -len(histories[i].items))
    for i in order:
        size, lane = heapq.heappop(heap)
        members[lane].append(histories[i])
        heapq.heappush(heap, (size + len(histories[i].items), lane))
    length = max(1, max(size for size, _ in heap))
    shape = (n_lanes, length)
    items = np.zeros(shape, dtype=np.int64)
    ratings = np.full(shape, 3.0, dtype=np.float32)
    gaps = np.zeros(shape, dtype=np.float32)
    counts = np.zeros(shape, dtype=np.float32)
    start = np.zeros(shape, dtype=bool)
    valid = np.zeros(shape, dtype=bool)
    scored = np.zeros(shape, dtype=bool)
    for lane, users in enumerate(members):
        at = 0
        for h in users:
            n = len(h.items)
            items[lane, at : at + n] = h.items
            ratings[lane, at : at + n] = h.ratings
            gaps[lane, at : at + n] = h.gaps
            counts[lane, at : at + n] = np.arange(n)
            start[lane, at] = True
            valid[lane, at : at + n] = True
            scored[lane, at : at + n] = h.scored
            at += n
    return _Lanes(
        *(torch.from_numpy(a) for a in (items, ratings, gaps, counts, start, valid, scored))
    )


def _run_chunk(
    net: ResidualNet,
    vectors: torch.Tensor,
    lanes: _Lanes,
    lo: int,
    hi: int,
    user: torch.Tensor,
    rated: torch.Tensor,
    weigh: bool,
    config: ResidualConfig | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Steps ``lo:hi`` of every lane: score, then update. ``rated`` is updated in place.

    Returns the final user vectors and, per step, the loss terms, the weights and the
    target ranks (ranks only when ``weigh`` is False, i.e. in validation).
    """
    config = config or ResidualConfig()
    prior = net.prior_vector()
    scale = net.scale()
    every = torch.arange(rated.shape[0])
    losses: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    ranks: list[torch.Tensor] = []
    for t in range(lo, hi):
        start, valid = lanes.start[:, t], lanes.valid[:, t]
        target = lanes.items[:, t]
        count = lanes.counts[:, t]
        user = torch.where(start[:, None], prior.expand_as(user), user)
        rated[start] = False
        # A user with no rating has no list in the evaluation: no loss on the first step.
        # A re-rated movie is excluded from the list, so it cannot be a target either.
        live = valid & (count > 0) & ~rated[every, target]
        if weigh:
            w = live.float() * (
                1.0 + config.early_weight * torch.exp(-(count - 1) / config.early_horizon)
            )
        else:
            w = (live & lanes.scored[:, t]).float()
        if bool((w > 0).any()):
            cos = user @ vectors.T
            logits = (scale * cos).masked_fill(rated.clone(), float("-inf"))
            loss = F.cross_entropy(logits, target, reduction="none")
            # A masked target (padding, a re-rating) has an infinite loss and weight 0.
            losses.append(torch.where(w > 0, loss, torch.zeros_like(loss)))
            weights.append(w)
            if not weigh:
                hit = cos.gather(1, target[:, None])
                ranks.append(((cos > hit) & ~rated).sum(dim=1))
        new = net(user, vectors[target], lanes.ratings[:, t], lanes.gaps[:, t], lanes.counts[:, t])
        user = torch.where(valid[:, None], new, user)
        rated[every[valid], target[valid]] = True
    return user, losses, weights, ranks


def _validate(
    net: ResidualNet, vectors: torch.Tensor, lanes: _Lanes, k: int = 10
) -> dict[str, float]:
    """Replay every lane (no gradients); score the ``scored`` steps."""
    net.eval()
    n_scored = int(lanes.scored.sum())
    total_loss = total_ndcg = total_hr = 0.0
    with torch.no_grad():
        user = net.prior_vector().expand(lanes.items.shape[0], -1).clone()
        rated = torch.zeros(lanes.items.shape[0], vectors.shape[0], dtype=torch.bool)
        for lo in range(0, lanes.length, 256):
            hi = min(lo + 256, lanes.length)
            user, losses, weights, ranks = _run_chunk(
                net, vectors, lanes, lo, hi, user, rated, False
            )
            for loss, w, rank in zip(losses, weights, ranks, strict=True):
                mask = w > 0
                total_loss += float(loss[mask].sum())
                r = rank[mask].double()
                hits = r < k
                total_hr += float(hits.sum())
                total_ndcg += float((hits / torch.log2(r + 2.0)).sum())
    net.train()
    # Steps with no prior rating count as misses (no list), as in the evaluation.
    denominator = max(n_scored, 1)
    return {
        "val_loss": total_loss / denominator,
        "val_ndcg": total_ndcg / denominator,
        "val_hr": total_hr / denominator,
    }


def _item_matrix(
    item_ids: list[MovieId], item_vectors: Matrix
) -> tuple[torch.Tensor, dict[MovieId, int]]:
    matrix = np.asarray(item_vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(item_ids):
        raise ValueError(
            f"item_vectors must have one row per item id: {matrix.shape} for {len(item_ids)} ids"
        )
    if not np.isfinite(matrix).all():
        raise NumericalError("NaN or infinity in the item vectors")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item_ids has duplicates")
    rows = {movie: i for i, movie in enumerate(item_ids)}
    return torch.from_numpy(matrix.copy()), rows


def train_residual(
    item_ids: list[MovieId],
    item_vectors: Matrix,
    train: Sequence[RatingSubmitted],
    *,
    validation: Sequence[RatingSubmitted] | None = None,
    config: ResidualConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ResidualNet, dict[str, Any], dict[str, list[float]]]:
    """Train a ``ResidualNet`` on TRAIN histories with the online next-item objective.

    Each user's ratings are replayed in time order from the prior; before each rating
    (but the first) the current vector scores all items (``exp(log_scale) * cosine``,
    the user's rated items masked) in a softmax against the rated item, and the rating
    then moves the vector through the net, exactly as online. Truncated BPTT over
    ``config.chunk`` steps, ``config.lanes`` lanes of users played back to back, Adam,
    gradient clipping. With ``validation`` (later ratings, e.g. the last 10% of TRAIN)
    each validation user's TRAIN history is replayed and then their validation ratings
    are scored (NDCG@10, HR@10, loss) after every epoch; the best-NDCG epoch is kept.

    Args:
        item_ids: the movie of each row of ``item_vectors``.
        item_vectors: ``(n_items, dim)`` L2-normalised float32, the deployed item
            encoder's output; fixed inputs, never trained.
        train: ratings in any order (sorted by time per user here). Ratings of movies
            without a vector are skipped (logged).
        validation: held-out later ratings, or None (then the last epoch is kept).
        config: hyper-parameters (default ``ResidualConfig()``).
        seed: seeds torch and numpy (user order, initial weights).
        progress: show a tqdm bar.

    Returns:
        ``(net, config, history)``: the net (eval mode), the checkpoint config (kind,
        version, architecture, hyper-parameters, a training record) and per-epoch lists
        ``train_loss``, and with validation ``val_loss``, ``val_ndcg``, ``val_hr``.

    Raises:
        ValueError: no usable training rating, or item ids and vectors do not match.
        NumericalError: NaN in the item vectors or in the training loss.
    """
    config = config or ResidualConfig()
    began = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vectors, rows = _item_matrix(item_ids, item_vectors)
    by_user, skipped = _histories(train, rows, scored=False)
    if not by_user:
        raise ValueError("no training rating has an item vector")
    users = sorted(by_user)
    histories = [_to_history(by_user[u]) for u in users]
    if config.max_history:
        n = config.max_history
        histories = [
            _History(h.items[:n], h.ratings[:n], h.gaps[:n], h.scored[:n]) for h in histories
        ]
    n_steps = sum(len(h.items) for h in histories)

    val_lanes: _Lanes | None = None
    n_val = 0
    if validation:
        held, val_skipped = _histories(validation, rows, scored=True)
        skipped += val_skipped
        replay = [_to_history(by_user.get(u, []) + held[u]) for u in sorted(held)]
        n_val = sum(int(h.scored.sum()) for h in replay)
        val_lanes = _pack(replay, 512)
    if skipped:
        log.warning("ratings skipped: their movie has no item vector n=%d", skipped)

    net = ResidualNet(
        vectors.shape[1],
        config.hidden,
        config.layers,
        use_gap=config.use_gap,
        use_count=config.use_count,
        init_scale=config.init_scale,
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: dict[str, list[float]] = {"train_loss": []}
    if val_lanes is not None:
        history.update(val_loss=[], val_ndcg=[], val_hr=[])
    best = BestEpoch(config.patience, maximise=True)
    log.info(
        "training residual updater users=%d steps=%d val=%d dim=%d config=%s",
        len(histories),
        n_steps,
        n_val,
        vectors.shape[1],
        config,
    )
    chunks_per_epoch = math.ceil(
        math.ceil(n_steps / min(config.lanes, len(histories))) / config.chunk
    )
    bar = tqdm(
        total=config.epochs * chunks_per_epoch,
        desc="residual updater",
        unit="chunk",
        disable=not progress,
    )
    net.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(histories))
        lanes = _pack([histories[i] for i in order], config.lanes)
        user = net.prior_vector().detach().expand(lanes.items.shape[0], -1).clone()
        rated = torch.zeros(lanes.items.shape[0], vectors.shape[0], dtype=torch.bool)
        loss_sum = weight_sum = 0.0
        for lo in range(0, lanes.length, config.chunk):
            hi = min(lo + config.chunk, lanes.length)
            user, losses, weights, _ = _run_chunk(
                net, vectors, lanes, lo, hi, user, rated, True, config
            )
            user = user.detach()
            bar.update(1)
            if not losses:
                continue
            w = torch.stack(weights)
            total = (torch.stack(losses) * w).sum()
            if not torch.isfinite(total):
                raise NumericalError(f"training loss is not finite at epoch {epoch}")
            optimiser.zero_grad()
            (total / w.sum()).backward()
            nn.utils.clip_grad_norm_(net.parameters(), config.clip)
            optimiser.step()
            loss_sum += float(total.detach())
            weight_sum += float(w.sum())
            bar.set_postfix(loss=f"{loss_sum / max(weight_sum, 1e-9):.3f}")
        history["train_loss"].append(loss_sum / max(weight_sum, 1e-9))
        line = f"epoch={epoch} train_loss={history['train_loss'][-1]:.4f}"
        if val_lanes is not None:
            metrics = _validate(net, vectors, val_lanes)
            for key, value in metrics.items():
                history[key].append(value)
            line += " " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            best.update(net, epoch, metrics["val_ndcg"])
        log.info("residual %s", line)
        if val_lanes is not None and best.should_stop():
            log.info("residual early stop epoch=%d best_epoch=%d", epoch, best.best_epoch)
            break
    bar.close()
    best_epoch = best.restore(net, len(history["train_loss"]))
    net.eval()
    seconds = time.perf_counter() - began
    record: dict[str, Any] = {
        "seed": seed,
        "n_users": len(histories),
        "n_train_steps": n_steps,
        "n_validation": n_val,
        "n_skipped": skipped,
        "n_items": len(item_ids),
        "epochs_run": len(history["train_loss"]),
        "best_epoch": best_epoch,
        "train_seconds": round(seconds, 1),
        "history": history,
        "scale": float(net.scale().detach()),
    }
    out_config: dict[str, Any] = {
        **net.describe(),
        "kind": KIND,
        "version": weights_version(net),
        "hyper": asdict(config),
        "training": record,
    }
    log.info(
        "residual updater trained version=%s best_epoch=%d seconds=%.1f",
        out_config["version"],
        best_epoch,
        seconds,
    )
    return net, out_config, history


# --- checkpoints ----------------------------------------------------------------------------


def save_residual(directory: Path, net: ResidualNet, config: dict[str, Any]) -> Path:
    """Write ``net`` as a ``residual-updater`` checkpoint; returns the directory.

    ``config`` is the one ``train_residual`` returns (anything JSON-serialisable is
    kept); the architecture (``net.describe()``), ``kind`` and ``version`` are filled in
    from the net itself, so the checkpoint always rebuilds it.
    """
    full = {**config, **net.describe(), "kind": KIND, "version": weights_version(net)}
    return save_checkpoint(directory, net, full)

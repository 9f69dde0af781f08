"""Training of the fusion item encoder (``shared.models.fusion``) and its checkpoint writer.

``train_fusion`` fits a ``FusionNet`` with two objectives (both switchable for the
ablation):

- a multi-triplet loss on cosine distance: an anchor, a positive sharing its primary
  genre / a director / a lead actor, and a negative sharing none of them;
- an interaction objective from TRAIN ratings, shaped like the way the space is used:
  the rating-weighted mean of a user's last ``window`` items (the rating-weighted-mean
  updater over a short history) must retrieve the next item that user rated, with a
  softmax over the whole catalogue at a temperature (the items already in the context
  are excluded, as the recommender excludes rated movies; ``rated_negatives_only``
  keeps movies nobody rated out of the negatives).

``save_fusion`` writes the trained net as a ``fusion-item-encoder`` checkpoint, which
``shared.models.fusion.load_fusion_encoder`` loads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional
from tqdm import tqdm

from infra.lab.training.checkpoint import save_checkpoint
from shared.convert import movies_of
from shared.events import MoviePublished, RatingSubmitted
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.fusion import (
    FUSION_VERSION,
    KIND,
    RATED_KEY,
    YEAR_CENTER,
    YEAR_SCALE,
    FusionNet,
    build_net,
    content_inputs,
    weights_digest,
)
from shared.models.image import ImageEncoder
from shared.models.metadata import GENRE_FEATURES, LEAD_CAST, genre_index
from shared.models.text import TextEncoder
from shared.types import MovieId

log = logging.getLogger(__name__)

LIKED_RATING = 4.0
"""Stars from which a rating counts as liked (``FusionConfig.liked_weight``)."""

SPREAD_SAMPLE = 4000
"""Movies the spread statistics are computed over (a seeded sample when more)."""


@dataclass(frozen=True)
class FusionConfig:
    """Architecture and training hyper-parameters of the fusion encoder.

    The three ``use_*`` switches are the ablation steps: without metadata the network has
    no metadata branch; at least one of the two objectives must be on.
    """

    use_metadata: bool = True
    """Genres, year and hashed people as a modality (default on)."""
    use_triplet: bool = True
    """Multi-triplet loss: shared primary genre / director / lead actor (default on)."""
    use_interaction: bool = True
    """Next-item InfoNCE from TRAIN rating histories (default on)."""
    out_dim: int = 128
    """Dimension of the item vectors."""
    hidden_dim: int = 256
    """Width of the modality projections and of the MLP's hidden layer."""
    people_dim: int = 32
    """Width of a person's embedding."""
    people_buckets: int = 16384
    """Hash buckets of people ids (collisions share an embedding). Fewer buckets place
    unseen movies better: with 15% of the fit window's movies left out of the
    interaction objective, their median rank for the contexts that rated them went from
    550 to 373 of 1,682 with 1,024 buckets (both with ``rated_negatives_only``), warm
    movies' staying at 40; see ``rated_negatives_only`` for why neither is the default."""
    dropout: float = 0.1
    """Dropout on the fused hidden layer, training only."""
    modality_dropout: float = 0.1
    """Probability of masking a movie's metadata in a training forward, so the model
    also learns to embed movies that come with less content."""
    epochs: int = 10
    batch_size: int = 512
    """Interaction examples (context, next item) per step."""
    triplet_batch: int = 256
    """Anchors per triplet term per step."""
    lr: float = 2e-3
    """AdamW learning rate (cosine-decayed to 5% over the run)."""
    weight_decay: float = 1e-4
    margin: float = 0.2
    """Triplet margin, in cosine distance (1 - cosine)."""
    temperature: float = 0.1
    """Softmax temperature of the interaction objective (cosines are divided by it).
    Chosen on validation: 0.1 beat 0.05 (NDCG@10 0.0675 vs 0.0656) and spreads the
    space (mean nearest-neighbour cosine 0.83 vs 0.91)."""
    window: int = 10
    """Previous ratings of a user that form the context of the next one."""
    rated_negatives_only: bool = False
    """Only movies rated in the training ratings are negatives of the interaction
    softmax. With the whole catalogue (the default), every movie nobody rated is pushed
    away from every context, and a new release is placed worse than at random: with 15%
    of the fit window's movies left out of the interaction objective, their median rank
    for the contexts that rated them was 1,109 of 1,682 with the whole catalogue as
    negatives and 550 with rated movies only (top 100: 1.6% and 11.3%); warm movies'
    median stayed at 40. Still off: with it and 1,024 people buckets, all four stages
    retrained scored validation HR@10 0.2412 and NDCG@10 0.1248 against 0.2435 and
    0.1261, and no cold-item hit against one. A median rank of 373 is still far from a
    top-10 list."""
    liked_weight: float = 1.0
    """Loss weight of a next item rated >= 4 stars, relative to 1 for the others."""
    triplet_weight: float = 1.0
    interaction_weight: float = 1.0
    val_fraction: float = 0.0
    """Latest share of the training ratings held out for ``val_loss`` (0 = none; every
    rating then trains, and ``val_loss`` stays empty)."""

    def __post_init__(self) -> None:
        if not (self.use_triplet or self.use_interaction):
            raise ConfigurationError("FusionConfig: turn on use_triplet or use_interaction")
        positive_ints = (
            "out_dim hidden_dim people_dim people_buckets epochs batch_size triplet_batch window"
        )
        for name in positive_ints.split():
            if getattr(self, name) < 1:
                raise ConfigurationError(f"FusionConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "temperature", "liked_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"FusionConfig.{name}={value} must be positive")
        for name in ("dropout", "modality_dropout", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigurationError(f"FusionConfig.{name}={value} must be in [0, 1)")
        for name in ("weight_decay", "margin", "triplet_weight", "interaction_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"FusionConfig.{name}={value} must be >= 0")


def _arch_config(
    cfg: FusionConfig, text_encoder: TextEncoder, image_encoder: ImageEncoder | None
) -> dict[str, Any]:
    return {
        "kind": KIND,
        "architecture": FUSION_VERSION,
        "text_model": text_encoder.name,
        "text_dim": text_encoder.dim,
        "image_model": None if image_encoder is None else image_encoder.name,
        "image_dim": 0 if image_encoder is None else image_encoder.dim,
        "use_metadata": cfg.use_metadata,
        "hidden_dim": cfg.hidden_dim,
        "out_dim": cfg.out_dim,
        "people_dim": cfg.people_dim,
        "people_buckets": cfg.people_buckets,
        "dropout": cfg.dropout,
        "genre_features": list(GENRE_FEATURES),
        "year_center": YEAR_CENTER,
        "year_scale": YEAR_SCALE,
    }


# --- training data ---------------------------------------------------------------------


@dataclass(frozen=True)
class Interactions:
    """Next-item examples: the ``window`` previous items of a user (padded, weight 0)
    with their ratings as weights, and the item rated next."""

    context: torch.Tensor
    """[n, window] long, catalogue rows."""
    weights: torch.Tensor
    """[n, window] float32, stars (0 = padding)."""
    target: torch.Tensor
    """[n] long."""
    target_weight: torch.Tensor
    """[n] float32, ``liked_weight`` for liked targets else 1."""

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def take(self, index: torch.Tensor) -> Interactions:
        return Interactions(
            self.context[index], self.weights[index], self.target[index], self.target_weight[index]
        )


def interaction_examples(
    ratings: Sequence[RatingSubmitted],
    rows: dict[MovieId, int],
    window: int,
    liked_weight: float,
    val_fraction: float = 0.0,
) -> tuple[Interactions, Interactions]:
    """(train, validation) next-item examples from ratings, in time order per user.

    A rating of a movie outside ``rows`` is skipped. The validation examples are those
    whose next item is among the latest ``val_fraction`` of the ratings (their context
    may reach back into the earlier ones, as a live user's history would).
    """
    order = sorted(range(len(ratings)), key=lambda i: ratings[i].occurred_at)
    cut = math.floor(len(order) * (1.0 - val_fraction) + 1e-9)
    rank = {index: position for position, index in enumerate(order)}
    histories: dict[str, list[tuple[int, float]]] = {}
    context: list[list[int]] = []
    weights: list[list[float]] = []
    target: list[int] = []
    target_weight: list[float] = []
    is_val: list[bool] = []
    for index in order:
        rating = ratings[index]
        row = rows.get(rating.movie_id)
        if row is None:
            continue
        history = histories.setdefault(rating.user_id, [])
        if history:
            recent = history[-window:]
            pad = window - len(recent)
            context.append([r for r, _ in recent] + [0] * pad)
            weights.append([w for _, w in recent] + [0.0] * pad)
            target.append(row)
            target_weight.append(liked_weight if rating.rating >= LIKED_RATING else 1.0)
            is_val.append(rank[index] >= cut)
        history.append((row, rating.rating))
    if not target:
        empty = Interactions(
            torch.zeros((0, window), dtype=torch.long),
            torch.zeros((0, window)),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0),
        )
        return empty, empty
    everything = Interactions(
        torch.tensor(context, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
        torch.tensor(target, dtype=torch.long),
        torch.tensor(target_weight, dtype=torch.float32),
    )
    val = torch.tensor(is_val)
    return everything.take(torch.nonzero(~val)[:, 0]), everything.take(torch.nonzero(val)[:, 0])


@dataclass(frozen=True)
class Relations:
    """What the triplet loss reads per movie: primary genre, directors, lead actors."""

    primary: list[int | None]
    directors: list[frozenset[str]]
    leads: list[frozenset[str]]

    @classmethod
    def of(cls, movies: Sequence[MoviePublished]) -> Relations:
        return cls(
            primary=[genre_index(m.genres[0]) if m.genres else None for m in movies],
            directors=[frozenset(p for p in m.people.directors if p.strip()) for m in movies],
            leads=[frozenset([p for p in m.people.cast if p.strip()][:LEAD_CAST]) for m in movies],
        )

    def related(self, a: int, b: int) -> bool:
        """True when the movies share the primary genre, a director or a lead actor."""
        return (
            (self.primary[a] is not None and self.primary[a] == self.primary[b])
            or bool(self.directors[a] & self.directors[b])
            or bool(self.leads[a] & self.leads[b])
        )

    def positives(self) -> list[list[np.ndarray]]:
        """Per relation (genre, director, lead actor), per movie, the movies sharing it."""
        out: list[list[np.ndarray]] = []
        relations: list[list[set[Any]]] = [
            [set() if p is None else {p} for p in self.primary],
            [set(d) for d in self.directors],
            [set(c) for c in self.leads],
        ]
        for keys in relations:
            groups: dict[Any, list[int]] = {}
            for movie, movie_keys in enumerate(keys):
                for key in movie_keys:
                    groups.setdefault(key, []).append(movie)
            per_movie = []
            for movie, movie_keys in enumerate(keys):
                pool = {m for key in movie_keys for m in groups[key]} - {movie}
                per_movie.append(np.array(sorted(pool), dtype=np.int64))
            out.append(per_movie)
        return out


TRIPLET_RELATIONS = ("genre", "director", "actor")
NEGATIVE_TRIES = 20
"""Random draws tried for a negative that shares nothing with the anchor."""


def sample_triplets(
    relations: Relations,
    positives: list[np.ndarray],
    rng: np.random.Generator,
    count: int,
) -> np.ndarray:
    """[<=count, 3] (anchor, positive, negative) rows for one relation; anchors with no
    positive, or for which no unrelated negative was drawn, are left out."""
    anchors = np.array([i for i, p in enumerate(positives) if len(p)], dtype=np.int64)
    n = len(relations.primary)
    if len(anchors) == 0 or n < 3:
        return np.zeros((0, 3), dtype=np.int64)
    out = []
    for anchor in rng.choice(anchors, size=count):
        positive = int(rng.choice(positives[anchor]))
        for candidate in rng.integers(0, n, size=NEGATIVE_TRIES):
            if candidate != anchor and not relations.related(int(anchor), int(candidate)):
                out.append((int(anchor), positive, int(candidate)))
                break
    return np.array(out, dtype=np.int64).reshape(-1, 3)


# --- training --------------------------------------------------------------------------


def _interaction_loss(
    vectors: torch.Tensor,
    batch: Interactions,
    temperature: float,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of each example's next item against the catalogue, or against the
    movies of ``negatives`` (bool per movie) only."""
    context = vectors[batch.context] * batch.weights[:, :, None]
    users = functional.normalize(context.sum(dim=1), dim=1)
    logits = users @ vectors.T / temperature
    # The recommender never offers a movie the user already rated, so those are not
    # negatives either (the target itself stays, should the user rate it again).
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.scatter_(1, batch.context, batch.weights > 0)
    if negatives is not None:
        seen |= ~negatives[None, :]
    seen[torch.arange(len(batch)), batch.target] = False
    logits = logits.masked_fill(seen, float("-inf"))
    losses = functional.cross_entropy(logits, batch.target, reduction="none")
    return (losses * batch.target_weight).sum() / batch.target_weight.sum()


def _triplet_loss(vectors: torch.Tensor, triplets: torch.Tensor, margin: float) -> torch.Tensor:
    a, p, n = vectors[triplets[:, 0]], vectors[triplets[:, 1]], vectors[triplets[:, 2]]
    positive = 1.0 - (a * p).sum(dim=1)
    negative = 1.0 - (a * n).sum(dim=1)
    return functional.relu(positive - negative + margin).mean()


def space_spread(vectors: torch.Tensor, rng: np.random.Generator) -> tuple[float, float]:
    """(mean nearest-neighbour cosine, mean pairwise cosine) of unit vectors (over a
    seeded sample of ``SPREAD_SAMPLE`` when there are more)."""
    if len(vectors) < 2:
        return float("nan"), float("nan")
    if len(vectors) > SPREAD_SAMPLE:
        vectors = vectors[torch.from_numpy(rng.choice(len(vectors), SPREAD_SAMPLE, replace=False))]
    sims = vectors @ vectors.T
    n = len(vectors)
    off = ~torch.eye(n, dtype=torch.bool)
    nearest = sims.masked_fill(~off, float("-inf")).max(dim=1).values.mean()
    return float(nearest), float(sims[off].mean())


def train_fusion(
    movies: Sequence[MoviePublished],
    train_ratings: Sequence[RatingSubmitted],
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder | None = None,
    *,
    config: FusionConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[FusionNet, dict[str, Any], dict[str, list[float]]]:
    """Train a ``FusionNet`` on the catalogue's content and the TRAIN ratings.

    Reproducible: the same inputs, seed and thread count give the same weights (torch's
    global RNG is seeded with ``seed``, sampling uses ``np.random.default_rng(seed)``).

    Args:
        movies: the catalogue (every movie is embedded; ratings of other movies are
            skipped).
        train_ratings: TRAIN ratings only (any order; sorted by time here).
        image_encoder: embeds posters; None builds a network without an image branch.
        config: hyper-parameters (default ``FusionConfig()``).
        progress: show a tqdm bar over the steps.

    Returns:
        (network in eval mode, checkpoint config with ``kind``/``version``/training
        record, history of per-epoch lists: ``train_loss``, ``triplet_loss``,
        ``interaction_loss``, ``val_loss`` (empty without ``val_fraction``),
        ``nn_cosine``, ``mean_cosine``).

    Raises:
        ConfigurationError: no movies, or the interaction objective has no examples.
        NumericalError: the loss became NaN or infinite.
    """
    cfg = config or FusionConfig()
    if not movies:
        raise ConfigurationError("train_fusion needs movies")
    began = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arch = _arch_config(cfg, text_encoder, image_encoder)
    inputs = content_inputs(
        movies_of(movies),
        text_encoder,
        image_encoder,
        people_buckets=cfg.people_buckets,
        image_dim=int(arch["image_dim"]),
    )
    rows = {m.movie_id: i for i, m in enumerate(movies)}
    train_ex, val_ex = interaction_examples(
        train_ratings, rows, cfg.window, cfg.liked_weight, cfg.val_fraction
    )
    if cfg.use_interaction and len(train_ex) == 0:
        raise ConfigurationError("no interaction examples: no user rated two catalogue movies")
    negatives: torch.Tensor | None = None
    if cfg.rated_negatives_only:
        negatives = torch.zeros(len(movies), dtype=torch.bool)
        negatives[[rows[r.movie_id] for r in train_ratings if r.movie_id in rows]] = True
    relations = Relations.of(movies)
    positives = relations.positives() if cfg.use_triplet else []
    net = build_net(arch)
    net.fit_input_stats(inputs)
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.use_interaction:
        steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    else:
        steps_per_epoch = max(1, math.ceil(len(movies) / cfg.triplet_batch))
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (
            0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        ),
    )
    history: dict[str, list[float]] = {
        key: []
        for key in (
            "train_loss",
            "triplet_loss",
            "interaction_loss",
            "val_loss",
            "nn_cosine",
            "mean_cosine",
        )
    }
    log.info(
        "fusion training movies=%d examples=%d val_examples=%d steps=%d config=%s",
        len(movies),
        len(train_ex),
        len(val_ex),
        total_steps,
        cfg,
    )
    bar = tqdm(total=total_steps, desc="fusion", unit="step", disable=not progress)
    for _epoch in range(cfg.epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(train_ex)))
        epoch_triplets = [
            torch.from_numpy(
                sample_triplets(relations, p, rng, cfg.triplet_batch * steps_per_epoch)
            )
            for p in positives
        ]
        sums = {"train": 0.0, "triplet": 0.0, "interaction": 0.0}
        for step in range(steps_per_epoch):
            keep = torch.from_numpy(
                (rng.random(len(movies)) >= cfg.modality_dropout).astype(np.float32)
            )
            vectors = net(inputs, meta_keep=keep)
            loss = vectors.new_zeros(())
            if cfg.use_interaction:
                index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                part = _interaction_loss(vectors, train_ex.take(index), cfg.temperature, negatives)
                sums["interaction"] += float(part.detach())
                loss = loss + cfg.interaction_weight * part
            if cfg.use_triplet:
                terms = [
                    _triplet_loss(
                        vectors,
                        t[step * cfg.triplet_batch : (step + 1) * cfg.triplet_batch],
                        cfg.margin,
                    )
                    for t in epoch_triplets
                    if len(t[step * cfg.triplet_batch : (step + 1) * cfg.triplet_batch])
                ]
                if terms:
                    part = torch.stack(terms).sum()
                    sums["triplet"] += float(part.detach())
                    loss = loss + cfg.triplet_weight * part
            if not torch.isfinite(loss):
                raise NumericalError(f"fusion training loss is {float(loss)} at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            sums["train"] += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        history["train_loss"].append(sums["train"] / steps_per_epoch)
        history["triplet_loss"].append(sums["triplet"] / steps_per_epoch)
        history["interaction_loss"].append(sums["interaction"] / steps_per_epoch)
        net.eval()
        with torch.no_grad():
            vectors = net(inputs)
            if len(val_ex):
                val_losses = [
                    float(
                        _interaction_loss(vectors, val_ex.take(chunk), cfg.temperature, negatives)
                    )
                    * len(chunk)
                    for chunk in torch.arange(len(val_ex)).split(cfg.batch_size)
                ]
                history["val_loss"].append(sum(val_losses) / len(val_ex))
            nearest, mean = space_spread(vectors, rng)
        history["nn_cosine"].append(nearest)
        history["mean_cosine"].append(mean)
    bar.close()
    net.eval()
    seconds = time.perf_counter() - began
    config_out: dict[str, Any] = {
        **arch,
        RATED_KEY: rated_movie_ids(movies, train_ratings),
        "training": {
            "seed": seed,
            "config": asdict(cfg),
            "n_movies": len(movies),
            "n_ratings": len(train_ratings),
            "n_examples": len(train_ex),
            "seconds": round(seconds, 1),
            "final": {k: v[-1] for k, v in history.items() if v},
        },
    }
    config_out["version"] = f"{FUSION_VERSION}-{weights_digest(net, config_out)}"
    log.info(
        "fusion trained version=%s seconds=%.1f loss=%.4f nn_cosine=%.3f mean_cosine=%.3f",
        config_out["version"],
        seconds,
        history["train_loss"][-1],
        history["nn_cosine"][-1],
        history["mean_cosine"][-1],
    )
    return net, config_out, history


def rated_movie_ids(
    movies: Sequence[MoviePublished], train_ratings: Sequence[RatingSubmitted]
) -> list[MovieId]:
    """The catalogue movies with at least one rating in ``train_ratings``, sorted: the
    movies whose vectors the interaction objective placed (``RATED_KEY``)."""
    catalogue = {m.movie_id for m in movies}
    return sorted({r.movie_id for r in train_ratings if r.movie_id in catalogue})


def save_fusion(directory: Path, net: FusionNet, config: dict[str, Any]) -> Path:
    """Write a ``fusion-item-encoder`` checkpoint (``config`` from ``train_fusion``)."""
    if config.get("kind") != KIND:
        raise ValueError(f"not a fusion config: kind={config.get('kind')!r}")
    return save_checkpoint(directory, net, config)

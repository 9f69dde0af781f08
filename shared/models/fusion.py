"""The trained multimodal item encoder: content in, one fused, L2-normalised vector out.

Inputs per movie, each with a presence mask (a missing modality is masked, never
silently zero-filled):

- text: the sentence-transformers embedding of ``movie_text(movie)`` (always present:
  every movie has a title);
- image: the open_clip embedding of the poster, when the movie has a usable poster and
  an ``ImageEncoder`` is configured;
- metadata: the genre multi-hot, the normalised year (with known/unknown flags) and the
  movie's people (directors, cast, writers) hashed into buckets with blake2b and
  embedded with an ``nn.EmbeddingBag`` (lead cast and directors at full weight, as
  ``people_tokens`` weighs them).

``FusionNet`` projects each present modality, averages the projections of the present
ones, appends the mask flags and maps that through an MLP to a unit vector. Only content
goes in: the model has no per-item free embedding, so a movie never seen in training
gets a vector from its content alone.

``train_fusion`` fits it with two objectives (both switchable for the ablation):

- a multi-triplet loss on cosine distance: an anchor, a positive sharing its primary
  genre / a director / a lead actor, and a negative sharing none of them;
- an interaction objective from TRAIN ratings, shaped like the way the space is used:
  the rating-weighted mean of a user's last ``window`` items (the rating-weighted-mean
  updater over a short history) must retrieve the next item that user rated, with a
  softmax over the whole catalogue at a temperature (the items already in the context
  are excluded, as the recommender excludes rated movies; ``rated_negatives_only``
  keeps movies nobody rated out of the negatives).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm import tqdm

from shared.events import MoviePublished, RatingSubmitted
from shared.events.record import Modality
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import load_checkpoint, load_into, save_checkpoint
from shared.models.image import ImageEncoder, load_posters
from shared.models.item_encoder import MODALITY_ORDER, EncodedItem, ItemEncoder
from shared.models.metadata import (
    GENRE_FEATURES,
    LEAD_CAST,
    genre_features,
    genre_index,
    people_tokens,
)
from shared.models.text import TextEncoder, movie_text
from shared.types import Matrix, MovieId

log = logging.getLogger(__name__)

KIND = "fusion-item-encoder"
"""Checkpoint kind of a fusion item encoder."""

FUSION_VERSION = "fusion-v1"
"""Version of the architecture and feature layout; bump it when either changes."""

RATED_KEY = "rated_movie_ids"
"""Config entry listing the movies the interaction objective saw rated in training
(sorted). Not part of the version digest: it describes the data, not the network."""

YEAR_CENTER = 1980.0
YEAR_SCALE = 20.0
"""A year enters as ``(year - YEAR_CENTER) / YEAR_SCALE``, clipped to +-YEAR_CLIP."""
YEAR_CLIP = 4.0

META_DENSE_DIM = len(GENRE_FEATURES) + 3
"""Genre multi-hot, then flags [has genres, year known] and the normalised year."""

LIKED_RATING = 4.0
"""Stars from which a rating counts as liked (``FusionConfig.liked_weight``)."""

STD_FLOOR = 1e-2
"""Added to every embedding dimension's standard deviation before dividing by it."""

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


# --- content inputs --------------------------------------------------------------------


@dataclass
class FusionInputs:
    """Content features of a batch of movies, as tensors (row i is movie i).

    ``people_index``/``people_offsets``/``people_weights`` are an ``nn.EmbeddingBag``
    input: movie i's people are ``people_index[people_offsets[i]:people_offsets[i+1]]``,
    weights summing to 1 per movie (an empty bag for a movie without people).
    """

    text: torch.Tensor
    """[n, text_dim] float32."""
    image: torch.Tensor | None
    """[n, image_dim] float32 (zero rows where masked), None without an image branch."""
    image_mask: torch.Tensor
    """[n] float32, 1 where the poster was embedded."""
    meta_dense: torch.Tensor
    """[n, META_DENSE_DIM] float32."""
    people_index: torch.Tensor
    people_offsets: torch.Tensor
    people_weights: torch.Tensor
    meta_mask: torch.Tensor
    """[n] float32, 1 where the movie has any of genres, year or people."""

    def __len__(self) -> int:
        return int(self.text.shape[0])


def person_bucket(token: str, buckets: int) -> int:
    """Bucket of a role-prefixed person token (blake2b, the same in every process)."""
    digest = hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def year_feature(year: int | None) -> float:
    """The normalised year fed to the network (0 when unknown; a flag says which)."""
    if year is None:
        return 0.0
    return float(np.clip((year - YEAR_CENTER) / YEAR_SCALE, -YEAR_CLIP, YEAR_CLIP))


def metadata_inputs(
    movies: Sequence[MoviePublished], buckets: int
) -> tuple[Matrix, list[list[int]], list[list[float]], np.ndarray]:
    """Dense metadata rows, people buckets and weights per movie, and the metadata mask."""
    dense = np.zeros((len(movies), META_DENSE_DIM), dtype=np.float32)
    people: list[list[int]] = []
    weights: list[list[float]] = []
    mask = np.zeros(len(movies), dtype=np.float32)
    n_genres = len(GENRE_FEATURES)
    for row, movie in enumerate(movies):
        genres = genre_features(movie.genres)
        if genres is not None:
            dense[row, :n_genres] = genres
            dense[row, n_genres] = 1.0
        if movie.year is not None:
            dense[row, n_genres + 1] = 1.0
            dense[row, n_genres + 2] = year_feature(movie.year)
        tokens = people_tokens(movie.people)
        total = sum(w for _, w in tokens)
        people.append([person_bucket(t, buckets) for t, _ in tokens])
        weights.append([w / total for _, w in tokens] if total > 0 else [])
        if genres is not None or movie.year is not None or tokens:
            mask[row] = 1.0
    return dense, people, weights, mask


def content_inputs(
    movies: Sequence[MoviePublished],
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder | None,
    *,
    people_buckets: int,
    image_dim: int = 0,
) -> FusionInputs:
    """Encode the movies' content into ``FusionInputs``.

    Args:
        image_encoder: embeds posters; None masks the image modality of every movie.
        people_buckets: hash buckets of people ids (the network's).
        image_dim: width of the network's image branch (0: none; posters are not even
            loaded). Must equal ``image_encoder.dim`` when both are set.
    """
    texts = text_encoder.encode([movie_text(m) for m in movies])
    image_mask = np.zeros(len(movies), dtype=np.float32)
    image: torch.Tensor | None = None
    if image_dim > 0:
        image_rows = np.zeros((len(movies), image_dim), dtype=np.float32)
        if image_encoder is not None:
            posters = load_posters(movies, image_encoder.poster_dir)
            loaded = [(i, img) for i, img in enumerate(posters) if img is not None]
            if loaded:
                rows = [i for i, _ in loaded]
                image_rows[rows] = image_encoder.encode([img for _, img in loaded])
                image_mask[rows] = 1.0
        image = torch.from_numpy(image_rows)
    dense, people, weights, meta_mask = metadata_inputs(movies, people_buckets)
    lengths = [len(p) for p in people]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if lengths else np.zeros(0)
    return FusionInputs(
        text=torch.from_numpy(np.ascontiguousarray(texts, dtype=np.float32)),
        image=image,
        image_mask=torch.from_numpy(image_mask),
        meta_dense=torch.from_numpy(dense),
        people_index=torch.tensor([b for p in people for b in p], dtype=torch.long),
        people_offsets=torch.as_tensor(offsets, dtype=torch.long),
        people_weights=torch.tensor([w for ws in weights for w in ws], dtype=torch.float32),
        meta_mask=torch.from_numpy(meta_mask),
    )


# --- the network -----------------------------------------------------------------------


class FusionNet(nn.Module):
    """Masked fusion of per-modality projections, then an MLP to a unit vector.

    Args:
        text_dim: width of the text embeddings.
        image_dim: width of the image embeddings; 0 builds no image branch.
        use_metadata: build the metadata branch (genres, year, people).
        hidden_dim, out_dim, people_dim, people_buckets, dropout: see ``FusionConfig``.
    """

    text_shift: torch.Tensor
    text_scale: torch.Tensor
    image_shift: torch.Tensor
    image_scale: torch.Tensor

    def __init__(
        self,
        *,
        text_dim: int,
        image_dim: int = 0,
        use_metadata: bool = True,
        hidden_dim: int = 256,
        out_dim: int = 128,
        people_dim: int = 32,
        people_buckets: int = 16384,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.image_dim = image_dim
        self.use_metadata = use_metadata
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.image_proj = nn.Linear(image_dim, hidden_dim) if image_dim > 0 else None
        # Embeddings of one kind share a large common direction (titles all look alike to
        # a sentence model); standardising them with the training catalogue's statistics
        # keeps that shared part from bunching every output vector together.
        self.register_buffer("text_shift", torch.zeros(text_dim))
        self.register_buffer("text_scale", torch.ones(text_dim))
        self.register_buffer("image_shift", torch.zeros(max(image_dim, 1)))
        self.register_buffer("image_scale", torch.ones(max(image_dim, 1)))
        if use_metadata:
            self.people = nn.EmbeddingBag(people_buckets, people_dim, mode="sum")
            nn.init.normal_(self.people.weight, std=0.1)
            self.meta_proj = nn.Linear(META_DENSE_DIM + people_dim + 1, hidden_dim)
        self.mlp = nn.Sequential(
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim + len(MODALITY_ORDER), hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def fit_input_stats(self, inputs: FusionInputs) -> None:
        """Set the text and image standardisation from a catalogue's embeddings (the
        image's from the movies whose poster was embedded)."""
        with torch.no_grad():
            self.text_shift.copy_(inputs.text.mean(dim=0))
            self.text_scale.copy_(inputs.text.std(dim=0, correction=0) + STD_FLOOR)
            present = inputs.image_mask > 0
            if inputs.image is not None and self.image_proj is not None and present.any():
                images = inputs.image[present]
                self.image_shift.copy_(images.mean(dim=0))
                self.image_scale.copy_(images.std(dim=0, correction=0) + STD_FLOOR)

    def forward(self, inputs: FusionInputs, meta_keep: torch.Tensor | None = None) -> torch.Tensor:
        """[n, out_dim] L2-normalised vectors.

        Args:
            meta_keep: optional [n] 0/1 multiplier of the metadata mask (modality dropout
                in training).
        """
        text_mask = torch.ones_like(inputs.image_mask)
        total = self.text_proj((inputs.text - self.text_shift) / self.text_scale)
        count = text_mask.clone()
        image_mask = torch.zeros_like(inputs.image_mask)
        if self.image_proj is not None and inputs.image is not None:
            image_mask = inputs.image_mask
            total = total + image_mask[:, None] * self.image_proj(
                (inputs.image - self.image_shift) / self.image_scale
            )
            count = count + image_mask
        meta_mask = torch.zeros_like(inputs.meta_mask)
        if self.use_metadata:
            meta_mask = inputs.meta_mask if meta_keep is None else inputs.meta_mask * meta_keep
            bag = self.people(
                inputs.people_index,
                inputs.people_offsets,
                per_sample_weights=inputs.people_weights,
            )
            has_people = (
                torch.diff(
                    inputs.people_offsets,
                    append=inputs.people_offsets.new_tensor([len(inputs.people_index)]),
                )
                > 0
            ).float()
            meta = torch.cat([inputs.meta_dense, has_people[:, None], bag], dim=1)
            total = total + meta_mask[:, None] * self.meta_proj(meta)
            count = count + meta_mask
        fused = total / count[:, None]
        flags = torch.stack([text_mask, image_mask, meta_mask], dim=1)
        return functional.normalize(self.mlp(torch.cat([fused, flags], dim=1)), dim=1)


def build_net(config: dict[str, Any]) -> FusionNet:
    """A fresh ``FusionNet`` with the architecture a checkpoint config describes."""
    return FusionNet(
        text_dim=int(config["text_dim"]),
        image_dim=int(config["image_dim"]),
        use_metadata=bool(config["use_metadata"]),
        hidden_dim=int(config["hidden_dim"]),
        out_dim=int(config["out_dim"]),
        people_dim=int(config["people_dim"]),
        people_buckets=int(config["people_buckets"]),
        dropout=float(config["dropout"]),
    )


ARCH_KEYS = (
    "text_model",
    "text_dim",
    "image_model",
    "image_dim",
    "use_metadata",
    "hidden_dim",
    "out_dim",
    "people_dim",
    "people_buckets",
    "dropout",
    "genre_features",
    "year_center",
    "year_scale",
)
"""Config entries that define the network and its inputs (part of the version digest)."""


def weights_digest(net: nn.Module, config: dict[str, Any]) -> str:
    """8 hex characters of a blake2b digest of the weights and the architecture."""
    digest = hashlib.blake2b(digest_size=4)
    for key in ARCH_KEYS:
        digest.update(f"{key}={config.get(key)!r};".encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
        movies,
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


# --- the item encoder ------------------------------------------------------------------


class FusionItemEncoder:
    """``ItemEncoder`` over a trained ``FusionNet`` (runs on CPU: the network is small).

    Args:
        net: the trained network (put in eval mode here).
        config: its checkpoint config (``version``, ``text_model``, dims).
        text_encoder: must be the text model the network was trained on.
        image_encoder: must match the checkpoint's image model when the network has an
            image branch (None then masks the image of every movie); ignored, with a
            warning, when the network has none.

    Raises:
        ConfigurationError: the encoders do not match the checkpoint.
    """

    def __init__(
        self,
        net: FusionNet,
        config: dict[str, Any],
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder | None = None,
    ) -> None:
        check_encoders(config, text_encoder, image_encoder)
        if int(config["image_dim"]) == 0 and image_encoder is not None:
            log.warning(
                "fusion checkpoint %s has no image branch; image modality off", config["version"]
            )
            image_encoder = None
        self._net = net.eval()
        self._config = config
        self._text = text_encoder
        self._image = image_encoder
        self._dim = int(config["out_dim"])
        self._version = str(config["version"])
        rated = config.get(RATED_KEY)
        if rated is None:
            # Without the list every movie counts as learned from ratings, so no vector
            # is moved online: the safe side (moving learned vectors spoils them).
            log.warning(
                "fusion checkpoint %s does not list its training movies (%s); every "
                "movie counts as rated in training",
                self._version,
                RATED_KEY,
            )
        self._rated: frozenset[MovieId] | None = None if rated is None else frozenset(rated)

    @property
    def dim(self) -> int:
        """The network's ``out_dim`` (128 by default)."""
        return self._dim

    @property
    def model_version(self) -> str:
        """``fusion-v1-<8 hex digest of the weights and architecture>``."""
        return self._version

    @property
    def modalities_enabled(self) -> list[Modality]:
        enabled: set[Modality] = {"text"}
        if self._image is not None:
            enabled.add("image")
        if self._config["use_metadata"]:
            enabled.add("metadata")
        return [m for m in MODALITY_ORDER if m in enabled]

    def describe(self) -> str:
        """One line saying which modalities are on, e.g. for the start-up log."""
        return ", ".join(f"{m} on" for m in self.modalities_enabled)

    def rated_in_training(self, movie_id: MovieId) -> bool:
        """Whether the network learned this movie's vector from its training ratings
        (always true for a checkpoint that does not list them)."""
        return self._rated is None or movie_id in self._rated

    def encode(self, movies: Sequence[MoviePublished]) -> list[EncodedItem]:
        """One vector per movie, with the modalities that contributed to it.

        Raises:
            NumericalError: a vector came out NaN or infinite (names the movies).
        """
        if not movies:
            return []
        inputs = content_inputs(
            movies,
            self._text,
            self._image,
            people_buckets=int(self._config["people_buckets"]),
            image_dim=int(self._config["image_dim"]),
        )
        with torch.inference_mode():
            matrix = self._net(inputs).numpy().astype(np.float32, copy=False)
        bad = [movies[int(i)].movie_id for i in np.flatnonzero(~np.isfinite(matrix).all(axis=1))]
        if bad:
            raise NumericalError(f"NaN or infinite fused item vector for movies {bad[:10]}")
        items = []
        for i in range(len(movies)):
            present: set[Modality] = {"text"}
            if inputs.image_mask[i] > 0 and self._image is not None:
                present.add("image")
            if inputs.meta_mask[i] > 0 and self._config["use_metadata"]:
                present.add("metadata")
            items.append(
                EncodedItem(
                    vector=matrix[i].copy(),
                    modalities=[m for m in MODALITY_ORDER if m in present],
                    rated_in_training=self.rated_in_training(movies[i].movie_id),
                )
            )
        return items


def check_encoders(
    config: dict[str, Any], text_encoder: TextEncoder, image_encoder: ImageEncoder | None
) -> None:
    """Refuse encoders that do not produce what the checkpoint was trained on.

    Raises:
        ConfigurationError: another text model or dimension, or another image model.
    """
    version = config.get("version")
    if config.get("text_model") != text_encoder.name or config.get("text_dim") != text_encoder.dim:
        raise ConfigurationError(
            f"fusion checkpoint {version} was trained on text model "
            f"{config.get('text_model')!r} ({config.get('text_dim')} dims), not "
            f"{text_encoder.name!r} ({text_encoder.dim} dims)"
        )
    image_dim = int(config.get("image_dim", 0))
    if (
        image_dim
        and image_encoder is not None
        and (config.get("image_model") != image_encoder.name or image_dim != image_encoder.dim)
    ):
        raise ConfigurationError(
            f"fusion checkpoint {version} was trained on image model "
            f"{config.get('image_model')!r} ({image_dim} dims), not "
            f"{image_encoder.name!r} ({image_encoder.dim} dims)"
        )


def save_fusion(directory: Path, net: FusionNet, config: dict[str, Any]) -> Path:
    """Write a ``fusion-item-encoder`` checkpoint (``config`` from ``train_fusion``)."""
    if config.get("kind") != KIND:
        raise ValueError(f"not a fusion config: kind={config.get('kind')!r}")
    return save_checkpoint(directory, net, config)


def load_fusion_encoder(
    directory: Path, text_encoder: TextEncoder, image_encoder: ImageEncoder | None = None
) -> FusionItemEncoder:
    """The ``FusionItemEncoder`` of a checkpoint written by ``save_fusion``.

    Raises:
        ConfigurationError: no such checkpoint, another kind, weights that do not fit
            the config or its version, or encoders that do not match it.
    """
    state, config = load_checkpoint(directory, KIND)
    missing = [k for k in (*ARCH_KEYS, "version") if k not in config]
    if missing:
        raise ConfigurationError(f"fusion checkpoint {directory} lacks {', '.join(missing)}")
    if config["genre_features"] != list(GENRE_FEATURES):
        raise ConfigurationError(f"fusion checkpoint {directory} has another genre layout")
    check_encoders(config, text_encoder, image_encoder)
    net = build_net(config)
    load_into(net, state, directory)
    expected = f"{FUSION_VERSION}-{weights_digest(net, config)}"
    if config["version"] != expected:
        raise ConfigurationError(
            f"fusion checkpoint {directory}: version {config['version']!r} does not match "
            f"its weights ({expected!r})"
        )
    encoder = FusionItemEncoder(net, config, text_encoder, image_encoder)
    log.info(
        "fusion item encoder %s version=%s dim=%d dir=%s",
        encoder.describe(),
        encoder.model_version,
        encoder.dim,
        directory,
    )
    return encoder


def encode_catalogue(
    encoder: ItemEncoder, movies: Sequence[MoviePublished], batch_size: int = 256
) -> tuple[list[MovieId], Matrix]:
    """(movie ids, [n, encoder.dim] float32 matrix) of the movies, in order."""
    ids = [m.movie_id for m in movies]
    rows: list[Matrix] = []
    for start in range(0, len(movies), batch_size):
        rows.extend(
            item.vector[None, :] for item in encoder.encode(movies[start : start + batch_size])
        )
    if not rows:
        return ids, np.zeros((0, encoder.dim), dtype=np.float32)
    return ids, np.concatenate(rows).astype(np.float32, copy=False)

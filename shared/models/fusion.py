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

Training (``train_fusion``, ``FusionConfig``) and the checkpoint writer
(``save_fusion``) are the lab's, in ``infra.lab.training.fusion``; this module rebuilds
the network from a checkpoint's config (``build_net``, ``load_fusion_encoder``) and runs
it (``FusionItemEncoder``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from shared.domain import Modality, Movie
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.checkpoint import load_checkpoint, load_into
from shared.models.image import ImageEncoder, load_posters
from shared.models.item_encoder import MODALITY_ORDER, EncodedItem, ItemEncoder
from shared.models.metadata import GENRE_FEATURES, genre_features, people_tokens
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

STD_FLOOR = 1e-2
"""Added to every embedding dimension's standard deviation before dividing by it."""


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
    movies: Sequence[Movie], buckets: int
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
    movies: Sequence[Movie],
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
        hidden_dim, out_dim, people_dim, people_buckets, dropout: as in the lab's
            ``FusionConfig`` (``infra.lab.training.fusion``).
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

    def encode(self, movies: Sequence[Movie]) -> list[EncodedItem]:
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


def load_fusion_encoder(
    directory: Path, text_encoder: TextEncoder, image_encoder: ImageEncoder | None = None
) -> FusionItemEncoder:
    """The ``FusionItemEncoder`` of a checkpoint written by the lab's ``save_fusion``.

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
    encoder: ItemEncoder, movies: Sequence[Movie], batch_size: int = 256
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

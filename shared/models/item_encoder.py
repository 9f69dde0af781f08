"""Item encoders: movie content in, one L2-normalised vector per movie out.

``ItemEncoder`` is the contract every item encoder fulfils (the baseline below, and the
trained fusion model later). ``ConcatItemEncoder`` is the baseline: per-modality blocks,
each L2-normalised and weighted, concatenated and normalised again. A block a movie has
no input for is left out of that movie's vector and out of its ``modalities``, so a
reader always knows which inputs a vector stands for.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np

from shared.config import Settings
from shared.domain import Modality, Movie
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.device import resolve_device, resolve_precision
from shared.models.image import ImageEncoder, load_image_encoder, load_posters
from shared.models.metadata import GENRE_FEATURES, PEOPLE_DIM, genre_features, people_features
from shared.models.text import TextEncoder, movie_text
from shared.types import Matrix, Vector

log = logging.getLogger(__name__)

CONCAT_VERSION = "concat-v1"
"""Version of the concatenation scheme itself; bump it when the layout or maths change."""

MODALITY_ORDER: tuple[Modality, ...] = ("text", "image", "metadata")
"""The order modalities are listed in, everywhere."""


POSTER_CHUNK = 64
"""Posters decoded and encoded together (bounds the images held in memory)."""


@dataclass(frozen=True)
class EncodedItem:
    """A movie's vector and the modalities that contributed to it."""

    vector: Vector
    """L2-normalised float32, of the encoder's ``dim``."""
    modalities: list[Modality]
    rated_in_training: bool = False
    """True when the encoder learned this movie's vector from its training ratings."""


@runtime_checkable
class ItemEncoder(Protocol):
    """What the item-embedding service needs from an item encoder."""

    @property
    def dim(self) -> int:
        """Dimension of every item vector."""
        ...

    @property
    def model_version(self) -> str:
        """Identifies the encoder and its configuration; vectors of two versions differ."""
        ...

    @property
    def modalities_enabled(self) -> list[Modality]:
        """Modalities this encoder can use (a given movie may lack some of them)."""
        ...

    def encode(self, movies: Sequence[Movie]) -> list[EncodedItem]:
        """One encoded item per movie, in order; a batch gives the same vectors as
        encoding each movie alone.

        Raises:
            NumericalError: a vector came out NaN or infinite.
        """
        ...


@dataclass(frozen=True)
class BlockWeights:
    """Weight of each block in the concatenated vector (each block is unit length first).

    The defaults make text dominate, with metadata and the poster as refinements; the
    share of a block in a cosine similarity grows with the square of its weight.
    """

    text: float = 1.0
    genres: float = 0.5
    people: float = 0.3
    image: float = 0.7

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"block weight {f.name}={value} must be positive")

    def tag(self) -> str:
        """Short form for model versions, e.g. ``w1-0.5-0.3-0.7``."""
        return "w" + "-".join(f"{getattr(self, f.name):g}" for f in fields(self))


@dataclass(frozen=True)
class Block:
    """Where one block sits in the concatenated vector."""

    name: str
    modality: Modality
    start: int
    stop: int
    weight: float


class ConcatItemEncoder:
    """Baseline item encoder: weighted, normalised blocks [text, genres, people, image].

    Args:
        text: The text encoder (reads ``movie_text``).
        image: The poster encoder; None leaves the image block out of the layout.
        weights: Block weights (default ``BlockWeights()``).
        people_dim: Width of the hashed people block (default 64).
        image_off_reason: Why ``image`` is None, for the start-up log line.
    """

    def __init__(
        self,
        text: TextEncoder,
        image: ImageEncoder | None = None,
        *,
        weights: BlockWeights | None = None,
        people_dim: int = PEOPLE_DIM,
        image_off_reason: str = "no image encoder",
    ) -> None:
        if people_dim < 1:
            raise ConfigurationError(f"people_dim={people_dim} must be at least 1")
        self._text = text
        self._image = image
        self._weights = weights or BlockWeights()
        self._people_dim = people_dim
        self._image_off_reason = image_off_reason
        sizes: list[tuple[str, Modality, int, float]] = [
            ("text", "text", text.dim, self._weights.text),
            ("genres", "metadata", len(GENRE_FEATURES), self._weights.genres),
            ("people", "metadata", people_dim, self._weights.people),
        ]
        if image is not None:
            sizes.append(("image", "image", image.dim, self._weights.image))
        self._blocks: dict[str, Block] = {}
        start = 0
        for name, modality, size, weight in sizes:
            self._blocks[name] = Block(name, modality, start, start + size, weight)
            start += size
        self._dim = start
        self._version = self._make_version()

    def _make_version(self) -> str:
        parts = [CONCAT_VERSION, self._text.name]
        if self._weights != BlockWeights() or self._people_dim != PEOPLE_DIM:
            parts.append(f"{self._weights.tag()}-p{self._people_dim}")
        parts.append("img-off" if self._image is None else f"img-{self._image.name}")
        return "+".join(parts)

    @property
    def dim(self) -> int:
        """Sum of the block widths (384 + 20 + 64 [+ CLIP embed_dim] by default)."""
        return self._dim

    @property
    def model_version(self) -> str:
        """E.g. ``concat-v1+all-MiniLM-L6-v2+img-off``."""
        return self._version

    @property
    def modalities_enabled(self) -> list[Modality]:
        return self._modalities(set(self._blocks))

    @property
    def blocks(self) -> list[Block]:
        """The layout of the concatenated vector, in order."""
        return list(self._blocks.values())

    def describe(self) -> str:
        """One line saying which modalities are on, e.g. for the start-up log."""
        image = "image on" if self._image is not None else f"image off ({self._image_off_reason})"
        return f"text on, metadata on, {image}"

    def encode(self, movies: Sequence[Movie]) -> list[EncodedItem]:
        """Encode a batch; one text forward pass and one image forward pass for all of it.

        Raises:
            NumericalError: a vector came out NaN or infinite (names the movies).
        """
        if not movies:
            return []
        matrix = np.zeros((len(movies), self._dim), dtype=np.float32)
        present: list[set[str]] = [{"text"} for _ in movies]

        texts = self._text.encode([movie_text(m) for m in movies])
        self._put(matrix, "text", np.arange(len(movies)), texts)

        for row, movie in enumerate(movies):
            genres = genre_features(movie.genres)
            if genres is not None:
                self._put(matrix, "genres", np.array([row]), genres[None, :])
                present[row].add("genres")
            people = people_features(movie.people, self._people_dim)
            if people is not None:
                self._put(matrix, "people", np.array([row]), people[None, :])
                present[row].add("people")

        if self._image is not None:
            # Posters are decoded a chunk at a time so a large batch never holds all of
            # its images in memory at once.
            for offset in range(0, len(movies), POSTER_CHUNK):
                chunk = movies[offset : offset + POSTER_CHUNK]
                loaded = [
                    (offset + i, img)
                    for i, img in enumerate(load_posters(chunk, self._image.poster_dir))
                    if img is not None
                ]
                if loaded:
                    rows = [i for i, _ in loaded]
                    vectors = self._image.encode([img for _, img in loaded])
                    self._put(matrix, "image", np.array(rows), vectors)
                    for i in rows:
                        present[i].add("image")

        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        bad = [
            movies[int(i)].movie_id
            for i in np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
        ]
        if bad:
            raise NumericalError(f"NaN, infinite or zero item vector for movies {bad[:10]}")
        matrix /= norms
        return [
            EncodedItem(vector=matrix[i].copy(), modalities=self._modalities(present[i]))
            for i in range(len(movies))
        ]

    def _put(self, matrix: Matrix, block: str, rows: np.ndarray, values: Matrix) -> None:
        spec = self._blocks[block]
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        if not np.isfinite(values).all() or (norms == 0).any():
            raise NumericalError(f"NaN, infinite or zero {block} features")
        matrix[rows, spec.start : spec.stop] = spec.weight * values / norms

    def _modalities(self, blocks: set[str]) -> list[Modality]:
        present = {self._blocks[b].modality for b in blocks}
        return [m for m in MODALITY_ORDER if m in present]


def build_text_encoder(settings: Settings) -> TextEncoder:
    """The text model the settings name, on their device and in their precision.

    Raises:
        ConfigurationError: the model directory is missing or unusable, or the device
            is not available.
    """
    device = resolve_device(settings.device)
    return TextEncoder(
        settings.text_model, device, resolve_precision(settings.text_precision, device)
    )


def build_item_encoder(
    settings: Settings, weights: BlockWeights | None = None
) -> ConcatItemEncoder:
    """The baseline item encoder the settings describe, with a start-up log line.

    Raises:
        ConfigurationError: a model directory or checkpoint is missing or does not fit.
    """
    text = build_text_encoder(settings)
    image = load_image_encoder(settings)
    encoder = ConcatItemEncoder(
        text,
        image,
        weights=weights,
        image_off_reason="CLIP_WEIGHTS not set" if settings.clip_weights is None else "",
    )
    log.info(
        "item encoder %s version=%s dim=%d device=%s",
        encoder.describe(),
        encoder.model_version,
        encoder.dim,
        text.device,
    )
    return encoder

"""The items the recommender knows: their vectors (in a ``VectorIndex``) and payload."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shared.events import ItemEmbedded
from shared.exceptions import UnprocessableEventError
from shared.retrieval.faiss_index import FaissIndex
from shared.retrieval.index import VectorIndex
from shared.types import MovieId

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3
"""Largest accepted deviation of a vector's L2 norm from 1 (float32 leaves ~1e-7)."""


@dataclass(frozen=True)
class ItemInfo:
    """What a recommendation list shows of an item besides its id."""

    title: str
    year: int | None
    genres: tuple[str, ...]
    model_version: str


@dataclass(frozen=True)
class Refusal:
    """An item ``apply`` did not take: its position in the batch and why."""

    position: int
    error: UnprocessableEventError


def check_vector(vector: np.ndarray, dim: int | None, what: str) -> int:
    """Raise ``UnprocessableEventError`` unless ``vector`` has dimension ``dim`` (any,
    when None) and is L2-normalised; returns its dimension."""
    size = int(vector.shape[0])
    if dim is not None and size != dim:
        raise UnprocessableEventError(
            f"{what} has dimension {size}; the item catalogue's dimension is {dim}"
        )
    check_unit_norm(vector, what)
    return size


def check_unit_norm(vector: np.ndarray, what: str) -> None:
    """Raise ``UnprocessableEventError`` unless ``vector`` is L2-normalised."""
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise UnprocessableEventError(
            f"{what} has L2 norm {norm:.6g}; an L2-normalised vector is expected"
        )


class Catalogue:
    """Item vectors and payload, fed from ``ItemEmbedded`` events; thread-safe.

    The dimension is fixed by the first item (the item encoder decides it; nothing
    here hard-codes it), and the index is built then with ``index_factory(dim)``.
    Items are upserted, so a re-embedded movie replaces its old vector. Payload is
    stored before the vector, so any id a search returns has a title.
    """

    def __init__(self, index_factory: Callable[[int], VectorIndex] = FaissIndex) -> None:
        """``index_factory``: builds the ANN backend for a dimension (default: FAISS)."""
        self._index_factory = index_factory
        self._index: VectorIndex | None = None
        self._info: dict[MovieId, ItemInfo] = {}
        self._versions: Counter[str] = Counter()
        self._newest: list[MovieId] | None = None  # by release year, newest first
        self._lock = threading.Lock()

    @property
    def dim(self) -> int | None:
        """Vector dimension, or None while the catalogue is empty."""
        index = self._index
        return None if index is None else index.dim

    @property
    def index(self) -> VectorIndex | None:
        """The ANN index, or None while the catalogue is empty."""
        return self._index

    @property
    def model_version(self) -> str:
        """The item model version(s) of the catalogue, ``+``-joined when several are
        live (mid-way through a re-embedding); ``"none"`` while empty."""
        with self._lock:
            versions = sorted(v for v, n in self._versions.items() if n > 0)
        return "+".join(versions) if versions else "none"

    def __len__(self) -> int:
        with self._lock:
            return len(self._info)

    def __contains__(self, movie_id: object) -> bool:
        with self._lock:
            return movie_id in self._info

    def info(self, movie_id: MovieId) -> ItemInfo:
        """Payload of a known item; raises ``KeyError`` for an unknown one."""
        with self._lock:
            return self._info[movie_id]

    def title(self, movie_id: MovieId) -> str:
        """Title of a known item; raises ``KeyError`` for an unknown one."""
        return self.info(movie_id).title

    def years(self, movie_ids: Sequence[MovieId]) -> list[int | None]:
        """Release year of each known movie (None where unknown); ``KeyError`` for a
        movie not in the catalogue."""
        with self._lock:
            return [self._info[m].year for m in movie_ids]

    def newest(self, n: int) -> list[MovieId]:
        """The ``n`` movies with the latest release years, newest first (ties: the movie
        that entered the catalogue last first); movies without a year are left out.
        The order is cached until the catalogue changes."""
        if n <= 0:
            return []
        with self._lock:
            if self._newest is None:
                dated = [
                    (info.year, position, movie_id)
                    for position, (movie_id, info) in enumerate(self._info.items())
                    if info.year is not None
                ]
                self._newest = [movie_id for _, _, movie_id in sorted(dated, reverse=True)]
            return self._newest[:n]

    def add(self, event: ItemEmbedded) -> None:
        """Upsert one item.

        Raises:
            UnprocessableEventError: its dimension differs from the catalogue's, or its
                vector is not L2-normalised.
        """
        refusals = self.apply([event])
        if refusals:
            raise refusals[0].error

    def apply(self, events: Sequence[ItemEmbedded]) -> list[Refusal]:
        """Upsert a batch of items (one index call); the last event of a movie wins.

        Items whose dimension differs from the catalogue's (the first item ever fixes
        it) or whose vector is not L2-normalised are refused, not raised, so the caller
        can dead-letter exactly those and keep the rest.
        """
        refusals: list[Refusal] = []
        with self._lock:
            accepted: dict[MovieId, ItemEmbedded] = {}
            dim = self.dim
            for position, event in enumerate(events):
                try:
                    dim = check_vector(
                        np.asarray(event.vector), dim, f"item {event.movie_id} vector"
                    )
                except UnprocessableEventError as exc:
                    refusals.append(Refusal(position, exc))
                    continue
                accepted[event.movie_id] = event
            if not accepted:
                return refusals
            if self._index is None:
                assert dim is not None  # an accepted item fixed it
                self._index = self._index_factory(dim)
                log.info("catalogue dim=%d index=%s", dim, type(self._index).__name__)
            self._newest = None
            for movie_id, event in accepted.items():
                old = self._info.get(movie_id)
                if old is not None:
                    self._versions[old.model_version] -= 1
                self._versions[event.model_version] += 1
                self._info[movie_id] = ItemInfo(
                    title=event.title,
                    year=event.year,
                    genres=tuple(event.genres),
                    model_version=event.model_version,
                )
            self._index.upsert(
                list(accepted), np.stack([np.asarray(e.vector) for e in accepted.values()])
            )
        return refusals

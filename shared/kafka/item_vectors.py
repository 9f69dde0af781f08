"""Every item vector, kept in memory and followed live from ``item-embeddings``.

Each instance of the service reads all partitions of the topic (ratings of any user may
name any movie), in a ``TopicReader`` thread; the consumer loop reads the map.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from shared.config import Settings
from shared.events import ITEM_EMBEDDINGS, Event, ItemEmbedded
from shared.kafka.message import Incoming, Source
from shared.kafka.topic_reader import TopicReader
from shared.types import MovieId, Vector

log = logging.getLogger(__name__)

UNIT_NORM_TOLERANCE = 1e-3
"""An item vector whose L2 norm is further than this from 1 is refused."""

InvalidHandler = Callable[[Source, str], None]
"""Gets an ``item-embeddings`` message that cannot be used and the reason; called on
the reader's thread."""


class ItemVectors(Mapping[MovieId, Vector]):
    """A thread-safe ``movie_id -> vector`` map fed by ``item-embeddings``: the vectors
    ratings are learned from, i.e. each movie's vector as the encoder made it
    (``ItemEmbedded.content_vector`` of a moved one).

    A movie's latest embedding wins (item-embedding is the topic's only writer); a
    tombstone (null value) removes the movie. Invalid messages and vectors that are not
    L2-normalised are handed to ``on_invalid`` (the service dead-letters them); the map
    keeps the previous vector of that movie, if any.
    """

    def __init__(
        self,
        settings: Settings,
        on_invalid: InvalidHandler | None = None,
        *,
        name: str = "item-vectors",
    ) -> None:
        self._settings = settings
        self._on_invalid = on_invalid
        self._name = name
        self._lock = threading.Lock()
        self._vectors: dict[MovieId, Vector] = {}
        self._content_only: set[MovieId] = set()
        self._model_version: str | None = None
        self._reader: TopicReader | None = None

    # --- lifecycle ---------------------------------------------------------------
    def start(self) -> ItemVectors:
        """Start reading the whole topic from the beginning, in a thread."""
        if self._reader is None:
            self._reader = TopicReader(
                self._settings, ITEM_EMBEDDINGS, self.add, self._invalid, name=self._name
            ).start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._reader is not None:
            self._reader.stop(timeout_s)
            self._reader = None

    def wait_caught_up(self, timeout_s: float | None = None) -> bool:
        """Block until everything that was in the topic at ``start`` has been read."""
        return self._reader is not None and self._reader.wait_caught_up(timeout_s)

    def healthy(self) -> bool:
        """True while the reader follows the topic (see ``TopicReader.healthy``)."""
        return self._reader is not None and self._reader.healthy()

    # --- the map -----------------------------------------------------------------
    def __getitem__(self, movie_id: MovieId) -> Vector:
        with self._lock:
            return self._vectors[movie_id]

    def __contains__(self, movie_id: object) -> bool:
        with self._lock:
            return movie_id in self._vectors

    def __iter__(self) -> Iterator[MovieId]:
        with self._lock:
            return iter(list(self._vectors))

    def __len__(self) -> int:
        with self._lock:
            return len(self._vectors)

    def get_many(self, movie_ids: Iterable[MovieId]) -> dict[MovieId, Vector]:
        """A snapshot of the vectors of ``movie_ids`` that are known (others left out)."""
        with self._lock:
            return {m: self._vectors[m] for m in set(movie_ids) if m in self._vectors}

    def content_only(self, movie_ids: Iterable[MovieId]) -> set[MovieId]:
        """Those of ``movie_ids`` whose vector the item encoder made from their content
        alone (``rated_in_training`` false): their raters move them."""
        with self._lock:
            return set(movie_ids) & self._content_only

    @property
    def n_content_only(self) -> int:
        """How many movies the item encoder did not learn from ratings."""
        with self._lock:
            return len(self._content_only)

    @property
    def model_version(self) -> str | None:
        """``model_version`` of the most recently read embedding (None before any)."""
        return self._model_version

    # --- feeding -----------------------------------------------------------------
    def add(self, batch: Sequence[Incoming[Event]]) -> None:
        """Take a batch of ``item-embeddings`` events (the reader's callback)."""
        accepted: list[ItemEmbedded] = []
        for incoming in batch:
            event = incoming.event
            if not isinstance(event, ItemEmbedded):
                self._invalid(incoming.source, f"not an ItemEmbedded: {type(event).__name__}")
                continue
            norm = float(np.linalg.norm(event.vector.astype(np.float64)))
            if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
                self._invalid(
                    incoming.source, f"item vector is not L2-normalised (norm {norm:.6g})"
                )
                continue
            accepted.append(event)
        self.update(accepted)

    def update(self, items: Sequence[ItemEmbedded]) -> None:
        """Take valid item embeddings, in topic order."""
        if not items:
            return
        with self._lock:
            for item in items:
                movie_id = item.movie_id
                vector = item.vector if item.content_vector is None else item.content_vector
                self._vectors[movie_id] = vector.astype(np.float32, copy=False)
                if item.rated_in_training:
                    self._content_only.discard(movie_id)
                else:
                    self._content_only.add(movie_id)
                self._model_version = item.model_version

    def _invalid(self, source: Source, reason: str) -> None:
        if source.value is None and source.key is not None:
            # A tombstone of the compacted topic: the movie left the catalogue.
            movie_id = source.key.decode("utf-8", errors="replace")
            with self._lock:
                self._vectors.pop(movie_id, None)
                self._content_only.discard(movie_id)
            log.info("item removed movie_id=%s", movie_id)
            return
        log.warning(
            "invalid item embedding topic=%s partition=%s offset=%s error=%s",
            source.topic,
            source.partition,
            source.offset,
            reason,
        )
        if self._on_invalid is not None:
            self._on_invalid(source, reason)

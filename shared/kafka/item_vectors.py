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
    """A thread-safe ``movie_id -> vector`` map fed by ``item-embeddings``.

    A movie's latest embedding wins; a tombstone (null value) removes the movie. Invalid
    messages and vectors that are not L2-normalised are handed to ``on_invalid`` (the
    service dead-letters them); the map keeps the previous vector of that movie, if any.

    The service moves the vectors of movies the encoder did not learn from ratings
    (``pullable``) and publishes them on the same topic. It keeps its own moves at once
    (``update``), so reading one back later must not undo a newer move: a moved vector
    (``online_ratings`` > 0) only replaces one moved fewer times. A fresh embedding
    (``online_ratings`` 0: the movie was re-embedded) always does.
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
        self._online: dict[MovieId, int] = {}
        self._pullable: dict[MovieId, ItemEmbedded] = {}
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

    def pullable(self, movie_ids: Iterable[MovieId]) -> dict[MovieId, ItemEmbedded]:
        """The latest embedding of each of ``movie_ids`` that the item encoder did not
        learn from ratings (others left out)."""
        with self._lock:
            return {m: self._pullable[m] for m in set(movie_ids) if m in self._pullable}

    @property
    def n_pullable(self) -> int:
        """How many movies the item encoder did not learn from ratings."""
        with self._lock:
            return len(self._pullable)

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
        """Take valid item embeddings (read from the topic, or moved by this service)."""
        if not items:
            return
        with self._lock:
            for item in items:
                movie_id = item.movie_id
                if 0 < item.online_ratings <= self._online.get(movie_id, -1):
                    continue  # our own older move, read back after a newer one
                self._vectors[movie_id] = item.vector.astype(np.float32, copy=False)
                self._online[movie_id] = item.online_ratings
                if item.rated_in_training:
                    self._pullable.pop(movie_id, None)
                else:
                    self._pullable[movie_id] = item
                self._model_version = item.model_version

    def _invalid(self, source: Source, reason: str) -> None:
        if source.value is None and source.key is not None:
            # A tombstone of the compacted topic: the movie left the catalogue.
            movie_id = source.key.decode("utf-8", errors="replace")
            with self._lock:
                self._vectors.pop(movie_id, None)
                self._online.pop(movie_id, None)
                self._pullable.pop(movie_id, None)
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

"""Materialized views of the stack's compacted topics, for the read API.

Each view is a ``TopicReader`` over a whole topic (every instance of the API holds
every key), so any instance answers for any user or movie, and a restarted one reads
the compacted topics again: the latest value per key, as published.

"More like this" asks Qdrant. With a Qdrant server (``QDRANT_URL``) the API queries the
collection the item-embedding service writes. Embedded Qdrant has one owner per
storage folder, so there the API keeps a collection of its own (``<QDRANT_PATH>-api``),
upserted from ``item-embeddings``: the same vectors, the ones the recommender serves
from.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    RECOMMENDATIONS,
    USER_PROFILES,
    DeadLetter,
    Event,
    ItemEmbedded,
    RecommendationsGenerated,
    UserProfileUpdated,
)
from shared.kafka.client import consumer_lag, make_admin, make_consumer
from shared.kafka.message import Incoming, Source
from shared.kafka.topic_reader import TopicReader
from shared.read import SERVICE
from shared.read.activity import Activity
from shared.retrieval.qdrant_store import QdrantStore
from shared.types import MovieId, UserId

log = logging.getLogger(__name__)

STREAM_SERVICES = ("item-embedding", "user-profile", "recommender")
"""The stream processors whose consumer groups' lag the dashboard shows (their handlers'
``SERVICE``; not imported from there, which would load torch into the API)."""

LAG_EVERY_S = 2.0
"""How often (seconds) the lag is asked of the broker, at most."""

FOLLOW_S = 0.5
"""How often (seconds) an idle view of lists or profiles asks its topic for news: a list
reaches the API at most this long after it is published (``sync`` reads at once)."""

FOLLOW_SLOW_S = 2.0
"""The same for the catalogue and the dead letters, which change seldom."""


def replica_path(settings: Settings) -> Path:
    """Where an embedded API keeps its own Qdrant collection."""
    return settings.qdrant_path.with_name(f"{settings.qdrant_path.name}-{SERVICE}")


class ReadViews:
    """The latest list and profile per user and the served catalogue, followed live.

    ``start`` starts the readers; ``ready`` says whether each has read what its topic
    held at start. Lookups return None for a key the topic has not (yet) held.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._lists: dict[UserId, RecommendationsGenerated] = {}
        self._profiles: dict[UserId, UserProfileUpdated] = {}
        self._movies: dict[MovieId, ItemEmbedded] = {}
        self._store: QdrantStore | None = None
        self._replica = settings.qdrant_url is None
        self.invalid = 0
        """Messages the readers could not parse (their owners dead-letter them)."""
        self._lag_lock = threading.Lock()
        self._lag_at = float("-inf")
        self._lag: dict[str, int | None] = {}
        self._lag_clients: tuple[AdminClient, Consumer] | None = None
        self.activity = Activity()
        """What the dashboard shows: lists as they stream, dead letters, trajectories."""
        self._readers = [
            TopicReader(
                settings,
                RECOMMENDATIONS,
                self._on_lists,
                self._on_invalid,
                name=f"{SERVICE}-lists",
                follow_interval_s=FOLLOW_S,
            ),
            TopicReader(
                settings,
                USER_PROFILES,
                self._on_profiles,
                self._on_invalid,
                name=f"{SERVICE}-profiles",
                follow_interval_s=FOLLOW_S,
            ),
            TopicReader(
                settings,
                ITEM_EMBEDDINGS,
                self._on_movies,
                self._on_invalid,
                name=f"{SERVICE}-movies",
                follow_interval_s=FOLLOW_SLOW_S,
            ),
            TopicReader(
                settings,
                DEAD_LETTERS,
                self._on_dead_letters,
                self._on_invalid,
                name=f"{SERVICE}-dead-letters",
                follow_interval_s=FOLLOW_SLOW_S,
            ),
        ]

    # --- life cycle ----------------------------------------------------------------
    def start(self) -> ReadViews:
        for reader in self._readers:
            reader.start()
        return self

    def stop(self) -> None:
        for reader in self._readers:
            reader.stop()
        with self._lag_lock:
            if self._lag_clients is not None:
                self._lag_clients[1].close()
                self._lag_clients = None
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def ready(self) -> bool:
        """Every view has read its topic to where it ended at start, and is healthy."""
        return all(r.wait_caught_up(0) and r.healthy() for r in self._readers)

    def wait_ready(self, timeout_s: float) -> bool:
        return all(r.wait_caught_up(timeout_s) for r in self._readers)

    def sync(self, timeout_s: float = 5.0) -> bool:
        """Read what the topics hold now (for a caller that has just published)."""
        return all(r.sync(timeout_s) for r in self._readers)

    # --- lookups -------------------------------------------------------------------
    def recommendations(self, user_id: UserId) -> RecommendationsGenerated | None:
        with self._lock:
            return self._lists.get(user_id)

    def profile(self, user_id: UserId) -> UserProfileUpdated | None:
        with self._lock:
            return self._profiles.get(user_id)

    def movie(self, movie_id: MovieId) -> ItemEmbedded | None:
        with self._lock:
            return self._movies.get(movie_id)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "lists": len(self._lists),
                "profiles": len(self._profiles),
                "movies": len(self._movies),
            }

    def similar(
        self,
        movie_id: MovieId,
        k: int,
        *,
        genre: str | None = None,
        year: int | None = None,
    ) -> list[tuple[MovieId, float]]:
        """The ``k`` movies nearest to ``movie_id`` in Qdrant (itself left out), best
        first, optionally only those of a genre or a year. Empty while the catalogue
        is empty."""
        with self._lock:
            store = self._store
        if store is None:
            return []
        return store.similar(movie_id, k, genre=genre, year=year)

    # --- the readers' callbacks (each on its reader's thread) ----------------------
    def _on_lists(self, batch: list[Incoming[Event]]) -> None:
        lists = cast(Sequence[Incoming[RecommendationsGenerated]], batch)
        with self._lock:
            for item in lists:
                self._lists[item.event.user_id] = item.event
        self.activity.lists([item.event for item in lists])

    def _on_profiles(self, batch: list[Incoming[Event]]) -> None:
        profiles = cast(Sequence[Incoming[UserProfileUpdated]], batch)
        with self._lock:
            for item in profiles:
                self._profiles[item.event.user_id] = item.event
        for item in profiles:
            self.activity.vector(item.event.user_id, np.asarray(item.event.vector))

    def _on_movies(self, batch: list[Incoming[Event]]) -> None:
        movies = [cast(ItemEmbedded, item.event) for item in batch]
        if not movies:
            return
        store = self._store_for(len(movies[0].vector))
        if self._replica:
            store.upsert(movies)
        with self._lock:
            for movie in movies:
                self._movies[movie.movie_id] = movie

    def _on_dead_letters(self, batch: list[Incoming[Event]]) -> None:
        self.activity.dead_letters([cast(DeadLetter, item.event) for item in batch])

    def movie_vectors(self) -> tuple[list[MovieId], np.ndarray]:
        """The served catalogue: movie ids and their vectors (one row each)."""
        with self._lock:
            movies = list(self._movies.values())
        if not movies:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [m.movie_id for m in movies], np.stack([np.asarray(m.vector) for m in movies])

    def lag(self) -> dict[str, int | None]:
        """Each stream processor's consumer lag (messages its group has not committed;
        None before its first commit), asked of the broker at most every ``LAG_EVERY_S``."""
        with self._lag_lock:
            now = time.monotonic()
            if now - self._lag_at >= LAG_EVERY_S:
                if self._lag_clients is None:
                    self._lag_clients = (
                        make_admin(self._settings),
                        make_consumer(self._settings, f"{SERVICE}-lag-{uuid.uuid4().hex[:8]}"),
                    )
                admin, consumer = self._lag_clients
                for service in STREAM_SERVICES:
                    try:
                        self._lag[service] = consumer_lag(
                            self._settings,
                            self._settings.group(service),
                            admin=admin,
                            consumer=consumer,
                        )
                    except Exception as exc:  # one group's failure must not fail the page
                        log.warning("lag unavailable group=%s: %s", service, exc)
                        self._lag[service] = None
                self._lag_at = now
            return dict(self._lag)

    def _store_for(self, dim: int) -> QdrantStore:
        with self._lock:
            if self._store is None:
                settings = self._settings
                if self._replica:
                    settings = settings.model_copy(update={"qdrant_path": replica_path(settings)})
                self._store = QdrantStore(settings, dim)
            return self._store

    def _on_invalid(self, source: Source, reason: str) -> None:
        self.invalid += 1
        log.warning(
            "unreadable message left out of the view topic=%s partition=%s offset=%s: %s",
            source.topic,
            source.partition,
            source.offset,
            reason,
        )

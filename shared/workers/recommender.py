"""The recommender worker: user profiles in, recommendation lists out.

Wiring only: a ``TopicReader`` hydrates the catalogue from the whole of
``item-embeddings`` and keeps following it; once it has caught up, a ``BatchConsumer``
turns ``user-profiles`` into ``recommendations`` with ``handle_user_profiles``, keeping
each user's rated movies (the profiles carry a recent window) in a ``ChangelogTable``
restored from ``Settings.changelog(SERVICE, TABLE)``. A second
reader follows the whole of ``ratings`` to keep the online item features (popularity,
mean rating; with a trained ranker also its online BPR) and, once it has caught up,
publishes the newcomers' list (``newcomers_recommendations``, key
``NEWCOMERS_USER_ID``) whenever its movies change.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import cast

from shared.config import Settings
from shared.events import (
    ITEM_EMBEDDINGS,
    RATINGS,
    RECOMMENDATIONS,
    USER_PROFILES,
    Event,
    ItemEmbedded,
    RatingSubmitted,
    UserProfileUpdated,
)
from shared.handlers.recommender import (
    SERVICE,
    TABLE,
    handle_item_embeddings,
    handle_user_profiles,
    newcomers_recommendations,
)
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.message import Incoming, Outgoing, Source, dead_letter, handle_isolating_failures
from shared.kafka.publisher import DeliveryError, Publisher
from shared.kafka.table import ChangelogTable
from shared.kafka.topic_reader import TopicReader
from shared.models.deployed import build_reranker
from shared.models.item_stats import ItemStats
from shared.models.recommend import CandidateSources
from shared.retrieval.catalogue import Catalogue
from shared.types import MovieId

log = logging.getLogger(__name__)

CATCH_UP_TIMEOUT_S = 300.0
"""Longest wait (seconds) for the catalogue to load before serving anyway."""

PROGRESS_EVERY_S = 5.0
"""How often (seconds) catch-up progress is logged."""


class RecommenderWorker:
    """The recommender's reader thread, consumer loop and their clean stop.

    ``run`` blocks until ``stop`` (from a signal handler or another thread).
    """

    def __init__(self, settings: Settings, *, catch_up_timeout_s: float = CATCH_UP_TIMEOUT_S):
        """``catch_up_timeout_s``: see ``CATCH_UP_TIMEOUT_S`` (default 300 s)."""
        self.settings = settings
        self.catalogue = Catalogue()
        self.reranker = build_reranker(settings)
        self.sources = (
            CandidateSources(ItemStats()) if self.reranker is None else self.reranker.sources
        )
        """The online item features (the ranker's when there is one)."""
        self._catch_up_timeout_s = catch_up_timeout_s
        self._stopping = threading.Event()
        # The reader thread gets its own producer: the consumer loop's flush must only
        # answer for the outputs of its own batches.
        self._reader_publisher = Publisher(settings)
        self._reader = TopicReader(
            settings, ITEM_EMBEDDINGS, self._on_items, self._on_invalid_item, name=SERVICE
        )
        # The newcomers' list: published from the ratings reader's thread and, once the
        # catalogue is loaded, from the main one; the lock keeps one at a time.
        self._newcomers_lock = threading.Lock()
        self._newcomers_publisher = Publisher(settings)
        self._newcomers_published: list[MovieId] | None = None
        self._last_rating: Incoming[RatingSubmitted] | None = None
        self._ratings_reader = TopicReader(
            settings,
            RATINGS,
            self._on_ratings,
            self._on_invalid_rating,
            name=f"{SERVICE}-ratings",
            on_caught_up=self._publish_newcomers,
        )
        self.table = ChangelogTable(settings, settings.changelog(SERVICE, TABLE))
        self.consumer = BatchConsumer(
            settings,
            SERVICE,
            [USER_PROFILES],
            self._on_profiles,
            ready_file=settings.ready_file(SERVICE),
            table=self.table,
        )

    def run(self) -> None:
        self._reader.start()
        self._ratings_reader.start()
        try:
            if self._wait_for_catalogue():
                if self._ratings_reader.wait_caught_up(0):
                    self._publish_newcomers()  # now with the whole catalogue's titles
                self.consumer.run()
        finally:
            self._reader.stop()
            self._ratings_reader.stop()
            try:
                self._reader_publisher.flush()
            except DeliveryError as exc:
                log.error("dead letters of item-embeddings not delivered error=%s", exc)
            log.info("stopped items=%d", len(self.catalogue))

    def stop(self) -> None:
        self._stopping.set()
        self.consumer.stop()

    def _wait_for_catalogue(self) -> bool:
        """False when asked to stop while waiting; True otherwise (even on time-out)."""
        started = time.monotonic()
        last_report = started
        while not self._stopping.is_set():
            if self._reader.wait_caught_up(0.5):
                log.info(
                    "catalogue loaded items=%d dim=%s model_version=%s",
                    len(self.catalogue),
                    self.catalogue.dim,
                    self.catalogue.model_version,
                )
                return True
            now = time.monotonic()
            if now - started > self._catch_up_timeout_s:
                log.warning(
                    "catalogue not caught up after %.0fs; serving with items=%d",
                    now - started,
                    len(self.catalogue),
                )
                return True
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                log.info("loading catalogue items=%d", len(self.catalogue))
        return False

    def _on_profiles(self, batch: list[Incoming[Event]]) -> list[Outgoing]:
        # The loop reads only user-profiles, and parse() validated each against its record.
        profiles = cast(list[Incoming[UserProfileUpdated]], batch)
        partitions = {p.event.user_id: p.source.partition for p in profiles}
        histories = {u: raw for u in partitions if (raw := self.table.get(u.encode())) is not None}
        out, updated = handle_user_profiles(
            profiles, histories, self.catalogue, self.settings, datetime.now(UTC), self.reranker
        )
        for user, history in updated.items():
            partition = partitions[user]
            if partition is not None:
                self.table.put(user.encode(), history.to_bytes(), partition)
        return out

    def _on_ratings(self, batch: list[Incoming[Event]]) -> None:
        # The online features only: the user-profile service owns the ratings' validation
        # and dead letters, so a rating it will refuse (unknown movie) still counts here.
        # The reader follows only ratings, and parse() validated each event.
        ratings = cast(list[Incoming[RatingSubmitted]], batch)
        if not ratings:
            return
        self.sources.learn([i.event for i in ratings])
        self._last_rating = ratings[-1]
        if self._ratings_reader.wait_caught_up(0):
            self._publish_newcomers()

    def _publish_newcomers(self) -> None:
        """Publish the newcomers' list if its movies changed since the last one."""
        with self._newcomers_lock:
            cause = self._last_rating
            if cause is None:
                return
            event = newcomers_recommendations(
                self.sources.item_stats, self.catalogue, self.settings, datetime.now(UTC), cause
            )
            movies = None if event is None else [item.movie_id for item in event.items]
            if event is None or movies == self._newcomers_published:
                return
            try:
                self._newcomers_publisher.publish(Outgoing(RECOMMENDATIONS, event))
                self._newcomers_publisher.flush()
            except DeliveryError as exc:
                # The next change publishes again; the readers must keep running.
                log.error("newcomers' list not delivered error=%s", exc)
                return
            self._newcomers_published = movies
            log.debug("newcomers' list published movies=%s", movies)

    def _on_invalid_rating(self, source: Source, reason: str) -> None:
        # Not ours to dead-letter: the user-profile service dead-letters bad ratings.
        log.debug("skipping invalid rating offset=%s reason=%s", source.offset, reason)

    def _on_items(self, batch: list[Incoming[Event]]) -> None:
        # The reader thread must survive anything, or the catalogue would silently freeze.
        out = handle_isolating_failures(self._apply_items, batch, SERVICE)
        self._reader_publisher.publish_all(out)

    def _apply_items(self, batch: list[Incoming[Event]]) -> list[Outgoing]:
        # The reader follows only item-embeddings, and parse() validated each event.
        items = cast(list[Incoming[ItemEmbedded]], batch)
        return handle_item_embeddings(items, self.catalogue)

    def _on_invalid_item(self, source: Source, reason: str) -> None:
        self._reader_publisher.publish(dead_letter(source, reason, SERVICE))

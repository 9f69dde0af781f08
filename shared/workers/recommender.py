"""The recommender worker: user profiles in, recommendation lists out.

Wiring only. Two ``TopicReader`` threads hold what every instance needs whole, as global
tables read from compacted topics: the catalogue (``item-embeddings``) and the movies'
online rating statistics (``item-features``, into the reranker's ``ItemStats``). Once
both have caught up, a ``BatchConsumer`` turns this instance's share of
``user-profiles`` into ``recommendations`` with ``handle_user_profiles``, keeping each
user's rated movies (the profiles carry a recent window) in a ``ChangelogTable``
restored from ``Settings.changelog(SERVICE, TABLE)``. Before each batch both readers
read up to the topics' current ends, so a list sees everything published before its
profile was read.

The newcomers' list (``newcomers_recommendations``, key ``NEWCOMERS_USER_ID``) has one
writer: the instance that holds partition 0 of ``user-profiles`` publishes it from its
consumer loop, in the same batch as any lists, whenever the statistics changed its
movies.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import cast

from shared import metrics
from shared.config import Settings
from shared.events import (
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    RECOMMENDATIONS,
    USER_PROFILES,
    Event,
    ItemEmbedded,
    ItemFeaturesUpdated,
    RecommendationsGenerated,
    UserProfileUpdated,
)
from shared.handlers.recommender import (
    SERVICE,
    TABLE,
    StatsBefore,
    handle_item_embeddings,
    handle_item_features,
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
"""Longest wait (seconds) for the global tables to load before serving anyway."""

PROGRESS_EVERY_S = 5.0
"""How often (seconds) catch-up progress is logged."""

SYNC_TIMEOUT_S = 5.0
"""Longest wait (seconds) for the global tables to read their news before a batch."""

NEWCOMERS_PARTITION = 0
"""The ``user-profiles`` partition whose holder publishes the newcomers' list."""


class RecommenderWorker:
    """The recommender's reader threads, consumer loop and their clean stop.

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
        # The readers' dead letters go out on their own producer: the consumer loop's
        # flush must only answer for the outputs of its own batches.
        self._reader_publisher = Publisher(settings)
        self._reader = TopicReader(
            settings, ITEM_EMBEDDINGS, self._on_items, self._on_invalid, name=SERVICE
        )
        # The statistics change on the features reader's thread and are read by the
        # consumer loop's: the lock keeps a batch's lists on one version of them.
        self._features_lock = threading.Lock()
        self._stats_before = StatsBefore()
        self._features_cause: Incoming[ItemFeaturesUpdated] | None = None
        self._features_version = 0
        self._newcomers_version = 0
        self._newcomers_movies: list[MovieId] | None = None
        self._pending_newcomers: tuple[int, list[MovieId]] | None = None
        self._pending_latencies: list[float] = []
        """The latencies (seconds) of the lists of the batch in hand."""
        self._features_reader = TopicReader(
            settings,
            ITEM_FEATURES,
            self._on_features,
            self._on_invalid,
            name=f"{SERVICE}-features",
        )
        self.table = ChangelogTable(settings, settings.changelog(SERVICE, TABLE))
        self.consumer = BatchConsumer(
            settings,
            SERVICE,
            [USER_PROFILES],
            self._on_profiles,
            ready_file=settings.ready_file(SERVICE),
            table=self.table,
            has_work=self._newcomers_due,
            after_commit=self._committed,
        )

    def run(self) -> None:
        self._reader.start()
        self._features_reader.start()
        try:
            if self._wait_for_tables():
                self.consumer.run()
        finally:
            self._reader.stop()
            self._features_reader.stop()
            try:
                self._reader_publisher.flush()
            except DeliveryError as exc:
                log.error("dead letters of the global tables not delivered error=%s", exc)
            log.info("stopped items=%d", len(self.catalogue))

    def stop(self) -> None:
        self._stopping.set()
        self.consumer.stop()

    def _wait_for_tables(self) -> bool:
        """False when asked to stop while waiting; True otherwise (even on time-out)."""
        started = time.monotonic()
        last_report = started
        while not self._stopping.is_set():
            if self._reader.wait_caught_up(0.5) and self._features_reader.wait_caught_up(0):
                log.info(
                    "global tables loaded items=%d dim=%s model_version=%s rated_items=%d",
                    len(self.catalogue),
                    self.catalogue.dim,
                    self.catalogue.model_version,
                    len(self.sources.item_stats),
                )
                return True
            now = time.monotonic()
            if now - started > self._catch_up_timeout_s:
                log.warning(
                    "global tables not caught up after %.0fs; serving with items=%d rated_items=%d",
                    now - started,
                    len(self.catalogue),
                    len(self.sources.item_stats),
                )
                return True
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                log.info(
                    "loading global tables items=%d rated_items=%d",
                    len(self.catalogue),
                    len(self.sources.item_stats),
                )
        return False

    # --- the consumer loop --------------------------------------------------------------

    def _on_profiles(self, batch: list[Incoming[Event]]) -> list[Outgoing]:
        # The loop reads only user-profiles, and parse() validated each against its record.
        profiles = cast(list[Incoming[UserProfileUpdated]], batch)
        self._sync_tables()
        partitions = {p.event.user_id: p.source.partition for p in profiles}
        histories = {u: raw for u in partitions if (raw := self.table.get(u.encode())) is not None}
        with self._features_lock:
            out, updated = handle_user_profiles(
                profiles,
                histories,
                self.catalogue,
                self.settings,
                datetime.now(UTC),
                self.reranker,
                self._stats_before,
            )
            out.extend(self._newcomers())
        for user, history in updated.items():
            partition = partitions[user]
            if partition is not None:
                self.table.put(user.encode(), history.to_bytes(), partition)
        self._pending_latencies = [
            o.event.latency_ms / 1000
            for o in out
            if isinstance(o.event, RecommendationsGenerated) and o.event.user_id in partitions
        ]
        return out

    def _sync_tables(self) -> None:
        """Read what the global tables' topics hold now, so that a batch's lists see every
        movie and statistic published before its profiles were read: whether they would
        otherwise depends on the readers' timing, and the lists would too."""
        for reader in (self._reader, self._features_reader):
            if not reader.sync(SYNC_TIMEOUT_S):
                log.warning(
                    "global table not synced in %.1fs; lists may miss its news reader=%s",
                    SYNC_TIMEOUT_S,
                    reader.name,
                )

    def _owns_newcomers(self) -> bool:
        return (self.settings.topic(USER_PROFILES.name), NEWCOMERS_PARTITION) in (
            self.consumer.assignment
        )

    def _newcomers_due(self) -> bool:
        """Whether the statistics changed since the newcomers' list was last published,
        and this instance publishes it."""
        return self._features_version != self._newcomers_version and self._owns_newcomers()

    def _newcomers(self) -> list[Outgoing]:
        """The newcomers' list, if due and its movies changed (the caller holds the
        features lock)."""
        self._pending_newcomers = None
        cause = self._features_cause
        if cause is None or not self._newcomers_due():
            return []
        version = self._features_version
        event = newcomers_recommendations(
            self.sources.item_stats, self.catalogue, self.settings, datetime.now(UTC), cause
        )
        movies = [] if event is None else [item.movie_id for item in event.items]
        self._pending_newcomers = (version, movies)
        if event is None or movies == self._newcomers_movies:
            return []
        return [Outgoing(RECOMMENDATIONS, event)]

    def _committed(self) -> None:
        """The batch is out: remember the newcomers' list it carried, if any, and count
        its lists' latencies."""
        for seconds in self._pending_latencies:
            metrics.LIST_LATENCY.observe(seconds)
        self._pending_latencies = []
        if self._pending_newcomers is not None:
            self._newcomers_version, self._newcomers_movies = self._pending_newcomers
            self._pending_newcomers = None

    # --- the global tables' readers -----------------------------------------------------

    def _on_features(self, batch: list[Incoming[Event]]) -> None:
        # The reader follows only item-features, and parse() validated each event.
        features = cast(list[Incoming[ItemFeaturesUpdated]], batch)
        with self._features_lock:
            out = handle_isolating_failures(
                lambda b: handle_item_features(
                    cast(list[Incoming[ItemFeaturesUpdated]], b),
                    self.sources.item_stats,
                    self._stats_before,
                ),
                batch,
                SERVICE,
            )
            if features:
                self._features_cause = features[-1]
                self._features_version += 1
        self._reader_publisher.publish_all(out)

    def _on_items(self, batch: list[Incoming[Event]]) -> None:
        # The reader thread must survive anything, or the catalogue would silently freeze.
        out = handle_isolating_failures(self._apply_items, batch, SERVICE)
        self._reader_publisher.publish_all(out)

    def _apply_items(self, batch: list[Incoming[Event]]) -> list[Outgoing]:
        # The reader follows only item-embeddings, and parse() validated each event.
        items = cast(list[Incoming[ItemEmbedded]], batch)
        return handle_item_embeddings(items, self.catalogue)

    def _on_invalid(self, source: Source, reason: str) -> None:
        self._reader_publisher.publish(dead_letter(source, reason, SERVICE))

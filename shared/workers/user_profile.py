"""The user-profile worker: ``ratings`` in, ``user-profiles`` and ``item-feedback`` out.

Per-user records (``UserRecord`` bytes: the updater's state and any parked ratings)
live in a ``ChangelogTable`` restored from the compacted changelog topic
``Settings.changelog(SERVICE, TABLE)`` for the ``ratings`` partitions this instance owns. Each
micro-batch runs on the shared ``BatchConsumer`` loop:

    parse -> handle_ratings (with the users whose parked ratings can go on)
    -> publish item feedback, profiles, dead letters, then the changed records
    -> commit the input offsets (one transaction when ``Settings.transactions``)

A rating of a movie with no vector yet parks in its user's record and waits there
(``Settings.rating_wait_s``) without holding back any other user: the loop revisits
the user as soon as the vector arrives on ``item-embeddings``.

Each applied rating also goes out on ``item-feedback``, keyed by movie, for the movie's
owner (item-embedding): with the rater's taste when the movie's vector stands for its
content alone, which moves that vector there.

Stops cleanly on SIGTERM or SIGINT: the batch in hand is finished and committed, the
ready file removed.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import cast

from shared.config import Settings
from shared.events import RATINGS, Event
from shared.handlers.user_profile import (
    SERVICE,
    TABLE,
    ParkedUsers,
    Rating,
    UserRecord,
    handle_ratings,
)
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.item_vectors import ItemVectors
from shared.kafka.message import Incoming, Outgoing, Source, dead_letter
from shared.kafka.publisher import DeliveryError, Publisher
from shared.kafka.table import ChangelogTable
from shared.models.deployed import build_user_updater
from shared.models.updater import UserUpdater
from shared.types import UserId

log = logging.getLogger(__name__)

CATCH_UP_POLL_S = 0.5


class UserProfileWorker:
    """The item-vector reader, the ratings loop and their clean stop.

    Args:
        settings: topics, broker, batch size and timeout, ``rating_wait_s``, var dir.
        updater: the user model (default: the deployed one, ``build_user_updater``:
            the trained residual updater, or ``RatingWeightedMean`` without one).
    """

    def __init__(self, settings: Settings, updater: UserUpdater | None = None) -> None:
        self.settings = settings
        self.updater: UserUpdater = updater or build_user_updater(settings)
        self.vectors = ItemVectors(settings, on_invalid=self._invalid_item)
        self.table = ChangelogTable(settings, settings.changelog(SERVICE, TABLE))
        self._parked = ParkedUsers(settings.rating_wait_s)
        self._written: dict[UserId, UserRecord] = {}
        # Dead letters of item-embeddings are sent from the reader's thread.
        self._item_letters = Publisher(settings)
        self._stopping = False
        self.consumer = BatchConsumer(
            settings,
            SERVICE,
            [RATINGS],
            self._handle,
            ready_file=settings.ready_file(SERVICE),
            table=self.table,
            has_work=self._has_work,
            healthy=self.vectors.healthy,
            after_commit=self._after_commit,
        )

    def run(self) -> None:
        """Follow item vectors, then process ratings until ``stop``."""
        self.vectors.start()
        try:
            # Ratings replayed at start must not park for want of a vector that is on
            # item-embeddings but not read yet.
            while not self.vectors.wait_caught_up(CATCH_UP_POLL_S):
                if self._stopping:
                    return
            log.info(
                "service=%s items=%d content_only=%d",
                SERVICE,
                len(self.vectors),
                self.vectors.n_content_only,
            )
            self.consumer.run()
        finally:
            self.vectors.stop()
            try:
                self._item_letters.flush(10)
            except DeliveryError as exc:
                log.error("service=%s item dead letters not delivered: %s", SERVICE, exc)

    def stop(self) -> None:
        self._stopping = True
        self.consumer.stop()

    # --- the batch ---------------------------------------------------------------
    def _handle(self, batch: list[Incoming[Event]]) -> list[Outgoing]:
        # The loop reads only ratings, and parse() validated each against its record.
        ratings = cast(list[Rating], batch)
        now = datetime.now(UTC)
        self._parked.sync(self.table)
        revisit = self._parked.due(self.vectors, time.time())
        users = {r.event.user_id for r in ratings} | revisit
        states = {u: raw for u in users if (raw := self.table.get(u.encode())) is not None}
        partitions = {r.event.user_id: r.source.partition for r in ratings}
        movies = {r.event.movie_id for r in ratings}
        out, updated = handle_ratings(
            ratings,
            states,
            self.vectors,
            self.updater,
            now,
            item_model_version=self.vectors.model_version,
            content_only=self.vectors.content_only(movies),
            revisit=revisit,
            wait_s=self.settings.rating_wait_s,
        )
        for user, record in updated.items():
            key = user.encode()
            partition = partitions.get(user)
            if partition is None:
                partition = self.table.partition_of(key)
            if partition is not None:
                self.table.put(key, record.to_bytes(), partition)
        self._written = updated
        return out

    def _after_commit(self) -> None:
        self._parked.update(self._written)
        self._written = {}

    def _has_work(self) -> bool:
        self._parked.sync(self.table)
        return bool(self._parked.due(self.vectors, time.time()))

    # --- item-embeddings dead letters ----------------------------------------------
    def _invalid_item(self, source: Source, reason: str) -> None:
        try:
            self._item_letters.publish(dead_letter(source, reason, SERVICE))
            self._item_letters.flush(10)
        except DeliveryError as exc:
            log.error(
                "service=%s dead letter not delivered topic=%s partition=%s offset=%s: %s",
                SERVICE,
                source.topic,
                source.partition,
                source.offset,
                exc,
            )

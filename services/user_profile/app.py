"""The user-profile service's faust app: ``ratings`` in, ``user-profiles`` out.

Per-user state (``UserState`` bytes) lives in the faust table ``naming.TABLE``, in
memory and recovered from its changelog topic at start. The app reads ``ratings`` as
raw bytes, so an invalid message becomes a dead letter instead of a faust decode
error, and processes micro-batches:

    parse -> wait (bounded) for missing item vectors -> handle_ratings in an executor
    -> write the table -> publish moved item vectors, profiles and dead letters

Ratings of movies the item encoder did not learn from ratings move those movies'
vectors (``settings.item_pull``); the service keeps its moves at once and publishes
them on ``item-embeddings``, where the recommender's catalogue picks them up. Run one
instance per item catalogue: two instances moving the same movie would each publish
their own moves, and the later message would win.

Delivery is at-least-once: faust commits a batch's offsets after the agent has
finished with it and after flushing the producer (changelog and outputs). A batch
re-delivered after a crash finds its ratings at or below the stored ``last_offset``
and does not apply them twice.

Nothing connects until a worker starts the app (``python -m services.user_profile
worker``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import ChainMap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import faust
from faust.streams import Stream
from faust.types import EventT, StreamT
from mode import Service

from services.user_profile import naming
from services.user_profile.handler import Rating, handle_ratings
from services.user_profile.item_vectors import ItemVectors
from services.user_profile.naming import SERVICE
from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    RATINGS,
    USER_PROFILES,
    ItemEmbedded,
    RatingSubmitted,
    encode,
)
from shared.exceptions import ConfigurationError, InvalidEventError
from shared.kafka import aiokafka_backoff, faust_transport
from shared.kafka.message import Incoming, Outgoing, Source, dead_letter, parse
from shared.models.deployed import build_user_updater
from shared.models.updater import UserState, UserUpdater
from shared.types import MovieId, UserId

log = logging.getLogger(__name__)

REPORT_EVERY_S = 30.0
"""How often (seconds) the agent logs its counters."""


def broker_url(bootstrap_servers: str) -> str:
    """faust's form of a ``host:port,host:port`` list: ``kafka://host:port;kafka://...``."""
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    if not hosts:
        raise ConfigurationError("KAFKA_BOOTSTRAP_SERVERS is empty")
    return ";".join(f"kafka://{host}" for host in hosts)


def source_of(event: EventT) -> Source:
    """The ``Source`` of a faust event (raw key and value, broker timestamp in ms)."""
    message = event.message
    timestamp = message.timestamp
    return Source(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=cast(bytes | None, message.key),
        value=cast(bytes | None, message.value),
        # faust turns the broker's integer milliseconds into float seconds.
        timestamp_ms=None if timestamp is None else round(timestamp * 1000),
    )


class _Lifecycle(Service):
    """Starts the item-vector reader with the app; stops it and removes the ready
    file when the app stops."""

    def __init__(self, owner: UserProfileApp, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner

    async def on_start(self) -> None:
        self.owner.on_start(asyncio.get_running_loop())

    async def on_stop(self) -> None:
        self.owner.on_stop()


class UserProfileApp:
    """The faust app of the service, with its table, topics and agent.

    Args:
        settings: topics, broker, batch size and timeout, ``rating_wait_s``, var dir.
        updater: the user model (default: the deployed one, ``build_user_updater``:
            the trained residual updater, or ``RatingWeightedMean`` without one).
    """

    def __init__(self, settings: Settings, updater: UserUpdater | None = None) -> None:
        self.settings = settings
        self.updater: UserUpdater = updater or build_user_updater(settings)
        self.ready_file = settings.ready_file(SERVICE)
        # faust makes its data directory without parents, before any hook of ours runs.
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        aiokafka_backoff.install(settings.empty_fetch_backoff_s)
        self.app = faust.App(
            naming.app_id(settings),
            broker=broker_url(settings.kafka_bootstrap_servers),
            topic_partitions=settings.topic_partitions,
            # infra.topics creates every topic, the changelog and leader topics included,
            # with the partitions faust expects; faust must not create them its own way.
            topic_allow_declare=False,
            store="memory://",
            processing_guarantee="at_least_once",
            consumer_auto_offset_reset="earliest",
            web_enabled=False,
            datadir=str(settings.var_dir / SERVICE),
            key_serializer="raw",
            value_serializer="raw",
        )
        # Without it a group with no committed offsets can skip its first records.
        faust_transport.install(self.app)
        # Keys are the raw UTF-8 user id (key_type=bytes), exactly the ratings key, and
        # the producer's partitioner places them (use_partitioner=True): the changelog
        # partition of a user is then its ratings partition, whichever event is current.
        self.table = self.app.Table(
            naming.TABLE,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.topic_partitions,
            use_partitioner=True,
        )
        if self.table.changelog_topic.get_topic_name() != naming.changelog_topic(settings):
            raise ConfigurationError(
                f"faust's changelog topic {self.table.changelog_topic.get_topic_name()!r} "
                f"is not {naming.changelog_topic(settings)!r}"
            )
        self.ratings = self.app.topic(
            settings.topic(RATINGS.name),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.topic_partitions,
        )
        self.outputs = {
            spec.name: self.app.topic(
                settings.topic(spec.name), key_serializer="raw", value_serializer="raw"
            )
            for spec in (ITEM_EMBEDDINGS, USER_PROFILES, DEAD_LETTERS)
        }
        self.vectors = ItemVectors(settings, on_invalid=self._invalid_item)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="user-update")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.processed = 0
        self.dead_lettered = 0
        self.published = 0
        self._last_report = time.monotonic()

        self.app.agent(self.ratings, name=f"{SERVICE}-ratings")(self._agent)
        self.app.task(self._announce_ready)
        self.app.add_dependency(_Lifecycle(self))

    # --- lifecycle ---------------------------------------------------------------
    def on_start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.vectors.start()

    def on_stop(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        self.vectors.stop()
        self._executor.shutdown(wait=True)
        log.info(
            "service=%s stopped processed=%d published=%d dead_lettered=%d",
            SERVICE,
            self.processed,
            self.published,
            self.dead_lettered,
        )

    async def _announce_ready(self) -> None:
        # faust starts app tasks once partitions are assigned and the table recovered.
        await self.vectors.wait_caught_up()
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        self.ready_file.write_text(str(time.time()))
        log.info(
            "service=%s ready items=%d pullable=%d item_pull=%s",
            SERVICE,
            len(self.vectors),
            self.vectors.n_pullable,
            self.settings.item_pull,
        )

    # --- the agent ---------------------------------------------------------------
    async def _agent(self, stream: StreamT[bytes]) -> None:
        # Ratings replayed at start must not be dead-lettered for want of a vector that
        # is on item-embeddings but not read yet.
        await self.vectors.wait_caught_up()
        # take_events (faust-streaming) is on the Stream class, not in its StreamT type.
        async for events in cast(Stream[bytes], stream).take_events(
            self.settings.batch_size, within=self.settings.batch_timeout_s
        ):
            await self.process(events)

    async def process(self, events: Sequence[EventT]) -> None:
        """Handle one micro-batch of raw ``ratings`` messages end to end. Never raises
        for bad input: every message ends in a profile update or a dead letter."""
        sources = [source_of(event) for event in events]
        valid: list[Rating] = []
        out: list[Outgoing] = []
        for source in sources:
            try:
                incoming = parse(RATINGS, source, self.settings.max_message_bytes)
            except InvalidEventError as exc:
                out.append(self._reject(source, str(exc)))
                continue
            valid.append(cast(Incoming[RatingSubmitted], incoming))
        if valid:
            out.extend(await self._handle(valid))
        await self._publish(out)
        self.processed += len(sources)
        if time.monotonic() - self._last_report > REPORT_EVERY_S:
            self._last_report = time.monotonic()
            log.info(
                "service=%s processed=%d published=%d dead_lettered=%d",
                SERVICE,
                self.processed,
                self.published,
                self.dead_lettered,
            )

    async def _handle(self, valid: list[Rating]) -> list[Outgoing]:
        movie_ids = {incoming.event.movie_id for incoming in valid}
        missing = {m for m in movie_ids if m not in self.vectors}
        if missing:
            timeout = self._wait_s(valid, missing)
            still = await self.vectors.wait_for(missing, timeout)
            log.info(
                "waited for item vectors s=%.2f missing=%d still_missing=%d",
                timeout,
                len(missing),
                len(still),
            )
        users = {incoming.event.user_id for incoming in valid}
        stored = {u: raw for u in users if (raw := self.table.get(u.encode())) is not None}
        try:
            out, updated = await self._run_handler(valid, stored)
        except Exception:
            log.exception("service=%s batch of %d failed; retrying one by one", SERVICE, len(valid))
            out, updated = await self._handle_one_by_one(valid, stored)
        for user, state in updated.items():
            self.table[user.encode()] = state.to_bytes()
        return out

    async def _run_handler(
        self, batch: list[Rating], stored: ChainMap[UserId, bytes] | dict[UserId, bytes]
    ) -> tuple[list[Outgoing], dict[UserId, UserState]]:
        movie_ids = {incoming.event.movie_id for incoming in batch}
        pull = self.settings.item_pull
        loop = asyncio.get_running_loop()
        # The numeric update runs off the event loop so heartbeats and fetches go on.
        out, updated = await loop.run_in_executor(
            self._executor,
            partial(
                handle_ratings,
                batch,
                stored,
                self.vectors.get_many(movie_ids),
                self.updater,
                datetime.now(UTC),
                item_model_version=self.vectors.model_version,
                pullable=self.vectors.pullable(movie_ids) if pull > 0 else None,
                item_pull=pull,
            ),
        )
        # The next batch must see the moved vectors before they come back from the topic.
        self.vectors.update([o.event for o in out if isinstance(o.event, ItemEmbedded)])
        return out, updated

    async def _handle_one_by_one(
        self, valid: list[Rating], stored: dict[UserId, bytes]
    ) -> tuple[list[Outgoing], dict[UserId, UserState]]:
        out: list[Outgoing] = []
        updated: dict[UserId, UserState] = {}
        written: dict[UserId, bytes] = {}
        for incoming in valid:
            try:
                one_out, one_updated = await self._run_handler(
                    [incoming], ChainMap(written, stored)
                )
            except Exception as exc:
                s = incoming.source
                log.exception(
                    "service=%s topic=%s partition=%s offset=%s failed",
                    SERVICE,
                    s.topic,
                    s.partition,
                    s.offset,
                )
                out.append(self._reject(s, f"{type(exc).__name__}: {exc}"))
                continue
            out.extend(one_out)
            updated.update(one_updated)
            written.update({u: st.to_bytes() for u, st in one_updated.items()})
        return out, updated

    def _wait_s(self, valid: list[Rating], missing: set[MovieId]) -> float:
        """Seconds to wait for missing vectors: until ``rating_wait_s`` after the newest
        such rating was published (broker time), at most ``rating_wait_s`` from now. A
        backlog of old ratings of unknown movies is then dead-lettered without waiting."""
        wait = self.settings.rating_wait_s
        now_ms = time.time() * 1000
        newest = max(
            (
                incoming.source.timestamp_ms or now_ms
                for incoming in valid
                if incoming.event.movie_id in missing
            ),
            default=now_ms,
        )
        return max(0.0, min(wait, (newest - now_ms) / 1000 + wait))

    # --- output ------------------------------------------------------------------
    async def _publish(self, out: list[Outgoing]) -> None:
        for outgoing in out:
            key = outgoing.spec.key_of(outgoing.event)
            try:
                # force=True: publish now, not when faust commits the source offset
                # (up to a commit interval of latency); commits still flush first.
                await self.outputs[outgoing.spec.name].send(
                    key=key, value=encode(outgoing.event), force=True
                )
            except Exception:
                # e.g. a message over the broker's size limit. faust acks the batch
                # whatever happens here, so raising would lose the rest of it too.
                log.exception(
                    "service=%s publish failed topic=%s key=%r", SERVICE, outgoing.spec.name, key
                )
                continue
            self.published += 1
            if outgoing.spec is DEAD_LETTERS:
                self.dead_lettered += 1

    def _reject(self, source: Source, reason: str) -> Outgoing:
        return dead_letter(source, reason, SERVICE)

    def _invalid_item(self, source: Source, reason: str) -> None:
        # Called on the item reader's thread: hand the dead letter to the event loop.
        if self._loop is None:
            log.error("dead letter lost, no event loop: offset=%s error=%s", source.offset, reason)
            return
        self._loop.call_soon_threadsafe(self._send_item_dead_letter, source, reason)

    def _send_item_dead_letter(self, source: Source, reason: str) -> None:
        outgoing = dead_letter(source, reason, SERVICE)
        self.dead_lettered += 1
        self.outputs[DEAD_LETTERS.name].send_soon(
            key=outgoing.spec.key_of(outgoing.event), value=encode(outgoing.event), force=True
        )

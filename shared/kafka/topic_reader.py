"""Reads every partition of a (compacted) topic from the beginning, in a thread.

Every instance of a service needs the whole item catalogue, whatever partitions its
consumer group gave it, so item vectors are hydrated by assigning all partitions of
``item-embeddings`` without a group commit, and followed live afterwards.

A reader survives broker outages: any error closes its client, and after a back-off a
new client goes on from the positions already read. ``healthy()`` turns false when it
has been failing for ``UNHEALTHY_AFTER_S`` seconds, so the worker stops reporting ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from shared.config import Settings
from shared.events import Event, TopicSpec
from shared.exceptions import InvalidEventError
from shared.kafka.client import EARLIEST, LATEST, list_offsets, make_consumer
from shared.kafka.message import Incoming, Source, parse

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
"""Back-off between reconnections: doubles from the first to the max."""

_POLL_S = 0.1
"""Longest wait (seconds) of one poll while reading to the ends."""

END_QUERY_TIMEOUT_S = 10.0
"""Timeout of one request for the partitions' start or end offsets."""

UNHEALTHY_AFTER_S = 10.0
"""A reader failing for this long (seconds) is reported unhealthy."""


class TopicReader:
    """Follows a whole topic and hands each batch of valid events to ``on_events``.

    After the first read to the end it checks the partitions' high watermarks every
    ``follow_interval_s`` (default 0.2 s) and reads only what is new, so a new event
    is handed over within about that interval.

    ``on_invalid(source, reason)`` gets messages that do not parse; ``on_caught_up()``,
    when given, is called once, right after the first read to the end. Every callback
    runs on the reader's thread. ``sync`` reads the news at once, for a caller that must
    see everything already in the topic.
    """

    def __init__(
        self,
        settings: Settings,
        spec: TopicSpec,
        on_events: Callable[[list[Incoming[Event]]], None],
        on_invalid: Callable[[Source, str], None],
        *,
        name: str,
        follow_interval_s: float = 0.2,
        on_caught_up: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._spec = spec
        self._topic = settings.topic(spec.name)
        self._on_events = on_events
        self._on_invalid = on_invalid
        self._on_caught_up = on_caught_up
        self._name = name
        self._follow_interval_s = follow_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._caught_up = threading.Event()
        # Rounds of "read the high watermarks, read up to them": begun and finished.
        self._rounds = threading.Condition()
        self._rounds_begun = 0
        self._rounds_done = 0
        self._failing_since: float | None = None
        self._positions: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name=f"reader-{name}", daemon=True)

    @property
    def name(self) -> str:
        return self._name

    def start(self) -> TopicReader:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        """False once the reader thread has stopped (asked to, or crashed: see the log)."""
        return self._thread.is_alive()

    def healthy(self) -> bool:
        """True while the thread runs and has not been failing for ``UNHEALTHY_AFTER_S``."""
        since = self._failing_since
        return self.is_alive() and (since is None or time.monotonic() - since < UNHEALTHY_AFTER_S)

    def wait_caught_up(self, timeout_s: float | None = None) -> bool:
        """Block until everything that was in the topic at start has been read."""
        return self._caught_up.wait(timeout_s)

    def sync(self, timeout_s: float) -> bool:
        """Block until everything in the topic when called has been handed over (a read
        that starts after the call has reached the ends); False on time-out (the reader
        is failing or stopped)."""
        with self._rounds:
            target = self._rounds_begun + 1
            self._wake.set()
            return self._rounds.wait_for(lambda: self._rounds_done >= target, timeout_s)

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        while not self._stop.is_set():
            try:
                self._follow()
            except Exception as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                log.warning(
                    "reader=%s failed, reconnecting in %.1fs: %s: %s",
                    self._name,
                    delay,
                    type(exc).__name__,
                    exc,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                delay = RETRY_FIRST_S

    def _follow(self) -> None:
        """Follow the topic with a new client until asked to stop (or an error)."""
        consumer = make_consumer(
            self._settings,
            self._settings.group(f"{self._name}-reader"),
            **{"enable.partition.eof": True},
        )
        try:
            metadata = consumer.list_topics(self._topic, timeout=10)
            topic_meta = metadata.topics.get(self._topic)
            if topic_meta is None or topic_meta.error is not None:
                raise RuntimeError(f"topic {self._topic} is not available")
            positions = self._positions
            for partition in sorted(topic_meta.partitions):
                positions.setdefault(partition, OFFSET_BEGINNING)
            log.info("reader=%s topic=%s partitions=%d", self._name, self._topic, len(positions))
            while not self._stop.is_set():
                with self._rounds:
                    self._wake.clear()
                    self._rounds_begun += 1
                    this_round = self._rounds_begun
                behind = self._behind(consumer, positions)
                if behind:
                    self._read_to_end(consumer, behind, positions)
                with self._rounds:
                    self._rounds_done = this_round
                    self._rounds.notify_all()
                if self._failing_since is not None:
                    log.info("reader=%s following again", self._name)
                    self._failing_since = None
                if not self._caught_up.is_set() and not self._stop.is_set():
                    log.info("reader=%s caught up", self._name)
                    self._caught_up.set()
                    if self._on_caught_up is not None:
                        self._on_caught_up()
                self._wake.wait(self._follow_interval_s)
        finally:
            consumer.close()

    def _behind(self, consumer: Consumer, positions: dict[int, int]) -> list[int]:
        """The partitions with messages beyond ``positions`` (one request for the end
        offsets of all; one for the start offsets of those never read, which, when
        empty, are then positioned at their start, so that it is asked once)."""
        keys = [(self._topic, p) for p in positions]
        ends = list_offsets(consumer, keys, LATEST, END_QUERY_TIMEOUT_S)
        fresh = [(self._topic, p) for p, at in positions.items() if at == OFFSET_BEGINNING]
        starts = list_offsets(consumer, fresh, EARLIEST, END_QUERY_TIMEOUT_S)
        for key, start in starts.items():
            if start >= 0 and ends[key] == start:
                positions[key[1]] = start
        return [
            p
            for p, at in positions.items()
            if ends[(self._topic, p)] > starts.get((self._topic, p), at)
        ]

    def _read_to_end(
        self, consumer: Consumer, partitions: list[int], positions: dict[int, int]
    ) -> None:
        """Assign ``partitions`` at ``positions``, hand over everything up to their ends,
        advance ``positions``, and unassign: an assigned librdkafka consumer re-fetches
        at once after every empty answer, and some brokers answer empty fetches at once
        (a tight loop), so the reader holds partitions only while they have news."""
        consumer.assign([TopicPartition(self._topic, p, positions[p]) for p in partitions])
        pending = set(partitions)
        try:
            while pending and not self._stop.is_set():
                batch: list[Incoming[Event]] = []
                read: dict[int, int] = {}
                # poll returns at the first message (or end of partition), consume(n, 0)
                # then drains what is fetched: consume(n, t) alone would wait out t
                # whenever fewer than n messages are left.
                first = consumer.poll(_POLL_S)
                if first is None:
                    continue
                for message in [first, *consumer.consume(2000, timeout=0)]:
                    err = message.error()
                    partition = message.partition()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF or partition is None:
                            raise KafkaException(err)
                        pending.discard(partition)
                        end = message.offset()
                        if end is not None:
                            read[partition] = end
                        continue
                    offset = message.offset()
                    if partition is not None and offset is not None:
                        read[partition] = offset + 1
                    source = Source.of(message)
                    try:
                        batch.append(parse(self._spec, source, self._settings.max_message_bytes))
                    except InvalidEventError as exc:
                        self._on_invalid(source, str(exc))
                if batch:
                    self._hand_over(batch)
                positions.update(read)
        finally:
            consumer.unassign()

    def _hand_over(self, batch: list[Incoming[Event]]) -> None:
        try:
            self._on_events(batch)
        except Exception:
            # A bug of the callback's: retrying the same batch would fail the same way.
            first, last = batch[0].source, batch[-1].source
            log.exception(
                "reader=%s callback failed, events skipped topic=%s from=%s@%s to=%s@%s",
                self._name,
                self._topic,
                first.partition,
                first.offset,
                last.partition,
                last.offset,
            )

"""Fetch pacing for a consumer that has nothing to read.

A Kafka broker holds an empty Fetch until data arrives or ``fetch.wait.max.ms`` passes
(long poll), so an idle consumer costs nothing. Some Kafka-protocol brokers answer an
empty Fetch at once, among them the local noida-db (`docs/brokers.md`, check
``long_poll``), and librdkafka then sends the next one at once: an idle consumer
spins its fetcher thread at about a third of a core, and the broker with it.

``IdlePacer`` keeps that off on the client side, on any broker. After a poll that
returned nothing, it asks the broker for the end offsets of the consumer's partitions
(one ListOffsets request for all of them). If none has a message beyond the
consumer's position, their fetching is paused (no Fetch goes out) for a rest that
doubles from ``FIRST_REST_S`` up to ``max_rest_s``, and after each rest the end offsets
are asked again; fetching resumes as soon as a partition has news. A message that
arrives while a consumer rests waits at most ``max_rest_s``; while messages flow a
consumer never rests, so pacing costs no latency under load. Pausing only when the
broker says there is nothing to read matters: a paused partition drops what its
in-flight Fetch brings back, so pausing on a merely empty poll could drop a large
response again and again.

The same spin goes on while a batch is processed: librdkafka keeps fetching the
partitions the batch emptied. So after a poll that found messages, the partitions the
consumer has read to their end (its position at the end offset of the last Fetch, which
librdkafka caches) are paused until the next poll (``before_poll`` resumes them); those
still holding fetched messages keep them.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaException, TopicPartition

from shared.kafka.client import EARLIEST, LATEST, list_offsets

log = logging.getLogger(__name__)

FIRST_REST_S = 0.001
"""The first rest after an empty poll (seconds); each further empty poll doubles it."""

WATERMARK_TIMEOUT_S = 5.0
"""Timeout of one end-offset request."""


class IdlePacer:
    """Pauses a consumer's fetching while it has nothing to read (see the module
    docstring). Call ``before_poll`` before and ``after_poll`` after every poll, from the
    polling thread.

    Args:
        consumer: the consumer (its current assignment is paused and resumed).
        max_rest_s: the longest rest (seconds); 0 turns pacing off.
        stop: ends a rest early when set.
    """

    def __init__(
        self, consumer: Consumer, max_rest_s: float, stop: threading.Event | None = None
    ) -> None:
        self._consumer = consumer
        self._max_rest_s = max_rest_s
        self._stop = stop or threading.Event()
        self._rest_s = 0.0
        self._paused: list[TopicPartition] = []
        """Paused while resting: the whole assignment."""
        self._drained: list[TopicPartition] = []
        """Paused while a batch is processed: the partitions read to their end."""
        self._starts: dict[tuple[str, int], int] = {}
        """Where each partition not consumed yet (no position) starts: its committed
        offset, else its log start. Asked once per assignment, and again after news it
        suggested came to nothing (a log start only grows)."""
        self._assigned: frozenset[tuple[str, int]] = frozenset()
        self._suggested = False
        """Whether the last end-offset check found news."""

    @property
    def paused(self) -> frozenset[tuple[str, int]]:
        """The (topic, partition) pairs whose fetching is paused now."""
        return frozenset((p.topic, p.partition) for p in [*self._paused, *self._drained])

    @property
    def resting(self) -> bool:
        """Whether the consumer rests: its whole assignment paused after an empty poll."""
        return bool(self._paused)

    def before_poll(self) -> None:
        """Resume the partitions paused while the last batch was processed."""
        if self._drained:
            self._resume_some(self._drained)
            self._drained = []

    def after_poll(self, *, found: bool) -> None:
        """Record whether a poll found anything to do. When it did, pause the partitions
        read to their end while the batch is processed; when it did not and the broker
        has nothing beyond the consumer's positions, rest with fetching paused."""
        if self._max_rest_s <= 0:
            return
        if found:
            self._resume()
            self._rest_s = 0.0
            self._suggested = False
            self._pause_drained()
            return
        if self._suggested:  # the news it saw did not come: ask the starts again
            self._starts.clear()
        self._suggested = self._has_news()
        if self._suggested:
            self._resume()
            return
        self._rest_s = min(max(self._rest_s * 2, FIRST_REST_S), self._max_rest_s)
        self._pause()
        self._stop.wait(self._rest_s)

    def _pause(self) -> None:
        if self._paused:
            return
        partitions: list[TopicPartition] = self._consumer.assignment()
        if partitions:
            self._consumer.pause(partitions)
            self._paused = partitions

    def _resume(self) -> None:
        if self._paused:
            self._resume_some(self._paused)
            self._paused = []

    def _resume_some(self, partitions: list[TopicPartition]) -> None:
        assigned = {(p.topic, p.partition) for p in self._consumer.assignment()}
        # A rebalance while paused may have taken some away (a new assignment starts
        # unpaused).
        kept = [p for p in partitions if (p.topic, p.partition) in assigned]
        if kept:
            self._consumer.resume(kept)

    def _pause_drained(self) -> None:
        """Pause the partitions whose position is at the end offset the last Fetch saw
        (nothing fetched is waiting in them)."""
        drained = []
        for tp in self._consumer.position(self._consumer.assignment()):
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue  # no Fetch answered yet
            if tp.offset >= high or (tp.offset < 0 and high == low):
                drained.append(TopicPartition(tp.topic, tp.partition))
        if drained:
            self._consumer.pause(drained)
            self._drained = drained

    def _has_news(self) -> bool:
        """Whether a partition of the assignment has a message beyond the consumer's
        position (True when the broker cannot be asked: let the poll report why). One
        request asks for every partition's end offset."""
        try:
            assigned: list[TopicPartition] = self._consumer.assignment()
            keys = frozenset((tp.topic, tp.partition) for tp in assigned)
            if keys != self._assigned:  # a rebalance: committed offsets may have moved
                self._assigned = keys
                self._starts.clear()
            ends = list_offsets(
                self._consumer,
                [(tp.topic, tp.partition) for tp in assigned],
                LATEST,
                WATERMARK_TIMEOUT_S,
            )
            for tp in self._consumer.position(assigned):
                end = ends.get((tp.topic, tp.partition), -1)
                if end < 0:
                    return True
                if end > (tp.offset if tp.offset >= 0 else self._start(tp)):
                    return True
        except KafkaException as exc:
            log.debug("end offsets unknown (%s): fetching goes on", exc)
            return True
        return False

    def _start(self, tp: TopicPartition) -> int:
        """Where a partition not consumed yet starts: its committed offset, else the
        log start (``auto.offset.reset=earliest``)."""
        key = (tp.topic, tp.partition)
        if key not in self._starts:
            committed = self._consumer.committed(
                [TopicPartition(tp.topic, tp.partition)], timeout=WATERMARK_TIMEOUT_S
            )[0].offset
            self._starts[key] = (
                committed
                if committed >= 0
                else list_offsets(self._consumer, [key], EARLIEST, WATERMARK_TIMEOUT_S)[key]
            )
        return self._starts[key]

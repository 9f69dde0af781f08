"""Fetch pacing for a consumer that has nothing to read.

A Kafka broker holds an empty Fetch until data arrives or ``fetch.wait.max.ms`` passes
(long poll), so an idle consumer costs nothing. Some Kafka-protocol brokers answer an
empty Fetch at once, among them the local noida-db (`docs/brokers.md`, check
``long_poll``), and librdkafka then sends the next one at once: an idle consumer
spins its fetcher thread at about a third of a core, and the broker with it.

``IdlePacer`` keeps that off on the client side, on any broker. After a poll that
returned nothing, it asks the broker for the end offsets of the consumer's partitions
(``get_watermark_offsets``, one small request each). If none has a message beyond the
consumer's position, their fetching is paused (no Fetch goes out) for a rest that
doubles from ``FIRST_REST_S`` up to ``max_rest_s``, and after each rest the end offsets
are asked again; fetching resumes as soon as a partition has news. A message that
arrives while a consumer rests waits at most ``max_rest_s``; while messages flow a
consumer never rests, so pacing costs no latency under load. Pausing only when the
broker says there is nothing to read matters: a paused partition drops what its
in-flight Fetch brings back, so pausing on a merely empty poll could drop a large
response again and again.
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger(__name__)

FIRST_REST_S = 0.001
"""The first rest after an empty poll (seconds); each further empty poll doubles it."""

WATERMARK_TIMEOUT_S = 5.0
"""Timeout of one end-offset request."""


class IdlePacer:
    """Pauses a consumer's fetching while it has nothing to read (see the module
    docstring). Call ``after_poll`` after every poll, from the polling thread.

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
        self._committed: dict[tuple[str, int], int] = {}
        """Committed offsets of partitions not consumed yet (no position)."""

    @property
    def resting(self) -> bool:
        """Whether fetching is paused."""
        return bool(self._paused)

    def after_poll(self, *, found: bool) -> None:
        """Record whether a poll found anything to do; when it did not and the broker
        has nothing beyond the consumer's positions, rest with fetching paused."""
        if found or self._max_rest_s <= 0:
            self._resume()
            self._rest_s = 0.0
            self._committed.clear()
            return
        if self._has_news():
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
        if not self._paused:
            return
        partitions, self._paused = self._paused, []
        assigned = {(p.topic, p.partition) for p in self._consumer.assignment()}
        # A rebalance while paused may have taken some away (a new assignment starts
        # unpaused).
        kept = [p for p in partitions if (p.topic, p.partition) in assigned]
        if kept:
            self._consumer.resume(kept)

    def _has_news(self) -> bool:
        """Whether a partition of the assignment has a message beyond the consumer's
        position (True when the broker cannot be asked: let the poll report why)."""
        try:
            assigned: list[TopicPartition] = self._consumer.assignment()
            for tp in self._consumer.position(assigned):
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(tp.topic, tp.partition),
                    timeout=WATERMARK_TIMEOUT_S,
                    cached=False,
                )
                position = tp.offset if tp.offset >= 0 else self._start(tp, low)
                if high > position:
                    return True
        except KafkaException as exc:
            log.debug("end offsets unknown (%s): fetching goes on", exc)
            return True
        return False

    def _start(self, tp: TopicPartition, low: int) -> int:
        """Where a partition not consumed yet starts: its committed offset, else the
        log start (``auto.offset.reset=earliest``)."""
        key = (tp.topic, tp.partition)
        if key not in self._committed:
            committed = self._consumer.committed(
                [TopicPartition(tp.topic, tp.partition)], timeout=WATERMARK_TIMEOUT_S
            )[0].offset
            if committed < 0:
                return low
            self._committed[key] = committed
        return max(self._committed[key], low)

"""Per-key state of a stream processor, partitioned like its input and backed by a
compacted changelog topic.

An instance holds the keys of the input partitions it is assigned, and nothing else.
Each write goes to the changelog partition of the same number as the input partition
the key came from, so whoever owns an input partition restores exactly its keys from
the changelog partition of that number (``restore``), after a restart or a rebalance.

Writes are staged during a batch (``put``) and become the table's state only when the
batch's outputs and offsets are committed (``apply``); a failed batch drops them
(``discard``) and is processed again from the same state.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from shared.config import Settings
from shared.kafka.client import make_consumer

log = logging.getLogger(__name__)

END_QUERY_TIMEOUT_S = 10.0
"""Longest wait (seconds) for a partition's high watermark at the start of a restore."""

RESTORE_TIMEOUT_S = 120.0
"""Longest time (seconds) a restore may take before it fails (and the worker with it)."""


class ChangelogTable:
    """``key -> value`` bytes for the assigned partitions, restored from ``topic``."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self.topic = topic
        self._data: dict[int, dict[bytes, bytes]] = {}
        self._partition_of: dict[bytes, int] = {}
        self._staged: dict[bytes, tuple[int, bytes]] = {}
        self.generation = 0
        """Grows whenever partitions are restored or dropped."""

    # --- reads -------------------------------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, staged writes of the current batch included."""
        staged = self._staged.get(key)
        if staged is not None:
            return staged[1]
        partition = self._partition_of.get(key)
        return None if partition is None else self._data[partition].get(key)

    def partition_of(self, key: bytes) -> int | None:
        """The partition ``key`` is held under (None: not held here)."""
        staged = self._staged.get(key)
        return staged[0] if staged is not None else self._partition_of.get(key)

    def items(self) -> Iterator[tuple[int, bytes, bytes]]:
        """Every committed ``(partition, key, value)`` held."""
        for partition, rows in self._data.items():
            for key, value in rows.items():
                yield partition, key, value

    @property
    def partitions(self) -> frozenset[int]:
        return frozenset(self._data)

    def __len__(self) -> int:
        return len(self._partition_of)

    # --- writes of a batch -------------------------------------------------------
    def put(self, key: bytes, value: bytes, partition: int) -> None:
        """Stage ``value`` for ``key``, whose input partition is ``partition``."""
        if partition not in self._data:
            raise KeyError(f"partition {partition} of {self.topic} is not assigned here")
        self._staged[key] = (partition, value)

    def staged(self) -> list[tuple[bytes, bytes, int]]:
        """The batch's writes as ``(key, value, partition)``, for the changelog."""
        return [(key, value, partition) for key, (partition, value) in self._staged.items()]

    def apply(self) -> None:
        """Make the staged writes the table's state (after the batch committed)."""
        for key, (partition, value) in self._staged.items():
            rows = self._data.get(partition)
            if rows is not None:  # a revoked partition's late write is not ours any more
                rows[key] = value
                self._partition_of[key] = partition
        self._staged.clear()

    def discard(self) -> None:
        """Forget the staged writes (the batch failed and will be processed again)."""
        self._staged.clear()

    # --- assignment --------------------------------------------------------------
    def restore(self, partitions: Iterable[int], timeout_s: float = RESTORE_TIMEOUT_S) -> None:
        """Load the changelog ``partitions`` from their beginning to their end (committed
        records only); the latest value of each key wins.

        The end is the high watermark when the restore starts. A transaction still open
        on a partition (a previous owner's, not yet aborted by the broker) hides what
        follows it from a committed read, which then reports the end of the partition
        early: the restore waits for that transaction to end rather than take a
        partial state for the whole, which would silently forget the keys behind it.

        Raises:
            KafkaException: the changelog could not be read to its end within
                ``timeout_s`` seconds.
        """
        wanted = sorted(set(partitions))
        if not wanted:
            return
        started = time.monotonic()
        rows: dict[int, dict[bytes, bytes]] = {p: {} for p in wanted}
        consumer = make_consumer(
            self._settings,
            f"{self.topic}-restore-{uuid.uuid4().hex[:8]}",
            **{"enable.partition.eof": True},
        )
        try:
            ends = self._ends(wanted)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in wanted])
            pending = set(wanted)
            held: dict[int, int] = {}  # partitions whose committed read ended early: where
            while pending:
                if time.monotonic() - started > timeout_s:
                    raise KafkaException(
                        KafkaError(
                            KafkaError._TIMED_OUT,
                            f"restoring {self.topic} {wanted}: not at the end of "
                            + ", ".join(
                                f"partition {p} (read to {held.get(p)} of {ends[p][1]})"
                                for p in sorted(pending)
                            ),
                        )
                    )
                for message in consumer.consume(5000, timeout=0.2):
                    err = message.error()
                    partition = message.partition()
                    if partition is None:
                        continue
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            self._at_eof(consumer, partition, ends[partition], pending, held)
                        elif err.fatal() or not err.retriable():
                            raise KafkaException(err)
                        continue
                    key, value = message.key(), message.value()
                    if key is None:
                        continue
                    if value is None:
                        rows[partition].pop(key, None)  # a tombstone
                    else:
                        rows[partition][key] = value
        finally:
            consumer.close()
        for partition, data in rows.items():
            self._data[partition] = data
            for key in data:
                self._partition_of[key] = partition
        self.generation += 1
        log.info(
            "table=%s restored partitions=%s keys=%d s=%.2f",
            self.topic,
            wanted,
            sum(len(d) for d in rows.values()),
            time.monotonic() - started,
        )

    def _ends(self, partitions: list[int]) -> dict[int, tuple[int, int]]:
        """Each partition's low and high watermarks, transactions open or not."""
        probe = make_consumer(
            self._settings,
            f"{self.topic}-restore-end-{uuid.uuid4().hex[:8]}",
            **{"isolation.level": "read_uncommitted"},
        )
        try:
            return {
                p: probe.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=END_QUERY_TIMEOUT_S
                )
                for p in partitions
            }
        finally:
            probe.close()

    def _at_eof(
        self,
        consumer: Consumer,
        partition: int,
        ends: tuple[int, int],
        pending: set[int],
        held: dict[int, int],
    ) -> None:
        """Done with ``partition`` when the committed read reached its end, the high
        watermark of ``ends`` (low, high)."""
        start, end = ends
        position = consumer.position([TopicPartition(self.topic, partition)])[0].offset
        if position < 0:  # nothing read: the read ended where it began
            position = start
        if position >= end:
            pending.discard(partition)
            if partition in held:
                log.info(
                    "table=%s partition=%d restore went on past offset %d to %d",
                    self.topic,
                    partition,
                    held.pop(partition),
                    end,
                )
            return
        if partition not in held:
            log.warning(
                "table=%s partition=%d committed records end at offset %d of %d: an open "
                "transaction holds the rest back; waiting for it to end",
                self.topic,
                partition,
                position,
                end,
            )
        held[partition] = position

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget the keys of ``partitions`` (revoked or lost)."""
        for partition in partitions:
            for key in self._data.pop(partition, {}):
                self._partition_of.pop(key, None)
        self.generation += 1

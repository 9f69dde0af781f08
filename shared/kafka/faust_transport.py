"""faust's aiokafka transport, with "seek to committed" that also rewinds partitions
that have no committed offset.

faust (faust-streaming 0.15.3 on aiokafka 0.14.0) can lose the first records of a
consumer group that has no committed offsets. Right after assignment aiokafka's
background fetcher reads ahead on every assigned partition, the stream partitions
included; faust then pauses those for table recovery, and its ``getmany`` discards
records of partitions that are not active at that moment. The read-ahead has already
advanced aiokafka's position, and when recovery ends faust "seeks to the committed
offsets", which aiokafka does only for partitions with an offset greater than 0: a
partition with none stays where the read-ahead left it, past records that nobody
processed. Seen here as a user-profile worker that skipped every rating after its
consumer group was deleted (the restart test failed 4 times in about 72 runs).

``Transport`` fixes the one step: after aiokafka's ``seek_to_committed``, a partition
whose committed offset is missing (or 0) is sought to its beginning, which is what
``auto_offset_reset="earliest"`` means for a group that has not committed. Partitions
with a committed offset behave exactly as before. Use it only with that setting
(``install`` checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

from shared.exceptions import ConfigurationError


async def seek_to_committed_or_beginning(
    consumer: AIOKafkaConsumer,
) -> Mapping[TopicPartition, int | None]:
    """Seek every assigned partition to its committed offset, and those without one
    to their first offset. Returns the committed offsets (None: none), as aiokafka's
    ``seek_to_committed`` does."""
    committed: dict[TopicPartition, int | None] = await consumer.seek_to_committed()
    uncommitted = [tp for tp, offset in committed.items() if not offset]
    if uncommitted:
        await consumer.seek_to_beginning(*uncommitted)
    return committed


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await self.call_thread(seek_to_committed_or_beginning, self._ensure_consumer())
        # faust's type for aiokafka's answer (whose TopicPartition is a TP-like tuple, and
        # whose offsets may be None): faust's perform_seek handles both.
        return cast(Mapping[TP, int], committed)


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


# mode names a subclass's logger after its module when the class is made; log under
# faust's, as the classes they extend do (the "faust" loggers are kept at WARNING).
for _cls in (_ConsumerThread, _Consumer):
    _cls.logger = driver.logger


class Transport(driver.Transport):
    """faust's aiokafka transport with ``seek_to_committed_or_beginning``."""

    Consumer = _Consumer


def install(app: faust.App) -> None:
    """Make ``app`` consume through ``Transport``; call it before the app creates its
    consumer (before it starts)."""
    if app.conf.consumer_auto_offset_reset != "earliest":
        raise ConfigurationError(
            "faust_transport rewinds uncommitted partitions to the beginning: "
            f"consumer_auto_offset_reset must be 'earliest', not "
            f"{app.conf.consumer_auto_offset_reset!r}"
        )
    app.transport = Transport(app.conf.broker_consumer, app)

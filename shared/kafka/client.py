"""confluent-kafka client settings shared by every service and tool.

The code knows the broker only through ``bootstrap.servers``.
"""

from __future__ import annotations

import uuid
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from shared.config import Settings

# librdkafka's own ceiling. Some brokers ignore fetch size limits and answer a lagging
# consumer with one response of everything it has; this lets such a response through.
MAX_RECEIVE_BYTES = 2_147_483_647


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer that partitions keys like the Java client (and faust)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        # librdkafka's default (consistent_random) places keys differently from the Java
        # client and aiokafka; murmur2_random agrees with both, so keyed topics written by
        # confluent-kafka and by faust line up partition for partition.
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        "queue.buffering.max.messages": 500_000,
        "compression.type": settings.compression,
    }
    config.update(overrides)
    return config


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Consumer that commits by hand, after the work is done."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "receive.message.max.bytes": MAX_RECEIVE_BYTES,
        # Eager range assignment: partition p of co-partitioned topics goes to one
        # member, and every broker completes it. A cooperative rebalance needs a second
        # round after the revocation, which the local noida-db never starts: the
        # partitions taken from the first member when a second joined stayed unowned.
        "partition.assignment.strategy": "range",
        "isolation.level": "read_committed",
    }
    config.update(overrides)
    return config


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group_id, **overrides))


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})


LATEST, EARLIEST = -1, -2
"""The ListOffsets timestamps that ask for a partition's end and start offsets."""


def list_offsets(
    consumer: Consumer, partitions: list[tuple[str, int]], which: int, timeout_s: float
) -> dict[tuple[str, int], int]:
    """The end (``LATEST``) or start (``EARLIEST``) offset of each (topic, partition), in
    one ListOffsets request per broker: ``offsets_for_times`` with the timestamp -1 or -2,
    which the Kafka protocol defines as latest and earliest (the conformance check
    ``offsets`` holds a broker to it). ``get_watermark_offsets`` asks one partition per
    request. Raises ``KafkaException`` when the broker cannot say."""
    if not partitions:
        return {}
    asked = [TopicPartition(topic, partition, which) for topic, partition in partitions]
    offsets: dict[tuple[str, int], int] = {}
    for tp in consumer.offsets_for_times(asked, timeout=timeout_s):
        if tp.error is not None:
            raise KafkaException(tp.error)
        offsets[(tp.topic, tp.partition)] = tp.offset
    return offsets


def consumer_lag(
    settings: Settings,
    group: str,
    *,
    admin: AdminClient | None = None,
    consumer: Consumer | None = None,
    timeout_s: float = 5.0,
) -> int | None:
    """Total lag of a consumer group: high watermark minus committed offset, summed
    over every partition of every topic the group has committed on (a partition with
    no commit counts from its low watermark). None when the group has no commit."""
    admin = admin or make_admin(settings)
    owned = consumer is None
    consumer = consumer or make_consumer(settings, f"reelstream-status-{uuid.uuid4().hex}")
    try:
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s
        )
        result = futures[group].result()
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in result.topic_partitions or []
            if tp.offset >= 0
        }
        if not committed:
            return None
        lag = 0
        for topic in sorted({t for t, _ in committed}):
            metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
            for partition in metadata.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout_s
                )
                lag += max(0, high - committed.get((topic, partition), low))
        return lag
    finally:
        if owned:
            consumer.close()

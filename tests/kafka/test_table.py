"""ChangelogTable.restore on the real broker: it reads to the end of the changelog,
and a transaction left open by a previous owner makes it wait, never restore part."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import NewTopic

from shared.config import Settings
from shared.kafka.client import make_admin, make_producer
from shared.kafka.table import ChangelogTable
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration


def changelog(settings: Settings) -> str:
    topic = settings.changelog("test", "state")
    admin = make_admin(settings)  # kept alive until the topic exists
    admin.create_topics([NewTopic(topic, 1)])[topic].result(30)
    return topic


def transactional(settings: Settings, name: str) -> Producer:
    producer = make_producer(settings, **{"transactional.id": f"{settings.topic_prefix}{name}"})
    producer.init_transactions(30)
    return producer


def commit(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    producer.begin_transaction()
    producer.produce(topic, value, key, partition=0)
    producer.commit_transaction(30)


def test_restore_waits_for_an_open_transaction_instead_of_restoring_part(
    make_settings: SettingsFactory,
) -> None:
    """Regression: a restore ended at the first "end of partition" of its committed
    read, which an open transaction moves back to where it began; the keys committed
    after it were then forgotten, and their users started again from nothing (2,627
    ratings lost in a chaos run after a broker restart)."""
    settings = make_settings()
    topic = changelog(settings)
    owner = transactional(settings, "owner")
    commit(owner, topic, b"before", b"1")
    zombie = transactional(settings, "zombie")
    zombie.begin_transaction()
    zombie.produce(topic, b"never", b"open", partition=0)
    zombie.flush(10)
    commit(owner, topic, b"after", b"2")

    table = ChangelogTable(settings, topic)
    with pytest.raises(KafkaException, match="not at the end of partition 0"):
        table.restore([0], timeout_s=3)
    assert len(table) == 0  # nothing taken for the whole

    zombie.abort_transaction(30)
    table.restore([0], timeout_s=30)
    assert dict((k, v) for _, k, v in table.items()) == {b"before": b"1", b"after": b"2"}


def test_restore_reads_past_aborted_transactions_and_empty_partitions(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    topic = changelog(settings)
    table = ChangelogTable(settings, topic)
    table.restore([0], timeout_s=30)  # empty
    assert len(table) == 0

    owner = transactional(settings, "owner")
    owner.begin_transaction()
    owner.produce(topic, b"never", b"aborted", partition=0)
    owner.abort_transaction(30)
    table.restore([0], timeout_s=30)  # only an aborted transaction and its marker
    assert len(table) == 0

    commit(owner, topic, b"k", b"v")
    owner.begin_transaction()
    owner.produce(topic, b"never", b"k", partition=0)
    owner.abort_transaction(30)
    table.restore([0], timeout_s=30)  # ends with an aborted transaction
    assert dict((k, v) for _, k, v in table.items()) == {b"k": b"v"}

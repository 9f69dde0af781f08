"""faust's transport with "seek to committed" that rewinds uncommitted partitions, on
the real broker."""

from __future__ import annotations

import asyncio

import faust
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.user_profile.app import UserProfileApp
from shared.events import RATINGS
from shared.exceptions import ConfigurationError
from shared.kafka import faust_transport
from shared.kafka.client import make_producer
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration


def test_a_group_without_commits_is_read_again_from_the_beginning(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(topic_partitions=2)
    topic = settings.topic(RATINGS.name)
    producer = make_producer(settings)
    for partition in (0, 1):
        for k in range(3):
            producer.produce(topic, value=f"{partition}-{k}".encode(), partition=partition)
    assert producer.flush(10) == 0
    committed_tp, uncommitted_tp = TopicPartition(topic, 0), TopicPartition(topic, 1)

    async def run() -> tuple[dict[TopicPartition, int | None], int, int]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=f"{settings.topic_prefix}group",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            # Read ahead past every record, as aiokafka's fetcher does after assignment;
            # only partition 0 commits (to 2).
            seen = 0
            while seen < 6:
                batches = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 10)
                seen += sum(len(records) for records in batches.values())
            await consumer.commit({committed_tp: 2})
            committed = dict(await faust_transport.seek_to_committed_or_beginning(consumer))
            return (
                committed,
                await consumer.position(committed_tp),
                await consumer.position(uncommitted_tp),
            )
        finally:
            await consumer.stop()

    committed, committed_position, uncommitted_position = asyncio.run(run())
    assert committed == {committed_tp: 2, uncommitted_tp: None}
    assert committed_position == 2
    # aiokafka's own seek_to_committed leaves it at 3, past records nobody processed.
    assert uncommitted_position == 0


def test_the_user_profile_app_consumes_through_it(make_settings: SettingsFactory) -> None:
    app = UserProfileApp(make_settings()).app
    assert isinstance(app.transport, faust_transport.Transport)


def test_it_refuses_an_app_that_does_not_start_at_the_earliest_offset() -> None:
    app = faust.App("reelstream-test-latest", consumer_auto_offset_reset="latest")
    with pytest.raises(ConfigurationError, match="earliest"):
        faust_transport.install(app)

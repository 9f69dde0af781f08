"""The aiokafka empty-fetch backoff, on the real broker."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher

from shared.events import RATINGS
from shared.kafka import aiokafka_backoff
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw

pytestmark = pytest.mark.integration


def test_install_wraps_the_original_once() -> None:
    aiokafka_backoff.install(0.05)
    first = Fetcher._proc_fetch_request
    aiokafka_backoff.install(0.05)
    assert getattr(Fetcher, aiokafka_backoff._ORIGINAL) is not first
    assert Fetcher._proc_fetch_request.__qualname__.endswith("proc_fetch_request")


def test_records_still_arrive_promptly(make_settings: SettingsFactory) -> None:
    settings = make_settings(topic_partitions=1)
    aiokafka_backoff.install(0.05)

    async def run() -> float:
        consumer = AIOKafkaConsumer(
            settings.topic(RATINGS.name),
            bootstrap_servers=settings.kafka_bootstrap_servers,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=500)
            sent = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(
                None, produce_raw, settings, RATINGS, b"{}", b"1"
            )
            while not any((await consumer.getmany(timeout_ms=100)).values()):
                assert time.monotonic() - sent < 10, "record never arrived"
            return time.monotonic() - sent
        finally:
            await consumer.stop()

    asyncio.run(run())

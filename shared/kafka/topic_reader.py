"""Reads every partition of a (compacted) topic from the beginning, in a thread.

Every instance of a service needs the whole item catalogue, whatever partitions its
consumer group gave it, so item vectors are hydrated by assigning all partitions of
``item-embeddings`` without a group commit, and followed live afterwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from shared.config import Settings
from shared.events import Event, TopicSpec
from shared.exceptions import InvalidEventError
from shared.kafka.client import make_consumer
from shared.kafka.message import Incoming, Source, parse

log = logging.getLogger(__name__)


class TopicReader:
    """Follows a whole topic and hands each batch of valid events to ``on_events``.

    ``on_invalid(source, reason)`` gets messages that do not parse. Both callbacks run
    on the reader's thread.
    """

    def __init__(
        self,
        settings: Settings,
        spec: TopicSpec,
        on_events: Callable[[list[Incoming[Event]]], None],
        on_invalid: Callable[[Source, str], None],
        *,
        name: str,
    ) -> None:
        self._settings = settings
        self._spec = spec
        self._topic = settings.topic(spec.name)
        self._on_events = on_events
        self._on_invalid = on_invalid
        self._name = name
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reader-{name}", daemon=True)

    def start(self) -> TopicReader:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        """False once the reader thread has stopped (asked to, or crashed: see the log)."""
        return self._thread.is_alive()

    def wait_caught_up(self, timeout_s: float | None = None) -> bool:
        """Block until everything that was in the topic at start has been read."""
        return self._caught_up.wait(timeout_s)

    def _run(self) -> None:
        consumer = make_consumer(
            self._settings,
            self._settings.group(f"{self._name}-reader"),
            **{"enable.partition.eof": True},
        )
        try:
            metadata = consumer.list_topics(self._topic, timeout=30)
            topic_meta = metadata.topics.get(self._topic)
            if topic_meta is None or topic_meta.error is not None:
                raise RuntimeError(f"topic {self._topic} is not available")
            partitions = sorted(topic_meta.partitions)
            consumer.assign([TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in partitions])
            pending = set(partitions)
            log.info("reader=%s topic=%s partitions=%d", self._name, self._topic, len(partitions))
            while not self._stop.is_set():
                messages = consumer.consume(2000, timeout=0.05)
                batch: list[Incoming[Event]] = []
                for message in messages:
                    err = message.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(message.partition())
                        else:
                            log.warning("reader=%s error=%s", self._name, err)
                        continue
                    source = Source.of(message)
                    try:
                        batch.append(parse(self._spec, source, self._settings.max_message_bytes))
                    except InvalidEventError as exc:
                        self._on_invalid(source, str(exc))
                if batch:
                    self._on_events(batch)
                if not pending and not self._caught_up.is_set():
                    log.info("reader=%s caught up", self._name)
                    self._caught_up.set()
        except Exception:
            log.exception("reader=%s crashed", self._name)
            raise
        finally:
            consumer.close()

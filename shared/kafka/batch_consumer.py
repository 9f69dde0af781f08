"""The micro-batch consume → handle → publish → commit loop of the confluent-kafka services.

Delivery is at-least-once: a batch's outputs are flushed before its offsets are
committed. Invalid messages and events the handler cannot process go to
``dead-letters`` with the reason; the loop never stops on bad input.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from shared.config import Settings
from shared.events import DEAD_LETTERS, Event, TopicSpec
from shared.exceptions import InvalidEventError
from shared.kafka.client import make_consumer
from shared.kafka.message import (
    Incoming,
    Outgoing,
    Source,
    dead_letter,
    handle_isolating_failures,
    parse,
)
from shared.kafka.publisher import Publisher

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Incoming[Event]]], list[Outgoing]]
"""Takes the valid events of a micro-batch in offset order and returns what to publish
(dead letters for events it could not act on included)."""


class BatchConsumer:
    """Runs a batch handler over topics of the contract, in one consumer group."""

    def __init__(
        self,
        settings: Settings,
        service: str,
        sources: Sequence[TopicSpec],
        handler: BatchHandler,
        *,
        publisher: Publisher | None = None,
        ready_file: Path | None = None,
    ) -> None:
        self._settings = settings
        self._service = service
        self._specs = {settings.topic(spec.name): spec for spec in sources}
        self._handler = handler
        self._publisher = publisher or Publisher(settings)
        self._ready_file = ready_file
        self._stop = threading.Event()
        self.processed = 0
        self.dead_lettered = 0

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal=%s service=%s stopping", signal.Signals(signum).name, self._service)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self) -> None:
        consumer = make_consumer(self._settings, self._settings.group(self._service))
        consumer.subscribe(list(self._specs), on_assign=self._on_assign)
        log.info("service=%s subscribed topics=%s", self._service, ",".join(self._specs))
        last_report = time.monotonic()
        try:
            while not self._stop.is_set():
                messages = consumer.consume(
                    self._settings.batch_size, timeout=self._settings.batch_timeout_s
                )
                if messages:
                    self._process(consumer, [Source.of(m) for m in messages if self._ok(m)])
                if time.monotonic() - last_report > 30:
                    last_report = time.monotonic()
                    log.info(
                        "service=%s processed=%d dead_lettered=%d",
                        self._service,
                        self.processed,
                        self.dead_lettered,
                    )
        finally:
            self._publisher.flush()
            consumer.close()
            if self._ready_file is not None:
                self._ready_file.unlink(missing_ok=True)
            log.info("service=%s stopped processed=%d", self._service, self.processed)

    def process(self, sources: list[Source]) -> list[Outgoing]:
        """Parse and handle one micro-batch; returns outputs and dead letters."""
        valid: list[Incoming[Event]] = []
        out: list[Outgoing] = []
        for source in sources:
            try:
                valid.append(parse(self._specs[source.topic], source, self._max_bytes))
            except InvalidEventError as exc:
                out.append(self._reject(source, str(exc)))
        handled = handle_isolating_failures(self._handler, valid, self._service)
        self.dead_lettered += sum(o.spec is DEAD_LETTERS for o in handled)
        out.extend(handled)
        self.processed += len(sources)
        return out

    @property
    def _max_bytes(self) -> int:
        return self._settings.max_message_bytes

    def _process(self, consumer: Consumer, sources: list[Source]) -> None:
        if sources:
            self._publisher.publish_all(self.process(sources))
        self._publisher.flush()
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            # e.g. a rebalance took the partitions away; the new owner re-reads the batch.
            log.warning("service=%s commit failed error=%s", self._service, exc)

    def _reject(self, source: Source, reason: str) -> Outgoing:
        self.dead_lettered += 1
        return dead_letter(source, reason, self._service)

    def _ok(self, message: Message) -> bool:
        err = message.error()
        if err is None:
            return True
        if err.code() == KafkaError._PARTITION_EOF:
            return False
        if err.fatal():
            raise KafkaException(err)
        log.warning("service=%s consumer error=%s", self._service, err)
        return False

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info(
            "service=%s consuming partitions=%s",
            self._service,
            ",".join(f"{p.topic}[{p.partition}]" for p in partitions),
        )
        if self._ready_file is not None:
            self._ready_file.parent.mkdir(parents=True, exist_ok=True)
            self._ready_file.write_text(str(time.time()))

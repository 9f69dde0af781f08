"""The micro-batch loop every stream processor runs: consume → handle → publish → commit.

One loop and one error policy for every service:

- A message that is not a valid event, and an event the handler cannot act on, goes to
  ``dead-letters`` with the reason and its topic/partition/offset; the loop goes on.
- A batch's outputs, its table writes (``ChangelogTable``) and its input offsets are
  committed together: in one Kafka transaction when ``Settings.transactions`` is on
  (exactly once), else the outputs are flushed, then the changelog, then the offsets
  are committed (at least once: the handlers skip what their state says they applied,
  and the readers of their outputs skip copies).
- A failed send fails the batch: the transaction is aborted (or nothing is committed),
  the table's staged writes are dropped, and the same batch is processed again after a
  back-off. A dead letter that the broker refuses for good (e.g. too large) is logged
  with its source offset and left out of the retry: it never blocks the partition. A
  batch still failing after ``Settings.batch_retry_s`` stops the loop with the error,
  so that the process manager restarts the worker from the committed offsets.
- A loop that finishes no step (a poll, or one attempt at a batch) for
  ``Settings.stall_s`` seconds is stuck in a client call that ignored its timeout: a
  watchdog thread logs where and ends the process (exit code ``STALLED_EXIT``), and the
  process manager restarts it; an open transaction is aborted by the broker when the
  restarted worker claims its transactional id.
- While it runs, the worker's ready file is rewritten every ``READY_EVERY_S`` seconds
  as long as it has partitions and ``healthy()`` holds; it is removed otherwise.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from shared import metrics
from shared.config import Settings
from shared.events import DEAD_LETTERS, DeadLetter, Event, TopicSpec
from shared.exceptions import InvalidEventError
from shared.kafka.client import make_consumer, make_producer
from shared.kafka.message import (
    Incoming,
    Outgoing,
    Source,
    dead_letter,
    handle_isolating_failures,
    parse,
)
from shared.kafka.pacing import IdlePacer
from shared.kafka.publisher import DeliveryError, Publisher
from shared.kafka.table import ChangelogTable
from shared.lifecycle import stop_on_signals

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Incoming[Event]]], list[Outgoing]]
"""Takes the valid events of a micro-batch in offset order and returns what to publish
(dead letters for events it could not act on included)."""

READY_EVERY_S = 2.0
"""How often (seconds) a healthy worker rewrites its ready file."""

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
"""Back-off between attempts at a failed batch: doubles from the first to the max."""

LAG_EVERY_S = 1.0
"""How often (seconds) the consumer-lag gauges are updated."""

REPORT_EVERY_S = 30.0

STALLED_EXIT = 75
"""Exit code of a worker the watchdog ended (EX_TEMPFAIL: restart it)."""

Position = tuple[str, int]
"""A (topic, partition)."""

REFUSED_FOR_GOOD = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
    }
)
"""Delivery errors that no retry of the same message can mend."""


class BatchConsumer:
    """Runs a batch handler over topics of the contract, in one consumer group.

    Args:
        settings: broker, batch size and timeout, transactions, instance id, retries.
        service: the consumer group's service name and the dead letters' ``service``.
        sources: the topics consumed.
        handler: the pure batch function.
        ready_file: rewritten while healthy (see the module docstring).
        table: per-key state restored and committed with the batches (optional). With
            a table and several ``sources`` the topics are read co-partitioned: range
            assignment (``consumer_config``) gives partition p of each to the same
            instance, so the keys of partition p of every source share the table's
            partition p (the sources must have the same number of partitions and be
            keyed alike).
        has_work: when it returns True the handler is called even with no message
            (e.g. for ratings parked in ``table`` whose movie vector has arrived).
        healthy: extra health condition of the worker (e.g. its readers are alive).
        after_commit: called once a batch has committed (e.g. to keep in memory what
            the batch decided, which a retried batch must not see).
        ahead: sources whose messages go first: when a batch holds some of them and
            others, they are handled and committed as a batch of their own before the
            rest (e.g. a new movie, which need not wait while the ratings fetched with
            it are counted). A source's messages keep their order either way.
    """

    def __init__(
        self,
        settings: Settings,
        service: str,
        sources: Sequence[TopicSpec],
        handler: BatchHandler,
        *,
        publisher: Publisher | None = None,
        ready_file: Path | None = None,
        table: ChangelogTable | None = None,
        has_work: Callable[[], bool] | None = None,
        healthy: Callable[[], bool] | None = None,
        after_commit: Callable[[], None] | None = None,
        ahead: Sequence[TopicSpec] = (),
    ) -> None:
        self._settings = settings
        self._ahead = frozenset(settings.topic(spec.name) for spec in ahead)
        self._service = service
        self._specs = {settings.topic(spec.name): spec for spec in sources}
        self._handler = handler
        self._transactional = settings.transactions and publisher is None
        self._group = settings.group(service)
        if publisher is None:
            extra = {"transactional.id": self.transactional_id} if self._transactional else {}
            publisher = Publisher(settings, make_producer(settings, **extra))
        self._publisher = publisher
        self._ready_file = ready_file
        self._table = table
        self._has_work = has_work
        self._healthy = healthy
        self._after_commit = after_commit
        self._stop = threading.Event()
        self._assigned: set[Position] = set()
        self._unpublishable: set[tuple[str, int | None, int | None]] = set()
        self._last_ready = 0.0
        self._beat = time.monotonic()
        self._model_versions: set[str] = set()
        self._lag_measured = 0.0
        self.processed = 0
        self.dead_lettered = 0

    @property
    def assignment(self) -> frozenset[Position]:
        """The (topic, partition) pairs this instance holds now."""
        return frozenset(self._assigned)

    @property
    def transactional_id(self) -> str:
        """One per instance: with ``Settings.instance_id`` a restarted instance fences
        its previous incarnation; without one each process has its own (host and pid),
        so that instances started alike (``docker compose --scale``) never fence each
        other, and a zombie's commits are fenced by the group's generation instead."""
        instance = self._settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        return f"{self._group}-{instance}"

    def alive(self) -> bool:
        """Whether the loop has stepped within ``stall_s`` (the watchdog's rule)."""
        return time.monotonic() - self._beat <= self._settings.stall_s

    def ready(self) -> bool:
        """Whether it holds partitions and the worker is healthy (the ready file's rule)."""
        return bool(self._assigned) and (self._healthy is None or self._healthy())

    def stop(self) -> None:
        """Ask the loop to finish its batch, commit and return."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stop, self._service)

    # --- the loop ----------------------------------------------------------------
    def run(self) -> None:
        """Consume until ``stop``. Raises what cannot be retried (a fatal broker error,
        a batch that kept failing), after closing the consumer."""
        if self._transactional:
            self._publisher.producer.init_transactions(30)
        consumer = make_consumer(self._settings, self._group, **self._membership())
        consumer.subscribe(
            list(self._specs),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        log.info(
            "service=%s subscribed topics=%s transactions=%s",
            self._service,
            ",".join(self._specs),
            self._transactional,
        )
        pacer = IdlePacer(consumer, self._settings.idle_rest_s, self._stop)
        last_report = time.monotonic()
        watchdog = threading.Thread(
            target=self._watch, name=f"watchdog-{self._service}", daemon=True
        )
        watchdog.start()
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                pacer.before_poll()
                messages = self._poll(consumer)
                sources = [Source.of(m) for m in messages if self._ok(m)]
                work = self._has_work is not None and self._has_work()
                pacer.after_poll(found=bool(messages) or work)
                if sources or work:
                    for batch in self.batches(sources):
                        self._run_batch(consumer, batch)
                self._report_health()
                self._measure_lag(consumer)
                if time.monotonic() - last_report > REPORT_EVERY_S:
                    last_report = time.monotonic()
                    log.info(
                        "service=%s processed=%d dead_lettered=%d",
                        self._service,
                        self.processed,
                        self.dead_lettered,
                    )
        finally:
            self._not_ready()
            try:
                consumer.close()
            finally:
                if not self._transactional:
                    self._publisher.producer.flush(10)
            log.info("service=%s stopped processed=%d", self._service, self.processed)

    def _poll(self, consumer: Consumer) -> list[Message]:
        """The next micro-batch: waits up to ``batch_timeout_s`` for a first message,
        then takes what is already fetched, up to ``batch_size``. A batch is never held
        back to fill up: what arrives while one is processed makes the next one."""
        first = consumer.poll(self._settings.batch_timeout_s)
        if first is None:
            return []
        if self._settings.batch_size == 1:
            return [first]
        return [first, *consumer.consume(self._settings.batch_size - 1, timeout=0)]

    def batches(self, sources: list[Source]) -> list[list[Source]]:
        """What was fetched, as the batches to run: the sources ``ahead`` first, in a
        batch of their own, when there are others."""
        first = [s for s in sources if s.topic in self._ahead]
        if not first or len(first) == len(sources):
            return [sources]
        return [first, [s for s in sources if s.topic not in self._ahead]]

    def _watch(self) -> None:
        """End the process when the loop has not stepped for ``stall_s`` (see above)."""
        limit = self._settings.stall_s
        while not self._stop.wait(min(limit / 4, 5.0)):
            stalled = time.monotonic() - self._beat
            if stalled > limit:
                log.critical(
                    "service=%s loop stalled for %.0fs (limit %.0fs): exiting to be restarted; "
                    "thread stacks follow",
                    self._service,
                    stalled,
                    limit,
                )
                faulthandler.dump_traceback(file=sys.stderr)
                os._exit(STALLED_EXIT)

    def process(self, sources: list[Source]) -> list[Outgoing]:
        """Parse and handle one micro-batch; returns outputs and dead letters."""
        valid: list[Incoming[Event]] = []
        out: list[Outgoing] = []
        for source in sources:
            try:
                valid.append(parse(self._specs[source.topic], source, self._max_bytes))
            except InvalidEventError as exc:
                out.append(dead_letter(source, str(exc), self._service))
        if valid:
            out.extend(handle_isolating_failures(self._handler, valid, self._service))
        elif self._has_work is not None:
            try:
                out.extend(self._handler([]))
            except Exception:
                log.exception("service=%s work without input failed", self._service)
        return out

    @property
    def _max_bytes(self) -> int:
        return self._settings.max_message_bytes

    def _run_batch(self, consumer: Consumer, sources: list[Source]) -> None:
        """Process and commit one batch, retrying the whole of it until it commits."""
        started = time.monotonic()
        delay = RETRY_FIRST_S
        while True:
            self._beat = time.monotonic()
            try:
                out = [o for o in self.process(sources) if not self._is_unpublishable(o)]
                self._commit(consumer, sources, out)
                break
            except (DeliveryError, KafkaException) as exc:
                self._after_failure(exc)
                if time.monotonic() - started > self._settings.batch_retry_s:
                    log.error(
                        "service=%s batch failed for %.0fs, giving up: %s",
                        self._service,
                        time.monotonic() - started,
                        exc,
                    )
                    raise
                log.warning(
                    "service=%s batch failed, retrying in %.1fs: %s %s",
                    self._service,
                    delay,
                    exc,
                    _span(sources),
                )
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, RETRY_MAX_S)
        self.processed += len(sources)
        self.dead_lettered += sum(o.spec is DEAD_LETTERS for o in out)
        self._count(sources, out, time.monotonic() - started)

    def _count(self, sources: list[Source], out: list[Outgoing], seconds: float) -> None:
        """The batch in the service's metrics (``shared.metrics``)."""
        service, prefix = self._service, self._settings.topic_prefix
        for topic, n in Counter(s.topic.removeprefix(prefix) for s in sources).items():
            metrics.MESSAGES_IN.labels(service, topic).inc(n)
        for topic, n in Counter(o.spec.name for o in out).items():
            metrics.MESSAGES_OUT.labels(service, topic).inc(n)
        for o in out:
            if isinstance(o.event, DeadLetter):
                metrics.DEAD_LETTERS.labels(service, metrics.reason_of(o.event.error)).inc()
        for o in out:
            version = getattr(o.event, "model_version", None)
            if isinstance(version, str) and version not in self._model_versions:
                self._model_versions.add(version)
                metrics.MODEL_VERSION.labels(service, version).set(1)
        if sources:
            metrics.BATCH_MESSAGES.labels(service).observe(len(sources))
            metrics.BATCH_SECONDS.labels(service).observe(seconds)

    def _measure_lag(self, consumer: Consumer) -> None:
        """Each assigned partition's lag, from what the last Fetch said of its end (no
        request), at most once per ``LAG_EVERY_S``."""
        now = time.monotonic()
        if now - self._lag_measured < LAG_EVERY_S:
            return
        self._lag_measured = now
        prefix = self._settings.topic_prefix
        for tp in consumer.position(consumer.assignment()):
            _low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                metrics.CONSUMER_LAG.labels(
                    self._service, tp.topic.removeprefix(prefix), str(tp.partition)
                ).set(max(0, high - tp.offset))

    def _commit(self, consumer: Consumer, sources: list[Source], out: list[Outgoing]) -> None:
        offsets = _next_offsets(sources)
        producer = self._publisher.producer
        if self._transactional:
            producer.begin_transaction()
        self._publisher.publish_all(out)
        if self._table is not None and not self._transactional:
            # Effects before state: a crash between the two re-applies the batch, and
            # its outputs go out again (their readers skip copies), rather than leaving
            # state that says the batch was applied while its outputs were lost.
            self._publisher.flush()
        if self._table is not None:
            for key, value, partition in self._table.staged():
                self._publisher.produce(self._table.topic, key, value, partition)
        if self._transactional:
            producer.flush(30)
            self._publisher.raise_failures()
            if offsets:
                producer.send_offsets_to_transaction(
                    offsets, consumer.consumer_group_metadata(), 30
                )
            producer.commit_transaction(30)
        else:
            self._publisher.flush()
            if offsets:
                try:
                    consumer.commit(offsets=offsets, asynchronous=False)
                except KafkaException as exc:
                    # e.g. a rebalance took the partitions away: the outputs are out and
                    # the new owner re-reads the batch (the handlers are idempotent).
                    log.warning("service=%s commit failed error=%s", self._service, exc)
        if self._table is not None:
            self._table.apply()
        if self._after_commit is not None:
            self._after_commit()

    def _after_failure(self, exc: Exception) -> None:
        """Undo what a failed batch staged; remember its dead letters refused for good."""
        if self._table is not None:
            self._table.discard()
        failures = list(exc.failures) if isinstance(exc, DeliveryError) else []
        if self._transactional:
            error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(error, KafkaError) and error.fatal():
                raise exc
            try:
                self._publisher.producer.abort_transaction(30)
            except KafkaException as abort_exc:
                log.warning("service=%s abort failed: %s", self._service, abort_exc)
            try:
                self._publisher.raise_failures()  # the aborted messages' reports
            except DeliveryError as purged:
                failures += purged.failures
        for failure in failures:
            letter = None if failure.outgoing is None else failure.outgoing.event
            if not isinstance(letter, DeadLetter) or failure.error.code() not in REFUSED_FOR_GOOD:
                continue
            log.error(
                "service=%s dead letter unpublishable, skipped: topic=%s partition=%s "
                "offset=%s error=%s reason=%s",
                self._service,
                letter.source_topic,
                letter.partition,
                letter.offset,
                failure.error,
                letter.error[:200],
            )
            self._unpublishable.add((letter.source_topic, letter.partition, letter.offset))

    def _is_unpublishable(self, outgoing: Outgoing) -> bool:
        letter = outgoing.event
        return (
            isinstance(letter, DeadLetter)
            and (letter.source_topic, letter.partition, letter.offset) in self._unpublishable
        )

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

    # --- group membership --------------------------------------------------------
    def _membership(self) -> dict[str, object]:
        config: dict[str, object] = {
            "session.timeout.ms": self._settings.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self._settings.session_timeout_ms // 5),
        }
        if self._settings.instance_id is not None:
            config["group.instance.id"] = f"{self._service}-{self._settings.instance_id}"
        return config

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info(
            "service=%s assigned partitions=%s",
            self._service,
            ",".join(f"{p.topic}[{p.partition}]" for p in partitions),
        )
        if self._table is not None:
            self._table.restore({p.partition for p in partitions})
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        self._report_health(force=True)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info(
            "service=%s revoked partitions=%s",
            self._service,
            ",".join(f"{p.topic}[{p.partition}]" for p in partitions),
        )
        self._assigned -= {(p.topic, p.partition) for p in partitions}
        if self._table is not None:
            self._table.drop({p.partition for p in partitions})

    # --- readiness ---------------------------------------------------------------
    def _report_health(self, *, force: bool = False) -> None:
        if self._ready_file is None:
            return
        now = time.monotonic()
        if not force and now - self._last_ready < READY_EVERY_S:
            return
        self._last_ready = now
        if self._assigned and (self._healthy is None or self._healthy()):
            self._ready_file.parent.mkdir(parents=True, exist_ok=True)
            self._ready_file.write_text(str(time.time()))
        else:
            self._not_ready()

    def _not_ready(self) -> None:
        if self._ready_file is not None:
            self._ready_file.unlink(missing_ok=True)


def _next_offsets(sources: Sequence[Source]) -> list[TopicPartition]:
    """The offsets to commit after ``sources``: the last offset + 1 of each partition."""
    last: dict[Position, int] = {}
    for s in sources:
        if s.partition is not None and s.offset is not None and s.offset >= 0:
            key = (s.topic, s.partition)
            last[key] = max(last.get(key, -1), s.offset)
    return [TopicPartition(t, p, o + 1) for (t, p), o in sorted(last.items())]


def _span(sources: Sequence[Source]) -> str:
    """``topic[partition]@first-last`` of a batch, for logs."""
    spans: dict[Position, list[int]] = {}
    for s in sources:
        if s.partition is not None and s.offset is not None:
            spans.setdefault((s.topic, s.partition), []).append(s.offset)
    return " ".join(f"{t}[{p}]@{min(o)}-{max(o)}" for (t, p), o in sorted(spans.items()))

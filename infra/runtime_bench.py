"""Measure the two candidate stream runtimes on one processor: ``python -m infra.runtime_bench``.

The candidates:

- ``confluent``: the project's own loop, ``shared.kafka.batch_consumer.BatchConsumer``
  with a ``ChangelogTable`` (one Kafka transaction per micro-batch when
  ``guarantee=exactly_once``, i.e. ``Settings.transactions``);
- ``faust``: faust-streaming, an agent over ``ratings`` reading micro-batches with
  ``stream.take_events(n, within=s)``, a faust ``Table`` with its changelog, outputs sent
  with ``Topic.send`` (``processing_guarantee`` = the guarantee). Public settings only.

Both run the same pure handler, ``count_ratings``: per user a running count and rating
sum (``Totals``, 16 bytes in the table), and one ``UserTotalsUpdated`` JSON message per
user per input batch on ``runtime-bench-totals``, keyed by user id.

For each runtime and guarantee, on a fresh local broker (``infra.broker``, noida-db by
default; ``REELSTREAM_LOCAL_BROKER`` picks another) and a fresh topic prefix:

1. the first ``--limit`` MovieLens ratings are produced onto ``ratings`` (keyed by user
   id, as ``shared.replay`` does) before the processor starts;
2. the processor runs in its own process (``python -m infra.runtime_bench worker``);
3. throughput = ratings / (last input offset committed by the processor's group, as
   polled by this process every 50 ms - the first micro-batch handed to the handler);
   also ratings / (the outputs of the last rating's batch acknowledged by the broker -
   the first batch), which leaves out faust's periodic offset commit
   (``broker_commit_interval``, 2.8 s by default). The startup (process spawn to
   first batch) is reported apart;
4. once caught up (and ``SETTLE_S`` later), the processor's CPU (utime + stime of all
   its threads, from ``/proc/<pid>/stat``; psutil is not a dependency) over
   ``--idle-s`` seconds with no input, its busiest threads, the broker's CPU, and the
   processor's RSS (VmRSS) and peak RSS (VmHWM) from ``/proc/<pid>/status``;
5. the processor is stopped (SIGTERM), and its changelog and outputs are read back:
   every user's final count and sum must equal the ratings produced (each counted
   exactly once), and the outputs must account for every rating.

Prints a table; ``--json`` writes every number. ``--repeat R`` runs R rounds over the
runtimes and guarantees and adds the medians (for a shared, noisy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import NewTopic

from infra import broker as local_broker
from shared.config import Settings
from shared.data.movielens import MovieLens, load_movielens
from shared.events import RATINGS, Event, RatingSubmitted, TopicSpec, encode
from shared.kafka.client import make_admin, make_consumer
from shared.kafka.message import Incoming, Outgoing, Source, parse

log = logging.getLogger(__name__)

Runtime = Literal["confluent", "faust"]
Guarantee = Literal["exactly_once", "at_least_once"]
RUNTIMES: tuple[Runtime, ...] = ("confluent", "faust")
GUARANTEES: tuple[Guarantee, ...] = ("exactly_once", "at_least_once")

SERVICE = "runtime-bench"
"""The processor's service name: its consumer group (and faust app id) is
``Settings.group(SERVICE)``."""
TABLE = "user-totals"
"""Its table; the changelog is ``Settings.changelog(SERVICE, TABLE)``, which is also the
name faust gives it (``<app id>-<table>-changelog``)."""

DATASET = Path(__file__).resolve().parent.parent / "data" / "ml-100k"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_S = 0.05
"""How often the committed offsets are polled while the processor catches up."""
SETTLE_S = 3.0
"""Wait after catching up before the idle window (a last periodic commit, etc.)."""
STOP_TIMEOUT_S = 60.0


# --- the processor: the same pure handler for both runtimes ---------------------------


class UserTotalsUpdated(Event):
    """What the benchmark processor publishes: a user's totals after a batch."""

    user_id: str
    count: int
    rating_sum: float
    batch_ratings: int
    """Ratings of this user in the batch that produced this message."""


TOTALS = TopicSpec("runtime-bench-totals", UserTotalsUpdated, "user_id", compacted=False)

_TOTALS_FORMAT = struct.Struct(">qd")


@dataclass(frozen=True)
class Totals:
    """A user's state: ratings counted and their sum (16 bytes in the table)."""

    count: int = 0
    rating_sum: float = 0.0

    def to_bytes(self) -> bytes:
        return _TOTALS_FORMAT.pack(self.count, self.rating_sum)

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Totals:
        if raw is None:
            return cls()
        count, rating_sum = _TOTALS_FORMAT.unpack(raw)
        return cls(int(count), float(rating_sum))


def count_ratings(
    ratings: Sequence[RatingSubmitted], states: Mapping[str, bytes]
) -> tuple[dict[str, bytes], list[UserTotalsUpdated]]:
    """The handler: a micro-batch of ratings (offset order) and the stored state of its
    users in; each user's new state and one output per user of the batch out."""
    totals: dict[str, Totals] = {}
    in_batch: Counter[str] = Counter()
    for rating in ratings:
        user = rating.user_id
        before = totals.get(user) or Totals.from_bytes(states.get(user))
        totals[user] = Totals(before.count + 1, before.rating_sum + rating.rating)
        in_batch[user] += 1
    new_states = {user: t.to_bytes() for user, t in totals.items()}
    outputs = [
        UserTotalsUpdated(
            user_id=user, count=t.count, rating_sum=t.rating_sum, batch_ratings=in_batch[user]
        )
        for user, t in totals.items()
    ]
    return new_states, outputs


# --- the worker process ---------------------------------------------------------------


@dataclass
class WorkerOptions:
    runtime: Runtime
    guarantee: Guarantee
    bootstrap: str
    prefix: str
    partitions: int
    expect: int
    status: Path
    workdir: Path
    batch_size: int
    batch_timeout_s: float

    def settings(self) -> Settings:
        return Settings(
            kafka_bootstrap_servers=self.bootstrap,
            topic_prefix=self.prefix,
            topic_partitions=self.partitions,
            batch_size=self.batch_size,
            batch_timeout_s=self.batch_timeout_s,
            transactions=self.guarantee == "exactly_once",
            var_dir=self.workdir / "var",
        )

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "infra.runtime_bench",
            "worker",
            "--runtime",
            self.runtime,
            "--guarantee",
            self.guarantee,
            "--bootstrap",
            self.bootstrap,
            "--prefix",
            self.prefix,
            "--partitions",
            str(self.partitions),
            "--expect",
            str(self.expect),
            "--status",
            str(self.status),
            "--workdir",
            str(self.workdir),
            "--batch-size",
            str(self.batch_size),
            "--batch-timeout-s",
            str(self.batch_timeout_s),
        ]


class StatusFile:
    """What the worker tells the bench: when it started, when the first batch reached
    the handler, and when the outputs of the batch holding its ``expect``-th rating
    were acknowledged (confluent: committed)."""

    def __init__(self, path: Path, runtime: Runtime, expect: int) -> None:
        self._path = path
        self._expect = expect
        self.values: dict[str, Any] = {
            "runtime": runtime,
            "pid": os.getpid(),
            "started_at": time.time(),
            "first_batch_at": None,
            "outputs_done_at": None,
            "processed": 0,
            "batches": 0,
        }
        self._write()

    def first_batch(self) -> None:
        if self.values["first_batch_at"] is None:
            self.values["first_batch_at"] = time.time()
            self._write()

    def counted(self, n: int) -> bool:
        """Add a batch of ``n`` ratings; True when the expected total is reached with it."""
        self.values["processed"] += n
        self.values["batches"] += 1
        return self.values["outputs_done_at"] is None and self.values["processed"] >= self._expect

    def done(self) -> None:
        self.values["outputs_done_at"] = time.time()
        self._write()

    def _write(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.values))
        tmp.replace(self._path)


def run_confluent(options: WorkerOptions) -> int:
    """The processor on ``BatchConsumer`` + ``ChangelogTable``."""
    from shared.kafka.batch_consumer import BatchConsumer
    from shared.kafka.table import ChangelogTable

    settings = options.settings()
    status = StatusFile(options.status, "confluent", options.expect)
    table = ChangelogTable(settings, settings.changelog(SERVICE, TABLE))
    batch_n = 0

    def handle(batch: list[Incoming[Event]]) -> list[Outgoing]:
        nonlocal batch_n
        status.first_batch()
        ratings = [cast(RatingSubmitted, i.event) for i in batch]
        users = {r.user_id for r in ratings}
        states = {u: raw for u in users if (raw := table.get(u.encode())) is not None}
        new_states, outputs = count_ratings(ratings, states)
        partition_of = {r.user_id: i.source.partition for r, i in zip(ratings, batch, strict=True)}
        for user, value in new_states.items():
            partition = partition_of[user]
            assert partition is not None
            table.put(user.encode(), value, partition)
        batch_n = len(batch)
        return [Outgoing(TOTALS, o) for o in outputs]

    def after_commit() -> None:
        nonlocal batch_n
        if status.counted(batch_n):
            status.done()
        batch_n = 0

    consumer = BatchConsumer(
        settings, SERVICE, [RATINGS], handle, table=table, after_commit=after_commit
    )
    consumer.install_signal_handlers()
    consumer.run()
    return 0


def run_faust(options: WorkerOptions) -> int:
    """The processor as a faust agent with a faust ``Table``."""
    import faust

    settings = options.settings()
    status = StatusFile(options.status, "faust", options.expect)
    app = faust.App(
        settings.group(SERVICE),
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        store="memory://",
        datadir=str(options.workdir / "faust-data"),
        processing_guarantee=options.guarantee,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        web_enabled=False,
    )
    ratings_topic = app.topic(
        settings.topic(RATINGS.name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    totals_topic = app.topic(
        settings.topic(TOTALS.name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    # use_partitioner: a batch holds events of several partitions, while faust writes a
    # key's changelog record to the partition of the stream's *current* event unless
    # the producer partitions it. The producer (murmur2 on the key, as the ratings'
    # producer) then puts each user on the changelog partition of its ratings partition.
    table = app.Table(
        TABLE,
        partitions=settings.topic_partitions,
        key_type=bytes,  # bytes: faust's "raw" serializer, for keys and values
        value_type=bytes,
        use_partitioner=True,
    )
    max_bytes = settings.max_message_bytes

    async def process(stream: Any) -> None:
        async for events in stream.take_events(
            settings.batch_size, within=settings.batch_timeout_s
        ):
            status.first_batch()
            ratings = [
                cast(RatingSubmitted, parse(RATINGS, _source(e.message), max_bytes).event)
                for e in events
            ]
            users = {r.user_id for r in ratings}
            states = {u: raw for u in users if (raw := table.get(u.encode())) is not None}
            new_states, outputs = count_ratings(ratings, states)
            for user, value in new_states.items():
                table[user.encode()] = value
            sent = [
                await totals_topic.send(key=o.user_id.encode(), value=encode(o)) for o in outputs
            ]
            if status.counted(len(events)):
                await asyncio.gather(*sent)
                status.done()

    app.agent(ratings_topic, name=f"{SERVICE}-agent")(process)
    worker = faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def _source(message: Any) -> Source:
    """A faust message as the project's ``Source`` (so ``parse`` validates it as the
    confluent loop does)."""
    timestamp = message.timestamp
    return Source(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=None if timestamp is None else int(timestamp * 1000),
    )


# --- measuring ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is fields[0], utime fields[11], stime fields[12].
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[tuple[int, str], float]:
    """utime + stime of each thread of ``pid`` (seconds), by (thread id, name): the
    name is ``main`` for the main thread, else the kernel's (librdkafka names its
    threads ``rdk:...``; Python threads are all ``python``)."""
    out: dict[tuple[int, str], float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            with open(task / "stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        out[(int(task.name), name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


@dataclass
class Verification:
    """The processor's final state and outputs against the ratings produced."""

    users_expected: int = 0
    users_in_state: int = 0
    users_wrong: int = 0
    """Users whose final count or sum differs from theirs in the ratings produced."""
    users_missing: int = 0
    users_extra: int = 0
    keys_on_several_partitions: int = 0
    """Users whose changelog records are on more than one partition (misplaced writes)."""
    ratings_counted: int = 0
    """Sum of the final counts: each rating counted once gives the ratings produced."""
    outputs: int = 0
    output_ratings: int = 0
    """Sum of ``batch_ratings`` over every output (equal to the ratings when each was
    reported once)."""
    outputs_final_ok: bool = False
    """Each user's highest ``count`` on the output topic is its expected count."""
    examples: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return (
            self.users_wrong == 0
            and self.users_missing == 0
            and self.users_extra == 0
            and self.keys_on_several_partitions == 0
        )


@dataclass
class RunResult:
    runtime: Runtime
    guarantee: Guarantee
    ratings: int
    partitions: int
    batch_size: int
    ok: bool = False
    error: str | None = None
    startup_s: float | None = None
    """Worker process spawned -> first micro-batch handed to the handler."""
    process_s: float | None = None
    """First micro-batch -> every input offset committed (polled)."""
    events_per_s: float | None = None
    outputs_done_s: float | None = None
    """First micro-batch -> the outputs of the last rating's batch acknowledged (faust:
    its offsets are committed later, every ``broker_commit_interval``)."""
    outputs_events_per_s: float | None = None
    """Ratings / ``outputs_done_s``."""
    batches: int | None = None
    """Micro-batches the handler saw."""
    cpu_s_to_caught_up: float | None = None
    """Processor CPU seconds from spawn to caught up (startup included)."""
    idle_s: float | None = None
    idle_cpu_pct: float | None = None
    """Processor CPU over the idle window, % of one core."""
    idle_cpu_pct_by_thread: list[tuple[str, float]] = field(default_factory=list)
    """The processor's busiest threads over the idle window: (name, % of one core)."""
    broker_idle_cpu_pct: float | None = None
    rss_mib: float | None = None
    peak_rss_mib: float | None = None
    loadavg_1m_before: float | None = None
    """The machine's 1-minute load average when the run started (2 cores: above 2, the
    run shared its CPU with other work)."""
    exit_code: int | None = None
    stop_s: float | None = None
    verification: Verification | None = None
    log_tail: str = ""


def expected_totals(ratings: Sequence[RatingSubmitted]) -> dict[str, Totals]:
    totals: dict[str, Totals] = {}
    for r in ratings:
        t = totals.get(r.user_id, Totals())
        totals[r.user_id] = Totals(t.count + 1, t.rating_sum + r.rating)
    return totals


def read_topic(
    settings: Settings, topic: str, timeout_s: float = 60.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every committed record of ``topic`` as ``(partition, key, value)``, in order."""
    consumer = make_consumer(
        settings,
        f"{settings.topic_prefix}runtime-bench-reader-{uuid.uuid4().hex[:8]}",
        **{"enable.partition.eof": True},
    )
    records: list[tuple[int, bytes | None, bytes | None]] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise KafkaException(meta.error)
        pending = set(meta.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to the end")
            for message in consumer.consume(5000, timeout=0.2):
                err = message.error()
                partition = message.partition()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and partition is not None:
                        pending.discard(partition)
                    elif err.fatal() or not err.retriable():
                        raise KafkaException(err)
                    continue
                records.append((partition or 0, message.key(), message.value()))
    finally:
        consumer.close()
    return records


def verify(settings: Settings, ratings: Sequence[RatingSubmitted]) -> Verification:
    """Read the changelog (latest value per key) and the outputs back and compare."""
    expected = expected_totals(ratings)
    result = Verification(users_expected=len(expected))
    latest: dict[bytes, bytes | None] = {}
    partitions_of: dict[bytes, set[int]] = {}
    for partition, key, value in read_topic(settings, settings.changelog(SERVICE, TABLE)):
        if key is None:
            continue
        partitions_of.setdefault(key, set()).add(partition)
        latest[key] = value
    result.keys_on_several_partitions = sum(len(p) > 1 for p in partitions_of.values())
    state = {k.decode(): Totals.from_bytes(v) for k, v in latest.items() if v is not None}
    result.users_in_state = len(state)
    result.ratings_counted = sum(t.count for t in state.values())
    for user, want in expected.items():
        got = state.get(user)
        if got is None:
            result.users_missing += 1
        elif got != want:
            result.users_wrong += 1
            if len(result.examples) < 5:
                result.examples.append(f"user {user}: got {got}, expected {want}")
    result.users_extra = len(set(state) - set(expected))
    highest: dict[str, int] = {}
    for _, _, value in read_topic(settings, settings.topic(TOTALS.name)):
        if value is None:
            continue
        out = orjson.loads(value)
        result.outputs += 1
        result.output_ratings += int(out["batch_ratings"])
        highest[out["user_id"]] = max(highest.get(out["user_id"], 0), int(out["count"]))
    result.outputs_final_ok = highest == {u: t.count for u, t in expected.items()}
    return result


def committed_total(consumer: Consumer, partitions: list[TopicPartition]) -> int:
    """Sum of the group's committed offsets over ``partitions`` (none counts 0)."""
    got = consumer.committed(partitions, timeout=5)
    return sum(max(tp.offset, 0) for tp in got)


def create_topics(settings: Settings, runtime: Runtime) -> None:
    """``ratings`` and the outputs; the changelog too for the confluent loop (faust
    declares its own, compacted, with the table's partitions)."""
    n = settings.topic_partitions
    new = [
        NewTopic(settings.topic(RATINGS.name), n, 1, config={"cleanup.policy": "delete"}),
        NewTopic(settings.topic(TOTALS.name), n, 1, config={"cleanup.policy": "delete"}),
    ]
    if runtime == "confluent":
        new.append(
            NewTopic(settings.changelog(SERVICE, TABLE), n, 1, config={"cleanup.policy": "compact"})
        )
    admin = make_admin(settings)  # kept alive until every future has its answer
    for future in admin.create_topics(new, request_timeout=30).values():
        future.result()


def preload(settings: Settings, dataset: MovieLens, limit: int) -> None:
    """The first ``limit`` ratings onto ``ratings``, as ``make replay`` produces them."""
    from shared.replay import replay

    replay(settings, dataset, limit=limit, movies=False, progress=False)


@contextmanager
def fresh_broker(bootstrap: str | None, workdir: Path) -> Iterator[tuple[str, int | None]]:
    """``bootstrap`` as is, or a new local broker for the run: (address, its pid)."""
    if bootstrap is not None:
        yield bootstrap, None
        return
    data_dir = workdir / "broker"
    address = local_broker.start(local_broker.free_port(), data_dir)
    try:
        yield address, local_broker.pid(data_dir)
    finally:
        local_broker.stop(data_dir)


def run_one(
    runtime: Runtime,
    guarantee: Guarantee,
    dataset: MovieLens,
    limit: int,
    *,
    bootstrap: str | None = None,
    idle_s: float = 30.0,
    partitions: int = 4,
    batch_size: int = 500,
    batch_timeout_s: float = 0.02,
    timeout_s: float = 300.0,
    workdir: Path | None = None,
) -> RunResult:
    """One processor over ``limit`` ratings on a fresh broker (unless ``bootstrap``)."""
    ratings = dataset.ratings[:limit]
    result = RunResult(runtime, guarantee, len(ratings), partitions, batch_size)
    result.loadavg_1m_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix=f"runtime-bench-{runtime}-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            with fresh_broker(bootstrap, work) as (address, broker_pid):
                _measure(
                    result, dataset, address, broker_pid, work, idle_s, batch_timeout_s, timeout_s
                )
        except Exception as exc:  # the broker or the topics: this run failed, not the bench
            result.error = result.error or f"{type(exc).__name__}: {exc}"
            log.exception("runtime=%s guarantee=%s failed", runtime, guarantee)
    return result


def _measure(
    result: RunResult,
    dataset: MovieLens,
    bootstrap: str,
    broker_pid: int | None,
    work: Path,
    idle_s: float,
    batch_timeout_s: float,
    timeout_s: float,
) -> None:
    options = WorkerOptions(
        runtime=result.runtime,
        guarantee=result.guarantee,
        bootstrap=bootstrap,
        prefix=f"rb{uuid.uuid4().hex[:8]}.",
        partitions=result.partitions,
        expect=result.ratings,
        status=work / "status.json",
        workdir=work,
        batch_size=result.batch_size,
        batch_timeout_s=batch_timeout_s,
    )
    settings = options.settings()
    create_topics(settings, result.runtime)
    preload(settings, dataset, result.ratings)
    ratings_topic = settings.topic(RATINGS.name)
    poller = make_consumer(settings, settings.group(SERVICE))
    log_path = work / "worker.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        watermarks = [
            poller.get_watermark_offsets(TopicPartition(ratings_topic, p), timeout=10)
            for p in range(result.partitions)
        ]
        # Some brokers report a high watermark short of the last record (docs/brokers.md).
        total = max(sum(high for _, high in watermarks), result.ratings)
        tps = [TopicPartition(ratings_topic, p) for p in range(result.partitions)]
        with open(log_path, "wb") as logfile:
            spawned = time.time()
            process = subprocess.Popen(
                options.argv(),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        deadline = time.monotonic() + timeout_s
        committed = 0
        while committed < total:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{committed} of {total} ratings committed after {timeout_s:.0f}s"
                )
            time.sleep(POLL_S)
            committed = committed_total(poller, tps)
        caught_up = time.time()
        result.cpu_s_to_caught_up = cpu_seconds(process.pid)
        status = _read_status(options.status, wait_s=10.0)
        first = status.get("first_batch_at")
        if first is not None:
            result.startup_s = first - spawned
            result.process_s = caught_up - first
            result.events_per_s = result.ratings / result.process_s
            done = status.get("outputs_done_at")
            if done is not None:
                result.outputs_done_s = done - first
                result.outputs_events_per_s = result.ratings / max(done - first, 1e-6)
            result.batches = status.get("batches")
        if idle_s > 0:
            time.sleep(SETTLE_S)
            worker_before = cpu_seconds(process.pid)
            threads_before = thread_cpu_seconds(process.pid)
            broker_before = cpu_seconds(broker_pid) if broker_pid else None
            started = time.monotonic()
            time.sleep(idle_s)
            wall = time.monotonic() - started
            result.idle_s = wall
            result.idle_cpu_pct = 100 * (cpu_seconds(process.pid) - worker_before) / wall
            threads_after = thread_cpu_seconds(process.pid)
            by_thread = [
                (name, 100 * (cpu - threads_before.get((tid, name), 0.0)) / wall)
                for (tid, name), cpu in threads_after.items()
            ]
            by_thread.sort(key=lambda pair: pair[1], reverse=True)
            result.idle_cpu_pct_by_thread = [
                (name, round(pct, 1)) for name, pct in by_thread[:4] if pct >= 0.5
            ]
            if broker_pid and broker_before is not None:
                result.broker_idle_cpu_pct = 100 * (cpu_seconds(broker_pid) - broker_before) / wall
        result.rss_mib, result.peak_rss_mib = memory_mib(process.pid)
        result.stop_s, result.exit_code = _stop(process)
        process = None
        result.verification = verify(settings, dataset.ratings[: result.ratings])
        result.ok = result.verification.exact and result.verification.outputs_final_ok
        if not result.ok:
            result.error = (
                f"final state or outputs differ from the ratings produced: {result.verification}"
            )
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log.exception("runtime=%s guarantee=%s failed", result.runtime, result.guarantee)
    finally:
        if process is not None:
            result.stop_s, result.exit_code = _stop(process)
        poller.close()
        with suppress(OSError):
            result.log_tail = log_path.read_text(errors="replace")[-4000:]


def _read_status(path: Path, wait_s: float) -> dict[str, Any]:
    """The worker's status; waits up to ``wait_s`` for its ``outputs_done_at``."""
    deadline = time.monotonic() + wait_s
    status: dict[str, Any] = {}
    while True:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            status = {}
        if status.get("outputs_done_at") is not None or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> tuple[float, int]:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; (seconds to exit, exit code)."""
    started = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return time.monotonic() - started, int(process.returncode)


# --- report ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import aiokafka
    import confluent_kafka
    import faust

    try:
        noida = version("noida-db")
    except Exception:
        noida = None
    return {
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "faust_streaming": faust.__version__,
        "aiokafka": aiokafka.__version__,
        "broker": local_broker.kind_setting(),
        "noida_db": noida,
    }


_MEDIAN_FIELDS = (
    "startup_s",
    "process_s",
    "events_per_s",
    "outputs_done_s",
    "outputs_events_per_s",
    "batches",
    "cpu_s_to_caught_up",
    "idle_s",
    "idle_cpu_pct",
    "broker_idle_cpu_pct",
    "rss_mib",
    "peak_rss_mib",
    "loadavg_1m_before",
)


def summary(results: Sequence[RunResult]) -> list[RunResult]:
    """Per runtime and guarantee, the median of each number over the runs that
    succeeded (``ok`` only when all of them did)."""
    kinds: dict[tuple[Runtime, Guarantee], list[RunResult]] = {}
    for r in results:
        kinds.setdefault((r.runtime, r.guarantee), []).append(r)
    out = []
    for (runtime, guarantee), runs in kinds.items():
        first = runs[0]
        median = RunResult(runtime, guarantee, first.ratings, first.partitions, first.batch_size)
        good = [r for r in runs if r.ok]
        median.ok = len(good) == len(runs)
        if not median.ok:
            median.error = f"{len(runs) - len(good)} of {len(runs)} runs failed"
        for name in _MEDIAN_FIELDS:
            values = [v for r in good if (v := getattr(r, name)) is not None]
            if values:
                setattr(median, name, statistics.median(values))
        median.verification = Verification() if good else None
        out.append(median)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: Sequence[RunResult]) -> str:
    header = (
        f"{'runtime':10s} {'guarantee':14s} {'ratings':>7s} {'ev/s':>8s} {'proc s':>7s} "
        f"{'out ev/s':>8s} {'batches':>7s} "
        f"{'start s':>7s} {'idle cpu%':>9s} {'broker%':>8s} {'rss MiB':>8s} {'peak':>7s} "
        f"{'exact':>5s}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        exact = "-" if r.verification is None else ("yes" if r.ok else "NO")
        lines.append(
            f"{r.runtime:10s} {r.guarantee:14s} {r.ratings:7d} {_fmt(r.events_per_s, '8.0f')} "
            f"{_fmt(r.process_s, '7.2f')} {_fmt(r.outputs_events_per_s, '8.0f')} "
            f"{r.batches if r.batches is not None else '-':>7} {_fmt(r.startup_s, '7.2f')} "
            f"{_fmt(r.idle_cpu_pct, '9.1f')} {_fmt(r.broker_idle_cpu_pct, '8.1f')} "
            f"{_fmt(r.rss_mib, '8.1f')} {_fmt(r.peak_rss_mib, '7.1f')} {exact:>5s}"
        )
        if r.error:
            lines.append(f"    error: {r.error}")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.runtime_bench worker")
    parser.add_argument("--runtime", choices=RUNTIMES, required=True)
    parser.add_argument("--guarantee", choices=GUARANTEES, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-timeout-s", type=float, default=0.02)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    options = WorkerOptions(
        runtime=args.runtime,
        guarantee=args.guarantee,
        bootstrap=args.bootstrap,
        prefix=args.prefix,
        partitions=args.partitions,
        expect=args.expect,
        status=args.status,
        workdir=args.workdir,
        batch_size=args.batch_size,
        batch_timeout_s=args.batch_timeout_s,
    )
    if options.runtime == "confluent":
        return run_confluent(options)
    return run_faust(options)


def _csv(kind: tuple[str, ...]) -> Any:
    def parse_list(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in kind]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(kind)}")
        return values

    return parse_list


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m infra.runtime_bench",
        description="Throughput, idle CPU and RSS of the two stream runtimes.",
    )
    parser.add_argument("--limit", type=int, default=5000, help="ratings (default 5000)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--runtimes", type=_csv(RUNTIMES), default=list(RUNTIMES))
    parser.add_argument("--guarantees", type=_csv(GUARANTEES), default=list(GUARANTEES))
    parser.add_argument("--idle-s", type=float, default=30.0, help="idle CPU window")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-timeout-s", type=float, default=0.02)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per run, to catch up")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over every runtime and guarantee (a noisy machine: medians per kind)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    dataset = load_movielens(args.dataset)
    about = machine()
    results: list[RunResult] = []
    for round_no in range(1, args.repeat + 1):
        for runtime in args.runtimes:
            for guarantee in args.guarantees:
                print(
                    f"round {round_no}/{args.repeat}: {runtime} {guarantee} "
                    f"on {args.limit} ratings...",
                    file=sys.stderr,
                )
                results.append(
                    run_one(
                        runtime,
                        guarantee,
                        dataset,
                        args.limit,
                        idle_s=args.idle_s,
                        partitions=args.partitions,
                        batch_size=args.batch_size,
                        batch_timeout_s=args.batch_timeout_s,
                        timeout_s=args.timeout_s,
                    )
                )
    about["loadavg_after"] = os.getloadavg()
    print(table(results))
    medians = summary(results)
    if args.repeat > 1:
        print("\nmedians per runtime and guarantee:")
        print(table(medians))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "command": "python -m infra.runtime_bench " + " ".join(argv),
            "machine": about,
            "idle_window_s": args.idle_s,
            "medians": [
                {k: v for k, v in asdict(r).items() if k not in ("verification", "log_tail")}
                for r in medians
            ],
            "runs": [
                {**asdict(r), "verification_exact": r.verification and r.verification.exact}
                for r in results
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

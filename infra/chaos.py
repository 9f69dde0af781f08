"""Fault injection: ``make chaos`` (LIMIT=, RATE=).

1. Undisturbed run: a fresh stack (own var dir, topic prefix and supervised broker),
   the movies, then the first LIMIT ML-100K ratings at RATE/s; once user-profile and
   recommender have caught up (lag 0), snapshot every user's latest ``user-profiles``
   record, the ``cause_event_id``s on ``recommendations`` and ``dead-letters``.
2. Faulted run: the same on another fresh stack while, at seeded random moments,
   user-profile, recommender and item-embedding are ``kill -9``ed (supervisord restarts
   them) and the broker is stopped and started again. The ratings producer survives the
   broker restart: a fatal error of the idempotent producer is caught, and only the
   ratings not yet acknowledged are sent again by a new producer.
3. Compare: vectors within 1e-5 of the undisturbed run, n_ratings equal to the ratings
   published per user (lost / applied twice), every user's last rating has its list, no
   valid event dead-lettered. Recovery times (kill → ready again). Exit 1 on a failure.
4. Separately: ``kill -9`` of the broker server mid-replay (broker only, no services):
   ratings acknowledged to the producer but missing from the topic afterwards.

Writes ``reports/chaos.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infra import broker, stack
from shared.config import Settings
from shared.data.movielens import MovieLens, load_movielens
from shared.events import (
    DEAD_LETTERS,
    NEWCOMERS_USER_ID,
    RATINGS,
    RECOMMENDATIONS,
    USER_PROFILES,
    RatingSubmitted,
)
from shared.events.record import decode_vector
from shared.events.serde import encode
from shared.events.topic import BY_NAME
from shared.kafka.client import make_consumer, make_producer
from shared.replay import Pacer, replay, wait_until_embedded

Output = Callable[[str], None]
TOLERANCE = 1e-5
KILLABLE = ("user-profile", "recommender", "item-embedding")
BROKER_DOWN_S = 3.0
RECOVERY_LIMIT_S = 300.0
"""How long a fault waits for its recovery before it is reported as none."""


# --- Settings and stacks --------------------------------------------------------------


def fresh_settings(root: Path, name: str, **overrides: Any) -> Settings:
    """Settings of a stack of its own under ``root/name``: a free local port (so ``up``
    starts and supervises its own broker), its own topic prefix, var dir, Qdrant path
    and HTTP ports."""
    base = root / name
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": f"127.0.0.1:{broker.free_port()}",
        "topic_prefix": f"chaos-{name}-{uuid.uuid4().hex[:8]}.",
        "var_dir": base / "var",
        "qdrant_path": base / "qdrant",
        "ingest_http_port": broker.free_port(),
        "api_http_port": broker.free_port(),
        "qdrant_url": None,
    }
    values.update(overrides)
    return Settings(**values)


# --- The ratings producer that survives a broker restart ------------------------------


@dataclass
class ProducerReport:
    sent: int = 0
    """Ratings handed to a producer (resends included)."""
    acknowledged: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    """event_id -> (partition, offset, time.time()) of the broker's acknowledgement."""
    fatal_errors: list[str] = field(default_factory=list)
    delivery_errors: int = 0
    resent: int = 0
    producers: int = 1
    delivered_before_fatal: list[int] = field(default_factory=list)


class SurvivingProducer:
    """Produces ratings, tracks acknowledgements by event_id, and on a fatal error
    (an idempotent producer whose broker lost its producer state) or a failed delivery
    starts a new producer and sends again only the unacknowledged ratings."""

    def __init__(self, settings: Settings, out: Output) -> None:
        self.settings = settings
        self.out = out
        self.topic = settings.topic(RATINGS.name)
        self.report = ProducerReport()
        self.by_id: dict[str, RatingSubmitted] = {}
        self.order: list[str] = []
        self.retry: list[str] = []
        self._fatal = False
        self._old: list[Any] = []
        self._producer = self._new()

    def _new(self) -> Any:
        def on_error(err: KafkaError) -> None:
            if err.fatal():
                self._fatal = True
                self.report.fatal_errors.append(str(err))

        # Its connection errors while the broker is down are expected: say only fatal ones.
        return make_producer(self.settings, error_cb=on_error, log_level=2)

    def dispose(self) -> None:
        """Drop every producer (an error callback ties each to this object: a cycle
        that would keep it reconnecting to a stopped broker until the next GC)."""
        self._old.clear()
        self._producer = None
        gc.collect()

    def _produce(self, rating: RatingSubmitted) -> None:
        event_id = rating.event_id

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                self.report.acknowledged[event_id] = (msg.partition(), msg.offset(), time.time())
            else:
                self.report.delivery_errors += 1
                if err.fatal() or err.code() == KafkaError._FATAL:
                    self._fatal = True
                elif event_id not in self.report.acknowledged:
                    self.retry.append(event_id)

        while True:
            try:
                self._producer.produce(
                    self.topic,
                    key=RATINGS.key_of(rating),
                    value=encode(rating),
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and (
                    error.fatal() or error.code() == KafkaError._FATAL
                ):
                    self._fatal = True
                    self.report.fatal_errors.append(str(exc))
                    self._recover()
                else:
                    raise
        self.report.sent += 1
        self._producer.poll(0)

    def send(self, rating: RatingSubmitted) -> None:
        if rating.event_id not in self.by_id:
            self.by_id[rating.event_id] = rating
            self.order.append(rating.event_id)
        if self._fatal:
            self._recover()
        self._resend_failed()
        self._produce(rating)

    def _resend_failed(self) -> None:
        retry, self.retry = self.retry, []
        for event_id in retry:
            if event_id not in self.report.acknowledged:
                self.report.resent += 1
                self._produce(self.by_id[event_id])

    def _recover(self) -> None:
        """Drop the failed producer; send the unacknowledged ratings with a new one."""
        old = self._producer
        self.report.delivered_before_fatal.append(len(self.report.acknowledged))
        self.out(
            f"  producer    fatal error ({self.report.fatal_errors[-1:]}); "
            f"{len(self.report.acknowledged)} acknowledged so far, new producer resends the rest"
        )
        self._fatal = False
        self._old.append(old)  # destroying a failed producer may block: keep it
        self._producer = self._new()
        self.report.producers += 1
        self.retry = []
        for event_id in self.order:
            if event_id not in self.report.acknowledged:
                self.report.resent += 1
                self._produce(self.by_id[event_id])

    def close(self, timeout_s: float = 120.0) -> None:
        """Flush until every rating is acknowledged (recovering as needed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._producer.flush(1.0)
            except (KafkaException, SystemError) as exc:
                # After a fatal error flush may raise (SystemError: confluent-kafka's
                # NULL return without an exception, seen after a broker kill -9).
                self._fatal = True
                self.report.fatal_errors.append(f"flush: {exc!r}")
            if self._fatal:
                self._recover()
            self._resend_failed()
            done = all(e in self.report.acknowledged for e in self.order)
            if len(self._producer) == 0 and not self.retry and done:
                return
        self.out(f"  producer    {len(self._producer)} still queued after {timeout_s:.0f} s")


def replay_ratings(
    producer: SurvivingProducer, ratings: Sequence[RatingSubmitted], rate: float
) -> float:
    pacer = Pacer()
    start = time.perf_counter()
    for i, rating in enumerate(ratings):
        pacer.wait_until(i / rate)
        producer.send(rating)
    producer.close()
    return time.perf_counter() - start


# --- Reading topics back --------------------------------------------------------------


def read_topic(settings: Settings, name: str, timeout_s: float = 120.0) -> list[bytes]:
    """Every committed value on a topic, from the beginning up to its high watermarks."""
    topic = settings.topic(name)
    consumer = make_consumer(settings, f"chaos-read-{uuid.uuid4().hex}")
    values: list[bytes] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p) for p in meta.partitions]
        high = {}
        start = []
        for tp in parts:
            low, hi = consumer.get_watermark_offsets(tp, timeout=10)
            start.append(TopicPartition(topic, tp.partition, low))
            if hi > low:
                high[tp.partition] = hi
        consumer.assign(start)
        deadline = time.monotonic() + timeout_s
        while high and time.monotonic() < deadline:
            for message in consumer.consume(5000, timeout=0.5):
                value = message.value()
                if message.error() is None and value is not None:
                    values.append(value)
            positions = consumer.position([TopicPartition(topic, p) for p in high])
            for tp in positions:
                if tp.offset >= high[tp.partition]:
                    high.pop(tp.partition, None)
    finally:
        consumer.close()
    return values


@dataclass
class Snapshot:
    profiles: dict[str, tuple[np.ndarray, int]]
    causes: set[str]
    dead_letters: list[dict[str, Any]]
    ratings_on_topic: Counter[str]


def snapshot(settings: Settings) -> Snapshot:
    profiles: dict[str, tuple[np.ndarray, int]] = {}
    for raw in read_topic(settings, USER_PROFILES.name):
        value = orjson.loads(raw)
        profiles[str(value["user_id"])] = (
            decode_vector(value["vector"]).astype(np.float64),
            int(value["n_ratings"]),
        )
    causes = set()
    for raw in read_topic(settings, RECOMMENDATIONS.name):
        value = orjson.loads(raw)
        if value.get("user_id") != NEWCOMERS_USER_ID and "cause_event_id" in value:
            causes.add(str(value["cause_event_id"]))
    dead = [orjson.loads(raw) for raw in read_topic(settings, DEAD_LETTERS.name)]
    ratings = Counter(
        str(orjson.loads(raw)["event_id"]) for raw in read_topic(settings, RATINGS.name)
    )
    return Snapshot(profiles, causes, dead, ratings)


def valid_dead_letters(dead: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """Dead letters whose payload is a valid event of its source topic."""
    from shared.events import decode
    from shared.exceptions import InvalidEventError

    valid = []
    for letter in dead:
        source = str(letter.get("source_topic", ""))
        name = (
            source[len(settings.topic_prefix) :]
            if source.startswith(settings.topic_prefix)
            else source
        )
        spec = BY_NAME.get(name)
        if spec is None or letter.get("payload_encoding") != "utf-8":
            continue
        try:
            decode(spec.record, letter["payload"])
        except (InvalidEventError, KeyError, ValueError):
            continue
        valid.append(letter)
    return valid


# --- Waiting ----------------------------------------------------------------------------


def wait_caught_up(settings: Settings, out: Output, timeout_s: float = 900.0) -> float:
    """Until every service is ready and the consumer lag of user-profile, recommender and
    item-embedding is 0 (or, for a group reading a topic written in transactions, where
    each transaction's commit marker counts in the high watermark but is never
    consumed: small and unchanged) for three readings in a row; returns the seconds
    waited."""
    start = time.monotonic()
    history: list[dict[str, int | None]] = []
    last = ""
    bound = 4 * settings.topic_partitions
    while time.monotonic() - start < timeout_s:
        report = stack.status(settings)
        lags = {s.name: s.lag for s in report.services if s.group}
        ready = all(s.ready for s in report.services) and report.broker.reachable
        history = [*history[-2:], lags] if ready else []
        if len(history) == 3 and all(
            _settled(n, history, bound) for n in ("user-profile", "recommender", "item-embedding")
        ):
            return time.monotonic() - start
        line = f"  waiting     lag {lags} ready={ready}"
        if line != last:
            out(line)
            last = line
        time.sleep(2.0)
    raise stack.StackError(f"not caught up within {timeout_s:.0f} s")


def _settled(name: str, history: list[dict[str, int | None]], bound: int) -> bool:
    lag = history[-1].get(name)
    if lag is None:
        return False
    return lag == 0 or (lag <= bound and all(h.get(name) == lag for h in history))


def kill_and_time(
    settings: Settings, name: str, pid: int, timeout_s: float = RECOVERY_LIMIT_S
) -> float | None:
    """``kill -9`` program ``name`` (process ``pid``): seconds until its restarted process
    first wrote its ready file (None: not within ``timeout_s``)."""
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    times = stack.first_ready(settings, name, old_pid=pid, timeout_s=timeout_s)
    return None if times is None else times[1] - killed


# --- Faults -----------------------------------------------------------------------------


@dataclass
class Fault:
    at_s: float
    kind: str  # "kill <service>" or "broker restart"
    recovery_s: float | None = None
    started_s: float | None = None


def plan_faults(
    seed: int, duration_s: float, kills: Sequence[str], broker_restarts: int
) -> list[Fault]:
    rng = random.Random(seed)
    kinds = [f"kill {name}" for name in kills] + ["broker restart"] * broker_restarts
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.05, 0.7) * duration_s for _ in kinds)
    return [Fault(t, k) for t, k in zip(times, kinds, strict=True)]


def inject(settings: Settings, faults: list[Fault], t0: float, out: Output) -> None:
    """Run the faults in order (each waits for the previous one's recovery)."""
    for fault in faults:
        delay = t0 + fault.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fault.started_s = round(time.monotonic() - t0, 2)
        if fault.kind == "broker restart":
            stack.stop_program(settings, stack.BROKER)
            out(f"  fault       t={fault.started_s:.1f}s broker stopped")
            time.sleep(BROKER_DOWN_S)
            began = time.monotonic()
            try:
                stack.start_program(settings, stack.BROKER)
            except stack.StackError as exc:  # exited at once: supervisord retries it
                out(f"  fault       broker start: {exc}; waiting for supervisord's retry")
            while not stack.broker_answers(settings.kafka_bootstrap_servers, timeout_s=1):
                if time.monotonic() - began > RECOVERY_LIMIT_S:
                    out(f"  fault       broker not answering {RECOVERY_LIMIT_S:.0f} s after start")
                    break
                time.sleep(0.1)
            else:
                fault.recovery_s = round(time.monotonic() - began, 2)
                out(f"  fault       broker started again, answering after {fault.recovery_s} s")
        else:
            name = fault.kind.split(" ", 1)[1]
            pid = stack.program_pid(settings, name)
            if pid is None:
                out(f"  fault       {name} not running, skipped")
                continue
            out(f"  fault       t={fault.started_s:.1f}s kill -9 {name} (pid {pid})")
            recovery = kill_and_time(settings, name, pid)
            fault.recovery_s = None if recovery is None else round(recovery, 2)
            out(f"  fault       {name} ready again after {fault.recovery_s} s")


# --- One run ----------------------------------------------------------------------------


def run_once(
    settings: Settings,
    dataset: MovieLens,
    ratings: Sequence[RatingSubmitted],
    rate: float,
    faults: list[Fault],
    out: Output,
) -> dict[str, Any]:
    lines: list[str] = []
    try:
        stack.up(settings, out=lines.append)
        out(f"  stack up    {settings.kafka_bootstrap_servers} prefix {settings.topic_prefix}")
        replay(settings, dataset, ratings=False, progress=False)
        missing = wait_until_embedded(
            settings, {m.movie_id for m in dataset.movies}, timeout_s=600, progress=False
        )
        if missing:
            raise stack.StackError(f"{missing} movies were not embedded")
        producer = SurvivingProducer(settings, out)
        t0 = time.monotonic()
        wall_t0 = time.time()
        injector = threading.Thread(target=inject, args=(settings, faults, t0, out), daemon=True)
        injector.start()
        produce_s = replay_ratings(producer, ratings, rate)
        producer.dispose()
        injector.join()
        out(f"  replayed    {len(ratings)} ratings in {produce_s:.1f} s")
        waited = wait_caught_up(settings, out)
        snap = snapshot(settings)
        restarts = stack.restart_counts(settings)
    except Exception:
        out("\n".join(lines[-30:]))
        raise
    finally:
        stack.down(settings, out=lambda _line: None)
    r = producer.report
    lost_acks = [
        {"event_id": e, "partition": part, "offset": off, "acked_at_s": round(at - wall_t0, 2)}
        for e, (part, off, at) in r.acknowledged.items()
        if e not in snap.ratings_on_topic
    ]
    return {
        "snapshot": snap,
        "produce_s": round(produce_s, 2),
        "catch_up_s": round(waited, 2),
        "producer": {
            "sent": r.sent,
            "acknowledged": len(r.acknowledged),
            "resent": r.resent,
            "producers": r.producers,
            "fatal_errors": r.fatal_errors,
            "delivered_before_fatal": r.delivered_before_fatal,
            "delivery_errors": r.delivery_errors,
            "acknowledged_but_missing": lost_acks,
        },
        "faults": [dataclasses.asdict(f) for f in faults],
        "restarts": restarts,
    }


def compare(
    base: Snapshot,
    faulted: Snapshot,
    ratings: Sequence[RatingSubmitted],
    settings: Settings,
    base_settings: Settings,
) -> dict[str, Any]:
    """The faulted run against the undisturbed one.

    The stack is checked on the ratings that reached the topic: a rating the broker
    acknowledged and then lost in its restart (a noida-db gap, docs/brokers.md) is not
    on the topic afterwards, so its user is counted on the ratings that are, and left
    out of the vector comparison (its input differs from the undisturbed run's). Such
    a rating may still have been applied, read from the broker before it lost it: up
    to that many extra ratings of such a user count as applied then lost by the
    broker, not as applied twice.
    """
    on_topic = [r for r in ratings if r.event_id in faulted.ratings_on_topic]
    expected = Counter(r.user_id for r in on_topic)
    short = {r.user_id for r in ratings if r.event_id not in faulted.ratings_on_topic}
    last: dict[str, str] = {}
    for r in on_topic:
        last[r.user_id] = r.event_id
    max_diff = 0.0
    missing_users = []
    for user in expected:
        a, b = base.profiles.get(user), faulted.profiles.get(user)
        if a is None or b is None or a[0].shape != b[0].shape:
            missing_users.append(user)
            continue
        if user not in short:
            max_diff = max(max_diff, float(np.max(np.abs(a[0] - b[0]))))
    all_counts = Counter(r.user_id for r in ratings)
    lost = twice = applied_then_lost = 0
    for user, n in expected.items():
        got = faulted.profiles.get(user, (None, 0))[1]
        lost += max(0, n - got)
        extra = max(0, got - n)
        gone = all_counts[user] - n  # acknowledged, then lost by the broker
        applied_then_lost += min(extra, gone)
        twice += extra - min(extra, gone)
    base_lost = sum(max(0, n - base.profiles.get(u, (None, 0))[1]) for u, n in all_counts.items())
    no_list = [u for u, e in last.items() if e not in faulted.causes]
    base_last = {r.user_id: r.event_id for r in ratings}
    base_no_list = [u for u, e in base_last.items() if e not in base.causes]
    valid_dead = valid_dead_letters(faulted.dead_letters, settings)
    base_valid_dead = valid_dead_letters(base.dead_letters, base_settings)
    dupes = sum(c - 1 for c in faulted.ratings_on_topic.values() if c > 1)
    checks = {
        "vectors_within_1e-5": max_diff <= TOLERANCE and not missing_users,
        "n_ratings_exact": lost == 0 and twice == 0,
        "last_rating_has_list": not no_list,
        "no_valid_dead_letters": not valid_dead,
    }
    return {
        "users": len(all_counts),
        "max_vector_diff": max_diff,
        "users_compared": len(expected) - len(short & set(expected)) - len(missing_users),
        "users_without_profile": len(missing_users),
        "ratings_lost": lost,
        "ratings_applied_twice": twice,
        "ratings_applied_then_lost_by_broker": applied_then_lost,
        "users_last_rating_without_list": len(no_list),
        "dead_letters": len(faulted.dead_letters),
        "valid_dead_letters": len(valid_dead),
        "ratings_topic_duplicates": dupes,
        "ratings_missing_from_topic": len(ratings) - len(on_topic),
        "users_with_ratings_missing_from_topic": len(short),
        "undisturbed": {
            "ratings_lost": base_lost,
            "users_last_rating_without_list": len(base_no_list),
            "dead_letters": len(base.dead_letters),
            "valid_dead_letters": len(base_valid_dead),
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


# --- Broker kill -9 -------------------------------------------------------------------


def broker_kill(
    settings: Settings, ratings: Sequence[RatingSubmitted], rate: float, seed: int, out: Output
) -> dict[str, Any]:
    """The broker alone (no services): replay ratings, kill -9 the broker server at a
    random moment, let supervisord restart it; count acknowledged ratings missing."""
    rng = random.Random(seed + 1)
    duration = len(ratings) / rate
    at = rng.uniform(0.3, 0.6) * duration
    result: dict[str, Any] = {"kill_at_s": round(at, 2)}
    try:
        stack.up(settings, services=(), out=lambda _l: None)
        producer = SurvivingProducer(settings, out)

        def killer() -> None:
            time.sleep(at)
            pid = stack.program_pid(settings, stack.BROKER)
            acked = len(producer.report.acknowledged)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            began = time.monotonic()
            out(
                f"  fault       t={at:.1f}s kill -9 broker server (pid {pid}), {acked} acknowledged"
            )
            while not stack.broker_answers(settings.kafka_bootstrap_servers, timeout_s=1):
                time.sleep(0.1)
            result["acknowledged_at_kill"] = acked
            result["broker_back_s"] = round(time.monotonic() - began, 2)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        replay_ratings(producer, ratings, rate)
        producer.dispose()
        thread.join()
        on_topic = Counter(
            str(orjson.loads(raw)["event_id"]) for raw in read_topic(settings, RATINGS.name)
        )
    finally:
        stack.down(settings, out=lambda _l: None)
    acked = producer.report.acknowledged
    lost = [e for e in producer.order if e in acked and e not in on_topic]
    result.update(
        {
            "ratings": len(ratings),
            "acknowledged": len(acked),
            "on_topic": len(on_topic),
            "acknowledged_but_missing": len(lost),
            "duplicates_on_topic": sum(c - 1 for c in on_topic.values() if c > 1),
            "producers": producer.report.producers,
            "fatal_errors": producer.report.fatal_errors,
            "resent": producer.report.resent,
            "why": (
                "noida-db saves its state about every 0.5 s, not before it acknowledges "
                "(infra/conformance.py KNOWN_GAPS['noida']['durability']): records "
                "acknowledged in the last ~0.5 s before a kill -9 are lost; the producer "
                "does not resend them because they were acknowledged"
            ),
        }
    )
    return result


# --- Main -------------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    c = result["comparison"]
    rows = [["CHECK", "RESULT", "VALUE"]]
    rows.append(
        [
            "vectors within 1e-5",
            _ok(c["checks"]["vectors_within_1e-5"]),
            f"max diff {c['max_vector_diff']:.3g} over {c['users_compared']} users, "
            f"{c['users_without_profile']} without profile",
        ]
    )
    rows.append(
        [
            "n_ratings exact",
            _ok(c["checks"]["n_ratings_exact"]),
            f"lost {c['ratings_lost']}, applied twice {c['ratings_applied_twice']}",
        ]
    )
    rows.append(
        [
            "last rating has list",
            _ok(c["checks"]["last_rating_has_list"]),
            f"{c['users_last_rating_without_list']} of {c['users']} users without",
        ]
    )
    rows.append(
        [
            "no valid dead letters",
            _ok(c["checks"]["no_valid_dead_letters"]),
            f"{c['valid_dead_letters']} valid of {c['dead_letters']} dead letters",
        ]
    )
    lines = [stack.table(rows), "", "faults (faulted run):"]
    frows = [["T (s)", "FAULT", "RECOVERY (s)"]]
    for f in result["faulted"]["faults"]:
        frows.append([str(f["started_s"]), f["kind"], str(f["recovery_s"])])
    lines.append(stack.table(frows))
    p = result["faulted"]["producer"]
    lines.append(
        f"producer: {p['sent']} sent, {p['acknowledged']} acknowledged, {p['resent']} resent, "
        f"{p['producers']} producer(s), fatal errors {len(p['fatal_errors'])}; "
        f"ratings duplicated on topic {c['ratings_topic_duplicates']}"
    )
    lines.append(
        f"broker restart: {c['ratings_missing_from_topic']} acknowledged ratings missing "
        f"from the topic afterwards ({c['users_with_ratings_missing_from_topic']} users; "
        "noida-db's graceful-stop gap, docs/brokers.md), not counted against the stack; "
        f"{c['ratings_applied_then_lost_by_broker']} of them applied before the broker lost them"
    )
    u = c["undisturbed"]
    lines.append(
        f"undisturbed run: lost {u['ratings_lost']}, users without last list "
        f"{u['users_last_rating_without_list']}, dead letters {u['dead_letters']}"
    )
    if "broker_kill" in result and "error" in result["broker_kill"]:
        lines.append(f"broker kill -9: {result['broker_kill']['error']}")
    elif "broker_kill" in result:
        b = result["broker_kill"]
        lines.append(
            f"broker kill -9 at t={b['kill_at_s']}s: {b['acknowledged']} of {b['ratings']} "
            f"acknowledged, {b.get('acknowledged_at_kill')} at the kill, "
            f"{b['acknowledged_but_missing']} acknowledged but missing from the topic, "
            f"{b['duplicates_on_topic']} duplicates, broker back after {b.get('broker_back_s')} s"
        )
    lines.append("PASSED" if c["passed"] else "FAILED")
    return "\n".join(lines)


def _ok(value: bool) -> str:
    return "ok" if value else "FAIL"


def chaos(
    *,
    dataset_dir: Path = Path("data/ml-100k"),
    limit: int = 10_000,
    rate: float = 200.0,
    seed: int = 7,
    kills: Sequence[str] = KILLABLE,
    broker_restarts: int = 1,
    broker_kill_test: bool = True,
    rated_movies_only: bool = False,
    root: Path | None = None,
    out: Output = print,
) -> dict[str, Any]:
    """The whole experiment; ``rated_movies_only`` replays only the movies the ratings
    name (a shorter wait for their vectors, for tests)."""
    dataset = load_movielens(dataset_dir)
    ratings = dataset.ratings[:limit]
    if rated_movies_only:
        rated = {r.movie_id for r in ratings}
        dataset = dataclasses.replace(
            dataset, movies=[m for m in dataset.movies if m.movie_id in rated]
        )
    root = root or Path(tempfile.mkdtemp(prefix="reelstream-chaos-"))
    duration = len(ratings) / rate
    out(f"chaos: {len(ratings)} ratings at {rate}/s (~{duration:.0f} s), seed {seed}, in {root}")
    out("1. undisturbed run")
    base_settings = fresh_settings(root, "base")
    base = run_once(base_settings, dataset, ratings, rate, [], out)
    out("2. faulted run")
    faults = plan_faults(seed, duration, kills, broker_restarts)
    fault_settings = fresh_settings(root, "faulted")
    faulted = run_once(fault_settings, dataset, ratings, rate, faults, out)
    out("3. comparison")
    comparison = compare(
        base["snapshot"], faulted["snapshot"], ratings, fault_settings, base_settings
    )
    result: dict[str, Any] = {
        "limit": len(ratings),
        "rate": rate,
        "seed": seed,
        "undisturbed": {k: v for k, v in base.items() if k != "snapshot"},
        "faulted": {k: v for k, v in faulted.items() if k != "snapshot"},
        "comparison": comparison,
    }
    out(format_table(result))
    if broker_kill_test:
        out("4. broker kill -9 (broker only)")
        try:
            result["broker_kill"] = broker_kill(
                fresh_settings(root, "brokerkill"), ratings, rate, seed, out
            )
        except Exception as exc:  # the comparison stands on its own
            out(f"  broker kill failed: {exc!r}")
            result["broker_kill"] = {"error": repr(exc)}
    return result


def restart_times(
    settings: Settings, names: Sequence[str] = KILLABLE, out: Output = print
) -> dict[str, float | None]:
    """``kill -9`` each of ``names`` on the running stack of ``settings``, one after the
    other, and time until its restarted process is ready (seconds; None: not within
    ``RECOVERY_LIMIT_S``)."""
    times: dict[str, float | None] = {}
    for name in names:
        pid = stack.program_pid(settings, name)
        if pid is None:
            raise stack.StackError(f"{name} is not running: `make up` first")
        recovery = kill_and_time(settings, name, pid)
        times[name] = None if recovery is None else round(recovery, 1)
        out(f"kill -9 {name}: ready again after {times[name]} s")
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-broker-kill", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("reports/chaos.json"))
    parser.add_argument(
        "--restart-times",
        action="store_true",
        help="only kill -9 each worker of the running `make up` stack and time its restart",
    )
    args = parser.parse_args(argv)
    if args.restart_times:
        times = restart_times(stack.absolute(Settings()))
        return 0 if all(t is not None for t in times.values()) else 1
    result = chaos(
        dataset_dir=args.dataset,
        limit=args.limit,
        rate=args.rate,
        seed=args.seed,
        broker_kill_test=not args.no_broker_kill,
    )
    print()
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["comparison"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end benchmark of the running stack: ``make bench`` (after ``make up``).

One run measures, side by side on the same broker and machine:

1. **idle**: the stack's CPU (every service and the local broker) over ``IDLE_S``
   seconds with nothing to do, as % of one core;
2. **catalogue**: every ML-100K movie published, until each has a vector on
   ``item-embeddings`` (movies per second);
3. **ceiling**: a pass-through pipeline (``infra.ceiling``: decode, key, publish one
   small message per event) on the services' runtime, in a topic namespace of its own:
   the events per second this broker and these Python clients allow;
4. **full speed**: the ML-100K ratings (``--limit``: the first N) produced as fast as
   possible; events per second from the first rating produced to the last list
   consumed, once every user's last rating has caused a list (lists are coalesced per
   user per micro-batch, so not every rating gets its own), and the ratio to the
   ceiling;
5. **quiet**: ``QUIET_RATINGS`` ratings one at a time, each after ``QUIET_GAP_S`` of
   silence, when every consumer rests: produce to list, as a user rating on a quiet
   stack sees it;
6. **steady rates**: ratings offered at each ``--rates`` value for ``--steady-s``
   seconds (ML-100K order, all users, as new events), with new movies published
   meanwhile: latency from produce to the list consumed by the bench's own clocks,
   ``latency_ms`` of the same lists beside it, the rate achieved, and each new movie's
   time from publish to its vector on ``item-embeddings`` (the item-embedding service
   upserts it into Qdrant before publishing it there, and the recommender's catalogue
   reads that topic).

Then each process's peak RSS, the CPU seconds per 1,000 events of the full-speed pass,
and the model versions of the lists. Measure on a fresh stack (``make down clean up``):
the full-speed pass should meet users with no history.

``--instances N`` runs every pass with N instances of each partitioned service: the
bench starts N - 1 more of item-embedding, user-profile and the recommender beside the
supervised ones (logs in ``var/log/<service>-bench-<i>.log``), waits until each has
been assigned its share of the partitions, and stops them at the end. With embedded
Qdrant each extra item-embedding instance keeps a store of its own
(``var/qdrant-<name>``); a Qdrant server (``QDRANT_URL``) is shared. Two runs on fresh
stacks, with 1 and 2 instances, give the throughput ratio of scaling out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_END, KafkaError, TopicPartition

from infra import ceiling, stack
from shared.config import Settings
from shared.data.movielens import MovieLens, load_movielens
from shared.events import (
    ITEM_EMBEDDINGS,
    MOVIES,
    NEWCOMERS_USER_ID,
    RATINGS,
    RECOMMENDATIONS,
    MoviePublished,
    RatingSubmitted,
    TopicSpec,
)
from shared.kafka.client import make_consumer
from shared.kafka.message import Outgoing
from shared.kafka.pacing import IdlePacer
from shared.kafka.publisher import Publisher
from shared.replay import Pacer, replay, wait_until_embedded

SERVICES = tuple(spec.name for spec in stack.SERVICES)
BROKER = "broker (noida-db)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_S = 10.0
INSTANCE_START_S = 180.0
"""How long the bench waits for an extra instance to be assigned partitions."""
NEW_MOVIES = 20
"""New movies published during each steady-rate pass."""
QUIET_RATINGS = 15
QUIET_GAP_S = 2.0
"""The quiet pass: this many ratings, each after this long with nothing sent."""
"""New movies published during each steady-rate pass."""
READER_POLL_S = 0.05
READER_REST_S = 0.005
"""The bench's readers rest at most this long when they have nothing to read (see
``IdlePacer``): short, so that arrival times stay within a few ms, and not spinning,
so that they leave the broker's CPU to the stack."""


@dataclass
class Reader:
    """Reads a topic from its end in a thread and hands each value, with the time it
    arrived (epoch seconds), to ``on_value``."""

    settings: Settings
    spec: TopicSpec
    on_value: Callable[[dict[str, Any], float], None]
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        topic = self.settings.topic(self.spec.name)
        consumer = make_consumer(self.settings, f"bench-{uuid.uuid4().hex}")
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in meta.partitions])
        pacer = IdlePacer(consumer, READER_REST_S, self._stop)
        try:
            while not self._stop.is_set():
                pacer.before_poll()
                first = consumer.poll(0 if pacer.resting else READER_POLL_S)
                self._ready.set()
                messages = [] if first is None else [first, *consumer.consume(5000, timeout=0)]
                pacer.after_poll(found=bool(messages))
                now = time.time()
                for message in messages:
                    error = message.error()
                    if error is None:
                        # orjson directly: validating every message would slow the reader.
                        self.on_value(orjson.loads(message.value() or b"{}"), now)
                    elif error.code() != KafkaError._PARTITION_EOF:
                        print(f"bench reader {topic}: {error}", file=sys.stderr)
        finally:
            consumer.close()

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(30)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


@dataclass
class Lists:
    """What the bench has read of ``recommendations``."""

    arrived: dict[str, float] = field(default_factory=dict)
    """Cause event id → when its list arrived (epoch seconds)."""
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Cause event id → the list's ``latency_ms``."""
    versions: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, value: dict[str, Any], now: float) -> None:
        # The newcomers' list is no user's answer to a rating.
        if "latency_ms" not in value or value.get("user_id") == NEWCOMERS_USER_ID:
            return
        cause = str(value["cause_event_id"])
        with self.lock:
            self.arrived[cause] = now
            self.latency_ms[cause] = float(value["latency_ms"])
            self.versions.add(str(value.get("model_version")))

    def of(self, sent: dict[str, float], started: float) -> tuple[float, list[float], list[float]]:
        """For the lists caused by ``sent`` (event id → send time): when the last one
        arrived (``started`` when none did), and their latencies in ms by the bench's
        clocks and by their ``latency_ms``."""
        with self.lock:
            mine = [c for c in sent if c in self.arrived]
            ended = max((self.arrived[c] for c in mine), default=started)
            bench_ms = [1000 * (self.arrived[c] - sent[c]) for c in mine]
            field_ms = [self.latency_ms[c] for c in mine]
        return ended, bench_ms, field_ms

    def wait_for(self, causes: set[str], timeout_s: float) -> int:
        """Wait until every cause has a list; returns how many do not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if causes <= self.arrived.keys():
                    return 0
            time.sleep(0.1)
        with self.lock:
            return len(causes - self.arrived.keys())


# --- measures of processes ------------------------------------------------------------


def service_pids(settings: Settings) -> dict[str, int]:
    """Pids of the running stack's services (and of its broker when the stack runs
    one), from its supervisord."""
    pids: dict[str, int] = {}
    for name in SERVICES:
        pid = stack.program_pid(settings, name)
        if pid is not None:
            pids[name] = pid
    broker_pid = stack.program_pid(settings, stack.BROKER)
    if broker_pid is not None:
        pids[BROKER] = broker_pid
    return pids


def start_instances(settings: Settings, n: int) -> dict[str, subprocess.Popen[bytes]]:
    """Starts ``n - 1`` more instances of each partitioned service (``--instances``) and
    waits until every one logs its assignment. Their names are ``<service>-bench-<i>``."""
    started: dict[str, subprocess.Popen[bytes]] = {}
    logs = stack.StackPaths(settings.var_dir).log_dir
    for spec in stack.SERVICES:
        if not spec.consumes:
            continue
        for i in range(1, n):
            name = f"{spec.name}-bench-{i}"
            env = {**stack.child_env(settings), "REELSTREAM_INSTANCE_ID": f"bench-{i}"}
            if settings.qdrant_url is None:
                # Embedded Qdrant has one owner per storage path; a server is shared.
                env["QDRANT_PATH"] = str((settings.var_dir / f"qdrant-{name}").absolute())
            log = (logs / f"{name}.log").open("wb")
            started[name] = subprocess.Popen(
                spec.argv(), env=env, stdout=log, stderr=subprocess.STDOUT
            )
    deadline = time.monotonic() + INSTANCE_START_S
    waiting = set(started)
    while waiting:
        for name in sorted(waiting):
            if started[name].poll() is not None:
                stop_instances(started)
                sys.exit(f"{name} exited ({started[name].returncode}): see {logs}/{name}.log")
            if b"assigned partitions=" in (logs / f"{name}.log").read_bytes():
                waiting.discard(name)
        if waiting and time.monotonic() > deadline:
            stop_instances(started)
            sys.exit(f"not assigned within {INSTANCE_START_S:g} s: {sorted(waiting)}")
        time.sleep(0.5)
    return started


def stop_instances(started: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then waits for each (SIGKILL after ``stack.STOP_TIMEOUT_S``)."""
    for process in started.values():
        if process.poll() is None:
            process.terminate()
    for process in started.values():
        try:
            process.wait(timeout=stack.STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds so far) of a process."""
    peak_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kib = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return peak_kib / 1024, cpu_s


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: proc_usage(pid)[1] for name, pid in pids.items()}


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 1)

    return {"p50": at(50), "p99": at(99), "max": round(ordered[-1], 1), "n": len(ordered)}


def last_event_per_user(ratings: Sequence[RatingSubmitted]) -> set[str]:
    last: dict[str, str] = {}
    for rating in ratings:
        last[rating.user_id] = rating.event_id
    return set(last.values())


# --- the passes -------------------------------------------------------------------------


def measure_idle(pids: dict[str, int]) -> dict[str, Any]:
    before = cpu_seconds(pids)
    started = time.monotonic()
    time.sleep(IDLE_S)
    elapsed = time.monotonic() - started
    after = cpu_seconds(pids)
    per = {name: round(100 * (after[name] - before[name]) / elapsed, 1) for name in pids}
    return {
        "window_s": IDLE_S,
        "cpu_pct_of_one_core": round(sum(per.values()), 1),
        "per_process": per,
    }


def measure_catalogue(settings: Settings, dataset: MovieLens) -> dict[str, Any]:
    started = time.time()
    replay(settings, dataset, progress=True, ratings=False)
    missing = wait_until_embedded(settings, {m.movie_id for m in dataset.movies}, timeout_s=900)
    if missing:
        sys.exit(f"{missing} movies were not embedded: is the item-embedding service up?")
    seconds = time.time() - started
    return {
        "movies": len(dataset.movies),
        "seconds": round(seconds, 2),
        "movies_per_s": round(len(dataset.movies) / seconds, 1),
    }


def measure_ceiling(settings: Settings, ratings: Sequence[RatingSubmitted]) -> dict[str, Any]:
    """The pass-through pipeline over ``ratings`` in a namespace of its own."""
    prefix = f"bench-ceiling-{uuid.uuid4().hex[:8]}."
    ceiling_settings = settings.model_copy(update={"topic_prefix": prefix})
    ceiling.create_topics(ceiling_settings)
    echoed = 0
    last_at = 0.0
    done = threading.Event()

    def on_value(_value: dict[str, Any], now: float) -> None:
        nonlocal echoed, last_at
        echoed += 1
        last_at = now
        if echoed >= len(ratings):
            done.set()

    env = {
        **os.environ,
        "REELSTREAM_TOPIC_PREFIX": prefix,
        "REELSTREAM_TRANSACTIONS": str(not stack.without_transactions(settings)).lower(),
    }
    ready = ceiling_settings.ready_file(ceiling.SERVICE)
    ready.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "infra.ceiling"], env=env)
    reader = Reader(ceiling_settings, ceiling.ECHO, on_value).start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if time.monotonic() > deadline or process.poll() is not None:
                sys.exit("the pass-through pipeline did not start (python -m infra.ceiling)")
            time.sleep(0.1)
        publisher = Publisher(ceiling_settings)
        started = time.time()
        for rating in ratings:
            publisher.publish(Outgoing(RATINGS, rating))
        publisher.flush()
        produced_s = time.time() - started
        done.wait(600)
    finally:
        reader.stop()
        process.terminate()
        process.wait(30)
        ceiling.delete_topics(ceiling_settings)
    elapsed = last_at - started
    return {
        "events": len(ratings),
        "echoed": echoed,
        "produce_s": round(produced_s, 2),
        "seconds": round(elapsed, 2),
        "events_per_s": round(echoed / elapsed, 1) if elapsed > 0 else None,
    }


def measure_full_speed(
    settings: Settings, ratings: Sequence[RatingSubmitted], lists: Lists, pids: dict[str, int]
) -> dict[str, Any]:
    before = cpu_seconds(pids)
    expected = last_event_per_user(ratings)
    publisher = Publisher(settings)
    sent: dict[str, float] = {}
    started = time.time()
    for rating in ratings:
        sent[rating.event_id] = time.time()
        publisher.publish(Outgoing(RATINGS, rating))
    publisher.flush()
    produce_s = time.time() - started
    missing = lists.wait_for(expected, timeout_s=900)
    after = cpu_seconds(pids)
    ended, bench_ms, field_ms = lists.of(sent, started)
    elapsed = ended - started
    n = len(ratings)
    return {
        "ratings": n,
        "produce_s": round(produce_s, 2),
        "end_to_end_s": round(elapsed, 2),
        "events_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "lists_consumed": len(bench_ms),
        "users_missing_final_list": missing,
        "latency_ms_bench": percentiles(bench_ms),
        "latency_ms_field": percentiles(field_ms),
        "cpu_s_per_1000_events": {
            name: round((after[name] - before[name]) / n * 1000, 3) for name in pids
        },
    }


def as_new(ratings: Sequence[RatingSubmitted], tag: str, count: int) -> list[RatingSubmitted]:
    """``count`` ratings, ``ratings`` over and over, as new events (fresh ids), so that
    the stack applies them again."""
    return [
        ratings[i % len(ratings)].model_copy(
            update={"event_id": f"{ratings[i % len(ratings)].event_id}-{tag}-{i // len(ratings)}"}
        )
        for i in range(count)
    ]


def new_movies(dataset: MovieLens, tag: str, n: int) -> list[MoviePublished]:
    """``n`` movies the stack has never seen, with the content of existing ones."""
    step = max(1, len(dataset.movies) // n)
    return [
        m.model_copy(update={"movie_id": f"bench-{tag}-{i}", "title": f"{m.title} ({tag} {i})"})
        for i, m in enumerate(dataset.movies[::step][:n])
    ]


def measure_quiet(settings: Settings, dataset: MovieLens, lists: Lists) -> dict[str, Any]:
    """One rating at a time, each after ``QUIET_GAP_S`` of silence, when every consumer
    of the stack rests: what a user who rates on a quiet stack waits for their list."""
    ratings = as_new(dataset.ratings[::997], f"quiet-{uuid.uuid4().hex[:6]}", QUIET_RATINGS)
    publisher = Publisher(settings)
    sent: dict[str, float] = {}
    started = time.time()
    for rating in ratings:
        time.sleep(QUIET_GAP_S)
        sent[rating.event_id] = time.time()
        publisher.publish(Outgoing(RATINGS, rating))
        publisher.flush()
        lists.wait_for({rating.event_id}, timeout_s=30)
    _, bench_ms, field_ms = lists.of(sent, started)
    return {
        "ratings": len(ratings),
        "gap_s": QUIET_GAP_S,
        "latency_ms_bench": percentiles(bench_ms),
        "latency_ms_field": percentiles(field_ms),
        "lists_missing": len(ratings) - len(bench_ms),
    }


def measure_steady(
    settings: Settings,
    dataset: MovieLens,
    lists: Lists,
    rate: float,
    seconds: float,
    pids: dict[str, int],
) -> dict[str, Any]:
    tag = f"r{int(rate)}-{uuid.uuid4().hex[:6]}"
    count = int(rate * seconds)
    ratings = as_new(dataset.ratings, tag, count)
    movies = new_movies(dataset, tag, NEW_MOVIES)
    movie_every = max(1, count // (len(movies) + 1))
    embedded: dict[str, float] = {}

    def on_item(value: dict[str, Any], now: float) -> None:
        movie_id = str(value.get("movie_id"))
        if movie_id.startswith(f"bench-{tag}-") and movie_id not in embedded:
            embedded[movie_id] = now

    items = Reader(settings, ITEM_EMBEDDINGS, on_item).start()
    publisher = Publisher(settings)
    sent: dict[str, float] = {}
    published: dict[str, float] = {}
    pacer = Pacer()
    before = cpu_seconds(pids)
    started = time.time()
    try:
        for i, rating in enumerate(ratings):
            pacer.wait_until(i / rate)
            sent[rating.event_id] = time.time()
            publisher.publish(Outgoing(RATINGS, rating))
            if i % movie_every == movie_every - 1 and len(published) < len(movies):
                movie = movies[len(published)]
                published[movie.movie_id] = time.time()
                publisher.publish(Outgoing(MOVIES, movie))
            publisher.producer.poll(0)
        publisher.flush()
        offered_s = time.time() - started
        missing = lists.wait_for(last_event_per_user(ratings), timeout_s=600)
        after = cpu_seconds(pids)
        deadline = time.monotonic() + 60
        while len(embedded) < len(published) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        items.stop()
    ended, bench_ms, field_ms = lists.of(sent, started)
    new_ms = [1000 * (embedded[m] - published[m]) for m in published if m in embedded]
    return {
        "offered_events_per_s": rate,
        "ratings": count,
        "offered_s": round(offered_s, 2),
        "achieved_events_per_s": round(count / (ended - started), 1) if ended > started else None,
        "lists_consumed": len(bench_ms),
        "users_missing_final_list": missing,
        "latency_ms_bench": percentiles(bench_ms),
        "latency_ms_field": percentiles(field_ms),
        "new_movie_to_vector_ms": percentiles(new_ms),
        "new_movies_missing": len(published) - len(new_ms),
        "cpu_s_per_1000_events": {
            name: round((after[name] - before[name]) / count * 1000, 3) for name in pids
        },
    }


def run(
    settings: Settings,
    dataset: MovieLens,
    *,
    limit: int | None,
    rates: Sequence[float],
    steady_s: float,
    instances: int = 1,
) -> dict[str, Any]:
    pids = service_pids(settings)
    if not pids:
        sys.exit("no running stack (supervisord) found: start it with `make up`")
    ratings = dataset.ratings[:limit]
    lists = Lists()
    extra: dict[str, subprocess.Popen[bytes]] = {}
    if instances > 1:
        print(f"starting {instances - 1} more instance(s) of each service...", file=sys.stderr)
        extra = start_instances(settings, instances)
        pids.update({name: process.pid for name, process in extra.items()})
    try:
        return _passes(settings, dataset, ratings, lists, pids, rates, steady_s, instances)
    finally:
        stop_instances(extra)


def _passes(
    settings: Settings,
    dataset: MovieLens,
    ratings: Sequence[RatingSubmitted],
    lists: Lists,
    pids: dict[str, int],
    rates: Sequence[float],
    steady_s: float,
    instances: int,
) -> dict[str, Any]:
    print("idle...", file=sys.stderr)
    idle = measure_idle(pids)
    recommendations = Reader(settings, RECOMMENDATIONS, lists.take).start()
    try:
        print("catalogue...", file=sys.stderr)
        catalogue = measure_catalogue(settings, dataset)
        print("ceiling...", file=sys.stderr)
        ceiling_result = measure_ceiling(settings, ratings)
        print("full speed...", file=sys.stderr)
        full = measure_full_speed(settings, ratings, lists, pids)
        print("quiet...", file=sys.stderr)
        quiet = measure_quiet(settings, dataset, lists)
        steady = []
        for rate in rates:
            print(f"steady {rate:g}/s for {steady_s:g}s...", file=sys.stderr)
            steady.append(measure_steady(settings, dataset, lists, rate, steady_s, pids))
    finally:
        recommendations.stop()
    rss = {name: round(proc_usage(pid)[0], 1) for name, pid in pids.items()}
    ceiling_rate = ceiling_result["events_per_s"]
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count()},
        "instances_per_service": instances,
        "model_versions": sorted(lists.versions),
        # As this process reads them: the stack's own when `make up` ran with the same
        # environment.
        "settings": {
            name: getattr(settings, name)
            for name in ("batch_size", "batch_timeout_s", "idle_rest_s", "torch_threads")
        },
        "idle": idle,
        "catalogue": catalogue,
        "ceiling": ceiling_result,
        "full_speed": full,
        "full_speed_to_ceiling": (
            round(full["events_per_s"] / ceiling_rate, 3)
            if full["events_per_s"] and ceiling_rate
            else None
        ),
        "quiet": quiet,
        "steady": steady,
        "peak_rss_mib": {**rss, "total": round(sum(rss.values()), 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument(
        "--limit", type=int, default=None, help="full-speed and ceiling passes: first N ratings"
    )
    parser.add_argument(
        "--rates",
        default="1000,2000",
        help="comma-separated offered loads (events/s) of the steady passes; empty: none",
    )
    parser.add_argument("--steady-s", type=float, default=60.0, help="seconds per steady pass")
    parser.add_argument(
        "--instances", type=int, default=1, help="instances of each partitioned service"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    settings = Settings()
    dataset = load_movielens(args.dataset)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    result = run(
        settings,
        dataset,
        limit=args.limit,
        rates=rates,
        steady_s=args.steady_s,
        instances=args.instances,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""End-to-end benchmark of the running stack: ``make bench`` (after ``make up``).

Replays MovieLens-100K (every movie, then the ratings in time order) through the real
broker and all four services, reads ``recommendations`` back, and prints:

- throughput: rating events per second from the first rating produced to the last
  recommendation consumed (the run ends when every user's last rating has caused a
  list: lists are coalesced per user per micro-batch, so not every rating gets its own);
- latency: ``latency_ms`` of the lists (cause rating's broker timestamp → publication),
  p50 / p99 / max;
- resources: each service's (and the local broker's) peak RSS and CPU seconds per
  1,000 rating events, read from /proc.

Measure on a fresh stack (``make down clean up``): replaying into a stack that has
already seen the ratings still measures speed, but users then hold every movie as rated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, TopicPartition

from infra import stack
from shared.config import Settings
from shared.data.movielens import MovieLens, load_movielens
from shared.events import NEWCOMERS_USER_ID, RECOMMENDATIONS, RatingSubmitted
from shared.kafka.client import make_consumer
from shared.kafka.pacing import IdlePacer
from shared.replay import replay, wait_until_embedded

SERVICES = ("ingest", "item-embedding", "user-profile", "recommender")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Collector:
    """Reads ``recommendations`` from the end, in a thread, until told to stop."""

    settings: Settings
    latencies_ms: list[float] = field(default_factory=list)
    causes: set[str] = field(default_factory=set)
    last_consumed_at: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _ready: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        import orjson

        topic = self.settings.topic(RECOMMENDATIONS.name)
        consumer = make_consumer(self.settings, f"bench-{uuid.uuid4().hex}")
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in meta.partitions])
        pacer = IdlePacer(consumer, self.settings.idle_rest_s, self._stop)
        try:
            while not self._stop.is_set():
                messages = consumer.consume(2000, timeout=0.1)
                pacer.after_poll(found=bool(messages))
                self._ready.set()
                for message in messages:
                    if message.error() is not None:
                        continue
                    # orjson directly: validating every list would slow the reader, not the stack.
                    value = orjson.loads(message.value() or b"{}")
                    # The newcomers' list is no user's answer to a rating.
                    if "latency_ms" not in value or value.get("user_id") == NEWCOMERS_USER_ID:
                        continue
                    self.latencies_ms.append(float(value["latency_ms"]))
                    self.causes.add(value["cause_event_id"])
                    self.last_consumed_at = time.time()
        finally:
            consumer.close()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        self._ready.wait(30)
        return thread

    def stop(self) -> None:
        self._stop.set()


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
        pids["broker (noida-db)"] = broker_pid
    return pids


def proc_usage(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds so far) of a process."""
    peak_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak_kib = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return peak_kib / 1024, cpu_s


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def last_event_per_user(ratings: list[RatingSubmitted]) -> set[str]:
    last: dict[str, str] = {}
    for rating in ratings:
        last[rating.user_id] = rating.event_id
    return set(last.values())


def run(
    settings: Settings, dataset: MovieLens, rate: float | None, timeout_s: float
) -> dict[str, Any]:
    pids = service_pids(settings)
    if not pids:
        sys.exit("no running stack (supervisord) found: start it with `make up`")
    before = {name: proc_usage(pid) for name, pid in pids.items()}
    expected = last_event_per_user(dataset.ratings)

    collector = Collector(settings)
    thread = collector.start()
    replay(settings, dataset, progress=True, ratings=False)
    # As in production, the catalogue is embedded before its ratings flow.
    missing = wait_until_embedded(settings, {m.movie_id for m in dataset.movies}, timeout_s=900)
    if missing:
        sys.exit(f"{missing} movies were not embedded: is the item-embedding service up?")
    started = time.time()
    stats = replay(
        settings, dataset, limit=None, rate=rate, time_scale=None, progress=True, movies=False
    )
    deadline = time.monotonic() + timeout_s
    while not expected <= collector.causes and time.monotonic() < deadline:
        time.sleep(0.2)
    collector.stop()
    thread.join(10)
    missing = len(expected - collector.causes)
    elapsed = collector.last_consumed_at - started
    after = {name: proc_usage(pid) for name, pid in pids.items()}
    n = len(dataset.ratings)
    lat = collector.latencies_ms
    return {
        "ratings": n,
        "offered_rate": rate or "full speed",
        "produce_s": round(stats.wall_s, 2),
        "end_to_end_s": round(elapsed, 2),
        "events_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "lists_consumed": len(lat),
        "users_missing_final_list": missing,
        "latency_ms": {
            "p50": round(percentile(lat, 50), 1) if lat else None,
            "p99": round(percentile(lat, 99), 1) if lat else None,
            "max": round(max(lat), 1) if lat else None,
            "mean": round(statistics.fmean(lat), 1) if lat else None,
        },
        "services": {
            name: {
                "peak_rss_mib": round(after[name][0], 1),
                "cpu_s_per_1000_events": round((after[name][1] - before[name][1]) / n * 1000, 3),
            }
            for name in pids
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=Path("data/ml-100k"))
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N ratings")
    parser.add_argument("--rate", type=float, default=None, help="offered load, events/s")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for lists")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    settings = Settings()
    dataset = load_movielens(args.dataset)
    if args.limit is not None:
        dataset = dataclasses.replace(dataset, ratings=dataset.ratings[: args.limit])
    result = run(settings, dataset, args.rate, args.timeout)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

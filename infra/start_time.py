"""How long the running stack's recommender takes to start, and what it reads to start.

    python -m infra.start_time [--json reports/start-time.json] [--repeats 3]

Against a stack started with ``make up`` (after ``make replay LIMIT=...``): stops the
recommender through supervisord, starts it again and times it from the start of its new
process to its first ready file (global tables loaded, consumer assigned). Repeated
``--repeats`` times; the record holds each time and, for context, how many messages the
topics hold (offsets written, and records a whole read gets after compaction): what the
recommender reads whole at start (``item-embeddings``, ``item-features``) and what it
does not (``ratings``).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from infra import stack
from shared.config import Settings
from shared.events import ITEM_EMBEDDINGS, ITEM_FEATURES, RATINGS, USER_PROFILES
from shared.kafka.client import make_consumer

READY_TIMEOUT_S = 300.0
"""Longest wait (seconds) for the restarted recommender's ready file."""


def offsets(settings: Settings, names: list[str]) -> dict[str, int]:
    """Offsets each topic spans now (high minus low watermark, over its partitions): the
    messages written, less those deleted by retention, not by compaction."""
    consumer = make_consumer(settings, f"reelstream-start-time-{uuid.uuid4().hex}")
    try:
        out: dict[str, int] = {}
        for name in names:
            topic = settings.topic(name)
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            total = 0
            for partition in metadata.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10
                )
                total += high - low
            out[name] = total
        return out
    finally:
        consumer.close()


def records(settings: Settings, name: str) -> int:
    """Records a whole read of the topic gets now (after compaction)."""
    consumer = make_consumer(settings, f"reelstream-start-time-{uuid.uuid4().hex}")
    try:
        topic = settings.topic(name)
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        ends: dict[int, int] = {}
        for partition in metadata.partitions:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10
            )
            if high > 0:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        count, done = 0, set[int]()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(done) < len(ends) and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=1.0):
                if message.error() is not None:
                    continue
                count += 1
                offset, partition = message.offset(), message.partition()
                if offset is not None and partition is not None and offset + 1 >= ends[partition]:
                    done.add(partition)
        return count
    finally:
        consumer.close()


def restart_seconds(settings: Settings) -> float:
    """Stop and start the recommender; seconds from its new process's start to ready."""
    name = stack.RECOMMENDER.name
    stack.stop_program(settings, name)
    stack.start_program(settings, name, wait=False)
    times = stack.first_ready(settings, name, old_pid=None, timeout_s=READY_TIMEOUT_S)
    if times is None:
        raise SystemExit(f"the recommender was not ready {READY_TIMEOUT_S:.0f} s after its start")
    began, ready = times
    return ready - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = stack.absolute(Settings())
    names = [RATINGS.name, USER_PROFILES.name, ITEM_EMBEDDINGS.name, ITEM_FEATURES.name]
    spans = offsets(settings, names)
    held = {name: records(settings, name) for name in names[1:]}
    times = [restart_seconds(settings) for _ in range(args.repeats)]
    record: dict[str, Any] = {
        "command": "python -m infra.start_time",
        "offsets": spans,
        "records": held,
        "start_s": [round(t, 2) for t in times],
        "start_s_median": round(sorted(times)[len(times) // 2], 2),
    }
    print(json.dumps(record, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

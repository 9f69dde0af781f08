"""A consumer-group member in a process of its own, for the broker conformance checks.

``python -m infra.group_member --bootstrap B --group G --topic T`` joins the group,
prints one JSON line per rebalance event (``{"event": "assign"|"revoke",
"partitions": [...], "t": epoch seconds}``) and polls until it is killed. The checks
SIGKILL it, so it never leaves the group.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition


def _emit(event: str, partitions: list[TopicPartition]) -> None:
    line = {"event": event, "partitions": sorted(p.partition for p in partitions), "t": time.time()}
    print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--session-timeout-ms", type=int, default=6000)
    parser.add_argument("--instance-id", default=None, help="group.instance.id (static member)")
    args = parser.parse_args(argv)

    config: dict[str, Any] = {
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "session.timeout.ms": args.session_timeout_ms,
        "heartbeat.interval.ms": max(100, args.session_timeout_ms // 6),
        "partition.assignment.strategy": "range",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "log_level": 3,
    }
    if args.instance_id:
        config["group.instance.id"] = args.instance_id
    consumer = Consumer(config)
    consumer.subscribe(
        [args.topic],
        on_assign=lambda _c, parts: _emit("assign", parts),
        on_revoke=lambda _c, parts: _emit("revoke", parts),
    )
    print(json.dumps({"event": "started", "t": time.time()}), flush=True)
    while True:
        consumer.poll(0.2)


if __name__ == "__main__":
    raise SystemExit(main())

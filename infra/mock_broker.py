"""librdkafka's mock cluster as a broker process other processes can reach.

``python -m infra.mock_broker --data-dir DIR`` creates a client with
``test.mock.num.brokers``, writes the cluster's bootstrap address (the brokers listen
on 127.0.0.1, on ports librdkafka picks) to ``DIR/mock-broker.json`` and stays alive
until SIGTERM or SIGINT. Everything is in memory: nothing survives the process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from confluent_kafka import Producer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--brokers", type=int, default=1, help="mock brokers in the cluster")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # The cluster lives as long as this client does.
    holder = Producer({"test.mock.num.brokers": args.brokers, "log_level": 4})
    metadata = holder.list_topics(timeout=10)
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    args.data_dir.mkdir(parents=True, exist_ok=True)
    target = args.data_dir / "mock-broker.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"bootstrap": bootstrap, "pid": os.getpid()}))
    tmp.replace(target)
    print(f"mock cluster listening on {bootstrap}", flush=True)
    while not stopping.wait(1.0):
        holder.poll(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

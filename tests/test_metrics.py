"""Each service's /metrics, /healthz and /readyz: the stream loop's counts on a real
broker, the endpoints of a running worker process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra.stack import child_env
from shared.events import RATINGS, Event
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.message import Incoming, Outgoing
from shared.metrics import HealthServer, metrics_file, reason_of
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus' text format (0 when absent); the format
    writes labels in alphabetical order."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == f"{name}{{{wanted}}}" or (not labels and series == name):
            return float(value)
    return 0.0


def test_reason_labels_keep_the_first_clause() -> None:
    assert reason_of("invalid JSON: Expecting value at 3") == "invalid JSON"
    assert reason_of("") == "unknown"
    assert len(reason_of("x" * 500)) == 60


def test_the_loop_counts_messages_dead_letters_and_batches(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    service = f"metrics-{os.getpid()}-{time.monotonic_ns()}"
    done = threading.Event()

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        done.set()
        return []

    loop = BatchConsumer(settings, service, [RATINGS], handler)
    health = HealthServer(settings, service, alive=loop.alive, ready=loop.ready).start()
    thread = threading.Thread(target=loop.run, daemon=True)
    try:
        assert get(f"{health.url}/readyz")[0] == 503  # no partition yet
        thread.start()
        produce_raw(settings, RATINGS, b"{not json", b"1")
        produce_raw(
            settings,
            RATINGS,
            b'{"user_id": "1", "movie_id": "2", "rating": 4, "occurred_at": 1}',
            b"1",
        )
        assert done.wait(60)
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            text = get(f"{health.url}/metrics")[1]
            if sample(text, "reelstream_messages_in_total", service=service, topic="ratings") == 2:
                break
            time.sleep(0.2)
        assert sample(text, "reelstream_messages_in_total", service=service, topic="ratings") == 2
        assert (
            sample(text, "reelstream_dead_letters_total", service=service, reason="invalid JSON")
            == 1
        )
        assert (
            sample(text, "reelstream_messages_out_total", service=service, topic="dead-letters")
            == 1
        )
        assert sample(text, "reelstream_batch_messages_count", service=service) >= 1
        assert sample(text, "reelstream_batch_seconds_count", service=service) >= 1
        assert get(f"{health.url}/healthz")[0] == 200
        assert get(f"{health.url}/readyz")[0] == 200
        assert metrics_file(settings, service).read_text().strip() == health.url
    finally:
        loop.stop()
        thread.join(30)
        health.stop()
    assert not metrics_file(settings, service).exists()


@pytest.mark.slow
def test_a_worker_process_serves_its_metrics(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.user_profile", "worker"],
        cwd=ROOT,
        env=child_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    where = metrics_file(settings, "user-profile")
    try:
        deadline = time.monotonic() + 120
        while not where.exists() or get(where.read_text().strip() + "/readyz")[0] != 200:
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "no ready metrics endpoint"
            time.sleep(0.5)
        url = where.read_text().strip()
        produce_raw(settings, RATINGS, b"{not json", b"7")
        deadline = time.monotonic() + 60
        while (
            sample(
                get(f"{url}/metrics")[1],
                "reelstream_dead_letters_total",
                service="user-profile",
                reason="invalid JSON",
            )
            != 1
        ):
            assert time.monotonic() < deadline, "the dead letter was not counted"
            time.sleep(0.5)
        assert get(f"{url}/healthz") == (200, '{"status": "ok"}')
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    assert worker.returncode == 0
    assert not where.exists()

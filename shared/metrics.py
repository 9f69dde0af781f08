"""Prometheus metrics and health endpoints of a reelstream process.

Every service serves, on its metrics port (``REELSTREAM_METRICS_PORT``; 0, the
default, picks a free one and writes its URL to ``var/run/<service>.metrics``):

- ``/metrics``: the counters and histograms below, in Prometheus' text format;
- ``/healthz``: 200 while the process's loop steps, 503 once it is stuck;
- ``/readyz``: 200 while it is ready (a stream processor: partitions assigned and its
  global tables caught up; the API: every view loaded), 503 otherwise.

The stream loop (``BatchConsumer``) counts what every processor takes in and sends
out, so the figures mean the same in every service.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from shared.config import Settings

log = logging.getLogger(__name__)

MESSAGES_IN = Counter(
    "reelstream_messages_in", "Messages a stream processor took in", ["service", "topic"]
)
MESSAGES_OUT = Counter(
    "reelstream_messages_out", "Messages a service published", ["service", "topic"]
)
DEAD_LETTERS = Counter(
    "reelstream_dead_letters",
    "Messages sent to dead-letters, by the first clause of the reason",
    ["service", "reason"],
)
BATCH_MESSAGES = Histogram(
    "reelstream_batch_messages",
    "Messages per micro-batch",
    ["service"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
BATCH_SECONDS = Histogram(
    "reelstream_batch_seconds",
    "Time to process and commit one micro-batch",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONSUMER_LAG = Gauge(
    "reelstream_consumer_lag",
    "Messages fetched by no poll yet: the broker's end offset less the consumer's position",
    ["service", "topic", "partition"],
)
LIST_LATENCY = Histogram(
    "reelstream_list_latency_seconds",
    "From the cause rating's broker timestamp to its list's publication (latency_ms)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
MODEL_VERSION = Gauge(
    "reelstream_model_info",
    "1 for each model version the service's outputs have carried since it started",
    ["service", "version"],
)

REASON_CHARS = 60


def reason_of(error: str) -> str:
    """A dead letter's reason as a label: its first clause (up to a colon), cut short.
    The rest of the text names values, which would make one series per message."""
    return error.split(":", 1)[0].strip()[:REASON_CHARS] or "unknown"


def metrics_file(settings: Settings, service: str) -> Path:
    """Where a service writes the URL of its metrics endpoint."""
    return settings.var_dir / "run" / f"{service}.metrics"


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a thread of their own.

    Args:
        alive: whether the process's loop steps.
        ready: whether the service is ready.
    """

    def __init__(
        self,
        settings: Settings,
        service: str,
        *,
        alive: Callable[[], bool],
        ready: Callable[[], bool],
    ) -> None:
        self._file = metrics_file(settings, service)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok = alive() if path == "/healthz" else ready()
                    body = b'{"status": "%s"}' % (b"ok" if ok else b"unavailable")
                    self._answer(200 if ok else 503, body, "application/json")
                else:
                    self._answer(404, b'{"error": "not found"}', "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass  # one line per scrape would drown the service's own logs

        self._server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://{settings.metrics_host}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"metrics-{service}", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._file.write_text(self.url + "\n")
        log.info("metrics url=%s/metrics", self.url)
        return self

    def stop(self) -> None:
        self._file.unlink(missing_ok=True)
        self._server.shutdown()
        self._server.server_close()

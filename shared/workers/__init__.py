"""The stream processors: each wires a pure handler of ``shared.handlers`` to the one
micro-batch loop (``shared.kafka.batch_consumer``), its table and its topic readers.
``services/<name>/__main__.py`` runs one of them as a process (``run_worker``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from threadpoolctl import threadpool_limits

from shared.config import Settings
from shared.exceptions import ConfigurationError
from shared.kafka.batch_consumer import BatchConsumer
from shared.lifecycle import stop_on_signals
from shared.logs import configure_logging
from shared.metrics import HealthServer

log = logging.getLogger(__name__)

CONFIGURATION_EXIT = 2
"""Exit code of a worker that cannot start on its configuration (restarting won't help)."""


class Worker(Protocol):
    consumer: BatchConsumer
    """The worker's stream loop (its health and readiness)."""

    def run(self) -> None:
        """Process until ``stop``."""
        ...

    def stop(self) -> None:
        """Finish the batch in hand, commit it and make ``run`` return."""
        ...


def run_worker(
    service: str,
    build: Callable[[Settings], Worker],
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """``python -m services.<name> worker``: build the worker from the environment's
    ``Settings`` and run it until SIGTERM or SIGINT. Returns 0 on a clean stop and
    ``CONFIGURATION_EXIT`` when the worker cannot be built on its configuration."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{service.replace('-', '_')}", description=description
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="run the worker until SIGTERM or SIGINT")
    parser.parse_args(argv)
    configure_logging(service)
    try:
        settings = Settings()
        # The numpy models' BLAS (and faiss's OpenMP) on as few threads as torch's: with
        # more, the workers' threads spin-wait for each other on shared cores.
        threadpool_limits(settings.torch_threads)
        worker = build(settings)
    except ConfigurationError as exc:
        log.error("service=%s cannot start: %s", service, exc)
        return CONFIGURATION_EXIT
    stop_on_signals(worker.stop, service)
    health = HealthServer(
        settings, service, alive=worker.consumer.alive, ready=worker.consumer.ready
    ).start()
    try:
        worker.run()
    finally:
        health.stop()
    return 0

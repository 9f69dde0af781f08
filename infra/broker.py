"""Start and stop the local Kafka-protocol broker (the ``noida-db`` binary from PyPI).

Only the local stack and the tests use this; everything else knows the broker only
by ``bootstrap.servers``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

from shared.exceptions import ReelstreamError

log = logging.getLogger(__name__)


class BrokerError(ReelstreamError):
    """The broker could not be started, reached or stopped."""


def _noida() -> str:
    # Prefer the binary installed next to this interpreter (the project's .venv).
    local = Path(sys.executable).parent / "noida-db"
    found = str(local) if local.exists() else shutil.which("noida-db")
    if found is None:
        raise BrokerError("noida-db is not installed: run `make venv` (it is in pyproject.toml)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_reachable(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a Kafka-protocol broker answers a metadata request."""
    admin = AdminClient(
        {"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000}
    )
    try:
        admin.list_topics(timeout=timeout_s)
        return True
    except Exception:
        return False


def foreground_argv(port: int, data_dir: Path) -> list[str]:
    """The command that runs the local broker in the foreground (for a process manager)."""
    return [_noida(), "start", *_options(port, data_dir)]


def _options(port: int, data_dir: Path) -> list[str]:
    return ["--only", "kafka", "--kafka-port", str(port), "--data-dir", str(data_dir)]


def start(port: int, data_dir: Path, timeout_s: float = 30.0) -> str:
    """Start a local broker in the background; returns its bootstrap address."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [_noida(), "up", *_options(port, data_dir)]
    # noida-db prints a harmless GLIBC_2.39 warning on Debian 12; keep it out of the way.
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BrokerError(f"noida-db up failed: {result.stdout}{result.stderr}")
    bootstrap = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not is_reachable(bootstrap, timeout_s=2):
        if time.monotonic() > deadline:
            raise BrokerError(f"broker at {bootstrap} did not answer within {timeout_s}s")
        time.sleep(0.2)
    log.info("broker started bootstrap=%s data_dir=%s", bootstrap, data_dir)
    return bootstrap


def pid(data_dir: Path) -> int | None:
    """The pid of the broker serving ``data_dir``, if it is running."""
    control = data_dir / "noida.control.json"
    try:
        broker_pid = int(json.loads(control.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return broker_pid if process_alive(broker_pid) else None


def stop(data_dir: Path, timeout_s: float = 30.0) -> None:
    """Stop the broker serving ``data_dir`` (its data is saved) and wait until it exits."""
    broker_pid = pid(data_dir)
    if broker_pid is None:
        return
    subprocess.run(
        [_noida(), "down", "--data-dir", str(data_dir)], capture_output=True, check=False
    )
    # `noida-db down` returns before the process has written its last snapshot.
    deadline = time.monotonic() + timeout_s
    while process_alive(broker_pid):
        if time.monotonic() > deadline:
            os.kill(broker_pid, 9)
            break
        time.sleep(0.1)


def process_alive(process_id: int) -> bool:
    """True when ``process_id`` is a running process (a zombie is not running)."""
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{process_id}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True

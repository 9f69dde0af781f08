"""The local stack: a Kafka-protocol broker and the four services as background processes.

    python -m infra.stack up       # broker (unless one answers), topics, services; waits
    python -m infra.stack status   # broker, services, readiness and consumer lag
    python -m infra.stack down     # stops the services, and the broker if `up` started it
    python -m infra.stack tail     # prints recommendation lists as they are published

Everything the stack keeps lives under ``Settings.var_dir`` (default ``var/``):
``broker/`` (data of a broker started here), ``log/<service>.log``,
``run/<service>.pid``, ``run/<service>.ready`` (written by the service itself) and
``run/broker.json`` (present only when ``up`` started the broker, so that ``down``
stops only what ``up`` started).

The services get the launcher's settings through their environment (see
:func:`child_env`), so ``up(settings)`` with overridden settings starts a stack that
agrees with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr, ValidationError

from infra import broker
from infra.topics import ensure_topics, plan
from services.user_profile import naming
from shared.config import Settings
from shared.events import RECOMMENDATIONS, RecommendationsGenerated, decode
from shared.exceptions import InvalidEventError, ReelstreamError
from shared.kafka.client import make_admin, make_consumer

log = logging.getLogger(__name__)

Output = Callable[[str], None]
"""Where progress lines go (``print`` for the command line, a list's ``append`` in tests)."""

START_TIMEOUT_S = 240.0
"""Default wait (seconds) for every service to become ready. Generous because on a
2-core machine four processes import torch at once and one loads a text model."""

STOP_TIMEOUT_S = 30.0
"""Default wait (seconds) after SIGTERM before a service is killed."""

LOG_TAIL_LINES = 40

# Extra environment of every service. Models are installed packages or local files;
# nothing may be downloaded at run time. Tokenizers' own thread pool fights torch's
# for 2 cores and warns after fork.
SERVICE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})


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
        if self.name == naming.SERVICE:
            return naming.app_id(settings)
        return settings.group(self.name)


INGEST = ServiceSpec("ingest", "services.ingest", "serve", consumes=False)
ITEM_EMBEDDING = ServiceSpec("item-embedding", "services.item_embedding", "worker")
USER_PROFILE = ServiceSpec(naming.SERVICE, "services.user_profile", "worker")
RECOMMENDER = ServiceSpec("recommender", "services.recommender", "worker")

SERVICES: tuple[ServiceSpec, ...] = (INGEST, ITEM_EMBEDDING, USER_PROFILE, RECOMMENDER)
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
    def broker_state(self) -> Path:
        """Present only while a broker started by ``up`` is ours to stop."""
        return self.run_dir / "broker.json"

    def pid_file(self, service: str) -> Path:
        return self.run_dir / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.log_dir / f"{service}.log"


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


# --- Processes ---------------------------------------------------------------------

# Services started by this process, by pid. When the launcher stays alive (tests, a
# Python session) it is their parent and must reap them, or they linger as zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


def process_alive(pid: int) -> bool:
    """True when ``pid`` is a running process (a zombie is not running)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    return broker.process_alive(pid)


def _runs_module(pid: int, module: str) -> bool:
    # A pid file can outlive its process and the pid be reused by another program;
    # the command line tells them apart. Without /proc (not Linux) trust the pid.
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return module.encode() in argv


def running_pid(settings: Settings, spec: ServiceSpec) -> int | None:
    """The pid of the service's running process, from its pid file, if it runs."""
    try:
        pid = int(StackPaths(settings.var_dir).pid_file(spec.name).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) and _runs_module(pid, spec.module) else None


def start_service(settings: Settings, spec: ServiceSpec, env: Mapping[str, str]) -> int:
    """Start one service detached (its own session, so it outlives the launcher and a
    terminal's Ctrl-C); returns its pid. The previous log is kept as ``<log>.1``."""
    paths = StackPaths(settings.var_dir)
    log_file = paths.log_file(spec.name)
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))
    # A ready file left by a process that was killed would read as "ready" at once.
    settings.ready_file(spec.name).unlink(missing_ok=True)
    with open(log_file, "wb") as sink:
        proc = subprocess.Popen(
            spec.argv(),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    paths.pid_file(spec.name).write_text(f"{proc.pid}\n")
    log.info("service=%s pid=%s started log=%s", spec.name, proc.pid, log_file)
    return proc.pid


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


def _exit_code(pid: int) -> int | None:
    child = _children.get(pid)
    return None if child is None else child.poll()


def wait_ready(
    settings: Settings,
    pids: Mapping[str, int],
    *,
    timeout_s: float = START_TIMEOUT_S,
    out: Output = print,
) -> None:
    """Wait until every service in ``pids`` (name → pid) has written its ready file.

    Raises:
        StackError: a service exited (the tail of its log is shown first) or was not
            ready within ``timeout_s`` seconds.
    """
    paths = StackPaths(settings.var_dir)
    start = time.monotonic()
    last_report = start
    pending = list(pids)
    while pending:
        elapsed = time.monotonic() - start
        for name in list(pending):
            pid = pids[name]
            if not process_alive(pid):
                code = _exit_code(pid)
                how = "exited" if code is None else f"exited with code {code}"
                log_file = paths.log_file(name)
                out(f"{name} {how} while starting; last lines of {log_file}:")
                out(log_tail(log_file) or "(empty log)")
                raise StackError(
                    f"{name} {how} while starting (log: {log_file}); "
                    "`make down` stops the services still running"
                )
            if settings.ready_file(name).exists():
                pending.remove(name)
                out(f"  ready     {name} ({elapsed:.0f} s)")
        if not pending:
            return
        if elapsed > timeout_s:
            raise StackError(
                f"not ready after {timeout_s:.0f} s: {', '.join(pending)} "
                f"(logs in {paths.log_dir}); `make down` stops the stack"
            )
        if time.monotonic() - last_report >= 15:
            last_report = time.monotonic()
            out(f"  starting  {', '.join(pending)} ({elapsed:.0f} s)")
        time.sleep(0.5)


def stop_processes(
    pids: Mapping[str, int], *, timeout_s: float = STOP_TIMEOUT_S, out: Output = print
) -> None:
    """SIGTERM every process (name → pid), wait up to ``timeout_s`` seconds for all of
    them, then SIGKILL the process groups of those still running."""
    for name, pid in pids.items():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        out(f"  stopping  {name} (pid {pid})")
    deadline = time.monotonic() + timeout_s
    remaining = dict(pids)
    while remaining:
        remaining = {name: pid for name, pid in remaining.items() if process_alive(pid)}
        if not remaining or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for name, pid in remaining.items():
        out(f"  killing   {name} (pid {pid}): still running after {timeout_s:.0f} s")
        # Each service leads its own session, so its group holds any helpers it forked.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in pids.values():
        child = _children.pop(pid, None)
        if child is not None:
            child.wait()
    if len(remaining) < len(pids):
        out(f"  stopped   {', '.join(name for name in pids if name not in remaining)}")


# --- Broker ------------------------------------------------------------------------


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


def our_broker_pid(settings: Settings) -> int | None:
    """The pid of the broker ``up`` started, if it is still running."""
    paths = StackPaths(settings.var_dir)
    try:
        state = json.loads(paths.broker_state.read_text())
        data_dir = Path(state["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return broker.pid(data_dir)


def ensure_broker(settings: Settings, out: Output = print) -> str:
    """Use the broker at ``settings.kafka_bootstrap_servers`` or, when none answers and
    the address is a single local one, start noida-db there. Returns the address."""
    address = settings.kafka_bootstrap_servers
    if broker_answers(address):
        ours = our_broker_pid(settings)
        note = f"started earlier by `make up`, pid {ours}" if ours else "already running"
        out(f"broker      {address} ({note})")
        return address
    port = local_port(address)
    if port is None:
        raise StackError(
            f"no broker answers at {address}, and only a single local address "
            "(127.0.0.1:PORT or localhost:PORT) can be started here; start that broker "
            "or set KAFKA_BOOTSTRAP_SERVERS"
        )
    paths = StackPaths(settings.var_dir)
    if broker.pid(paths.broker_dir) is not None:
        raise StackError(
            f"a broker serving {paths.broker_dir} runs but does not answer at {address}; "
            "`make down` stops it"
        )
    out(f"broker      starting noida-db on {address} (data in {paths.broker_dir})")
    try:
        started = broker.start(port, paths.broker_dir)
    except broker.BrokerError as exc:
        raise StackError(f"could not start the local broker: {exc}") from exc
    paths.broker_state.write_text(
        json.dumps(
            {
                "bootstrap": started,
                "data_dir": str(paths.broker_dir),
                "pid": broker.pid(paths.broker_dir),
                "started_at": datetime.now(UTC).isoformat(),
            }
        )
    )
    return address


# --- Commands ----------------------------------------------------------------------


def up(
    settings: Settings,
    *,
    services: Sequence[ServiceSpec] = SERVICES,
    timeout_s: float = START_TIMEOUT_S,
    out: Output = print,
) -> dict[str, int]:
    """Start the stack and wait until every service is ready; returns name → pid.

    A service whose process already runs is not started again. The services start
    together: most of their start-up is importing torch and loading models, and two
    cores are kept busy either way.

    Raises:
        StackError: no broker and none can be started, a service exited while
            starting, or not every service was ready within ``timeout_s`` seconds.
    """
    settings = absolute(settings)
    paths = StackPaths(settings.var_dir)
    for folder in (paths.run_dir, paths.log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    address = ensure_broker(settings, out)
    created = ensure_topics(settings)
    out(f"topics      {len(plan(settings))} ready ({len(created)} created)")
    env = child_env(settings)
    pids: dict[str, int] = {}
    for spec in services:
        pid = running_pid(settings, spec)
        if pid is not None:
            out(f"  running   {spec.name} (pid {pid})")
        else:
            pid = start_service(settings, spec, env)
            out(f"  started   {spec.name} (pid {pid}, log {paths.log_file(spec.name)})")
        pids[spec.name] = pid
    wait_ready(settings, pids, timeout_s=timeout_s, out=out)
    out("")
    out(next_steps(settings, address))
    return pids


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
    logs = StackPaths(settings.var_dir).log_dir
    steps = [
        ["make replay LIMIT=5000 RATE=1000", "publish the ML-100K movies, then ratings"],
        ["make recs", "print recommendation lists as they arrive"],
        ["python -m infra.stack tail --user 42", "... of one user (--from-beginning: all)"],
        ["python -m services.ingest publish-rating 42 50 4.5", "rate a movie by hand"],
        [f"POST {gateway}/ratings", "the same over HTTP (also /movies, GET /health)"],
        ["make status", f"readiness and consumer lag (logs in {_shown(logs)})"],
        ["make down", "stop the stack"],
    ]
    indented = "\n".join(f"  {line}" for line in table(steps).splitlines())
    return f"reelstream is up: broker {address}{prefix}\nnext:\n{indented}"


def down(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S, out: Output = print) -> None:
    """Stop every service (SIGTERM, SIGKILL after ``timeout_s`` seconds), remove their
    pid and ready files, and stop the broker only if ``up`` started it."""
    settings = absolute(settings)
    paths = StackPaths(settings.var_dir)
    pids = {spec.name: pid for spec in SERVICES if (pid := running_pid(settings, spec))}
    if pids:
        stop_processes(pids, timeout_s=timeout_s, out=out)
    else:
        out("services    none running")
    for spec in SERVICES:
        paths.pid_file(spec.name).unlink(missing_ok=True)
        # A killed service cannot remove its own ready file.
        settings.ready_file(spec.name).unlink(missing_ok=True)
    if paths.broker_state.exists():
        try:
            data_dir = Path(json.loads(paths.broker_state.read_text())["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            data_dir = paths.broker_dir
        if broker.pid(data_dir) is not None:
            out(f"broker      stopping (data kept in {data_dir})")
            broker.stop(data_dir)
        paths.broker_state.unlink(missing_ok=True)
    else:
        out(f"broker      {settings.kafka_bootstrap_servers}: not started by `up`, left alone")


@dataclass(frozen=True)
class BrokerStatus:
    address: str
    reachable: bool
    pid: int | None
    """Pid of the broker ``up`` started; None when it is not ours (or not running)."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    """Pid of the running process; None when it does not run."""
    crashed: bool
    """A pid file is there but its process is gone: it died without ``down``."""
    ready: bool
    group: str | None
    lag: int | None
    """Messages not yet committed by the group, over the partitions it has committed
    on; None when unknown (no commit yet, no consumer group, broker unreachable)."""
    log: Path


@dataclass(frozen=True)
class StackStatus:
    broker: BrokerStatus
    services: tuple[ServiceStatus, ...]


def consumer_lag(
    settings: Settings,
    group: str,
    *,
    admin: AdminClient | None = None,
    consumer: Consumer | None = None,
    timeout_s: float = 5.0,
) -> int | None:
    """Total lag of a consumer group: high watermark minus committed offset, summed
    over every partition of every topic the group has committed on (a partition with
    no commit counts from its low watermark). None when the group has no commit."""
    admin = admin or make_admin(settings)
    owned = consumer is None
    consumer = consumer or make_consumer(settings, f"reelstream-status-{uuid.uuid4().hex}")
    try:
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s
        )
        result = futures[group].result()
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in result.topic_partitions or []
            if tp.offset >= 0
        }
        if not committed:
            return None
        lag = 0
        for topic in sorted({t for t, _ in committed}):
            metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
            for partition in metadata.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout_s
                )
                lag += max(0, high - committed.get((topic, partition), low))
        return lag
    finally:
        if owned:
            consumer.close()


def status(settings: Settings, *, timeout_s: float = 5.0) -> StackStatus:
    """The broker and every service: running, ready, consumer lag. Never raises for a
    stack that is down or half up."""
    settings = absolute(settings)
    paths = StackPaths(settings.var_dir)
    address = settings.kafka_bootstrap_servers
    reachable = broker_answers(address, timeout_s=timeout_s)
    admin: AdminClient | None = None
    consumer: Consumer | None = None
    if reachable:
        admin = make_admin(settings)
        consumer = make_consumer(settings, f"reelstream-status-{uuid.uuid4().hex}")
    rows = []
    try:
        for spec in SERVICES:
            pid = running_pid(settings, spec)
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
                    pid=pid,
                    crashed=pid is None and paths.pid_file(spec.name).exists(),
                    ready=pid is not None and settings.ready_file(spec.name).exists(),
                    group=group,
                    lag=lag,
                    log=paths.log_file(spec.name),
                )
            )
    finally:
        if consumer is not None:
            consumer.close()
    return StackStatus(
        broker=BrokerStatus(address, reachable, our_broker_pid(settings)),
        services=tuple(rows),
    )


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_status(report: StackStatus) -> str:
    """The status report as text: a broker line and a service table."""
    b = report.broker
    owner = f"pid {b.pid}, started by `make up`" if b.pid else "not started by `make up`"
    lines = [f"broker  {b.address}  {'reachable' if b.reachable else 'NOT reachable'}  ({owner})"]
    rows = [["SERVICE", "STATE", "PID", "READY", "LAG", "GROUP"]]
    for s in report.services:
        state = "running" if s.pid else ("crashed" if s.crashed else "stopped")
        rows.append(
            [
                s.name,
                state,
                str(s.pid) if s.pid else "-",
                "yes" if s.ready else "no",
                "-" if s.lag is None else str(s.lag),
                s.group or "-",
            ]
        )
    lines += ["", table(rows)]
    if any(s.crashed for s in report.services):
        crashed = [s for s in report.services if s.crashed]
        lines += ["", *(f"{s.name} crashed: see {s.log}" for s in crashed)]
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
    until ``limit`` lists were printed or ``stop`` is set; returns how many were.

    Reads without a consumer group commit, so it never disturbs the services.
    """
    wanted = {str(u) for u in users}
    topic = settings.topic(RECOMMENDATIONS.name)
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
                event = decode(RecommendationsGenerated, message.value())
            except InvalidEventError as exc:
                out(f"(invalid message p{message.partition()}@{message.offset()}: {exc})")
                continue
            if wanted and str(event.user_id) not in wanted:
                continue
            out(format_recommendations(event))
            shown += 1
    finally:
        consumer.close()
    return shown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack", description="Run the reelstream stack locally."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p_up = commands.add_parser("up", help="start the broker (if needed) and the services")
    p_up.add_argument(
        "--timeout", type=float, default=START_TIMEOUT_S, help="seconds to wait for readiness"
    )
    p_down = commands.add_parser("down", help="stop the services, and the broker if ours")
    p_down.add_argument(
        "--timeout", type=float, default=STOP_TIMEOUT_S, help="seconds before SIGKILL"
    )
    commands.add_parser("status", help="broker, services, readiness and consumer lag")
    p_tail = commands.add_parser("tail", help="print recommendation lists as they arrive")
    p_tail.add_argument("--from-beginning", action="store_true", help="start at the oldest")
    p_tail.add_argument("--user", action="append", default=[], help="only this user (repeatable)")
    p_tail.add_argument("--limit", type=int, default=None, help="stop after N lists")
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

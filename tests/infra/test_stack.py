"""The local stack launcher (`make up/down/status`) on the session's real broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from confluent_kafka import TopicPartition

from infra import broker, stack
from infra.topics import ensure_topics
from shared.config import Settings
from shared.events import DEAD_LETTERS, RATINGS, DeadLetter
from shared.kafka.client import make_consumer, make_producer


@pytest.fixture
def stack_env(bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of a stack of our own, set through the environment as `make up` sees
    them: the test broker, a fresh topic prefix, a tmp var dir, free HTTP ports."""
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REELSTREAM_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "REELSTREAM_PARTITIONS": "2",
        "REELSTREAM_VAR_DIR": str(tmp_path / "var"),
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "INGEST_HTTP_PORT": str(broker.free_port()),
        "API_HTTP_PORT": str(broker.free_port()),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("QDRANT_URL", raising=False)
    return Settings()


@pytest.fixture
def stopped_afterwards(stack_env: Settings) -> Iterator[list[str]]:
    """Collects the launcher's output, and stops whatever the test started."""
    lines: list[str] = []
    try:
        yield lines
    finally:
        stack.down(stack_env, timeout_s=30, out=lines.append)
        print("\n".join(lines))  # shown by pytest when the test fails


def _wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll ``condition`` until it is true; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.mark.integration
@pytest.mark.slow
def test_up_status_down_runs_the_whole_stack(
    stack_env: Settings, stopped_afterwards: list[str]
) -> None:
    pids = stack.up(stack_env, timeout_s=420, out=stopped_afterwards.append)

    assert set(pids) == {spec.name for spec in stack.SERVICES}
    report = stack.status(stack_env)
    assert report.supervisord_pid is not None
    assert report.broker.reachable
    assert not report.broker.supervised  # the test broker is not ours to stop
    for service in report.services:
        assert service.pid == pids[service.name]
        assert service.state in ("STARTING", "RUNNING")
        assert service.ready, f"{service.name} is not ready"
        assert service.restarts == 0
        assert stack.process_alive(service.pid)
    text = stack.format_status(report)
    for spec in stack.SERVICES:
        assert spec.name in text
    assert "dead letters 0" in text

    # A bad rating lands on dead-letters, and the status counts it by service and source.
    producer = make_producer(stack_env)
    producer.produce(stack_env.topic(RATINGS.name), key=b"9", value=b"{not json")
    assert producer.flush(10) == 0
    _wait_for(
        lambda: (stack.status(stack_env).dead_letters or {}).get(("user-profile", "ratings")) == 1,
        60,
        "the bad rating counted as a dead letter",
    )
    assert "dead letters 1: user-profile from ratings 1" in stack.format_status(
        stack.status(stack_env)
    )
    shown: list[str] = []
    assert (
        stack.follow(
            stack_env,
            DEAD_LETTERS,
            lambda e: stack.format_dead_letter(cast(DeadLetter, e)),
            from_beginning=True,
            limit=1,
            out=shown.append,
        )
        == 1
    )
    assert "user-profile" in shown[0] and "reason:" in shown[0] and "{not json" in shown[0]

    # A consumer killed with -9 is restarted at once, and back to work within 30 s.
    os.kill(pids["recommender"], signal.SIGKILL)
    took = _wait_for(
        lambda: stack.program_pid(stack_env, "recommender") not in (None, pids["recommender"]),
        10,
        "recommender restarted",
    )
    start = time.monotonic()
    pids.update(stack.wait_ready(stack_env, ["recommender"], timeout_s=60, out=print))
    took += time.monotonic() - start
    print(f"recommender killed -9: ready again after {took:.1f} s")
    assert took < 30

    # A second `up` finds everything running and starts nothing twice.
    assert stack.up(stack_env, timeout_s=30, out=stopped_afterwards.append) == pids

    everything = stack.stack_processes(stack_env)
    assert set(pids.values()) < set(everything)
    stack.down(stack_env, out=stopped_afterwards.append)
    assert not stack.stack_processes(stack_env)
    for pid in everything:
        assert not stack.process_alive(pid), f"pid {pid} still runs"
    assert not any(stack_env.ready_file(name).exists() for name in pids)
    assert broker.is_reachable(stack_env.kafka_bootstrap_servers)
    report = stack.status(stack_env)
    assert report.supervisord_pid is None
    assert all(s.state == "STOPPED" and s.pid is None and not s.ready for s in report.services)


@pytest.fixture
def own_broker_stack(tmp_path: Path) -> Iterator[Settings]:
    """Settings of a stack that starts its own broker (nothing answers at a free local
    port); stopped afterwards."""
    settings = Settings(
        kafka_bootstrap_servers=f"127.0.0.1:{broker.free_port()}",
        topic_partitions=2,
        var_dir=tmp_path / "var",
        qdrant_path=tmp_path / "qdrant",
        ingest_http_port=broker.free_port(),
        api_http_port=broker.free_port(),
    )
    lines: list[str] = []
    try:
        yield settings
    finally:
        stack.down(settings, out=lines.append)
        print("\n".join(lines))


@pytest.mark.integration
def test_supervisord_restarts_a_killed_program_and_down_leaves_nothing(
    own_broker_stack: Settings,
) -> None:
    settings = own_broker_stack
    lines: list[str] = []
    pids = stack.up(settings, services=[stack.INGEST], timeout_s=120, out=lines.append)
    assert "starting noida-db" in "\n".join(lines)
    server = stack.program_pid(settings, stack.BROKER)
    assert server is not None

    # kill -9 a service: supervisord starts it again, and it becomes ready again; the
    # restarted process's first ready file is seen before supervisord calls it RUNNING.
    killed = time.time()
    os.kill(pids["ingest"], signal.SIGKILL)
    times = stack.first_ready(settings, "ingest", old_pid=pids["ingest"], timeout_s=60)
    assert times is not None
    began, ready = times
    assert began <= ready and ready > killed
    restarted = stack.wait_ready(settings, ["ingest"], timeout_s=60, out=lines.append)
    assert restarted["ingest"] != pids["ingest"]

    # kill -9 the broker server: supervisord starts the broker again on the same data.
    os.kill(server, signal.SIGKILL)
    _wait_for(
        lambda: (
            stack.program_pid(settings, stack.BROKER) not in (None, server)
            and stack.broker_answers(settings.kafka_bootstrap_servers)
        ),
        20,
        "broker restarted",
    )
    report = stack.status(settings)
    assert report.broker.supervised and report.broker.reachable
    assert report.broker.restarts == 1
    ingest = next(s for s in report.services if s.name == "ingest")
    assert ingest.restarts == 1 and ingest.pid == restarted["ingest"]
    assert "restarts 1" in stack.format_status(report)

    # stop_program / start_program: stopped stays stopped until started again.
    stack.stop_program(settings, stack.BROKER)
    assert stack.program_pid(settings, stack.BROKER) is None
    assert not stack.broker_answers(settings.kafka_bootstrap_servers)
    stack.start_program(settings, stack.BROKER)
    _wait_for(lambda: stack.broker_answers(settings.kafka_bootstrap_servers), 20, "broker back")

    # `up` on the running stack starts nothing twice.
    assert stack.up(settings, services=[stack.INGEST], timeout_s=30, out=lines.append) == restarted
    everything = stack.stack_processes(settings)
    assert {restarted["ingest"], stack.program_pid(settings, stack.BROKER)} < set(everything)

    stack.down(settings, out=lines.append)
    assert stack.stack_processes(settings) == []
    for pid in everything:
        assert not stack.process_alive(pid), f"pid {pid} still runs"
    assert not stack.StackPaths(settings.var_dir).supervisor_socket.exists()
    assert not stack.broker_answers(settings.kafka_bootstrap_servers)


@pytest.mark.integration
def test_up_reports_a_service_that_dies_while_starting(
    stack_env: Settings, stopped_afterwards: list[str]
) -> None:
    # A port already taken is a real way for the HTTP gateway to fail at start.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stack_env.ingest_http_port))
        taken.listen()
        with pytest.raises(stack.StackError, match="ingest exited"):
            stack.up(
                stack_env,
                services=[stack.INGEST],
                timeout_s=180,
                out=stopped_afterwards.append,
            )
        # The tail of the service's log is shown, not only "it failed".
        output = "\n".join(stopped_afterwards)
        assert "last lines of" in output
        assert str(stack_env.ingest_http_port) in output or "address" in output.lower()
        report = stack.status(stack_env)
    assert not report.broker.supervised
    ingest = next(s for s in report.services if s.name == "ingest")
    assert not ingest.ready
    assert ingest.restarts is not None and ingest.restarts >= stack.START_EXITS - 1


@pytest.mark.integration
def test_status_and_down_when_nothing_runs(stack_env: Settings) -> None:
    report = stack.status(stack_env)
    assert report.supervisord_pid is None
    assert report.broker.reachable
    assert not report.broker.supervised and report.broker.pid is None
    assert [s.name for s in report.services] == [spec.name for spec in stack.SERVICES]
    assert all(s.state == "STOPPED" and s.pid is None and not s.ready for s in report.services)
    assert all(s.lag is None for s in report.services)  # no group has committed yet
    assert "supervisord  not running" in stack.format_status(report)

    lines: list[str] = []
    stack.down(stack_env, out=lines.append)
    stack.down(stack_env, out=lines.append)  # down twice: still nothing to fail on
    assert "none running" in "\n".join(lines)
    assert broker.is_reachable(stack_env.kafka_bootstrap_servers)  # not ours: left alone


@pytest.mark.integration
def test_consumer_lag_counts_uncommitted_messages(stack_env: Settings) -> None:
    ensure_topics(stack_env)
    topic = stack_env.topic(RATINGS.name)
    producer = make_producer(stack_env)
    for i in range(10):
        producer.produce(topic, key=f"user-{i}".encode(), value=b"{}")
    assert producer.flush(10) == 0
    group = stack_env.group("lag-probe")
    assert stack.consumer_lag(stack_env, group) is None  # nothing committed yet

    consumer = make_consumer(stack_env, group)
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        # Commit offset 1 on partition 0 only: 1 message done, 9 to go over the topic.
        consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    finally:
        consumer.close()
    assert len(partitions) == 2
    assert stack.consumer_lag(stack_env, group) == 9


def test_child_env_passes_the_launcher_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        kafka_bootstrap_servers="127.0.0.1:1234",
        topic_prefix="p.",
        var_dir=Path("relative/var"),
        top_k=7,
    )
    base = {"PATH": "/bin", "QDRANT_URL": "http://stale:6333", "REELSTREAM_TOP_K": "99"}
    env = stack.child_env(stack.absolute(settings), base)
    assert env["PATH"] == "/bin"
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:1234"
    assert env["REELSTREAM_TOPIC_PREFIX"] == "p."
    assert env["REELSTREAM_TOP_K"] == "7"  # the launcher's value wins over the inherited
    assert "QDRANT_URL" not in env  # None in the settings: not inherited either
    assert Path(env["REELSTREAM_VAR_DIR"]).is_absolute()
    assert env["HF_HUB_OFFLINE"] == "1"
    # What the services build from that environment is what the launcher had.
    for field in Settings.model_fields:
        monkeypatch.delenv(stack.env_name(field), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == stack.absolute(settings)


def test_up_refuses_a_remote_broker_it_cannot_start(tmp_path: Path) -> None:
    # 192.0.2.0/24 is reserved for documentation: nothing answers there.
    settings = Settings(kafka_bootstrap_servers="192.0.2.1:9092", var_dir=tmp_path / "var")
    with pytest.raises(stack.StackError, match="only a single local address"):
        stack.up(settings, services=[], out=lambda _line: None)
    assert stack.supervisord_pid(settings) is None
    assert not (tmp_path / "var" / "run" / "supervisord.conf").exists()


def test_a_ready_file_counts_only_while_fresh(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var")
    ready = settings.ready_file("recommender")
    assert not stack.is_ready(settings, "recommender")  # no file
    ready.parent.mkdir(parents=True)
    ready.write_text("")
    now = time.time()
    assert stack.is_ready(settings, "recommender", since=now - 5, now=now)
    # Written before the current process started: left by one that was killed.
    assert not stack.is_ready(settings, "recommender", since=now + 1, now=now)
    old = now - stack.READY_MAX_AGE_S - 1
    os.utime(ready, (old, old))
    assert not stack.is_ready(settings, "recommender", now=now)


def test_the_config_supervises_each_program_with_restarts(tmp_path: Path) -> None:
    settings = stack.absolute(
        Settings(var_dir=tmp_path / "var", kafka_bootstrap_servers="127.0.0.1:19092")
    )
    programs = stack.programs_for(settings, [stack.INGEST], with_broker=True)
    assert [p.name for p in programs] == ["broker", *(s.name for s in stack.SERVICES)]
    assert programs[0].argv == tuple(broker.foreground_argv(19092, settings.var_dir / "broker"))
    config = stack.render_config(settings, programs)
    # noida-db documents Ctrl-C (SIGINT) as its stop; the services stop on SIGTERM.
    for name, stop in (("broker", "INT"), ("recommender", "TERM")):
        section = config.split(f"[program:{name}]\n")[1].split("\n\n")[0]
        for line in (
            "autorestart=true",
            "stopasgroup=true",
            "killasgroup=true",
            f"stopsignal={stop}",
        ):
            assert line in section.splitlines()
        assert f"stdout_logfile={settings.var_dir / 'log' / name}.log" in section
    assert "unix://" in config and "inet_http_server" not in config
    # The services' environment is supervisord's, not written into the config.
    assert "environment=" not in config
    assert stack.programs_for(settings, [], with_broker=False)[0].name == "ingest"
    with pytest.raises(stack.StackError, match="single local address"):
        stack.programs_for(
            settings.model_copy(update={"kafka_bootstrap_servers": "a:1,b:2"}), [], with_broker=True
        )


def test_a_long_var_dir_gets_a_short_socket_path(tmp_path: Path) -> None:
    paths = stack.StackPaths(tmp_path / ("x" * 120))
    assert len(str(paths.supervisor_socket)) <= stack.SOCKET_PATH_MAX
    assert paths.supervisor_socket == stack.StackPaths(tmp_path / ("x" * 120)).supervisor_socket
    assert stack.StackPaths(Path("/v")).supervisor_socket == Path("/v/run/supervisor.sock")


def test_down_stops_services_started_before_supervisord(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var", kafka_bootstrap_servers="127.0.0.1:1")
    paths = stack.StackPaths(stack.absolute(settings).var_dir)
    paths.run_dir.mkdir(parents=True)
    # A detached service of the earlier launcher: its pid file names it.
    service = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "services.recommender"]
    )
    paths.pid_file("recommender").write_text(f"{service.pid}\n")
    # A live process that is not the service (a reused pid) is not touched.
    paths.pid_file("ingest").write_text(f"{os.getpid()}\n")
    try:
        stack.down(settings, out=lambda _line: None)
        assert service.wait(10) == -signal.SIGTERM
    finally:
        service.kill()
        service.wait()
    assert not list(paths.run_dir.glob("*.pid"))

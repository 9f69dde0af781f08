"""The local stack launcher (`make up/down/status`) on the session's real broker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from infra import broker, stack
from infra.topics import ensure_topics
from shared.config import Settings
from shared.events import RATINGS
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
        "RECOMMENDER_HTTP_PORT": str(broker.free_port()),
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


def _pid_files(settings: Settings) -> list[Path]:
    return sorted((settings.var_dir / "run").glob("*.pid"))


@pytest.mark.integration
@pytest.mark.slow
def test_up_status_down_runs_the_whole_stack(
    stack_env: Settings, stopped_afterwards: list[str]
) -> None:
    pids = stack.up(stack_env, timeout_s=420, out=stopped_afterwards.append)

    assert set(pids) == {spec.name for spec in stack.SERVICES}
    report = stack.status(stack_env)
    assert report.broker.reachable
    assert report.broker.pid is None  # the test broker is not ours to stop
    for service in report.services:
        assert service.pid == pids[service.name]
        assert service.ready, f"{service.name} is not ready"
        assert stack.process_alive(service.pid)
    text = stack.format_status(report)
    for spec in stack.SERVICES:
        assert spec.name in text

    # A second `up` finds everything running and starts nothing twice.
    assert stack.up(stack_env, timeout_s=30, out=stopped_afterwards.append) == pids

    stack.down(stack_env, out=stopped_afterwards.append)
    assert not _pid_files(stack_env)
    for name, pid in pids.items():
        assert not stack.process_alive(pid), f"{name} (pid {pid}) still runs"
        assert not stack_env.ready_file(name).exists()
    assert broker.is_reachable(stack_env.kafka_bootstrap_servers)
    assert all(s.pid is None and not s.ready for s in stack.status(stack_env).services)


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
    ingest = next(s for s in report.services if s.name == "ingest")
    assert ingest.pid is None and ingest.crashed and not ingest.ready


@pytest.mark.integration
def test_status_and_down_when_nothing_runs(stack_env: Settings) -> None:
    report = stack.status(stack_env)
    assert report.broker.reachable
    assert report.broker.pid is None
    assert [s.name for s in report.services] == [spec.name for spec in stack.SERVICES]
    assert all(s.pid is None and not s.ready and not s.crashed for s in report.services)
    assert all(s.lag is None for s in report.services)  # no group has committed yet
    assert "stopped" in stack.format_status(report)

    lines: list[str] = []
    stack.down(stack_env, out=lines.append)
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
    assert not (tmp_path / "var" / "run" / "broker.json").exists()


def test_a_stale_pid_file_is_not_a_running_service(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var")
    paths = stack.StackPaths(settings.var_dir)
    paths.run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    paths.pid_file("recommender").write_text(f"{dead.pid}\n")
    # A live process that is not the service (a reused pid) does not count either.
    paths.pid_file("ingest").write_text(f"{os.getpid()}\n")

    assert stack.running_pid(settings, stack.RECOMMENDER) is None
    assert stack.running_pid(settings, stack.INGEST) is None
    report = stack.status(settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"}))
    by_name = {s.name: s for s in report.services}
    assert by_name["recommender"].crashed and by_name["recommender"].pid is None
    assert not report.broker.reachable

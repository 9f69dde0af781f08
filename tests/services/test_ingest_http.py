"""The ingest HTTP gateway, in-process and as ``python -m services.ingest serve``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.broker import free_port
from shared.config import Settings
from shared.events import MOVIES, RATINGS, MoviePublished, RatingSubmitted
from shared.exceptions import ConfigurationError
from shared.ingest import SERVICE
from shared.ingest.gateway import Gateway, is_loopback
from tests.conftest import SettingsFactory
from tests.kafka_helpers import read_topic

ROOT = Path(__file__).resolve().parents[2]


def request(
    url: str, body: bytes | None = None, method: str | None = None, token: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of an HTTP request (error statuses included)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class RunningGateway:
    """A gateway on its own event loop thread, as the service runs it."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.gateway = Gateway(settings, port=0)

    def __enter__(self) -> Gateway:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self.loop).result(30)
        return self.gateway

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Gateway]:
    with RunningGateway(settings) as running:
        yield running


@pytest.mark.integration
def test_valid_rating_is_published_with_an_event_id(gateway: Gateway, settings: Settings) -> None:
    body = {"user_id": 42, "movie_id": "7", "rating": 4.5, "occurred_at": 881250949}
    status, event = request(f"{gateway.url}/ratings", json.dumps(body).encode())

    assert status == 202
    assert event["user_id"] == "42"
    assert event["occurred_at"] == "1997-12-04T15:55:49Z"
    assert len(event["event_id"]) == 32  # assigned by the gateway
    published = read_topic(settings, RATINGS, lambda events: len(events) >= 1)
    assert published == [RatingSubmitted.model_validate(event)]


@pytest.mark.integration
def test_given_event_id_is_kept_and_movies_are_published(
    gateway: Gateway, settings: Settings
) -> None:
    rating = {"event_id": "e-1", "user_id": "1", "movie_id": "2", "rating": 3, "occurred_at": 1}
    assert request(f"{gateway.url}/ratings", json.dumps(rating).encode())[1]["event_id"] == "e-1"
    movie = {"movie_id": "2", "title": "GoldenEye", "year": 1995, "genres": ["Action"]}
    status, event = request(f"{gateway.url}/movies", json.dumps(movie).encode())

    assert status == 202
    assert event["title"] == "GoldenEye"
    published = read_topic(settings, MOVIES, lambda events: len(events) >= 1)
    assert published == [MoviePublished.model_validate(movie)]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/ratings", b"{not json", "invalid JSON"),
        ("/ratings", b"", "empty message value"),
        ("/ratings", b"[1, 2]", "expected a JSON object"),
        (
            "/ratings",
            b'{"user_id": "1", "movie_id": "2", "rating": 7, "occurred_at": 1}',
            "rating: Input should be less than or equal to 5",
        ),
        ("/ratings", b'{"user_id": "1", "movie_id": "2", "rating": 3}', "occurred_at"),
        ("/movies", b'{"movie_id": "1", "title": "X", "colour": "red"}', "colour"),
    ],
)
def test_invalid_body_is_refused_with_the_reason(
    gateway: Gateway, path: str, body: bytes, reason: str
) -> None:
    status, answer = request(f"{gateway.url}{path}", body, method="POST")
    assert status == 400
    assert reason in answer["error"]
    assert gateway.rejected == 1


@pytest.mark.integration
def test_with_a_token_writes_must_carry_it(make_settings: SettingsFactory) -> None:
    settings = make_settings(ingest_token="s3cret")
    rating = {"user_id": "1", "movie_id": "2", "rating": 3, "occurred_at": 1}
    with RunningGateway(settings) as gateway:
        url, body = f"{gateway.url}/ratings", json.dumps(rating).encode()
        status, answer = request(url, body)
        assert status == 401
        assert "Authorization: Bearer" in answer["error"]
        assert request(url, body, token="wrong")[0] == 401
        assert request(url, body, token="s3cret")[0] == 202
        assert request(f"{gateway.url}/health")[0] == 200  # reads need none
    published = read_topic(settings, RATINGS, lambda events: len(events) >= 1)
    assert len(published) == 1


def test_off_loopback_the_gateway_refuses_to_start_without_a_token(
    make_settings: SettingsFactory,
) -> None:
    with pytest.raises(ConfigurationError, match="INGEST_TOKEN"):
        Gateway(make_settings(), host="0.0.0.0", port=0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


@pytest.mark.integration
def test_health_unknown_routes_and_ready_file(gateway: Gateway, settings: Settings) -> None:
    assert request(f"{gateway.url}/health") == (200, {"status": "ok"})
    status, answer = request(f"{gateway.url}/nowhere")
    assert status == 404
    assert "error" in answer
    assert request(f"{gateway.url}/ratings")[0] == 405
    assert settings.ready_file(SERVICE).is_file()


@pytest.mark.integration
def test_oversized_body_is_refused(make_settings: SettingsFactory) -> None:
    settings = make_settings(max_message_bytes=2048)
    with RunningGateway(settings) as gateway:
        status, answer = request(f"{gateway.url}/movies", b'{"x": "' + b"a" * 4096 + b'"}')
    assert status == 413
    assert "error" in answer
    assert not settings.ready_file(SERVICE).exists()


@pytest.mark.integration
def test_serve_command_stops_cleanly_on_sigterm(settings: Settings) -> None:
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REELSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "REELSTREAM_VAR_DIR": str(settings.var_dir),
        "INGEST_HTTP_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    ready = settings.ready_file(SERVICE)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.ingest", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.1)
        assert request(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"})
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert "stopping" in output
    assert not ready.exists()

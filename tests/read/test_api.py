"""The read API against a real broker and embedded Qdrant: views of the compacted
topics, the HTTP endpoints (in process), and ``python -m services.api`` as the stack
runs it (server, ready file, CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from infra.broker import free_port
from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    NEWCOMERS_USER_ID,
    RECOMMENDATIONS,
    USER_PROFILES,
    DeadLetter,
    Event,
    ItemEmbedded,
    RecommendationsGenerated,
    RecommendedItem,
    UserProfileUpdated,
)
from shared.handlers import item_embedding, recommender, user_profile
from shared.kafka.message import Outgoing, Source, dead_letter
from shared.kafka.publisher import Publisher
from shared.read import SERVICE
from shared.read.activity import project
from shared.read.app import create_app
from shared.read.views import STREAM_SERVICES, ReadViews
from tests.conftest import SettingsFactory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
GENRES = ["Drama", "Comedy", "Drama", "Horror", "Drama", "Comedy"]
YEARS = [1995, 1995, 1996, 1996, 1997, 1997]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def movies() -> list[ItemEmbedded]:
    rng = np.random.default_rng(7)
    return [
        ItemEmbedded(
            movie_id=str(i),
            title=f"Movie {i}",
            year=YEARS[i],
            genres=[GENRES[i]],
            vector=unit(rng.normal(size=DIM)),
            modalities=["text"],
            model_version="test-v1",
            embedded_at=datetime.now(UTC),
        )
        for i in range(len(GENRES))
    ]


def a_list(user: str, movie_ids: list[str], cause: str) -> RecommendationsGenerated:
    return RecommendationsGenerated(
        user_id=user,
        items=[
            RecommendedItem(
                movie_id=m, title=f"Movie {m}", score=1.0 - i / 10, predicted_rating=4.0
            )
            for i, m in enumerate(movie_ids)
        ],
        model_version="test-v1",
        cause_event_id=cause,
        generated_at=datetime.now(UTC),
        latency_ms=12.5,
    )


def a_profile(user: str, rated: list[str], ratings: list[float]) -> UserProfileUpdated:
    now = datetime.now(UTC)
    return UserProfileUpdated(
        user_id=user,
        vector=unit(np.ones(DIM)),
        n_ratings=len(rated),
        mean_rating=float(np.mean(ratings)),
        rated=rated,
        ratings=ratings,
        model_version="test-v1",
        cause_event_id="e-last",
        cause_published_at=now,
        updated_at=now,
    )


def a_dead_letter(settings: Settings) -> DeadLetter:
    source = Source(settings.topic("ratings"), 0, 41, b"7", b"{not json", None)
    letter = dead_letter(source, "invalid JSON: expected a value", "user-profile").event
    assert isinstance(letter, DeadLetter)
    return letter


def publish(settings: Settings, events: list[tuple[object, Event]]) -> None:
    publisher = Publisher(settings)
    for spec, event in events:
        publisher.publish(Outgoing(spec, event))  # type: ignore[arg-type]
    publisher.flush()


@pytest.fixture
def stocked(make_settings: SettingsFactory) -> Settings:
    """A topic namespace holding six movies, two lists of user 7 (the later one wins),
    the newcomers' list and user 7's profile."""
    settings = make_settings()
    publish(
        settings,
        [(ITEM_EMBEDDINGS, m) for m in movies()]
        + [
            (RECOMMENDATIONS, a_list("7", ["1", "2"], "e-first")),
            (RECOMMENDATIONS, a_list("7", ["3", "4", "5"], "e-last")),
            (RECOMMENDATIONS, a_list(NEWCOMERS_USER_ID, ["0", "1"], "e-new")),
            (USER_PROFILES, a_profile("7", ["0", "2"], [3.0, 5.0])),
            (DEAD_LETTERS, a_dead_letter(settings)),
        ],
    )
    return settings


@pytest.fixture
def client(stocked: Settings) -> Iterator[TestClient]:
    views = ReadViews(stocked).start()
    try:
        assert views.wait_ready(60)
        with TestClient(create_app(views)) as test_client:
            yield test_client
    finally:
        views.stop()


def test_a_users_current_list_with_titles(client: TestClient) -> None:
    body = client.get("/users/7/recommendations").json()
    assert body["for_newcomers"] is False
    assert [i["movie_id"] for i in body["items"]] == ["3", "4", "5"]
    assert [i["title"] for i in body["items"]] == ["Movie 3", "Movie 4", "Movie 5"]
    assert body["cause_event_id"] == "e-last"
    assert body["model_version"] == "test-v1"
    assert body["items"][0]["predicted_rating"] == 4.0


def test_a_user_without_a_list_gets_the_newcomers_list_marked(client: TestClient) -> None:
    body = client.get("/users/unknown-42/recommendations").json()
    assert body["for_newcomers"] is True
    assert body["user_id"] == "unknown-42"
    assert [i["movie_id"] for i in body["items"]] == ["0", "1"]


def test_no_list_at_all_is_a_clear_404(make_settings: SettingsFactory) -> None:
    views = ReadViews(make_settings()).start()
    try:
        assert views.wait_ready(60)
        response = TestClient(create_app(views)).get("/users/7/recommendations")
        assert response.status_code == 404
        assert "no list for user '7'" in response.json()["detail"]
    finally:
        views.stop()


def test_a_users_profile_names_their_latest_movies(client: TestClient) -> None:
    body = client.get("/users/7").json()
    assert body["n_ratings"] == 2
    assert [(r["movie_id"], r["title"], r["rating"]) for r in body["recent"]] == [
        ("2", "Movie 2", 5.0),
        ("0", "Movie 0", 3.0),
    ]
    assert body["vector_updated_at"]
    assert client.get("/users/8").status_code == 404


def test_a_movie_and_an_unknown_one(client: TestClient) -> None:
    body = client.get("/movies/3").json()
    assert (body["title"], body["year"], body["genres"]) == ("Movie 3", 1996, ["Horror"])
    response = client.get("/movies/999")
    assert response.status_code == 404
    assert "999" in response.json()["detail"]


def test_similar_movies_are_the_nearest_served_vectors(client: TestClient) -> None:
    catalogue = {m.movie_id: np.asarray(m.vector, dtype=np.float64) for m in movies()}
    cosine = {m: float(v @ catalogue["0"]) for m, v in catalogue.items() if m != "0"}
    expected = sorted(cosine, key=lambda m: -cosine[m])[:3]
    body = client.get("/movies/0/similar", params={"k": 3}).json()
    assert [i["movie_id"] for i in body["items"]] == expected
    assert [i["score"] for i in body["items"]] == pytest.approx(
        [cosine[m] for m in expected], abs=1e-5
    )
    assert all(i["title"] == f"Movie {i['movie_id']}" for i in body["items"])


def test_similar_filters_by_genre_and_year(client: TestClient) -> None:
    dramas = client.get("/movies/0/similar", params={"genre": "Drama"}).json()["items"]
    assert sorted(i["movie_id"] for i in dramas) == ["2", "4"]
    of_1997 = client.get("/movies/0/similar", params={"year": 1997}).json()["items"]
    assert sorted(i["movie_id"] for i in of_1997) == ["4", "5"]
    both = client.get("/movies/0/similar", params={"genre": "Comedy", "year": 1995}).json()
    assert [i["movie_id"] for i in both["items"]] == ["1"]


def test_similar_refuses_bad_requests(client: TestClient) -> None:
    assert client.get("/movies/999/similar").status_code == 404
    assert client.get("/movies/0/similar", params={"k": 0}).status_code == 422
    assert client.get("/movies/0/similar", params={"k": 1000}).status_code == 422


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "lists": 2, "profiles": 1, "movies": 6}


def test_views_follow_new_lists_and_survive_a_restart(stocked: Settings) -> None:
    views = ReadViews(stocked).start()
    try:
        assert views.wait_ready(60)
        publish(stocked, [(RECOMMENDATIONS, a_list("7", ["0"], "e-newer"))])
        assert views.sync(10)
        listed = views.recommendations("7")
        assert listed is not None and listed.cause_event_id == "e-newer"
    finally:
        views.stop()
    restarted = ReadViews(stocked).start()
    try:
        assert restarted.wait_ready(60)
        listed = restarted.recommendations("7")
        assert listed is not None and listed.cause_event_id == "e-newer"
        assert len(restarted.similar("0", 5)) == 5
    finally:
        restarted.stop()


def _get(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_service_serves_and_its_cli_prints_lists(stocked: Settings) -> None:
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": stocked.kafka_bootstrap_servers,
        "REELSTREAM_TOPIC_PREFIX": stocked.topic_prefix,
        "REELSTREAM_VAR_DIR": str(stocked.var_dir),
        "QDRANT_PATH": str(stocked.qdrant_path),
        "API_HTTP_PORT": str(port),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "services.api", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ready_file = stocked.ready_file(SERVICE)
    try:
        deadline = time.monotonic() + 90
        while not ready_file.exists():
            assert server.poll() is None, server.stdout and server.stdout.read().decode()
            assert time.monotonic() < deadline, "the API never became ready"
            time.sleep(0.2)
        assert _get(port, "/users/7/recommendations")["cause_event_id"] == "e-last"
        recommend = subprocess.run(
            [sys.executable, "-m", "services.api", "recommend", "--user", "7"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        lines = recommend.stdout.splitlines()
        assert "user 7" in lines[0]
        assert [line.strip().split("  ")[0] for line in lines[1:]] == [
            "1. Movie 3",
            "2. Movie 4",
            "3. Movie 5",
        ]
        similar = subprocess.run(
            [sys.executable, "-m", "services.api", "similar", "--movie", "0", "--k", "2"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert similar.stdout.startswith("more like Movie 0 [0]:")
        assert len(similar.stdout.splitlines()) == 3
        missing = subprocess.run(
            [sys.executable, "-m", "services.api", "similar", "--movie", "999"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert missing.returncode != 0
        assert "404" in missing.stderr and "999" in missing.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert server.returncode == 0
    assert not ready_file.exists()


def test_the_dashboard_page_and_its_data(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "dashboard/data" in page.text
    data = client.get("/dashboard/data").json()
    assert [(i["user_id"], i["titles"]) for i in data["feed"]] == [
        ("7", ["Movie 1", "Movie 2"]),
        ("7", ["Movie 3", "Movie 4", "Movie 5"]),
    ]  # the newcomers' list is no user's answer: not in the feed
    assert len(data["series"]) == 300
    assert sum(s["lists"] for s in data["series"]) == 2
    assert set(data["lag"]) == set(STREAM_SERVICES)
    assert data["dead_letters"]["by_reason"] == [
        {"service": "user-profile", "reason": "invalid JSON", "count": 1}
    ]
    assert data["counts"] == {"lists": 2, "profiles": 1, "movies": 6}
    newer = data["feed"][-1]["seq"]
    assert client.get("/dashboard/data", params={"after": newer}).json()["feed"] == []


def test_the_dashboard_space_holds_the_movies_and_a_users_path(client: TestClient) -> None:
    space = client.get("/dashboard/space", params={"user": "7"}).json()
    assert sorted(m[2] for m in space["movies"]) == [f"Movie {i}" for i in range(6)]
    assert len(space["trajectory"]) == 1
    assert client.get("/dashboard/space").json()["trajectory"] == []


def test_projection_keeps_the_catalogues_widest_direction() -> None:
    items = np.zeros((48, DIM))
    items[:, 3] = np.tile([-10.0, 10.0, -10.0, 10.0], 12)  # the widest direction
    items[:, 5] = np.tile([1.0, 1.0, -1.0, -1.0], 12)  # uncorrelated with it
    flat, user = project(items, np.eye(DIM)[3:4] * 4)
    assert np.allclose(np.abs(flat[:, 0]), 10) and np.allclose(np.abs(flat[:, 1]), 1)
    assert abs(user[0, 0]) == pytest.approx(4) and user[0, 1] == pytest.approx(0)


def test_the_lag_covers_every_stream_processor() -> None:
    assert set(STREAM_SERVICES) == {
        item_embedding.SERVICE,
        user_profile.SERVICE,
        recommender.SERVICE,
    }

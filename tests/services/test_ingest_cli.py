"""``python -m services.ingest`` commands, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.config import Settings
from shared.events import MOVIES, RATINGS, MoviePublished, RatingSubmitted
from tests.conftest import SettingsFactory
from tests.data.ml100k_files import write_recbole
from tests.kafka_helpers import read_topic

ROOT = Path(__file__).resolve().parents[2]


def ingest(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REELSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "REELSTREAM_VAR_DIR": str(settings.var_dir),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.ingest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_publish_rating(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    done = ingest(
        settings, "publish-rating", "42", "7", "4.5", "--at", "881250949", "--event-id", "cli-1"
    )

    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["event_id"] == "cli-1"
    published = read_topic(settings, RATINGS, lambda events: len(events) >= 1)
    assert published == [
        RatingSubmitted(
            event_id="cli-1",
            user_id="42",
            movie_id="7",
            rating=4.5,
            occurred_at=datetime.fromtimestamp(881250949, UTC),
        )
    ]


@pytest.mark.integration
def test_publish_rating_out_of_range_is_refused(make_settings: SettingsFactory) -> None:
    done = ingest(make_settings(), "publish-rating", "42", "7", "7")
    assert done.returncode == 2
    assert "rating: Input should be less than or equal to 5" in done.stderr
    assert done.stdout == ""


@pytest.mark.integration
def test_publish_movie(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    done = ingest(
        settings,
        "publish-movie",
        "m1",
        "Toy Story",
        "--year",
        "1995",
        "--genre",
        "Animation",
        "Comedy",
        "--director",
        "John Lasseter",
        "--cast",
        "Tom Hanks",
        "--cast",
        "Tim Allen",
        "--meta",
        "imdb_url=http://x",
    )

    assert done.returncode == 0, done.stderr
    (movie,) = read_topic(settings, MOVIES, lambda events: len(events) >= 1)
    assert isinstance(movie, MoviePublished)
    assert (movie.title, movie.year, movie.genres) == ("Toy Story", 1995, ["Animation", "Comedy"])
    assert movie.people.cast == ["Tom Hanks", "Tim Allen"]
    assert movie.people.directors == ["John Lasseter"]
    assert movie.metadata == {"imdb_url": "http://x"}


@pytest.mark.integration
def test_replay_command(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    folder = write_recbole(tmp_path / "ml")
    done = ingest(
        settings,
        "replay",
        "--dataset",
        str(folder),
        "--limit",
        "4",
        "--no-progress",
        "--embed-timeout",
        "0",
    )

    assert done.returncode == 0, done.stderr
    assert "published movies=5 ratings=4" in done.stdout
    ratings = read_topic(settings, RATINGS, lambda events: len(events) >= 4)
    assert len(ratings) == 4


def test_replay_without_data_says_how_to_get_it(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1", var_dir=tmp_path)
    done = ingest(settings, "replay", "--dataset", str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert "make data" in done.stderr

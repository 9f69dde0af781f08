"""The recommender: its handlers over a real catalogue, then the worker on the real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.lab.training.ranker import TwoTowerNet, ranker_of
from shared.config import Settings
from shared.convert import item_features_of
from shared.domain import Rating
from shared.events import (
    DEAD_LETTERS,
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    NEWCOMERS_USER_ID,
    RECOMMENDATIONS,
    USER_PROFILES,
    DeadLetter,
    Event,
    ItemEmbedded,
    ItemFeaturesUpdated,
    RecommendationsGenerated,
    TopicSpec,
    UserProfileUpdated,
    new_event_id,
)
from shared.handlers.recommender import (
    StatsBefore,
    UserHistory,
    handle_item_embeddings,
    handle_item_features,
    handle_user_profiles,
    newcomers_recommendations,
)
from shared.kafka.message import Incoming, Outgoing, Source
from shared.kafka.publisher import Publisher
from shared.models.item_stats import ItemStats, days
from shared.models.rating import RatingModel, RatingParams, fit_rating_factors
from shared.models.recommend import CandidateSources, Reranker
from shared.retrieval.catalogue import Catalogue
from shared.workers.recommender import RecommenderWorker
from tests.conftest import SettingsFactory
from tests.kafka_helpers import produce_raw, read_topic

DIM = 16
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def axis(i: int, dim: int = DIM) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[i]


def item(movie_id: str, vector: np.ndarray, title: str | None = None) -> ItemEmbedded:
    return ItemEmbedded(
        movie_id=movie_id,
        title=title or f"Movie {movie_id}",
        year=1997,
        genres=["Drama"],
        vector=unit(vector),
        modalities=["text", "metadata"],
        model_version="concat-v1",
        embedded_at=datetime.now(UTC),
    )


def seeded_items(n: int, seed: int = 0) -> list[ItemEmbedded]:
    rng = np.random.default_rng(seed)
    return [item(f"r{i}", rng.standard_normal(DIM)) for i in range(n)]


def profile(
    user: str,
    vector: np.ndarray,
    rated: list[str] | None = None,
    *,
    mean_rating: float = 3.8,
    published_at: datetime | None = None,
    ratings: list[float] | None = None,
    n_rated: int | None = None,
) -> UserProfileUpdated:
    return UserProfileUpdated(
        user_id=user,
        vector=unit(vector),
        n_ratings=len(rated or []) if n_rated is None else n_rated,
        mean_rating=mean_rating,
        rated=rated or [],
        ratings=ratings or [],
        n_rated=n_rated,
        model_version="mean-v1",
        cause_event_id=new_event_id(),
        cause_published_at=published_at or datetime.now(UTC),
        updated_at=datetime.now(UTC),
    )


def incoming(event: Event, offset: int = 0) -> Incoming:
    source = Source("user-profiles", 0, offset, b"k", b'{"raw": true}', None)
    return Incoming(event, source)


def handle(
    batch: list[Incoming],
    catalogue: Catalogue,
    settings: Settings,
    now: datetime,
    reranker: Reranker | None = None,
) -> list[Outgoing]:
    """``handle_user_profiles`` from no stored history; its outputs."""
    out, _ = handle_user_profiles(batch, {}, catalogue, settings, now, reranker)
    return out


def lists(out: list[Outgoing]) -> list[RecommendationsGenerated]:
    return [o.event for o in out if isinstance(o.event, RecommendationsGenerated)]


def letters(out: list[Outgoing]) -> list[DeadLetter]:
    return [o.event for o in out if isinstance(o.event, DeadLetter)]


@pytest.fixture
def catalogue() -> Catalogue:
    catalogue = Catalogue()
    catalogue.apply(
        [*seeded_items(40), item("hit", axis(0) + 0.2 * axis(1)), item("seen", axis(0))]
    )
    return catalogue


def settings() -> Settings:
    return Settings(top_k=5, n_candidates=20, mmr_lambda=0.7)


# --- handlers -------------------------------------------------------------------------


def test_a_profile_gets_a_list_that_excludes_what_it_rated(catalogue: Catalogue) -> None:
    p = profile("7", axis(0), ["seen"], mean_rating=9.0, published_at=NOW - timedelta(seconds=2))
    [rec] = lists(handle([incoming(p)], catalogue, settings(), NOW))
    assert rec.user_id == "7" and rec.cause_event_id == p.cause_event_id
    assert rec.items[0].movie_id == "hit"
    assert "seen" not in {i.movie_id for i in rec.items} and len(rec.items) == 5
    assert rec.items[0].title == "Movie hit"
    assert rec.items[0].score == pytest.approx(float(unit(axis(0) + 0.2 * axis(1))[0]), rel=1e-5)
    assert {i.predicted_rating for i in rec.items} == {5.0}
    assert rec.latency_ms == pytest.approx(2000.0)
    assert rec.generated_at == NOW
    assert rec.model_version == "user=mean-v1;item=concat-v1;ranker=none;rating=none;mmr=0.7"


def test_with_a_reranker_the_profiles_ratings_give_the_predicted_stars(
    catalogue: Catalogue,
) -> None:
    torch.manual_seed(0)
    ranker = ranker_of(TwoTowerNet(DIM, embed_dim=8, hidden=16, feature_hidden=8, rating_hidden=8))
    fit = fit_rating_factors(
        [
            Rating(user_id=str(u), movie_id=f"r{m}", rating=1.0 + (u + 2 * m) % 5)
            for u in range(6)
            for m in range(8)
        ],
        dim=2,
    )
    rating_model = RatingModel(fit.movie_ids, fit.factors, RatingParams(), (1.0, 5.0), "fold-in-t")
    reranker = Reranker(ranker, CandidateSources(ItemStats()), rating_model)
    rated = profile("7", axis(0), ["seen", "r3"], ratings=[5.0, 1.5])

    [rec] = lists(handle([incoming(rated)], catalogue, settings(), NOW, reranker))

    listed = [i.movie_id for i in rec.items]
    expected = reranker.predict_ratings(catalogue, (["seen", "r3"], [5.0, 1.5]), listed)
    assert expected is not None
    np.testing.assert_allclose([i.predicted_rating for i in rec.items], expected)
    assert f"ranker={ranker.model_version};rating=fold-in-t;" in rec.model_version


def test_the_last_profile_of_a_user_in_a_batch_wins(catalogue: Catalogue) -> None:
    first, second = profile("1", axis(0)), profile("1", axis(3), ["hit"])
    other = profile("2", axis(5), mean_rating=0.1)
    out = handle(
        [incoming(first, 0), incoming(other, 1), incoming(second, 2)], catalogue, settings(), NOW
    )
    recs = lists(out)
    assert [(r.user_id, r.cause_event_id) for r in recs] == [
        ("2", other.cause_event_id),
        ("1", second.cause_event_id),
    ]
    assert recs[0].items[0].predicted_rating == 0.5
    assert "hit" not in {i.movie_id for i in recs[1].items}


def test_a_profile_of_another_dimension_is_dead_lettered_and_the_rest_served(
    catalogue: Catalogue,
) -> None:
    bad = profile("1", axis(0, dim=8))
    good = profile("2", axis(0))
    out = handle([incoming(bad, 4), incoming(good, 5)], catalogue, settings(), NOW)
    [letter] = letters(out)
    assert "dimension 8" in letter.error and "dimension is 16" in letter.error
    assert (letter.service, letter.offset) == ("recommender", 4)
    assert [r.user_id for r in lists(out)] == ["2"]


def test_profiles_windows_build_the_history_that_lists_exclude(
    catalogue: Catalogue, caplog: pytest.LogCaptureFixture
) -> None:
    first = profile("1", axis(0), ["hit", "a"], n_rated=2, ratings=[5.0, 3.0])
    # The second profile's window holds the last 2 of 3 rated movies; "a" re-rated.
    second = profile("1", axis(0), ["a", "near"], n_rated=3, ratings=[1.0, 4.0])
    out, stored = handle_user_profiles([incoming(first, 0)], {}, catalogue, settings(), NOW)
    assert stored["1"] == UserHistory(("hit", "a"), (5.0, 3.0))
    raw = {u: h.to_bytes() for u, h in stored.items()}

    out, stored = handle_user_profiles([incoming(second, 1)], raw, catalogue, settings(), NOW)

    assert stored["1"] == UserHistory(("hit", "a", "near"), (5.0, 1.0, 4.0))
    assert UserHistory.from_bytes(stored["1"].to_bytes()) == stored["1"]
    [rec] = lists(out)
    assert not {"hit", "a", "near"} & {i.movie_id for i in rec.items}
    # Merging the same window again changes nothing (a profile published twice).
    assert stored["1"].merged(second) == stored["1"]
    # A window that starts past the stored history: what it holds is kept, the gap said.
    gap = profile("1", axis(0), ["far"], n_rated=6, ratings=[2.0])
    assert stored["1"].merged(gap).rated == ("hit", "a", "near", "far")
    assert "2 rated movies never reached the recommender" in caplog.text
    # A profile without n_rated carries every rated movie.
    assert UserHistory(("x",), (1.0,)).merged(profile("1", axis(0), ["y"])).rated == ("y",)


def test_an_empty_catalogue_still_publishes_the_list_with_no_items() -> None:
    p = profile("3", axis(0))
    [rec] = lists(handle([incoming(p)], Catalogue(), settings(), NOW))
    assert rec.items == [] and rec.model_version.startswith("user=mean-v1;item=none;")


def test_latency_is_never_negative(catalogue: Catalogue) -> None:
    p = profile("4", axis(2), published_at=NOW + timedelta(seconds=1))
    [rec] = lists(handle([incoming(p)], catalogue, settings(), NOW))
    assert rec.latency_ms == 0.0


def features(movie: str, stats: ItemStats, offset: int = 0) -> Incoming[ItemFeaturesUpdated]:
    """The ``item-features`` message of ``movie``'s statistics in ``stats``."""
    found = stats.get(movie)
    assert found is not None
    event = item_features_of(
        movie, found, stats.half_life_days, stats.fast_half_life_days, NOW, f"rating-{movie}"
    )
    return Incoming(event, Source("item-features", 0, offset, movie.encode(), b"{}", None))


def test_the_newcomers_list_holds_the_most_rated_movies_with_their_titles(
    catalogue: Catalogue,
) -> None:
    learned = ItemStats()
    hour = timedelta(hours=1)
    learned.learn_many(
        ["r2", "r2", "hit", "r7"],
        [5.0, 3.0, 4.0, 4.0],
        [NOW - hour, NOW - hour, NOW - 2 * hour, NOW],
    )
    # The recommender's statistics come from item-features, not from the ratings.
    stats = ItemStats()
    batch = [features(m, learned, i) for i, m in enumerate(["hit", "r2", "r7"])]
    assert handle_item_features(batch, stats) == []
    cause = batch[-1]
    rec = newcomers_recommendations(stats, catalogue, settings(), NOW, cause)
    assert rec is not None and rec.user_id == NEWCOMERS_USER_ID
    # r2 was rated twice; hit and r7 once each, and the later rating weighs a little more.
    assert [i.movie_id for i in rec.items] == ["r2", "r7", "hit"]
    assert rec.items[2].title == "Movie hit"
    assert rec.items[0].predicted_rating == pytest.approx(stats.shrunk_mean("r2"))
    assert rec.items[0].predicted_rating == pytest.approx(learned.shrunk_mean("r2"))
    assert rec.cause_event_id == "rating-r7" and rec.latency_ms == 0.0
    assert rec.model_version == "newcomers=trending-h10d;item=concat-v1"
    assert newcomers_recommendations(ItemStats(), catalogue, settings(), NOW, cause) is None


def test_lists_read_the_statistics_from_before_their_cause() -> None:
    learned = ItemStats()
    learned.learn_one("old", 4.0, NOW - timedelta(days=3))
    stats, before = ItemStats(), StatsBefore()
    assert handle_item_features([features("old", learned)], stats, before) == []
    learned.learn_one("old", 2.0, NOW - timedelta(days=1))
    learned.learn_one("new", 5.0, NOW)  # the newest rating: it sets the stream's time
    batch = [features(m, learned, i) for i, m in enumerate(["old", "new"], start=1)]
    assert handle_item_features(batch, stats, before) == []
    after = (stats.get("old"), stats.get("new"), stats.stream_day, stats.n_ratings)

    with before.excluding(stats, ["rating-new", "unknown"]):
        assert stats.get("new") is None and stats.n_ratings == 2
        assert stats.stream_day == pytest.approx(days(NOW - timedelta(days=1)))
    with before.excluding(stats, ["rating-old"]):
        assert stats.count("old") == 1 and stats.global_mean == pytest.approx(4.5)
    assert (stats.get("old"), stats.get("new"), stats.stream_day, stats.n_ratings) == after


def test_statistics_decayed_over_other_half_lives_are_dead_lettered() -> None:
    learned = ItemStats(half_life_days=3.0)
    learned.learn_one("m1", 4.0, NOW)
    learned.learn_one("m2", 2.0, NOW)
    stats = ItemStats()
    other = features("m1", learned)
    [letter] = letters(handle_item_features([other], stats))
    assert letter.offset == 0 and "half-lives 3/1 days" in letter.error
    assert len(stats) == 0
    fine = ItemStats()
    fine.learn_one("m2", 2.0, NOW)
    assert handle_item_features([features("m2", fine, 1)], stats) == []
    assert stats.count("m2") == 1 and stats.global_mean == 2.0


def test_refused_items_are_dead_lettered_and_the_others_kept() -> None:
    catalogue = Catalogue()
    batch = [
        incoming(item("a", axis(0))),
        incoming(item("b", axis(0, dim=4)), 1),
        incoming(item("c", axis(1))),
    ]
    [letter] = letters(handle_item_embeddings(batch, catalogue))
    assert letter.offset == 1 and "dimension 4" in letter.error
    assert len(catalogue) == 2


# --- the worker on the real broker ------------------------------------------------------


@contextmanager
def running(settings: Settings) -> Iterator[RecommenderWorker]:
    worker = RecommenderWorker(settings, catch_up_timeout_s=60)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive()


def publish(settings: Settings, spec_events: list[tuple[TopicSpec, Event]]) -> None:
    publisher = Publisher(settings)
    for spec, event in spec_events:
        publisher.publish(Outgoing(spec, event))
    publisher.flush()


def list_for(settings: Settings, cause_event_id: str) -> RecommendationsGenerated:
    def has(events: list[Event]) -> bool:
        return any(
            isinstance(e, RecommendationsGenerated) and e.cause_event_id == cause_event_id
            for e in events
        )

    events = read_topic(settings, RECOMMENDATIONS, has)
    return next(
        e
        for e in events
        if isinstance(e, RecommendationsGenerated) and e.cause_event_id == cause_event_id
    )


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.mark.integration
def test_the_worker_serves_lists_from_the_whole_catalogue_and_follows_new_items(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(top_k=5, n_candidates=20, mmr_lambda=0.7)
    catalogue_items = [
        *seeded_items(40),
        item("hit", axis(0) + 0.2 * axis(1)),
        item("seen", axis(0)),
    ]
    publish(settings, [(ITEM_EMBEDDINGS, e) for e in catalogue_items])

    with running(settings) as worker:
        first = profile("u1", axis(0), ["seen", "r3"])
        publish(settings, [(USER_PROFILES, first)])
        rec = list_for(settings, first.cause_event_id)
        assert len(worker.catalogue) == len(catalogue_items)
        assert rec.user_id == "u1" and len(rec.items) == 5
        assert rec.items[0].movie_id == "hit" and rec.items[0].title == "Movie hit"
        assert not {i.movie_id for i in rec.items} & {"seen", "r3"}
        assert rec.latency_ms >= 0
        assert rec.model_version == "user=mean-v1;item=concat-v1;ranker=none;rating=none;mmr=0.7"

        # A movie nobody has rated is recommended as soon as it is embedded.
        publish(settings, [(ITEM_EMBEDDINGS, item("fresh", axis(0) + 0.05 * axis(2), "Fresh"))])
        wait_until(lambda: "fresh" in worker.catalogue, "the new item")
        again = profile("u1", axis(0), ["seen", "r3"])
        publish(settings, [(USER_PROFILES, again)])
        rec = list_for(settings, again.cause_event_id)
        assert rec.items[0].movie_id == "fresh" and rec.items[0].title == "Fresh"
    assert not settings.ready_file("recommender").exists()


@pytest.mark.integration
def test_the_worker_publishes_the_newcomers_list_and_follows_what_is_rated(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(top_k=3, n_candidates=10)
    publish(settings, [(ITEM_EMBEDDINGS, e) for e in seeded_items(10)])
    # Rated before the worker starts: the list comes once the statistics are read.
    learned = ItemStats()
    learned.learn_many(["r4"] * 3 + ["r1"], [4.0] * 4, [NOW] * 4)
    publish(settings, [(ITEM_FEATURES, features(m, learned).event) for m in ("r4", "r1")])

    def newcomers(events: list[Event]) -> list[list[str]]:
        return [
            [i.movie_id for i in e.items]
            for e in events
            if isinstance(e, RecommendationsGenerated) and e.user_id == NEWCOMERS_USER_ID
        ]

    with running(settings):
        events = read_topic(settings, RECOMMENDATIONS, lambda ev: bool(newcomers(ev)))
        assert newcomers(events) == [["r4", "r1"]]
        # r7 is rated most of late now: a new list leads with it.
        learned.learn_many(["r7"] * 6, [4.0] * 6, [NOW] * 6)
        publish(settings, [(ITEM_FEATURES, features("r7", learned).event)])
        events = read_topic(settings, RECOMMENDATIONS, lambda ev: len(newcomers(ev)) >= 2)
        assert newcomers(events)[-1][0] == "r7"
        assert all(len(set(m)) == len(m) for m in newcomers(events))


@pytest.mark.integration
def test_bad_profiles_and_items_are_dead_lettered_and_the_worker_goes_on(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(top_k=3, n_candidates=10)
    publish(settings, [(ITEM_EMBEDDINGS, e) for e in seeded_items(10)])
    produce_raw(settings, ITEM_EMBEDDINGS, b"{not json", b"x1")
    publish(settings, [(ITEM_EMBEDDINGS, item("short", axis(0, dim=4)))])

    with running(settings):
        wrong_dim = profile("u2", axis(0, dim=8))
        publish(settings, [(USER_PROFILES, wrong_dim)])
        produce_raw(settings, USER_PROFILES, b"\x00garbage", b"u3")
        valid = profile("u4", axis(1), ["r0"])
        publish(settings, [(USER_PROFILES, valid)])
        rec = list_for(settings, valid.cause_event_id)
        assert len(rec.items) == 3 and "r0" not in {i.movie_id for i in rec.items}
        events = read_topic(settings, DEAD_LETTERS, lambda ev: len(ev) >= 4)

    dead = [e for e in events if isinstance(e, DeadLetter)]
    assert all(d.service == "recommender" for d in dead)
    by_topic: dict[str, list[str]] = {}
    for d in dead:
        by_topic.setdefault(d.source_topic.rsplit(".", 1)[-1], []).append(d.error)
    profiles, items = by_topic["user-profiles"], by_topic["item-embeddings"]
    assert any("u2 profile vector has dimension 8" in e for e in profiles)
    assert any("invalid JSON" in e for e in profiles)
    assert any("invalid JSON" in e for e in items)
    assert any("item short vector has dimension 4" in e for e in items)
    assert len(dead) == 4


@pytest.mark.integration
def test_python_m_worker_becomes_ready_and_stops_cleanly_on_sigterm(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    ready = settings.ready_file("recommender")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REELSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "REELSTREAM_VAR_DIR": str(settings.var_dir),
        "HF_HUB_OFFLINE": "1",
    }
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.recommender", "worker"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, "the ready file", 120)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "signal=SIGTERM stopping" in stderr
    assert not ready.exists()

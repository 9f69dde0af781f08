"""Online item and user features: the arithmetic by hand, batch == single, snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.exceptions import InvalidEventError, NumericalError
from shared.models.item_stats import (
    FEATURE_SCALE,
    ITEM_FEATURE_NAMES,
    N_ITEM_FEATURES,
    N_USER_FEATURES,
    SHARE_PER,
    ItemStats,
    user_features,
    user_features_batch,
)
from shared.models.updater import DEFAULT_PRIOR_RATING

UNRATED = [0.0, 0.0, 0.0, 1.0]


def stream(n: int, seed: int) -> tuple[list[str], list[float]]:
    rng = np.random.default_rng(seed)
    movies = [f"m{int(i)}" for i in rng.integers(0, 20, n)]
    ratings = [float(r) / 2 for r in rng.integers(1, 11, n)]
    return movies, ratings


def test_decayed_count_halves_after_half_life() -> None:
    stats = ItemStats(half_life=2.0)
    stats.learn_many(["a", "b", "b"], [4.0, 3.0, 5.0])
    gamma = 2.0**-0.5
    # "a" is two events old: exactly one half-life.
    assert stats.decayed_count("a") == pytest.approx(0.5)
    assert stats.decayed_count("b") == pytest.approx(1.0 + gamma)
    assert stats.decayed_total() == pytest.approx(0.5 + 1.0 + gamma)
    assert stats.decayed_count("never") == 0.0
    assert (stats.count("a"), stats.count("b"), stats.count("never")) == (1, 2, 0)


def test_renormalisation_keeps_decayed_counts() -> None:
    # A half-life of 0.01 events grows the increment by 2^100 per event, so it passes the
    # rescaling threshold within a few events.
    stats = ItemStats(half_life=0.01)
    movies, ratings = ["a", "b", "a", "c", "b", "a", "a", "c"], [3.0] * 8
    stats.learn_many(movies, ratings)
    gamma = 2.0**-100
    for movie in "abc":
        expected = sum(gamma ** (len(movies) - 1 - t) for t, m in enumerate(movies) if m == movie)
        assert stats.decayed_count(movie) == pytest.approx(expected, rel=1e-9)
    assert np.isfinite(stats.features(["a", "b", "c"])).all()


def test_shrunk_mean_and_features_by_hand() -> None:
    stats = ItemStats(half_life=4.0, prior_strength=2.0)
    stats.learn_many(["a", "b", "a"], [5.0, 1.0, 4.0])
    mu = 10.0 / 3.0
    assert stats.global_mean == pytest.approx(mu)
    assert stats.shrunk_mean("a") == pytest.approx((9.0 + 2.0 * mu) / 4.0)
    assert stats.shrunk_mean("b") == pytest.approx((1.0 + 2.0 * mu) / 3.0)
    assert stats.shrunk_mean("never") == pytest.approx(mu)

    gamma = 2.0**-0.25
    decayed_a = gamma**2 + 1.0
    total = gamma**2 + gamma + 1.0
    features = stats.features(["a", "never"])
    assert features.dtype == np.float32
    assert features.shape == (2, N_ITEM_FEATURES) == (2, len(ITEM_FEATURE_NAMES))
    expected_a = [
        math.log1p(SHARE_PER * decayed_a / total) / FEATURE_SCALE,
        math.log1p(2) / FEATURE_SCALE,
        (9.0 + 2.0 * mu) / 4.0 - mu,
        0.0,
    ]
    np.testing.assert_allclose(features[0], expected_a, rtol=1e-6)
    np.testing.assert_array_equal(features[1], UNRATED)


def test_empty_stats_and_unknown_movie() -> None:
    stats = ItemStats()
    assert stats.global_mean == DEFAULT_PRIOR_RATING
    assert stats.n_ratings == 0
    np.testing.assert_array_equal(stats.features(["x", "y"]), [UNRATED, UNRATED])
    assert stats.features([]).shape == (0, N_ITEM_FEATURES)


def test_learn_many_equals_learn_one() -> None:
    movies, ratings = stream(300, seed=1)
    one, many = ItemStats(half_life=50.0), ItemStats(half_life=50.0)
    for movie, rating in zip(movies, ratings, strict=True):
        one.learn_one(movie, rating)
    many.learn_many(movies, ratings)
    assert one.to_bytes() == many.to_bytes()
    ids = [f"m{i}" for i in range(25)]
    np.testing.assert_array_equal(one.features(ids), many.features(ids))


def test_bytes_roundtrip_continues_identically() -> None:
    movies, ratings = stream(200, seed=2)
    stats = ItemStats(half_life=0.05, prior_strength=3.0)  # renormalises along the way
    stats.learn_many(movies[:100], ratings[:100])
    copy = ItemStats.from_bytes(stats.to_bytes())
    assert copy.params() == stats.params()
    stats.learn_many(movies[100:], ratings[100:])
    copy.learn_many(movies[100:], ratings[100:])
    ids = [f"m{i}" for i in range(25)]
    np.testing.assert_array_equal(copy.features(ids), stats.features(ids))
    assert copy.to_bytes() == stats.to_bytes()


@pytest.mark.parametrize(
    "raw", [b"", b"[1, 2]", b'{"h": 5}', b'{"h":1,"k":1,"g":1,"t":1,"n":1,"s":1,"i":{"a":[1,2]}}']
)
def test_corrupt_snapshot_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidEventError):
        ItemStats.from_bytes(raw)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    stats = ItemStats()
    stats.learn_one("a", 4.0)
    before = stats.to_bytes()
    with pytest.raises(NumericalError):
        stats.learn_one("a", math.nan)
    with pytest.raises(NumericalError):
        stats.learn_many(["a", "b"], [3.0, math.inf])
    with pytest.raises(ValueError):
        stats.learn_many(["a"], [3.0, 4.0])
    assert stats.to_bytes() == before
    with pytest.raises(ValueError):
        ItemStats(half_life=0.0)
    with pytest.raises(ValueError):
        ItemStats(prior_strength=-1.0)


def test_user_features_by_hand_and_batch_equals_single() -> None:
    single = user_features(3, 4.0)
    assert single.dtype == np.float32
    assert single.shape == (N_USER_FEATURES,)
    np.testing.assert_allclose(
        single, [math.log1p(3) / FEATURE_SCALE, 4.0 - DEFAULT_PRIOR_RATING, 1.0], rtol=1e-6
    )
    np.testing.assert_allclose(user_features(12, 3.0), [math.log1p(12) / 4, -0.5, 0.0], rtol=1e-6)
    counts, means = [0, 3, 12, 40], [3.5, 4.0, 3.0, 2.25]
    batch = user_features_batch(counts, means)
    for row, (n, mean) in enumerate(zip(counts, means, strict=True)):
        np.testing.assert_array_equal(batch[row], user_features(n, mean))
    with pytest.raises(ValueError):
        user_features(-1, 3.0)
    with pytest.raises(NumericalError):
        user_features(2, math.nan)
    with pytest.raises(ValueError):
        user_features_batch([1, 2], [3.0])

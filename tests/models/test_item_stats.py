"""Online item and user features: the arithmetic by hand, batch == single, snapshots."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from shared.exceptions import InvalidEventError, NumericalError
from shared.models.item_stats import (
    FEATURE_SCALE,
    ITEM_FEATURE_NAMES,
    MAX_AGE_YEARS,
    N_ITEM_FEATURES,
    N_USER_FEATURES,
    NEW_USER_RATINGS,
    SHARE_PER,
    USER_FEATURE_NAMES,
    ItemStats,
    user_features,
    user_features_batch,
)
from shared.models.updater import DEFAULT_PRIOR_RATING

UNRATED = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
"""A movie without ratings, of unknown age."""

MID_1998 = datetime(1998, 7, 2, 12, tzinfo=UTC)
"""Exactly half-way through 1998 (365 days: 182.5 days in)."""


def stream(n: int, seed: int) -> tuple[list[str], list[float], list[datetime]]:
    rng = np.random.default_rng(seed)
    movies = [f"m{int(i)}" for i in rng.integers(0, 20, n)]
    ratings = [float(r) / 2 for r in rng.integers(1, 11, n)]
    # Mostly forward in time with some stragglers, as a real stream's event times.
    start = datetime(1997, 1, 1, tzinfo=UTC)
    times = [start + timedelta(days=float(d)) for d in np.sort(rng.uniform(0, 900, n))]
    for i in rng.choice(n, size=n // 10, replace=False):
        times[i] -= timedelta(days=200)
    return movies, ratings, times


def test_feature_layouts() -> None:
    assert ITEM_FEATURE_NAMES == (
        "log_recent_share",
        "log_fast_share",
        "log_count",
        "mean_offset",
        "unrated",
        "log_age",
        "new_release",
    )
    assert N_ITEM_FEATURES == 7
    assert USER_FEATURE_NAMES == ("log_count", "mean_offset", "new_user", "rated_offset")
    assert N_USER_FEATURES == 4


def test_decayed_counts_halve_after_their_half_lives() -> None:
    stats = ItemStats(half_life=2.0, fast_half_life=1.0)
    stats.learn_many(["a", "b", "b"], [4.0, 3.0, 5.0])
    gamma = 2.0**-0.5
    # "a" is two events old: exactly one slow half-life and two fast ones.
    assert stats.decayed_count("a") == pytest.approx(0.5)
    assert stats.decayed_count("b") == pytest.approx(1.0 + gamma)
    assert stats.decayed_total() == pytest.approx(0.5 + 1.0 + gamma)
    assert stats.fast_decayed_count("a") == pytest.approx(0.25)
    assert stats.fast_decayed_count("b") == pytest.approx(1.0 + 0.5)
    assert stats.decayed_count("never") == stats.fast_decayed_count("never") == 0.0
    assert (stats.count("a"), stats.count("b"), stats.count("never")) == (1, 2, 0)


def test_renormalisation_keeps_both_decayed_counts() -> None:
    # Half-lives of 0.02 and 0.01 events grow the increments by 2^50 and 2^100 per event:
    # without rescaling both would pass float's 2^1024 within the 25 events, and each
    # rescales at its own moments, which must not disturb the other.
    stats = ItemStats(half_life=0.02, fast_half_life=0.01)
    movies = list("abacbaacabcbaacbbcaabcabc")
    assert len(movies) == 25
    stats.learn_many(movies, [3.0] * len(movies))

    def decayed(movie: str, gamma: float) -> float:
        return sum(gamma ** (len(movies) - 1 - t) for t, m in enumerate(movies) if m == movie)

    slow, fast = 2.0**-50, 2.0**-100
    for movie in "abc":
        assert stats.decayed_count(movie) == pytest.approx(decayed(movie, slow), rel=1e-9)
        assert stats.fast_decayed_count(movie) == pytest.approx(decayed(movie, fast), rel=1e-9)
    total_slow = sum(decayed(m, slow) for m in "abc")
    total_fast = sum(decayed(m, fast) for m in "abc")
    assert stats.decayed_total() == pytest.approx(total_slow, rel=1e-9)
    features = stats.features(["a", "b", "c"])
    assert np.isfinite(features).all()
    for row, movie in enumerate("abc"):
        expected = [
            math.log1p(SHARE_PER * decayed(movie, slow) / total_slow) / FEATURE_SCALE,
            math.log1p(SHARE_PER * decayed(movie, fast) / total_fast) / FEATURE_SCALE,
        ]
        np.testing.assert_allclose(features[row, :2], expected, rtol=1e-6, atol=1e-30)


def test_shrunk_mean_and_features_by_hand() -> None:
    stats = ItemStats(half_life=4.0, prior_strength=2.0, fast_half_life=1.0)
    stats.learn_many(["a", "b", "a"], [5.0, 1.0, 4.0], [MID_1998] * 3)
    mu = 10.0 / 3.0
    assert stats.global_mean == pytest.approx(mu)
    assert stats.shrunk_mean("a") == pytest.approx((9.0 + 2.0 * mu) / 4.0)
    assert stats.shrunk_mean("b") == pytest.approx((1.0 + 2.0 * mu) / 3.0)
    assert stats.shrunk_mean("never") == pytest.approx(mu)
    assert stats.stream_year == pytest.approx(1998.5)

    gamma = 2.0**-0.25
    decayed_a, total = gamma**2 + 1.0, gamma**2 + gamma + 1.0
    fast_a, fast_total = 0.25 + 1.0, 0.25 + 0.5 + 1.0
    features = stats.features(["a", "never", "b"], [1995, 1998, None])
    assert features.dtype == np.float32
    assert features.shape == (3, N_ITEM_FEATURES)
    expected_a = [
        math.log1p(SHARE_PER * decayed_a / total) / FEATURE_SCALE,
        math.log1p(SHARE_PER * fast_a / fast_total) / FEATURE_SCALE,
        math.log1p(2) / FEATURE_SCALE,
        (9.0 + 2.0 * mu) / 4.0 - mu,
        0.0,
        math.log1p(3.5) / FEATURE_SCALE,  # 3.5 years from the start of 1995 to mid-1998
        0.0,
    ]
    np.testing.assert_allclose(features[0], expected_a, rtol=1e-6)
    # Never rated, released this year: the unrated features with its age and the flag.
    np.testing.assert_allclose(
        features[1], [0, 0, 0, 0, 1, math.log1p(0.5) / FEATURE_SCALE, 1], rtol=1e-6
    )
    # Unknown year: no age, not new.
    assert features[2, 4:].tolist() == [0.0, 0.0, 0.0]
    assert features[2, 3] == pytest.approx((1.0 + 2.0 * mu) / 3.0 - mu, rel=1e-6)


@pytest.mark.parametrize(
    ("year", "log_age", "new_release"),
    [
        (1998, math.log1p(0.5), 1.0),  # this year's movie
        (1997, math.log1p(1.5), 0.0),  # 1.5 years past the start of 1997: not new any more
        (1900, math.log1p(MAX_AGE_YEARS), 0.0),  # clipped to 50 years
        # Listed with a later year than the ratings (MovieLens has some): age 0, new.
        (1999, 0.0, 1.0),
    ],
)
def test_age_and_new_release(year: int, log_age: float, new_release: float) -> None:
    stats = ItemStats()
    stats.learn_one("x", 4.0, MID_1998)
    row = stats.features(["x", "unseen"], [year, year])
    for features in row:
        assert features[5] == pytest.approx(log_age / FEATURE_SCALE, rel=1e-6, abs=1e-7)
        assert features[6] == new_release


def test_new_release_flips_a_year_after_the_start_of_the_release_year() -> None:
    stats = ItemStats()
    stats.learn_one("x", 4.0, datetime(1998, 12, 31, 23, tzinfo=UTC))
    assert stats.features(["x"], [1998])[0, 6] == 1.0
    stats.learn_one("x", 4.0, datetime(1999, 1, 1, 1, tzinfo=UTC))
    assert stats.features(["x"], [1998])[0, 6] == 0.0


def test_without_stream_time_age_and_new_release_are_zero() -> None:
    stats = ItemStats()
    stats.learn_many(["a", "b"], [4.0, 2.0])  # no occurred_at
    assert stats.stream_year is None
    features = stats.features(["a", "never"], [1998, 1995])
    assert (features[:, 5:] == 0.0).all()
    np.testing.assert_array_equal(features, stats.features(["a", "never"]))


def test_stream_year_only_moves_forward() -> None:
    stats = ItemStats()
    assert stats.stream_year is None
    stats.learn_one("a", 4.0, datetime(2024, 7, 2, tzinfo=UTC))  # mid leap year 2024
    assert stats.stream_year == pytest.approx(2024.5)
    stats.learn_one("a", 4.0, datetime(2001, 3, 1, tzinfo=UTC))  # a late straggler
    stats.learn_one("b", 3.0)  # no time
    assert stats.stream_year == pytest.approx(2024.5)
    stats.learn_many(["a", "b"], [4.0, 3.0], [None, datetime(2025, 1, 1, tzinfo=UTC)])
    assert stats.stream_year == pytest.approx(2025.0)
    assert stats.n_ratings == 5


def test_rated_offset_is_the_mean_item_bias() -> None:
    stats = ItemStats(prior_strength=2.0)
    stats.learn_many(["a", "b", "a"], [5.0, 1.0, 4.0])
    mu = 10.0 / 3.0
    offset_a, offset_b = (9.0 + 2.0 * mu) / 4.0 - mu, (1.0 + 2.0 * mu) / 3.0 - mu
    assert stats.rated_offset(["a"]) == pytest.approx(offset_a)
    assert stats.rated_offset(["a", "b"]) == pytest.approx((offset_a + offset_b) / 2)
    # A movie without ratings has no bias but still counts in the mean.
    assert stats.rated_offset(["a", "b", "never"]) == pytest.approx((offset_a + offset_b) / 3)
    assert stats.rated_offset([]) == 0.0
    column = stats.features(["a", "b", "never"])[:, 3]
    assert stats.rated_offset(["a", "b", "never"]) == pytest.approx(float(column.mean()), rel=1e-6)


def test_empty_stats_and_unknown_movie() -> None:
    stats = ItemStats()
    assert stats.global_mean == DEFAULT_PRIOR_RATING
    assert stats.n_ratings == 0
    assert stats.stream_year is None
    assert stats.trending(5) == []
    np.testing.assert_array_equal(stats.features(["x", "y"]), [UNRATED, UNRATED])
    assert stats.features([]).shape == (0, N_ITEM_FEATURES)
    assert stats.features([], []).shape == (0, N_ITEM_FEATURES)


def test_learn_many_equals_learn_one() -> None:
    movies, ratings, times = stream(300, seed=1)
    one, many = ItemStats(half_life=50.0, fast_half_life=7.0), ItemStats(50.0, 10.0, 7.0)
    for movie, rating, moment in zip(movies, ratings, times, strict=True):
        one.learn_one(movie, rating, moment)
    many.learn_many(movies, ratings, times)
    assert one.to_bytes() == many.to_bytes()
    assert one.stream_year is not None
    assert one.stream_year == many.stream_year
    ids = [f"m{i}" for i in range(25)]
    years = [1990 + i if i % 3 else None for i in range(25)]
    np.testing.assert_array_equal(one.features(ids, years), many.features(ids, years))


def test_bytes_roundtrip_continues_identically() -> None:
    movies, ratings, times = stream(200, seed=2)
    # Both half-lives renormalise along the way.
    stats = ItemStats(half_life=0.05, prior_strength=3.0, fast_half_life=0.03)
    stats.learn_many(movies[:100], ratings[:100], times[:100])
    copy = ItemStats.from_bytes(stats.to_bytes())
    assert (
        copy.params()
        == stats.params()
        == {
            "half_life": 0.05,
            "prior_strength": 3.0,
            "fast_half_life": 0.03,
        }
    )
    assert stats.stream_year is not None
    assert copy.stream_year == stats.stream_year
    assert copy.to_bytes() == stats.to_bytes()
    stats.learn_many(movies[100:], ratings[100:], times[100:])
    copy.learn_many(movies[100:], ratings[100:], times[100:])
    ids = [f"m{i}" for i in range(25)]
    years = [1995] * 25
    np.testing.assert_array_equal(copy.features(ids, years), stats.features(ids, years))
    assert copy.to_bytes() == stats.to_bytes()
    assert copy.trending(10) == stats.trending(10)


def test_a_snapshot_without_stream_time_round_trips() -> None:
    stats = ItemStats()
    stats.learn_many(["a", "b"], [4.0, 2.0])
    copy = ItemStats.from_bytes(stats.to_bytes())
    assert copy.stream_year is None
    np.testing.assert_array_equal(
        copy.features(["a", "b"], [1998, None]), stats.features(["a", "b"])
    )


OLD_FORMAT = b'{"h":5000.0,"k":10.0,"g":1.0,"t":1.0,"n":1,"s":4.0,"i":{"a":[1.0,1.0,4.0]}}'
"""A snapshot of the one-decay layout, from before the fast count and stream time."""


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[1, 2]",
        b'{"h": 5}',
        OLD_FORMAT,
        # Items in the old [raw, count, sum] layout.
        b'{"p":{},"d":[[1,1],[1,1]],"n":1,"s":4,"now":null,"i":{"a":[1,1,4]}}',
        # One decay only.
        b'{"p":{},"d":[[1,1]],"n":1,"s":4,"now":null,"i":{"a":[1,1,1,4]}}',
        # Parameters out of range or unknown.
        b'{"p":{"fast_half_life":0},"d":[[1,1],[1,1]],"n":0,"s":0,"now":null,"i":{}}',
        b'{"p":{"decay":1},"d":[[1,1],[1,1]],"n":0,"s":0,"now":null,"i":{}}',
        b'{"p":{},"d":[[1,1],[1,1]],"n":0,"s":0,"now":"soon","i":{}}',
        b'{"p":{},"d":[[1,1],[1,1]],"n":0,"s":0,"i":{}}',
    ],
)
def test_corrupt_snapshot_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidEventError):
        ItemStats.from_bytes(raw)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    stats = ItemStats()
    stats.learn_one("a", 4.0, MID_1998)
    before = stats.to_bytes()
    with pytest.raises(NumericalError):
        stats.learn_one("a", math.nan, datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(NumericalError):
        stats.learn_many(["a", "b"], [3.0, math.inf])
    with pytest.raises(ValueError):
        stats.learn_many(["a"], [3.0, 4.0])
    with pytest.raises(ValueError):
        stats.learn_many(["a", "b"], [3.0, 4.0], [MID_1998])
    assert stats.to_bytes() == before
    with pytest.raises(ValueError):
        stats.features(["a", "b"], [1995])
    for bad in ({"half_life": 0.0}, {"fast_half_life": -1.0}, {"fast_half_life": math.inf}):
        with pytest.raises(ValueError):
            ItemStats(**bad)
    with pytest.raises(ValueError):
        ItemStats(prior_strength=-1.0)


def test_user_features_by_hand_and_batch_equals_single() -> None:
    single = user_features(3, 4.0, 0.25)
    assert single.dtype == np.float32
    assert single.shape == (N_USER_FEATURES,)
    np.testing.assert_allclose(
        single, [math.log1p(3) / FEATURE_SCALE, 4.0 - DEFAULT_PRIOR_RATING, 1.0, 0.25], rtol=1e-6
    )
    np.testing.assert_allclose(
        user_features(12, 3.0), [math.log1p(12) / FEATURE_SCALE, -0.5, 0.0, 0.0], rtol=1e-6
    )
    assert user_features(NEW_USER_RATINGS - 1, 3.0)[2] == 1.0
    assert user_features(NEW_USER_RATINGS, 3.0)[2] == 0.0
    counts, means, offsets = [0, 3, 12, 40], [3.5, 4.0, 3.0, 2.25], [0.0, -0.3, 0.1, 0.7]
    batch = user_features_batch(counts, means, offsets)
    assert batch.shape == (4, N_USER_FEATURES)
    for row, (n, mean, offset) in enumerate(zip(counts, means, offsets, strict=True)):
        np.testing.assert_array_equal(batch[row], user_features(n, mean, offset))
    np.testing.assert_array_equal(user_features_batch(counts, means)[:, 3], [0, 0, 0, 0])
    np.testing.assert_array_equal(user_features_batch(counts, means)[:, :3], batch[:, :3])
    assert user_features_batch([], []).shape == (0, N_USER_FEATURES)
    with pytest.raises(ValueError):
        user_features(-1, 3.0)
    with pytest.raises(NumericalError):
        user_features(2, math.nan)
    with pytest.raises(NumericalError):
        user_features(2, 3.0, math.inf)
    with pytest.raises(ValueError):
        user_features_batch([1, 2], [3.0])
    with pytest.raises(ValueError):
        user_features_batch([1, 2], [3.0, 4.0], [0.0])

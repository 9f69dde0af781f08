"""Online item and user features: the arithmetic by hand, order independence, ``put`` of
published statistics == learning, co-scores, ranking, and bad input."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from shared.exceptions import NumericalError
from shared.models.item_stats import (
    CO_RATED_WINDOW,
    CO_TOP,
    FEATURE_SCALE,
    ITEM_FEATURE_NAMES,
    MAX_AGE_YEARS,
    N_ITEM_FEATURES,
    N_USER_FEATURES,
    NEW_USER_RATINGS,
    SHARE_PER,
    USER_FEATURE_NAMES,
    ItemStats,
    MovieStats,
    co_rated,
    days,
    user_features,
    user_features_batch,
)
from shared.models.updater import DEFAULT_PRIOR_RATING

UNRATED = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
"""A movie without ratings, of unknown age."""

MID_1998 = datetime(1998, 7, 2, 12, tzinfo=UTC)
"""Exactly half-way through 1998 (365 days: 182.5 days in)."""

Event = tuple[str, float, datetime, list[str]]


def share(decayed: float, total: float) -> float:
    return math.log1p(SHARE_PER * decayed / total) / FEATURE_SCALE


def events(n: int, seed: int, n_movies: int = 30, n_users: int = 12) -> list[Event]:
    """A rating stream with co-rated lists, as the item side receives it: users rate
    movies (each at most once) over ~two years; each rating carries ``co_rated`` of what
    the user had rated before it. Times are distinct so that nothing ties."""
    rng = np.random.default_rng(seed)
    start = datetime(1997, 1, 1, tzinfo=UTC)
    offsets = np.sort(rng.uniform(0, 700, n))
    rated: dict[int, list[str]] = {u: [] for u in range(n_users)}
    out: list[Event] = []
    for offset in offsets:
        user = int(rng.integers(n_users))
        unrated = [m for m in range(n_movies) if f"m{m}" not in rated[user]]
        if not unrated:
            continue
        movie = f"m{int(rng.choice(unrated))}"
        rating = float(rng.integers(1, 11)) / 2
        out.append(
            (movie, rating, start + timedelta(days=float(offset)), co_rated(rated[user], movie))
        )
        rated[user].append(movie)
    return out


def learned(stream: list[Event], **params: float) -> ItemStats:
    stats = ItemStats(**params)
    for movie, rating, moment, others in stream:
        stats.learn_one(movie, rating, moment, others)
    return stats


def movie_ids(stats: ItemStats, n_movies: int = 30) -> list[str]:
    return [f"m{m}" for m in range(n_movies) if stats.get(f"m{m}") is not None]


# --- layouts and helpers ---------------------------------------------------------------


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


def test_days_since_the_epoch() -> None:
    assert days(datetime(1970, 1, 1, tzinfo=UTC)) == 0.0
    assert days(datetime(1970, 1, 11, 12, tzinfo=UTC)) == 10.5


def test_params_round_trip() -> None:
    stats = ItemStats(half_life_days=3.0, prior_strength=0.0, fast_half_life_days=0.25)
    assert stats.params() == {
        "half_life_days": 3.0,
        "prior_strength": 0.0,
        "fast_half_life_days": 0.25,
    }
    assert ItemStats(**stats.params()).params() == stats.params()
    assert ItemStats().params() == {
        "half_life_days": 10.0,
        "prior_strength": 10.0,
        "fast_half_life_days": 1.0,
    }


# --- decayed counts and features by hand -----------------------------------------------


def test_a_rating_one_half_life_old_weighs_a_half() -> None:
    stats = ItemStats(half_life_days=10.0, fast_half_life_days=1.0)
    now = MID_1998
    stats.learn_one("a", 4.0, now - timedelta(days=10))
    stats.learn_one("b", 3.0, now)
    stats.learn_one("b", 5.0, now - timedelta(days=1))
    assert stats.stream_day == days(now)
    assert stats.decayed_count("a") == pytest.approx(0.5, rel=1e-12)
    assert stats.decayed_count("b") == pytest.approx(1.0 + 2.0**-0.1, rel=1e-12)
    assert stats.decayed_total() == pytest.approx(1.5 + 2.0**-0.1, rel=1e-12)
    assert stats.fast_decayed_count("a") == pytest.approx(2.0**-10, rel=1e-9)
    assert stats.fast_decayed_count("b") == pytest.approx(1.5, rel=1e-12)
    assert stats.decayed_count("never") == stats.fast_decayed_count("never") == 0.0
    assert (stats.count("a"), stats.count("b"), stats.count("never")) == (1, 2, 0)
    # A newer rating of another movie ages every earlier one.
    stats.learn_one("c", 3.0, now + timedelta(days=10))
    assert stats.decayed_count("a") == pytest.approx(0.25, rel=1e-12)
    assert stats.decayed_count("b") == pytest.approx(0.5 + 2.0**-1.1, rel=1e-12)
    assert stats.decayed_count("c") == pytest.approx(1.0, rel=1e-12)
    assert stats.fast_decayed_count("b") == pytest.approx(1.5 * 2.0**-10, rel=1e-9)


def test_a_late_straggler_weighs_by_its_own_age() -> None:
    # Event time, not arrival order: a rating that arrives late but is old weighs little.
    stats = ItemStats(half_life_days=2.0, fast_half_life_days=1.0)
    stats.learn_one("a", 4.0, MID_1998)
    stats.learn_one("b", 4.0, MID_1998 - timedelta(days=4))
    assert stats.stream_day == days(MID_1998)
    assert stats.decayed_count("b") == pytest.approx(0.25, rel=1e-12)
    assert stats.fast_decayed_count("b") == pytest.approx(1 / 16, rel=1e-12)
    assert stats.get("b") is not None
    assert stats.get("b").last_day == days(MID_1998 - timedelta(days=4))  # type: ignore[union-attr]


def test_tiny_half_lives_over_decades_do_not_overflow() -> None:
    # 2^(t / half-life) with t ~ 10^4 days and half-lives of minutes is far beyond float's
    # range; the log2 sums must keep the counts exact.
    stats = ItemStats(half_life_days=0.01, fast_half_life_days=0.001)
    base = datetime(2020, 3, 1, tzinfo=UTC)
    ages = {"a": [0.0, 0.02], "b": [0.01, 0.005, 30.0 * 365]}
    for movie, movie_ages in ages.items():
        for age in movie_ages:
            stats.learn_one(movie, 3.0, base - timedelta(days=age))
    for movie, movie_ages in ages.items():
        slow = sum(2.0 ** (-age / 0.01) for age in movie_ages)
        fast = sum(2.0 ** (-age / 0.001) for age in movie_ages)
        assert stats.decayed_count(movie) == pytest.approx(slow, rel=1e-6)
        assert stats.fast_decayed_count(movie) == pytest.approx(fast, rel=1e-6, abs=1e-300)
    features = stats.features(["a", "b"])
    assert np.isfinite(features).all()
    total = 1.25 + 0.5 + 2.0**-0.5
    np.testing.assert_allclose(features[0, 0], share(1.25, total), rtol=1e-6)
    np.testing.assert_allclose(features[1, 0], share(0.5 + 2.0**-0.5, total), rtol=1e-6)


def test_movie_stats_added_by_hand() -> None:
    t1, t2 = MID_1998 - timedelta(days=3), MID_1998
    first = MovieStats().added(4.0, t2, ["x", "y"], 3.0, 1.0)
    second = first.added(2.5, t1, ["y"], 3.0, 1.0)
    assert (second.count, second.rating_sum) == (2, 6.5)
    assert second.last_day == days(t2)
    assert second.co == {"x": 1, "y": 2}
    # log2(2^(d1/3) + 2^(d2/3)) with d1 = d2 - 3: d2/3 + log2(1 + 1/2).
    expected = days(t2) / 3.0 + math.log2(1.5)
    assert second.log_decayed == pytest.approx(expected, rel=1e-14)
    assert second.log_fast_decayed == pytest.approx(days(t2) + math.log2(1 + 2.0**-3), rel=1e-14)
    # Frozen: adding makes a new one and leaves the old one as it was.
    assert (first.count, first.co) == (1, {"x": 1, "y": 1})
    assert MovieStats().log_decayed == -math.inf
    assert MovieStats().last_day is None
    # Several at once: the very same statistics as one by one.
    ratings = [(4.0, t2, ["x", "y"]), (2.5, t1, ["y"]), (5.0, t1, [])]
    one_by_one = MovieStats()
    for rating, at, co in ratings:
        one_by_one = one_by_one.added(rating, at, co, 3.0, 1.0)
    assert MovieStats().added_many(ratings, 3.0, 1.0) == one_by_one
    with pytest.raises(NumericalError):
        first.added_many([(math.nan, t1, [])], 3.0, 1.0)


def test_features_by_hand() -> None:
    stats = ItemStats(half_life_days=10.0, prior_strength=2.0, fast_half_life_days=1.0)
    stats.learn_many(
        ["a", "a", "b"],
        [5.0, 4.0, 1.0],
        [MID_1998 - timedelta(days=10), MID_1998 - timedelta(days=1), MID_1998],
    )
    mu = 10.0 / 3.0
    assert stats.n_ratings == 3
    assert stats.global_mean == pytest.approx(mu)
    assert stats.shrunk_mean("a") == pytest.approx((9.0 + 2.0 * mu) / 4.0)
    assert stats.shrunk_mean("b") == pytest.approx((1.0 + 2.0 * mu) / 3.0)
    assert stats.shrunk_mean("never") == pytest.approx(mu)
    assert stats.stream_year == pytest.approx(1998.5)

    decayed_a, decayed_b = 0.5 + 2.0**-0.1, 1.0
    fast_a, fast_b = 2.0**-10 + 0.5, 1.0
    features = stats.features(["a", "never", "b"], [1995, 1998, None])
    assert features.dtype == np.float32
    assert features.shape == (3, N_ITEM_FEATURES)
    expected_a = [
        share(decayed_a, decayed_a + decayed_b),
        share(fast_a, fast_a + fast_b),
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
    expected_b = [
        share(decayed_b, decayed_a + decayed_b),
        share(fast_b, fast_a + fast_b),
        math.log1p(1) / FEATURE_SCALE,
        (1.0 + 2.0 * mu) / 3.0 - mu,
        0.0,
        0.0,  # unknown year: no age,
        0.0,  # and not new
    ]
    np.testing.assert_allclose(features[2], expected_b, rtol=1e-6, atol=1e-7)
    # Without years, the age columns are 0 and the rest the same.
    np.testing.assert_array_equal(stats.features(["a", "never", "b"])[:, :5], features[:, :5])
    assert (stats.features(["a", "never", "b"])[:, 5:] == 0.0).all()


def test_shares_do_not_depend_on_the_stream_rate() -> None:
    # Twice the ratings at the same times: every count doubles, the shares stay.
    once, twice = ItemStats(), ItemStats()
    ratings = [("a", MID_1998), ("b", MID_1998 - timedelta(days=3)), ("a", MID_1998)]
    for movie, moment in ratings:
        once.learn_one(movie, 4.0, moment)
        twice.learn_one(movie, 4.0, moment)
        twice.learn_one(movie, 4.0, moment)
    assert twice.decayed_total() == pytest.approx(2 * once.decayed_total(), rel=1e-12)
    np.testing.assert_allclose(
        twice.features(["a", "b"])[:, :2], once.features(["a", "b"])[:, :2], rtol=1e-6
    )


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
    rows = stats.features(["x", "unseen"], [year, year])
    for features in rows:
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
    assert stats.stream_year is None
    np.testing.assert_array_equal(stats.features(["a", "b"], [1998, 1995]), [UNRATED, UNRATED])
    # Statistics without any rating do not give the stream a time.
    stats.put("a", MovieStats())
    assert stats.stream_year is None
    assert stats.stream_day is None
    np.testing.assert_array_equal(stats.features(["a"], [1998]), [UNRATED])


def test_empty_stats_and_unknown_movie() -> None:
    stats = ItemStats()
    assert stats.global_mean == DEFAULT_PRIOR_RATING
    assert stats.n_ratings == 0
    assert len(stats) == 0
    assert stats.get("x") is None
    assert stats.stream_year is None
    assert stats.trending(5) == stats.rising(5) == []
    assert stats.decayed_total() == 0.0
    np.testing.assert_array_equal(stats.features(["x", "y"]), [UNRATED, UNRATED])
    assert stats.features([]).shape == (0, N_ITEM_FEATURES)
    assert stats.features([], []).shape == (0, N_ITEM_FEATURES)
    assert stats.offsets([]).shape == (0,)
    np.testing.assert_array_equal(stats.offsets(["x"]), [0.0])
    assert stats.co_scores(["x"], ["y", "z"]).tolist() == [0.0, 0.0]


def test_rated_offset_and_offsets_are_the_item_biases() -> None:
    stats = ItemStats(prior_strength=2.0)
    stats.learn_many(["a", "b", "a"], [5.0, 1.0, 4.0], [MID_1998] * 3)
    mu = 10.0 / 3.0
    offset_a, offset_b = (9.0 + 2.0 * mu) / 4.0 - mu, (1.0 + 2.0 * mu) / 3.0 - mu
    offsets = stats.offsets(["a", "b", "never"])
    assert offsets.dtype == np.float64
    np.testing.assert_allclose(offsets, [offset_a, offset_b, 0.0], rtol=1e-12, atol=1e-15)
    assert stats.rated_offset(["a"]) == pytest.approx(offset_a)
    assert stats.rated_offset(["a", "b"]) == pytest.approx((offset_a + offset_b) / 2)
    # A movie without ratings has no bias but still counts in the mean.
    assert stats.rated_offset(["a", "b", "never"]) == pytest.approx((offset_a + offset_b) / 3)
    assert stats.rated_offset([]) == 0.0
    column = stats.features(["a", "b", "never"])[:, 3]
    np.testing.assert_allclose(column, offsets, rtol=1e-6, atol=1e-7)


def test_zero_prior_strength_gives_the_raw_mean() -> None:
    stats = ItemStats(prior_strength=0.0)
    stats.learn_many(["a", "b", "a"], [5.0, 1.0, 4.0], [MID_1998] * 3)
    assert stats.shrunk_mean("a") == pytest.approx(4.5)
    assert stats.shrunk_mean("b") == pytest.approx(1.0)
    assert stats.shrunk_mean("never") == pytest.approx(10.0 / 3.0)


# --- order independence and put ---------------------------------------------------------


def test_learn_many_equals_learn_one() -> None:
    stream = events(300, seed=1)
    one = learned(stream, half_life_days=50.0, fast_half_life_days=7.0)
    many = ItemStats(50.0, 10.0, 7.0)
    many.learn_many(
        [e[0] for e in stream],
        [e[1] for e in stream],
        [e[2] for e in stream],
        [e[3] for e in stream],
    )
    ids = movie_ids(one)
    assert ids == movie_ids(many)
    for movie in ids:
        assert one.get(movie) == many.get(movie)
    assert (one.n_ratings, one.stream_day) == (many.n_ratings, many.stream_day)
    # Without co-rated lists, learn_many leaves the co counts empty.
    plain = ItemStats(50.0, 10.0, 7.0)
    plain.learn_many([e[0] for e in stream], [e[1] for e in stream], [e[2] for e in stream])
    assert all(plain.get(m).co == {} for m in ids)  # type: ignore[union-attr]
    assert plain.get(ids[0]).count == one.get(ids[0]).count  # type: ignore[union-attr]


def test_the_order_of_the_ratings_does_not_matter() -> None:
    stream = events(400, seed=2)
    shuffled = list(stream)
    random.Random(7).shuffle(shuffled)
    assert shuffled != stream
    params = {"half_life_days": 20.0, "prior_strength": 3.0, "fast_half_life_days": 2.0}
    forward, mixed = learned(stream, **params), learned(shuffled, **params)
    ids = [f"m{m}" for m in range(32)]  # two of them never rated
    years = [1990 + m if m % 3 else None for m in range(32)]
    assert forward.stream_day == mixed.stream_day
    assert forward.n_ratings == mixed.n_ratings == len(stream)
    assert forward.global_mean == pytest.approx(mixed.global_mean, rel=1e-12)
    np.testing.assert_allclose(
        forward.features(ids, years), mixed.features(ids, years), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        [forward.decayed_count(m) for m in ids], [mixed.decayed_count(m) for m in ids], rtol=1e-9
    )
    np.testing.assert_allclose(
        [forward.fast_decayed_count(m) for m in ids],
        [mixed.fast_decayed_count(m) for m in ids],
        rtol=1e-9,
    )
    assert forward.trending(10) == mixed.trending(10)
    assert forward.rising(10) == mixed.rising(10)
    assert forward.trending(100) == mixed.trending(100)
    for recent in (["m3", "m7", "m1"], [f"m{m}" for m in range(0, 30, 2)]):
        scores = forward.co_scores(recent, ids)
        assert np.abs(scores).max() > 0.5  # not all zeros
        np.testing.assert_allclose(scores, mixed.co_scores(recent, ids), rtol=1e-9, atol=1e-12)
    for movie in movie_ids(forward):
        a, b = forward.get(movie), mixed.get(movie)
        assert a is not None and b is not None
        assert (a.count, a.last_day, a.co) == (b.count, b.last_day, b.co)
        assert a.rating_sum == pytest.approx(b.rating_sum, rel=1e-12)


def test_put_of_each_movies_stats_equals_learning() -> None:
    stream = events(400, seed=3)
    params = {"half_life_days": 15.0, "prior_strength": 4.0, "fast_half_life_days": 0.5}
    source = learned(stream, **params)
    ids = movie_ids(source)
    reader = ItemStats(**params)
    for movie in reversed(ids):  # another movie order than the source's
        reader.put(movie, source.get(movie))  # type: ignore[arg-type]
    published = ItemStats(**params)
    for movie in sorted(ids, key=lambda m: hash(m) % 17):
        published.put(movie, source.get(movie).published())  # type: ignore[union-attr]
    everything = [f"m{m}" for m in range(32)]
    years = [1980 + m for m in range(32)]
    recent = ["m2", "m5", "m11", "m17", "m29"]
    for copy in (reader, published):
        assert len(copy) == len(source)
        assert copy.n_ratings == source.n_ratings
        assert copy.global_mean == pytest.approx(source.global_mean, rel=1e-12)
        assert copy.stream_day == source.stream_day
        np.testing.assert_allclose(
            copy.features(everything, years),
            source.features(everything, years),
            rtol=1e-6,
            atol=1e-7,
        )
        assert copy.trending(8) == source.trending(8)
        assert copy.rising(8) == source.rising(8)
        np.testing.assert_allclose(
            copy.co_scores(recent, everything),
            source.co_scores(recent, everything),
            rtol=1e-9,
            atol=1e-12,
        )
    # Learning on after the put continues as the source does.
    more = events(40, seed=4)
    for copy in (reader, source):
        for movie, rating, moment, others in more:
            copy.learn_one(movie, rating, moment + timedelta(days=800), others)
    np.testing.assert_allclose(
        reader.features(everything, years), source.features(everything, years), rtol=1e-6, atol=1e-7
    )


def test_put_replaces_without_double_counting() -> None:
    stats = ItemStats(prior_strength=0.0)
    stats.learn_many(["a", "a", "b"], [5.0, 4.0, 1.0], [MID_1998] * 3)
    a = stats.get("a")
    assert a is not None
    assert (stats.n_ratings, stats.global_mean) == (3, pytest.approx(10.0 / 3.0))
    # The same statistics again (a re-delivered message) change nothing.
    stats.put("a", a)
    assert (stats.n_ratings, stats.global_mean, len(stats)) == (3, pytest.approx(10.0 / 3.0), 2)
    # Replacing with fewer ratings (e.g. another partition's older snapshot) replaces.
    smaller = MovieStats().added(2.0, MID_1998, (), stats.half_life_days, 1.0)
    stats.put("a", smaller)
    assert stats.get("a") == smaller
    assert (stats.n_ratings, stats.count("a")) == (2, 1)
    assert stats.global_mean == pytest.approx(1.5)
    assert stats.shrunk_mean("a") == pytest.approx(2.0)
    assert stats.decayed_total() == pytest.approx(2.0, rel=1e-12)
    stats.put("c", MovieStats())
    assert (stats.n_ratings, len(stats), stats.count("c")) == (2, 3, 0)
    np.testing.assert_array_equal(stats.features(["c"]), [UNRATED])
    # Statistics read back are the ones put; learning on does not change them in place.
    stats.learn_one("a", 5.0, MID_1998)
    assert smaller.count == 1
    assert stats.count("a") == 2


def test_stream_time_is_the_newest_rating_held() -> None:
    stats = ItemStats()
    assert stats.stream_year is None
    stats.learn_one("a", 4.0, datetime(2024, 7, 2, tzinfo=UTC))  # mid leap year 2024
    assert stats.stream_year == pytest.approx(2024.5)
    stats.learn_one("a", 4.0, datetime(2001, 3, 1, tzinfo=UTC))  # a late straggler
    assert stats.stream_year == pytest.approx(2024.5)
    stats.put("b", MovieStats().added(3.0, datetime(1999, 3, 1, tzinfo=UTC), (), 10.0, 1.0))
    assert stats.stream_day == days(datetime(2024, 7, 2, tzinfo=UTC))
    # Replacing the newest movie's statistics by older ones (the statistics before a
    # rating, put back) takes the time back to the newest rating still held.
    stats.put("a", MovieStats().added(4.0, datetime(2001, 3, 1, tzinfo=UTC), (), 10.0, 1.0))
    assert stats.stream_day == days(datetime(2001, 3, 1, tzinfo=UTC))
    stats.put("b", MovieStats().added(3.0, datetime(2025, 1, 1, tzinfo=UTC), (), 10.0, 1.0))
    assert stats.stream_year == pytest.approx(2025.0)
    assert stats.n_ratings == 2
    stats.remove("b")
    assert stats.stream_day == days(datetime(2001, 3, 1, tzinfo=UTC))
    assert (stats.n_ratings, len(stats), stats.get("b")) == (1, 1, None)
    stats.remove("b")  # nothing to forget
    stats.remove("a")
    assert (stats.stream_day, stats.n_ratings, stats.trending(3)) == (None, 0, [])


def test_reads_follow_updates() -> None:
    # The read-side caches (decayed counts, top co-rated) must follow each update.
    stats = ItemStats(half_life_days=1.0, fast_half_life_days=1.0)
    stats.learn_many(
        ["a", "a", "a", "b", "r", "r", "c"],
        [4.0] * 7,
        [MID_1998] * 7,
        [[], [], [], ["r"], [], [], []],
    )

    def expected(raw: list[float]) -> np.ndarray:
        values = np.array(raw)
        return (values - values.mean()) / values.std()

    assert stats.trending(1) == ["a"]
    assert stats.decayed_total() == pytest.approx(7.0)
    before = stats.features(["a", "b", "c"])
    # b: 1 co-rating with r (2 ratings) of 1 rating; a, c: none.
    np.testing.assert_allclose(
        stats.co_scores(["r"], ["a", "b", "c"]), expected([0.0, 1 / math.sqrt(2), 0.0])
    )
    for _ in range(3):
        stats.learn_one("b", 4.0, MID_1998, ["r"])
    for _ in range(2):
        stats.learn_one("c", 4.0, MID_1998, ["r"])
    assert stats.trending(1) == ["b"]  # a 3, b 4, c 3, r 2
    assert stats.decayed_total() == pytest.approx(12.0)
    assert not np.array_equal(stats.features(["a", "b", "c"]), before)
    # b: 4 co-ratings of 4 ratings, c: 2 of 3.
    b_raw, c_raw = 4 / math.sqrt(2 * 4), 2 / math.sqrt(2 * 3)
    np.testing.assert_allclose(
        stats.co_scores(["r"], ["a", "b", "c"]), expected([0.0, b_raw, c_raw]), rtol=1e-12
    )
    # A day later every earlier rating weighs 1/2: a 1.5, b 2, c 1 + 1.5, r 1.
    stats.learn_one("c", 4.0, MID_1998 + timedelta(days=1), ["r"])
    assert stats.trending(4) == ["c", "b", "a", "r"]
    assert stats.decayed_total() == pytest.approx(7.0)
    c_raw = 3 / math.sqrt(2 * 4)
    np.testing.assert_allclose(
        stats.co_scores(["r"], ["a", "b", "c"]), expected([0.0, b_raw, c_raw]), rtol=1e-12
    )


# --- trending and rising -----------------------------------------------------------------


def test_trending_and_rising_order() -> None:
    stats = ItemStats(half_life_days=10.0, fast_half_life_days=1.0)
    now = MID_1998
    # "old": a burst of 20 five days ago; "new": 3 today; "mid": 4 two days ago.
    for _ in range(20):
        stats.learn_one("old", 4.0, now - timedelta(days=5))
    for _ in range(3):
        stats.learn_one("new", 4.0, now)
    for _ in range(4):
        stats.learn_one("mid", 4.0, now - timedelta(days=2))
    # Slow counts: old 20 * 2^-0.5 = 14.1, mid 4 * 2^-0.2 = 3.48, new 3.
    assert stats.trending(3) == ["old", "mid", "new"]
    assert stats.trending(1) == ["old"]
    # Fast counts: new 3, mid 4 / 4 = 1, old 20 / 32 = 0.625.
    assert stats.rising(3) == ["new", "mid", "old"]
    assert stats.rising(2) == ["new", "mid"]
    assert stats.trending(10) == ["old", "mid", "new"]
    assert stats.trending(0) == stats.rising(-1) == []


def test_trending_ties_go_to_the_smaller_id_when_all_are_listed() -> None:
    stats = ItemStats()
    for movie in ["e", "d", "c", "b", "a"]:
        stats.learn_one(movie, 4.0, MID_1998)
    stats.learn_one("z", 4.0, MID_1998)
    stats.learn_one("z", 4.0, MID_1998)
    assert stats.trending(6) == ["z", "a", "b", "c", "d", "e"]
    assert stats.rising(10) == ["z", "a", "b", "c", "d", "e"]


def test_trending_ties_at_the_cut_go_to_the_smaller_id() -> None:
    stats = ItemStats()
    for movie in ["e", "d", "c", "b", "a"]:
        stats.learn_one(movie, 4.0, MID_1998)
    assert stats.trending(2) == ["a", "b"]
    assert stats.rising(3) == ["a", "b", "c"]


# --- co-rated movies and co-scores ---------------------------------------------------------


def test_co_rated_is_the_latest_window_other_than_the_movie() -> None:
    assert CO_RATED_WINDOW == 10
    rated = [f"m{i}" for i in range(15)]
    assert co_rated([], "x") == []
    assert co_rated(rated[:4], "x") == rated[:4]
    assert co_rated(rated[:4], "m2") == ["m0", "m1", "m3"]
    assert co_rated(rated, "x") == rated[5:]
    assert co_rated(rated, "m2") == rated[5:]  # rated long ago: not in the window anyway
    assert co_rated(rated, "m14") == rated[4:14]
    assert co_rated(rated, "m10") == rated[4:10] + rated[11:]
    assert co_rated(rated, "m4") == rated[5:]
    assert co_rated(rated[:11], "m0") == rated[1:11]
    for movie in [*rated, "x"]:
        out = co_rated(rated, movie)
        assert len(out) == CO_RATED_WINDOW
        assert movie not in out


def test_top_co_and_published() -> None:
    assert CO_TOP == 50
    # 60 co-rated movies, ten for each count 1..6 (c00..c09: 1, ..., c50..c59: 6): the top
    # 50 are those of count >= 2, most co-rated first, then by id.
    co = {f"c{i:02d}": 1 + i // 10 for i in range(60)}
    stats = MovieStats(count=70, rating_sum=280.0, co=co)
    top = stats.top_co()
    assert len(top) == CO_TOP
    assert list(top) == [f"c{i:02d}" for tens in range(50, 0, -10) for i in range(tens, tens + 10)]
    assert all(top[m] == co[m] for m in top)
    # Ties at the cut: the smaller ids stay.
    tied = MovieStats(co={"b": 2, "d": 1, "a": 1, "c": 1, "e": 3})
    assert tied.top_co(3) == {"e": 3, "b": 2, "a": 1}
    assert list(tied.top_co(4)) == ["e", "b", "a", "c"]
    assert tied.top_co(0) == {}
    assert tied.top_co(10) == {"e": 3, "b": 2, "a": 1, "c": 1, "d": 1}
    crowded = MovieStats(co={f"x{i:03d}": 1 for i in range(100, 0, -1)})
    assert list(crowded.published().co) == [f"x{i:03d}" for i in range(1, 51)]
    published = stats.published()
    assert published.co == top
    assert (published.count, published.rating_sum, published.last_day) == (70, 280.0, None)
    assert published.published() == published
    assert len(stats.co) == 60  # the original keeps all


def test_top_co_carried_through_added_many_is_the_whole_ranking() -> None:
    # The top found among the old top and the movies a batch counted, batch after
    # batch, against the top ranked over all the counts each time.
    rng = np.random.default_rng(7)
    movies = [f"m{i:03d}" for i in range(300)]
    carried = MovieStats()
    for step in range(150):
        batch = [
            (4.0, MID_1998, list(rng.choice(movies, size=rng.integers(0, 11), replace=False)))
            for _ in range(int(rng.integers(1, 6)))
        ]
        carried = carried.added_many(batch, 10.0, 1.0)
        whole = MovieStats(co=dict(carried.co))
        assert carried.top_co() == whole.top_co(), step
        assert list(carried.top_co()) == list(whole.top_co())


def test_published_stats_give_the_same_co_scores() -> None:
    # "x" co-rated with 60 movies, more than CO_TOP; "y" with a few.
    full, published = ItemStats(), ItemStats()
    per_movie: dict[str, MovieStats] = {}
    for i in range(60):
        per_movie[f"c{i:02d}"] = MovieStats().added(3.0, MID_1998, (), 10.0, 1.0)
    x = MovieStats()
    for i in range(60):
        for _ in range(1 + i // 10):
            x = x.added(4.0, MID_1998, [f"c{i:02d}"], 10.0, 1.0)
    per_movie["x"] = x
    per_movie["y"] = MovieStats().added(4.0, MID_1998, ["c00", "c55", "c31"], 10.0, 1.0)
    for movie, stats in per_movie.items():
        full.put(movie, stats)
        published.put(movie, stats.published())
    candidates = ["x", "y", "c03", "nothing"]
    for recent in (
        ["c00", "c05"],
        ["c55", "c31"],
        ["c09", "c10", "c59"],
        [f"c{i:02d}" for i in range(60)],
    ):
        np.testing.assert_allclose(
            published.co_scores(recent, candidates), full.co_scores(recent, candidates), rtol=1e-12
        )
    # The co-rated movies cut from x's top count for nothing: only y scores.
    scores = full.co_scores(["c00", "c05"], ["x", "y"])
    assert scores[1] > scores[0]
    np.testing.assert_allclose(scores, [-1.0, 1.0])


def co_rated_by_hand() -> ItemStats:
    """r1 rated twice, r2 once; a rated twice (co: r1 twice, r2 once), b once (co: r1)."""
    stats = ItemStats()
    t = MID_1998
    stats.put("r1", MovieStats(count=2, rating_sum=8.0, last_day=days(t)))
    stats.put("r2", MovieStats(count=1, rating_sum=3.0, last_day=days(t)))
    stats.put("a", MovieStats(count=2, rating_sum=8.0, last_day=days(t), co={"r1": 2, "r2": 1}))
    stats.put("b", MovieStats(count=1, rating_sum=4.0, last_day=days(t), co={"r1": 1}))
    return stats


def test_co_scores_by_hand() -> None:
    stats = co_rated_by_hand()
    t = MID_1998
    # c rated three times, with no co-ratings.
    stats.put("c", MovieStats(count=3, rating_sum=9.0, last_day=days(t)))
    raw = np.array(
        [
            (2 / math.sqrt(2) + 1 / math.sqrt(1)) / math.sqrt(2),  # a
            (1 / math.sqrt(2)) / math.sqrt(1),  # b
            0.0,  # c
            0.0,  # never rated
        ]
    )
    expected = (raw - raw.mean()) / raw.std()
    scores = stats.co_scores(["r1", "r2"], ["a", "b", "c", "never"])
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert scores.mean() == pytest.approx(0.0, abs=1e-12)
    assert scores.std() == pytest.approx(1.0, rel=1e-12)
    # Unknown movies among the recent ones count for nothing; the order of recent does not
    # matter.
    np.testing.assert_allclose(
        stats.co_scores(["unknown", "r2", "r1"], ["a", "b", "c", "never"]), expected, rtol=1e-12
    )
    # Only the last CO_RATED_WINDOW of recent are read: r2 falls out behind 9 others.
    fillers = [f"f{i}" for i in range(CO_RATED_WINDOW - 1)]
    for filler in fillers:
        stats.put(filler, MovieStats(count=1, rating_sum=4.0, last_day=days(t)))
    raw = np.array([2 / math.sqrt(2) / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])
    np.testing.assert_allclose(
        stats.co_scores(["r2", "r1", *fillers], ["a", "b", "c", "never"]),
        (raw - raw.mean()) / raw.std(),
        rtol=1e-12,
    )
    # Standardised over the candidates given: two of them.
    np.testing.assert_allclose(stats.co_scores(["r1", "r2"], ["b", "a"]), [-1.0, 1.0])


def test_co_candidates_follow_the_co_scores_and_their_changes() -> None:
    stats = co_rated_by_hand()
    t = MID_1998
    stats.put("c", MovieStats(count=3, rating_sum=9.0, last_day=days(t), co={"r2": 1}))
    stats.put("d", MovieStats(count=3, rating_sum=9.0, last_day=days(t)))
    everything = ["a", "b", "c", "d", "r1", "r2"]
    scores = dict(zip(everything, stats.co_scores(["r1", "r2"], everything), strict=True))
    listed = stats.co_candidates(["r1", "r2"], 10)
    # Only movies co-rated with r1 or r2 are found, in co_scores order.
    assert listed == ["a", "b", "c"]
    assert [scores[m] for m in listed] == sorted((scores[m] for m in listed), reverse=True)
    assert stats.co_candidates(["r1", "r2"], 2) == ["a", "b"]
    assert stats.co_candidates(["r1", "r2"], 10, exclude={"a"}) == ["b", "c"]
    assert stats.co_candidates(["r2"], 10) == ["a", "c"]
    assert stats.co_candidates([], 10) == []
    assert stats.co_candidates(["unknown", "d"], 10) == []
    assert stats.co_candidates(["r1"], 0) == []
    # A movie whose statistics change is re-indexed; a removed one is no longer found.
    stats.put("d", MovieStats(count=1, rating_sum=4.0, last_day=days(t), co={"r2": 5}))
    assert stats.co_candidates(["r2"], 10) == ["d", "a", "c"]
    stats.remove("a")
    assert stats.co_candidates(["r1", "r2"], 10) == ["d", "b", "c"]
    # Only the last CO_RATED_WINDOW recent movies are read.
    fillers = [f"f{i}" for i in range(CO_RATED_WINDOW)]
    assert stats.co_candidates(["r2", *fillers], 10) == []


def test_co_scores_are_zero_without_recent_or_spread() -> None:
    stats = ItemStats()
    stats.learn_many(["r", "a", "b", "c"], [4.0] * 4, [MID_1998] * 4, [[], ["r"], ["r"], []])
    candidates = ["a", "b", "c"]
    assert stats.co_scores([], candidates).tolist() == [0.0, 0.0, 0.0]
    assert stats.co_scores(["unknown"], candidates).tolist() == [0.0, 0.0, 0.0]
    assert stats.co_scores(["c"], candidates).tolist() == [0.0, 0.0, 0.0]  # nothing co-rated
    assert stats.co_scores(["r"], []).shape == (0,)
    assert stats.co_scores(["r"], ["a", "b"]).tolist() == [0.0, 0.0]  # equal
    assert stats.co_scores(["r"], ["a"]).tolist() == [0.0]
    np.testing.assert_allclose(
        stats.co_scores(["r"], candidates), [1 / math.sqrt(2), 1 / math.sqrt(2), -math.sqrt(2)]
    )


def test_co_scores_of_equal_non_zero_scores_are_zero() -> None:
    stats = ItemStats()
    for _ in range(7):
        stats.learn_one("r", 4.0, MID_1998)
    for movie in ["a", "b", "c"]:
        stats.learn_one(movie, 4.0, MID_1998, ["r"])
    assert stats.co_scores(["r"], ["a", "b", "c"]).tolist() == [0.0, 0.0, 0.0]


def test_co_counts_from_a_rating_stream() -> None:
    # Two users; each rating counts the user's earlier rated movies as co-rated.
    stats = ItemStats()
    histories: dict[str, list[str]] = {"u": [], "v": []}
    sequence = [("u", "a"), ("u", "b"), ("v", "b"), ("u", "c"), ("v", "c"), ("v", "a")]
    for step, (user, movie) in enumerate(sequence):
        moment = MID_1998 + timedelta(hours=step)
        stats.learn_one(movie, 4.0, moment, co_rated(histories[user], movie))
        histories[user].append(movie)
    assert stats.get("a").co == {"b": 1, "c": 1}  # type: ignore[union-attr]
    assert stats.get("b").co == {"a": 1}  # type: ignore[union-attr]
    assert stats.get("c").co == {"a": 1, "b": 2}  # type: ignore[union-attr]


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"half_life_days": 0.0},
        {"half_life_days": -1.0},
        {"half_life_days": math.inf},
        {"half_life_days": math.nan},
        {"fast_half_life_days": 0.0},
        {"fast_half_life_days": -0.5},
        {"fast_half_life_days": math.inf},
        {"fast_half_life_days": math.nan},
        {"prior_strength": -1.0},
        {"prior_strength": math.nan},
        {"prior_strength": math.inf},
    ],
)
def test_parameters_out_of_range_are_refused(params: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ItemStats(**params)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    stats = ItemStats()
    stats.learn_one("a", 4.0, MID_1998, ["b"])
    before = (stats.get("a"), stats.n_ratings, stats.global_mean, stats.stream_day, len(stats))
    later = datetime(2020, 1, 1, tzinfo=UTC)
    with pytest.raises(NumericalError):
        stats.learn_one("a", math.nan, later)
    with pytest.raises(NumericalError):
        stats.learn_one("new", math.inf, later)
    with pytest.raises(NumericalError):
        stats.learn_many(["a", "b"], [3.0, math.nan], [later, later])
    with pytest.raises(NumericalError):
        MovieStats().added(-math.inf, later, (), 10.0, 1.0)
    with pytest.raises(ValueError):
        stats.learn_many(["a"], [3.0, 4.0], [later, later])
    with pytest.raises(ValueError):
        stats.learn_many(["a", "b"], [3.0, 4.0], [later])
    with pytest.raises(ValueError):
        stats.learn_many(["a", "b"], [3.0, 4.0], [later, later], [["c"]])
    after = (stats.get("a"), stats.n_ratings, stats.global_mean, stats.stream_day, len(stats))
    assert after == before
    with pytest.raises(ValueError):
        stats.features(["a", "b"], [1995])


# --- user features -------------------------------------------------------------------------


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


def test_user_features_with_item_stats_rated_offset() -> None:
    stats = ItemStats(prior_strength=1.0)
    stats.learn_many(["a", "b"], [5.0, 2.0], [MID_1998] * 2)
    offset = stats.rated_offset(["a", "b", "c"])
    assert offset == pytest.approx(0.0)  # (0.75 - 0.75 + 0) / 3
    assert stats.rated_offset(["a"]) == pytest.approx(0.75)
    assert user_features(2, 4.5, stats.rated_offset(["a"]))[3] == pytest.approx(0.75)

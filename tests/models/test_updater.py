"""Contract checks run over every user updater, plus the baseline's own arithmetic."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pytest

from shared.exceptions import InvalidEventError, NumericalError
from shared.models.updater import (
    DEFAULT_PRIOR_RATING,
    RatingWeightedMean,
    UserState,
    UserUpdater,
    shrunk_mean_rating,
)
from shared.types import Vector

DIM = 16
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

UPDATERS: list[Callable[[], UserUpdater]] = [RatingWeightedMean]
"""Every user model; each must pass the contract checks below."""


@pytest.fixture(params=UPDATERS, ids=lambda factory: factory.__name__)
def updater(request: pytest.FixtureRequest) -> UserUpdater:
    return request.param()


def unit_vectors(n: int, seed: int, dim: int = DIM) -> list[Vector]:
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, dim)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return list(m)


def history(updater: UserUpdater, n: int, seed: int) -> UserState:
    """A state after ``n`` seeded ratings."""
    rng = np.random.default_rng(seed)
    state = updater.initial_state()
    for i, item in enumerate(unit_vectors(n, seed + 1)):
        rating = float(rng.integers(1, 11)) / 2
        state = updater.learn_one(state, item, rating, T0 + timedelta(minutes=i))
    return state


def assert_states_equal(a: UserState, b: UserState, rtol: float = 1e-6) -> None:
    assert (a.vector is None) == (b.vector is None)
    if a.vector is not None and b.vector is not None:
        np.testing.assert_allclose(a.vector, b.vector, rtol=rtol, atol=1e-7)
    assert a.weight == pytest.approx(b.weight)
    assert (a.n_ratings, a.rated, a.ratings, a.last_at, a.last_offset) == (
        b.n_ratings,
        b.rated,
        b.ratings,
        b.last_at,
        b.last_offset,
    )
    assert a.rating_sum == pytest.approx(b.rating_sum)


# --- contract ------------------------------------------------------------------------


def test_updater_follows_the_protocol(updater: UserUpdater) -> None:
    assert isinstance(updater, UserUpdater)
    assert updater.model_version


def test_the_rating_weighted_mean_has_no_centre() -> None:
    assert RatingWeightedMean().centre() is None


def test_no_vector_before_any_rating(updater: UserUpdater) -> None:
    state = updater.initial_state()
    assert updater.vector(state) is None
    assert state.n_ratings == 0
    assert updater.mean_rating(state) == pytest.approx(DEFAULT_PRIOR_RATING)


def test_learn_one_is_pure(updater: UserUpdater) -> None:
    state = history(updater, 3, seed=1)
    assert state.vector is not None
    before = state.vector.copy()
    item = unit_vectors(1, seed=2)[0]
    item_before = item.copy()

    new = updater.learn_one(state, item, 4.5, T0 + timedelta(days=1))

    np.testing.assert_array_equal(state.vector, before)
    np.testing.assert_array_equal(item, item_before)
    assert state.n_ratings == 3
    assert new.n_ratings == 4
    assert new.last_at == T0 + timedelta(days=1)
    assert new is not state


def test_learn_many_agrees_with_repeated_learn_one(updater: UserUpdater) -> None:
    # Rows mix new users and users with a history, as a real batch does.
    states = [updater.initial_state(), history(updater, 1, seed=3), history(updater, 7, seed=4)]
    states += [history(updater, 2, seed=5), updater.initial_state()]
    items = unit_vectors(len(states), seed=6)
    ratings = [0.5, 5.0, 3.0, 4.5, 1.0]
    times = [T0 + timedelta(hours=h) for h in range(len(states))]

    batch = updater.learn_many(states, items, ratings, times)
    single = [updater.learn_one(*row) for row in zip(states, items, ratings, times, strict=True)]

    assert len(batch) == len(single)
    for b, s in zip(batch, single, strict=True):
        assert_states_equal(b, s)
        vb, vs = updater.vector(b), updater.vector(s)
        assert vb is not None and vs is not None
        np.testing.assert_allclose(vb, vs, rtol=1e-6, atol=1e-7)


def test_learn_many_of_nothing_is_nothing(updater: UserUpdater) -> None:
    assert updater.learn_many([], [], [], []) == []


def test_user_vector_is_l2_normalised_float32(updater: UserUpdater) -> None:
    for n in (1, 2, 10):
        vector = updater.vector(history(updater, n, seed=n))
        assert vector is not None
        assert vector.dtype == np.float32
        assert vector.shape == (DIM,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)


def test_dimension_comes_from_the_items(updater: UserUpdater) -> None:
    for dim in (3, 384):
        item = unit_vectors(1, seed=7, dim=dim)[0]
        state = updater.learn_one(updater.initial_state(), item, 4.0, T0)
        vector = updater.vector(state)
        assert vector is not None and vector.shape == (dim,)


def test_state_survives_serialisation(updater: UserUpdater) -> None:
    state = history(updater, 5, seed=8).after("m-42", 4.5, 1234)
    state = state.after("m-7", 2.0, 1235)

    raw = state.to_bytes()
    back = UserState.from_bytes(raw)

    assert_states_equal(back, state, rtol=0)
    assert back.rated == ("m-42", "m-7")
    assert back.ratings == (4.5, 2.0)
    assert back.last_offset == 1235
    assert back.last_at == state.last_at  # microseconds kept exactly
    # base64 float32 plus a few counters: the changelog record stays small.
    assert len(raw) < 4 * DIM * 4 / 3 + 200


def test_initial_state_survives_serialisation(updater: UserUpdater) -> None:
    state = updater.initial_state()
    assert_states_equal(UserState.from_bytes(state.to_bytes()), state, rtol=0)


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[]", b'{"n": 1}', b'{"n":1,"s":1,"r":[],"v":"!"}']
)
def test_corrupt_state_is_an_invalid_event(raw: bytes) -> None:
    with pytest.raises(InvalidEventError, match="not a user state"):
        UserState.from_bytes(raw)


def test_nan_is_a_numerical_error(updater: UserUpdater) -> None:
    state = history(updater, 2, seed=9)
    item = unit_vectors(1, seed=10)[0]
    bad_item = item.copy()
    bad_item[3] = np.nan
    with pytest.raises(NumericalError):
        updater.learn_one(state, bad_item, 4.0, T0)
    with pytest.raises(NumericalError):
        updater.learn_one(state, item, float("nan"), T0)
    with pytest.raises(NumericalError):
        updater.learn_many([state, state], [item, bad_item], [4.0, 4.0], [T0, T0])
    with pytest.raises(NumericalError):
        updater.learn_one(state, np.full(DIM, np.inf, dtype=np.float32), 4.0, T0)


def test_item_of_another_dimension_is_refused(updater: UserUpdater) -> None:
    state = history(updater, 2, seed=11)
    item = unit_vectors(1, seed=12, dim=DIM + 1)[0]
    with pytest.raises(ValueError, match="dimension"):
        updater.learn_one(state, item, 4.0, T0)
    with pytest.raises(ValueError, match="dimension"):
        updater.learn_many([state], [item], [4.0], [T0])


def test_bookkeeping_keeps_each_movie_once_in_first_rating_order() -> None:
    state = UserState().after("a", 1.0, 1).after("b", 4.0, 2).after("a", 3.5, 3)
    assert state.rated == ("a", "b")
    assert state.ratings == (3.5, 4.0)  # a re-rating replaces the stars in place
    assert state.last_offset == 3


def test_a_state_written_before_ratings_were_kept_reads_with_the_mean() -> None:
    old = orjson.dumps({"n": 3, "s": 10.5, "r": ["a", "b"]})
    state = UserState.from_bytes(old)
    assert state.rated == ("a", "b")
    assert state.ratings == (3.5, 3.5)


def test_a_state_whose_ratings_do_not_match_rated_is_refused() -> None:
    with pytest.raises(InvalidEventError, match="2 rated movies but 1 ratings"):
        UserState.from_bytes(orjson.dumps({"n": 2, "s": 7.0, "r": ["a", "b"], "y": [3.0]}))


# --- the baseline's arithmetic ---------------------------------------------------------


def test_rating_weighted_mean_by_hand() -> None:
    model = RatingWeightedMean()
    items = unit_vectors(4, seed=13)
    ratings = [5.0, 1.0, 3.5, 0.5]
    state = model.initial_state()
    for i, (item, rating) in enumerate(zip(items, ratings, strict=True)):
        state = model.learn_one(state, item, rating, T0 + timedelta(seconds=i))

    weighted = [r * x.astype(np.float64) for r, x in zip(ratings, items, strict=True)]
    mean = np.sum(weighted, axis=0) / sum(ratings)
    expected = mean / np.linalg.norm(mean)

    vector = model.vector(state)
    assert vector is not None
    np.testing.assert_allclose(vector, expected, rtol=1e-5, atol=1e-6)
    assert state.weight == pytest.approx(sum(ratings))
    assert state.n_ratings == 4
    assert state.rating_sum == pytest.approx(10.0)


def test_a_higher_rating_pulls_harder() -> None:
    model = RatingWeightedMean()
    a, b = unit_vectors(2, seed=14)
    state = model.learn_one(model.initial_state(), a, 5.0, T0)
    state = model.learn_one(state, b, 1.0, T0)
    vector = model.vector(state)
    assert vector is not None
    assert float(vector @ a) > float(vector @ b)


def test_shrunk_mean_rating_by_hand() -> None:
    state = replace(UserState(), n_ratings=4, rating_sum=18.0)  # a 4.5-star user
    assert shrunk_mean_rating(state, prior=3.5, strength=5.0) == pytest.approx((18.0 + 3.5 * 5) / 9)
    assert shrunk_mean_rating(state, prior=3.5, strength=0.0) == pytest.approx(4.5)
    assert RatingWeightedMean().mean_rating(state, prior=3.0, strength=2.0) == pytest.approx(
        (18.0 + 6.0) / 6
    )
    # More ratings, less shrinkage.
    many = replace(state, n_ratings=400, rating_sum=1800.0)
    assert abs(shrunk_mean_rating(many) - 4.5) < abs(shrunk_mean_rating(state) - 4.5)


def test_cancelling_items_are_a_numerical_error() -> None:
    model = RatingWeightedMean()
    item = unit_vectors(1, seed=15)[0]
    state = model.learn_one(model.initial_state(), item, 2.0, T0)
    state = model.learn_one(state, -item, 2.0, T0)
    with pytest.raises(NumericalError, match="zero length"):
        model.vector(state)

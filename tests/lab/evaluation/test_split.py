"""The temporal split of protocol T1 on tiny hand-made rating streams."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta

import pytest

from infra.lab.evaluation.split import Split, arrivals, temporal_split
from shared.events import RatingSubmitted

T0 = datetime(1997, 9, 20, tzinfo=UTC)


def rating(
    event_id: str, user: str, movie: str, second: int, stars: float = 4.0
) -> RatingSubmitted:
    return RatingSubmitted(
        event_id=event_id,
        user_id=user,
        movie_id=movie,
        rating=stars,
        occurred_at=T0 + timedelta(seconds=second),
    )


def ids(ratings: tuple[RatingSubmitted, ...]) -> list[str]:
    return [r.event_id for r in ratings]


def ten_ratings() -> list[RatingSubmitted]:
    """e0..e9 in time order; u3 and m4 first appear in the last two (TEST) ratings."""
    return [
        rating("e0", "u1", "m1", 0),
        rating("e1", "u2", "m1", 1),
        rating("e2", "u1", "m2", 2),
        rating("e3", "u2", "m3", 3),
        rating("e4", "u1", "m3", 4),
        rating("e5", "u2", "m2", 5),
        rating("e6", "u1", "m5", 6),
        rating("e7", "u2", "m5", 7),
        rating("e8", "u3", "m4", 8),
        rating("e9", "u1", "m4", 9),
    ]


def test_equal_timestamps_keep_input_order() -> None:
    ratings = [
        rating("c", "u1", "m1", 5),
        rating("a", "u2", "m2", 5),
        rating("b", "u3", "m3", 5),
        rating("d", "u4", "m4", 5),
        rating("e", "u5", "m5", 5),
    ]
    split = temporal_split(ratings)
    assert ids(split.train) + ids(split.test) == ["c", "a", "b", "d", "e"]
    assert ids(split.train) == ["c", "a", "b", "d"]


def test_unsorted_input_is_sorted_by_time_then_input_position() -> None:
    ratings = [
        rating("late", "u1", "m1", 30),
        rating("tie-first", "u2", "m2", 10),
        rating("early", "u3", "m3", 0),
        rating("tie-second", "u4", "m4", 10),
        rating("middle", "u5", "m5", 20),
    ]
    split = temporal_split(ratings, train_fraction=0.6)
    assert ids(split.train) == ["early", "tie-first", "tie-second"]
    assert ids(split.test) == ["middle", "late"]
    # The input is not reordered in place.
    assert ratings[0].event_id == "late"


def test_exact_80_20_sizes_on_ten_ratings() -> None:
    split = temporal_split(ten_ratings())
    assert len(split.train) == 8
    assert len(split.test) == 2
    assert ids(split.train) == [f"e{i}" for i in range(8)]
    assert ids(split.test) == ["e8", "e9"]


@pytest.mark.parametrize(
    ("n", "fraction", "n_train"),
    [
        (100_000, 0.8, 80_000),
        (10, 0.8, 8),
        (9, 0.8, 7),  # 7.2 rounds down
        (100, 0.29, 29),  # 100 * 0.29 == 28.999999999999996 in binary floats
        (3, 0.1, 0),
    ],
)
def test_train_size_is_the_floor_of_n_times_fraction(n: int, fraction: float, n_train: int) -> None:
    ratings = [rating(f"e{i}", "u1", f"m{i}", i) for i in range(n)]
    split = temporal_split(ratings, train_fraction=fraction)
    assert len(split.train) == n_train
    assert len(split.test) == n - n_train


def test_cold_users_and_items_are_those_without_a_train_rating() -> None:
    split = temporal_split(ten_ratings())
    assert split.train_users == frozenset({"u1", "u2"})
    assert split.train_items == frozenset({"m1", "m2", "m3", "m5"})
    assert split.is_cold_user("u3")
    assert not split.is_cold_user("u1")
    assert split.is_cold_item("m4")
    assert not split.is_cold_item("m5")
    # Never rated at all is cold too.
    assert split.is_cold_item("m-unknown")


def test_arrivals_give_the_first_test_index_of_each_cold_item() -> None:
    ratings = [
        rating("e0", "u1", "m1", 0),
        rating("e1", "u2", "m2", 1),
        rating("e2", "u1", "m3", 2),
        rating("e3", "u2", "m4", 3),
        rating("e4", "u3", "m5", 4),
        rating("e5", "u1", "m9", 5),  # TEST starts here (index 0)
        rating("e6", "u2", "m1", 6),  # warm movie: not an arrival
        rating("e7", "u3", "m8", 7),
        rating("e8", "u2", "m9", 8),  # m9's second rating: arrival stays at index 0
        rating("e9", "u1", "m7", 9),
    ]
    split = temporal_split(ratings, train_fraction=0.5)
    assert ids(split.test)[0] == "e5"
    assert arrivals(split) == {"m9": 0, "m8": 2, "m7": 4}
    assert list(arrivals(split)) == ["m9", "m8", "m7"]


def test_validation_splits_train_alone() -> None:
    split = temporal_split(ten_ratings())
    inner = split.validation(0.25)
    assert isinstance(inner, Split)
    # 8 TRAIN ratings: floor(8 * 0.75) = 6 for validation TRAIN, the last 2 held out.
    assert ids(inner.train) == [f"e{i}" for i in range(6)]
    assert ids(inner.test) == ["e6", "e7"]
    # Nothing of TEST leaks into the validation split.
    assert not set(ids(inner.train) + ids(inner.test)) & set(ids(split.test))
    # m5 is first rated in e6, so it is cold inside the validation split only.
    assert inner.is_cold_item("m5")
    assert not split.is_cold_item("m5")


def test_validation_default_holds_out_a_tenth() -> None:
    ratings = [rating(f"e{i}", f"u{i % 3}", f"m{i % 7}", i) for i in range(100)]
    inner = temporal_split(ratings).validation()
    assert (len(inner.train), len(inner.test)) == (72, 8)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_bad_fractions_are_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        temporal_split(ten_ratings(), train_fraction=fraction)
    with pytest.raises(ValueError, match="between 0 and 1"):
        temporal_split(ten_ratings()).validation(fraction)


def test_split_is_frozen_and_empty_input_gives_an_empty_split() -> None:
    split = temporal_split([])
    assert split.train == () and split.test == ()
    assert split.train_users == frozenset()
    with pytest.raises(FrozenInstanceError):
        split.train = ()  # type: ignore[misc]

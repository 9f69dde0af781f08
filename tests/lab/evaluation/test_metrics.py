"""Protocol T1's measures on hand-computed examples."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest

from infra.lab.evaluation.metrics import (
    LIKED_THRESHOLD,
    K,
    Scoreboard,
    genre_vectors,
    hit_at_k,
    intra_list_diversity,
    ndcg_at_k,
    rank_of,
    rolling_mean,
    top_k,
)
from shared.data.movielens import ML100K_GENRES
from shared.events import MoviePublished
from shared.exceptions import NumericalError

TEN = [f"m{i}" for i in range(1, 11)]
ELEVEN = [*TEN, "m11"]


def test_constants() -> None:
    assert K == 10
    assert LIKED_THRESHOLD == 4.0


# --- rank, hit, NDCG -------------------------------------------------------------------


def test_target_at_rank_one() -> None:
    assert rank_of(TEN, "m1") == 1
    assert hit_at_k(TEN, "m1") == 1.0
    assert ndcg_at_k(TEN, "m1") == 1.0  # 1 / log2(2)


def test_target_at_rank_three() -> None:
    assert rank_of(TEN, "m3") == 3
    assert hit_at_k(TEN, "m3") == 1.0
    assert ndcg_at_k(TEN, "m3") == 0.5  # 1 / log2(4)


def test_rank_ten_counts_and_rank_eleven_does_not() -> None:
    assert rank_of(ELEVEN, "m10") == 10
    assert hit_at_k(ELEVEN, "m10", k=10) == 1.0
    assert ndcg_at_k(ELEVEN, "m10", k=10) == pytest.approx(1 / math.log2(11))
    assert rank_of(ELEVEN, "m11") == 11
    assert hit_at_k(ELEVEN, "m11", k=10) == 0.0
    assert ndcg_at_k(ELEVEN, "m11", k=10) == 0.0
    assert ndcg_at_k(ELEVEN, "m11", k=11) == pytest.approx(1 / math.log2(12))


def test_absent_target() -> None:
    assert rank_of(TEN, "m99") is None
    assert hit_at_k(TEN, "m99") == 0.0
    assert ndcg_at_k(TEN, "m99") == 0.0
    assert rank_of([], "m1") is None
    assert hit_at_k([], "m1") == 0.0


def test_bad_lists_and_k_are_refused() -> None:
    with pytest.raises(ValueError, match="'m2'"):
        rank_of(["m1", "m2", "m3", "m2"], "m1")
    with pytest.raises(ValueError, match="k must be at least 1"):
        hit_at_k(TEN, "m1", k=0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        ndcg_at_k(TEN, "m1", k=0)


# --- top_k -----------------------------------------------------------------------------

IDS = ["a", "b", "c", "d", "e"]
SCORES = np.array([0.5, 0.9, 0.5, 0.1, 0.9])


def test_top_k_breaks_ties_by_position() -> None:
    assert top_k(SCORES, IDS, 1) == ["b"]
    assert top_k(SCORES, IDS, 3) == ["b", "e", "a"]
    assert top_k(SCORES, IDS, 4) == ["b", "e", "a", "c"]


def test_top_k_ties_at_the_cut_among_many_equal_scores() -> None:
    ids = [f"m{i:03d}" for i in range(200)]
    scores = np.ones(200)
    scores[150] = 2.0
    assert top_k(scores, ids, 4) == ["m150", "m000", "m001", "m002"]
    assert top_k(scores, ids, 4, exclude={"m000", "m002"}) == ["m150", "m001", "m003", "m004"]


def test_top_k_exclusion() -> None:
    assert top_k(SCORES, IDS, 3, exclude={"b"}) == ["e", "a", "c"]
    # Any collection works, and ids that are not in the catalogue are harmless.
    assert top_k(SCORES, IDS, 2, exclude=["e", "zzz"]) == ["b", "a"]


def test_top_k_larger_than_the_allowed_items() -> None:
    assert top_k(SCORES, IDS, 10) == ["b", "e", "a", "c", "d"]
    assert top_k(SCORES, IDS, 10, exclude={"a", "b"}) == ["e", "c", "d"]


def test_top_k_with_every_item_excluded_is_empty() -> None:
    assert top_k(SCORES, IDS, 10, exclude=set(IDS)) == []
    assert top_k(np.array([]), [], 10) == []


def test_top_k_orders_infinities_and_refuses_nan() -> None:
    scores = np.array([-np.inf, 1.0, np.inf, 0.0])
    assert top_k(scores, ["a", "b", "c", "d"], 4) == ["c", "b", "d", "a"]
    with pytest.raises(NumericalError, match="NaN"):
        top_k(np.array([0.1, np.nan, 0.3]), ["a", "b", "c"], 2)


def test_top_k_refuses_bad_shapes_k_and_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="one score per id"):
        top_k(np.array([0.1, 0.2]), ["a", "b", "c"], 1)
    with pytest.raises(ValueError, match="one score per id"):
        top_k(np.ones((2, 2)), ["a", "b"], 1)
    with pytest.raises(ValueError, match="k must be non-negative"):
        top_k(SCORES, IDS, -1)
    assert top_k(SCORES, IDS, 0) == []
    with pytest.raises(ValueError, match="'a'"):
        top_k(np.array([0.9, 0.8, 0.7]), ["a", "a", "c"], 2)


def test_top_k_agrees_with_a_full_python_sort() -> None:
    rng = np.random.default_rng(7)
    ids = [f"m{i}" for i in range(300)]
    for _ in range(200):
        # Rounded scores make ties common, including at the cut.
        scores = np.round(rng.normal(size=300), 1)
        exclude = {ids[i] for i in rng.choice(300, size=int(rng.integers(0, 290)), replace=False)}
        k = int(rng.integers(1, 30))
        expected = [
            ids[i]
            for i in sorted(range(300), key=lambda i: (-scores[i], i))
            if ids[i] not in exclude
        ][:k]
        assert top_k(scores, ids, k, exclude) == expected


# --- genres and ILD --------------------------------------------------------------------

GENRES = ("Action", "Comedy", "Drama")


def movie(movie_id: str, *genres: str) -> MoviePublished:
    return MoviePublished(movie_id=movie_id, title=f"Movie {movie_id}", genres=list(genres))


def test_genre_vectors_are_multi_hot_and_ignore_unknown_genres() -> None:
    vectors = genre_vectors(
        [movie("m1", "Action"), movie("m2", "Comedy", "Drama"), movie("m3", "Space-Opera")],
        GENRES,
    )
    assert vectors["m1"].tolist() == [1.0, 0.0, 0.0]
    assert vectors["m2"].tolist() == [0.0, 1.0, 1.0]
    assert vectors["m3"].tolist() == [0.0, 0.0, 0.0]
    default = genre_vectors([movie("m1", "Film-Noir", "Western")])
    assert default["m1"].shape == (len(ML100K_GENRES),) == (19,)
    assert default["m1"].sum() == 2.0
    assert default["m1"][ML100K_GENRES.index("Film-Noir")] == 1.0
    with pytest.raises(ValueError, match="more than once"):
        genre_vectors([], ("Action", "Action"))


def test_ild_of_three_multi_hot_vectors() -> None:
    vectors = {
        "a": np.array([1.0, 1.0, 0.0]),
        "b": np.array([1.0, 0.0, 0.0]),
        "c": np.array([0.0, 1.0, 1.0]),
    }
    # cos(a, b) = 1 / (sqrt2 * 1) = 0.70710678
    # cos(a, c) = 1 / (sqrt2 * sqrt2) = 0.5
    # cos(b, c) = 0 / (1 * sqrt2) = 0
    # mean = (0.70710678 + 0.5 + 0) / 3 = 0.40236893; ILD = 1 - mean = 0.59763107
    assert intra_list_diversity(["a", "b", "c"], vectors) == pytest.approx(0.59763107, abs=1e-8)
    # Order in the list does not matter.
    assert intra_list_diversity(["c", "a", "b"], vectors) == pytest.approx(0.59763107, abs=1e-8)


def test_ild_with_a_zero_or_missing_vector() -> None:
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 0.0]), "z": np.zeros(2)}
    # cos(a, b) = 1, cos(a, z) = cos(b, z) = 0 -> mean 1/3 -> ILD 2/3
    assert intra_list_diversity(["a", "b", "z"], vectors) == pytest.approx(2 / 3)
    # A movie without a vector counts as a zero vector.
    assert intra_list_diversity(["a", "b", "missing"], vectors) == pytest.approx(2 / 3)
    assert intra_list_diversity(["a", "missing", "gone"], vectors) == 1.0
    # Identical genres everywhere: no diversity.
    assert intra_list_diversity(["a", "b"], vectors) == pytest.approx(0.0)


def test_ild_needs_two_movies_and_refuses_bad_input() -> None:
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    assert intra_list_diversity([], vectors) is None
    assert intra_list_diversity(["a"], vectors) is None
    with pytest.raises(ValueError, match="'a'"):
        intra_list_diversity(["a", "b", "a"], vectors)
    with pytest.raises(NumericalError):
        intra_list_diversity(["a", "b"], {"a": np.array([np.nan, 1.0]), "b": np.ones(2)})


# --- rolling mean ----------------------------------------------------------------------


def test_rolling_mean() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rolling_mean(values, 1).tolist() == values
    assert rolling_mean(values, 2).tolist() == pytest.approx([1.0, 1.5, 2.5, 3.5, 4.5])
    assert rolling_mean(values, 3).tolist() == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0])
    # A window longer than the series is the running mean.
    assert rolling_mean(values, 10).tolist() == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
    assert rolling_mean([], 3).shape == (0,)
    with pytest.raises(ValueError, match="window"):
        rolling_mean(values, 0)
    with pytest.raises(NumericalError):
        rolling_mean([1.0, float("nan")], 2)


# --- Scoreboard ------------------------------------------------------------------------


def scoreboard_vectors() -> dict[str, np.ndarray]:
    return genre_vectors(
        [
            movie("m1", "Action"),  # [1, 0, 0]
            movie("m2", "Action", "Comedy"),  # [1, 1, 0]
            movie("m3", "Comedy"),  # [0, 1, 0]
            movie("m4", "Drama"),  # [0, 0, 1]
            movie("m5"),  # [0, 0, 0]
            movie("m6", "Unknown-Genre"),  # [0, 0, 0]
        ],
        GENRES,
    )


def test_scoreboard_on_hand_made_events() -> None:
    board = Scoreboard(k=3, catalogue_size=10, genre_vectors=scoreboard_vectors())

    # e1: warm, liked. Rank 1. cos(m1,m2) = 1/sqrt2, cos(m1,m3) = 0, cos(m2,m3) = 1/sqrt2
    # -> mean sqrt2/3 -> ILD 1 - sqrt2/3 = 0.52859548. Error 4.0 - 5.0 = -1.0.
    e1 = board.add(
        recommended=["m1", "m2", "m3"],
        target="m1",
        rating=5.0,
        predicted=4.0,
        cold_user=False,
        cold_item=False,
    )
    assert (e1.rank, e1.hit, e1.ndcg, e1.error) == (1, 1.0, 1.0, -1.0)
    assert e1.ild == pytest.approx(1 - math.sqrt(2) / 3)

    # e2: cold user, not liked. Only [m4, m5, m2] count (m7 is 4th): rank 3, NDCG 0.5.
    # m4 . m2 = 0 and m5 is a zero vector -> every cosine 0 -> ILD 1. Error +0.5.
    e2 = board.add(
        recommended=["m4", "m5", "m2", "m7"],
        target="m2",
        rating=3.0,
        predicted=3.5,
        cold_user=True,
        cold_item=False,
    )
    assert (e2.rank, e2.hit, e2.ndcg, e2.ild, e2.error) == (3, 1.0, 0.5, 1.0, 0.5)

    # e3: cold item, liked (4.0 is the threshold). Target m1 is 4th, past k: a miss.
    # [0,1,0], [0,0,1], [0,0,0] -> ILD 1. No prediction.
    e3 = board.add(
        recommended=["m3", "m4", "m6", "m1"],
        target="m1",
        rating=4.0,
        predicted=None,
        cold_user=False,
        cold_item=True,
    )
    assert (e3.rank, e3.hit, e3.ndcg, e3.ild, e3.error) == (None, 0.0, 0.0, 1.0, None)

    # e4: cold user and cold item, liked; the user has rated everything: an empty list.
    # A miss, ILD None. Error 5.0 - 4.5 = +0.5.
    e4 = board.add(
        recommended=[],
        target="m2",
        rating=4.5,
        predicted=5.0,
        cold_user=True,
        cold_item=True,
    )
    assert (e4.rank, e4.hit, e4.ndcg, e4.ild, e4.error) == (None, 0.0, 0.0, None, 0.5)

    # e5: warm, not liked; one movie (ILD None), a miss. Error 4.0 - 2.0 = +2.0.
    e5 = board.add(
        recommended=["m2"],
        target="m3",
        rating=2.0,
        predicted=4.0,
        cold_user=False,
        cold_item=False,
    )
    assert (e5.rank, e5.hit, e5.ild, e5.error) == (None, 0.0, None, 2.0)

    summary = board.summary()
    assert summary["k"] == 3
    assert summary["n_events"] == 5
    segments = summary["segments"]
    # all: hits e1, e2 -> HR 2/5; NDCG (1 + 0.5) / 5 = 0.3
    assert segments["all"] == {"n": 5, "hr": pytest.approx(0.4), "ndcg": pytest.approx(0.3)}
    # liked (>= 4): e1, e3, e4 -> one hit at rank 1
    assert segments["liked"] == {"n": 3, "hr": pytest.approx(1 / 3), "ndcg": pytest.approx(1 / 3)}
    # cold users: e2, e4 -> hit at rank 3 and a miss
    assert segments["cold_users"] == {"n": 2, "hr": 0.5, "ndcg": 0.25}
    # cold items: e3, e4 -> two misses
    assert segments["cold_items"] == {"n": 2, "hr": 0.0, "ndcg": 0.0}
    # ILD over e1, e2, e3: (0.52859548 + 1 + 1) / 3 = 0.84286516
    assert summary["ild"] == pytest.approx((1 - math.sqrt(2) / 3 + 2) / 3)
    assert summary["ild"] == pytest.approx(0.84286516, abs=1e-8)
    assert summary["n_ild"] == 3
    # m1..m6 appeared in a first-3 list; m7 only 4th -> 6 / 10
    assert summary["n_recommended"] == 6
    assert summary["coverage"] == 0.6
    assert summary["empty_lists"] == 1
    # errors -1, +0.5, +0.5, +2: MAE (1 + 0.5 + 0.5 + 2) / 4 = 1.0,
    # RMSE sqrt((1 + 0.25 + 0.25 + 4) / 4) = sqrt(1.375) = 1.17260394
    assert summary["n_predictions"] == 4
    assert summary["mae"] == pytest.approx(1.0)
    assert summary["rmse"] == pytest.approx(1.17260394, abs=1e-8)

    assert board.ndcg_series.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert board.n_events == 5

    # JSON-ready: plain Python values only, dumpable by both json and orjson.
    assert json.loads(json.dumps(summary)) == json.loads(orjson.dumps(summary))
    for segment in segments.values():
        assert all(type(v) in (int, float) for v in segment.values())
    assert all(type(summary[key]) is float for key in ("ild", "coverage", "rmse", "mae"))


def test_empty_segments_and_no_predictions_report_none() -> None:
    board = Scoreboard(catalogue_size=1682, genre_vectors={})
    empty = board.summary()
    assert empty["n_events"] == 0
    assert empty["segments"]["all"] == {"n": 0, "hr": None, "ndcg": None}
    assert (empty["ild"], empty["rmse"], empty["mae"]) == (None, None, None)
    assert empty["coverage"] == 0.0
    assert board.ndcg_series.shape == (0,)

    board.add(
        recommended=["m1", "m2"],
        target="m2",
        rating=3.0,
        predicted=None,
        cold_user=False,
        cold_item=False,
    )
    summary = board.summary()
    assert summary["segments"]["all"] == {
        "n": 1,
        "hr": 1.0,
        "ndcg": pytest.approx(1 / math.log2(3)),
    }
    assert summary["segments"]["liked"] == {"n": 0, "hr": None, "ndcg": None}
    assert summary["segments"]["cold_users"]["hr"] is None
    # Movies without genre vectors are zero vectors: ILD 1.
    assert summary["ild"] == 1.0
    assert (summary["rmse"], summary["mae"], summary["n_predictions"]) == (None, None, 0)
    assert summary["coverage"] == pytest.approx(2 / 1682)
    json.dumps(summary)


def test_scoreboard_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        Scoreboard(k=0, catalogue_size=10, genre_vectors={})
    with pytest.raises(ValueError, match="catalogue_size"):
        Scoreboard(catalogue_size=0, genre_vectors={})
    board = Scoreboard(k=2, catalogue_size=10, genre_vectors={})
    # A duplicate is refused even beyond the first k.
    with pytest.raises(ValueError, match="'m3'"):
        board.add(
            recommended=["m1", "m3", "m2", "m3"],
            target="m1",
            rating=4.0,
            predicted=None,
            cold_user=False,
            cold_item=False,
        )
    with pytest.raises(NumericalError):
        board.add(
            recommended=["m1"],
            target="m1",
            rating=4.0,
            predicted=float("nan"),
            cold_user=False,
            cold_item=False,
        )
    # Refused events leave no trace.
    assert board.summary()["n_events"] == 0

"""infra.runtime_bench: the shared handler, and each runtime counting every rating once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from infra import runtime_bench as bench
from shared.data.movielens import MovieLens, load_movielens
from shared.events import RatingSubmitted

RATINGS = 300


def rating(user: str, stars: float) -> RatingSubmitted:
    return RatingSubmitted(
        user_id=user, movie_id="1", rating=stars, occurred_at=datetime(1998, 1, 1, tzinfo=UTC)
    )


def test_count_ratings_adds_to_the_stored_state_and_reports_each_user_once() -> None:
    stored = {"a": bench.Totals(2, 7.0).to_bytes()}
    states, outputs = bench.count_ratings(
        [rating("a", 4.0), rating("b", 3.0), rating("a", 1.0)], stored
    )
    assert {u: bench.Totals.from_bytes(v) for u, v in states.items()} == {
        "a": bench.Totals(4, 12.0),
        "b": bench.Totals(1, 3.0),
    }
    assert [(o.user_id, o.count, o.rating_sum, o.batch_ratings) for o in outputs] == [
        ("a", 4, 12.0, 2),
        ("b", 1, 3.0, 1),
    ]


@pytest.fixture(scope="module")
def movielens() -> MovieLens:
    assert bench.DATASET.is_dir(), f"{bench.DATASET} missing: run `make data`"
    return load_movielens(bench.DATASET)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("runtime", "guarantee"), [("confluent", "exactly_once"), ("faust", "at_least_once")]
)
def test_each_rating_is_counted_once_in_the_final_state(
    runtime: bench.Runtime,
    guarantee: bench.Guarantee,
    movielens: MovieLens,
    bootstrap: str,
    tmp_path: Path,
) -> None:
    result = bench.run_one(
        runtime,
        guarantee,
        movielens,
        RATINGS,
        bootstrap=bootstrap,
        idle_s=0,
        partitions=2,
        batch_size=50,  # several batches: the state must carry over between them
        timeout_s=120,
        workdir=tmp_path,
    )
    assert result.error is None, f"{result.error}\n{result.log_tail}"
    check = result.verification
    assert check is not None
    expected = bench.expected_totals(movielens.ratings[:RATINGS])
    # Read back from the processor's changelog after it stopped: every user's count and
    # sum are those of the ratings produced, each rating counted once.
    assert check.users_in_state == len(expected) == check.users_expected
    assert check.ratings_counted == RATINGS
    assert (check.users_wrong, check.users_missing, check.users_extra) == (0, 0, 0), check.examples
    assert check.keys_on_several_partitions == 0
    # The outputs report every rating once, and each user's last total.
    assert check.output_ratings == RATINGS
    assert check.outputs_final_ok
    assert result.events_per_s is not None and result.events_per_s > 0
    assert result.exit_code == 0

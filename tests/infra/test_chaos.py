"""``make chaos`` in small: an undisturbed and a faulted stack (one kill -9 of
user-profile, one broker stop/start) end with the same profiles and lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import chaos

DATASET = Path("data/ml-100k")


@pytest.mark.integration
@pytest.mark.slow
def test_kills_and_a_broker_restart_change_no_profile_and_lose_no_list(tmp_path: Path) -> None:
    if not (DATASET / "ml-100k.inter").exists():
        pytest.skip("ML-100K not fetched: `make data`")
    lines: list[str] = []
    result = chaos.chaos(
        dataset_dir=DATASET,
        limit=600,
        rate=100.0,
        seed=3,
        kills=("user-profile",),
        broker_restarts=1,
        broker_kill_test=False,
        rated_movies_only=True,
        root=tmp_path,
        out=lines.append,
    )
    print("\n".join(lines))
    print(chaos.format_table(result))
    comparison = result["comparison"]
    kinds = [f["kind"] for f in result["faulted"]["faults"]]
    assert sorted(kinds) == ["broker restart", "kill user-profile"]
    assert all(f["recovery_s"] is not None for f in result["faulted"]["faults"])
    assert comparison["checks"] == {
        "vectors_within_1e-5": True,
        "n_ratings_exact": True,
        "last_rating_has_list": True,
        "no_valid_dead_letters": True,
    }, comparison
    assert comparison["passed"]


def test_a_rating_applied_before_the_broker_lost_it_is_not_counted_twice() -> None:
    from collections import Counter
    from datetime import UTC, datetime

    import numpy as np

    from shared.config import Settings
    from shared.events import RatingSubmitted

    def rating(event_id: str, user: str) -> RatingSubmitted:
        when = datetime(2026, 1, 1, tzinfo=UTC)
        return RatingSubmitted(
            event_id=event_id, user_id=user, movie_id="1", rating=4.0, occurred_at=when
        )

    ratings = [rating("a1", "a"), rating("a2", "a"), rating("b1", "b"), rating("b2", "b")]
    vector = np.ones(2)
    base = chaos.Snapshot(
        {"a": (vector, 2), "b": (vector, 2)}, {"a2", "b2"}, [], Counter(["a1", "a2", "b1", "b2"])
    )
    # a2 was applied, then lost from the topic by the broker; b's last rating twice.
    faulted = chaos.Snapshot(
        {"a": (vector, 2), "b": (vector, 3)}, {"a2", "b2"}, [], Counter(["a1", "b1", "b2"])
    )
    result = chaos.compare(base, faulted, ratings, Settings(), Settings())
    assert result["ratings_missing_from_topic"] == 1
    assert result["ratings_applied_then_lost_by_broker"] == 1
    assert result["ratings_applied_twice"] == 1
    assert result["ratings_lost"] == 0

"""OnlineBPR: the streaming BPR factors behind the ranker's cf_score feature."""

from __future__ import annotations

import numpy as np
import pytest

from infra.lab.evaluation.online_cf import OnlineBPR, bpr_step, sample_negatives
from shared.exceptions import NumericalError


def test_a_taste_shared_by_similar_users_is_learned() -> None:
    """Two groups of users with disjoint tastes: after a few passes, a user who has
    rated only part of their group's movies scores the rest of them above the other
    group's movies."""
    model = OnlineBPR(dim=8, seed=3)
    groups = {"a": [f"a{k}" for k in range(6)], "b": [f"b{k}" for k in range(6)]}
    for _ in range(30):
        for u in range(10):
            group = "a" if u % 2 == 0 else "b"
            for movie in groups[group]:
                model.learn_one(f"{group}-user{u}", movie)
    for movie in groups["a"][:3]:
        model.learn_one("newcomer", movie)
    scores = model.standardised_scores("newcomer", groups["a"][3:] + groups["b"])
    assert scores[:3].min() > scores[3:].max()


def test_standardised_scores_are_z_scores_over_the_known_movies() -> None:
    model = OnlineBPR(dim=4, seed=0)
    for k in range(20):
        model.learn_one(f"u{k % 3}", f"m{k % 7}")
    known = [f"m{j}" for j in range(7)]
    z = model.standardised_scores("u1", known)
    assert z.mean() == pytest.approx(0.0, abs=1e-9)
    assert z.std() == pytest.approx(1.0, abs=1e-9)
    # Order and repetition follow the request; unknown movies and users score 0.
    np.testing.assert_allclose(model.standardised_scores("u1", ["m3", "ghost", "m3"])[[0, 2]], z[3])
    assert model.standardised_scores("u1", ["ghost"])[0] == 0.0
    np.testing.assert_array_equal(model.standardised_scores("nobody", known), 0.0)
    assert model.n_items == 7


def test_an_empty_or_single_movie_model_scores_zero() -> None:
    model = OnlineBPR()
    np.testing.assert_array_equal(model.standardised_scores("u", ["m"]), 0.0)
    model.learn_one("u", "m")  # no other movie: no negative, no step
    np.testing.assert_array_equal(model.standardised_scores("u", ["m"]), 0.0)


def test_seeded_models_agree_and_params_rebuild_an_equal_one() -> None:
    events = [(f"u{k % 4}", f"m{(k * 3) % 11}") for k in range(60)]
    a, b = OnlineBPR(seed=5), OnlineBPR.from_params(OnlineBPR(seed=5).params())
    a.learn_many(*zip(*events, strict=True))
    for user, movie in events:
        b.learn_one(user, movie)
    ids = [f"m{j}" for j in range(11)]
    same = b.standardised_scores("u2", ids)
    np.testing.assert_array_equal(a.standardised_scores("u2", ids), same)
    c = OnlineBPR(seed=6)
    c.learn_many(*zip(*events, strict=True))
    assert not np.array_equal(a.standardised_scores("u2", ids), c.standardised_scores("u2", ids))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="dim"):
        OnlineBPR(dim=0)
    with pytest.raises(ValueError, match="lr"):
        OnlineBPR(lr=float("nan"))
    with pytest.raises(KeyError):
        OnlineBPR.from_params({"dim": 4})
    with pytest.raises(ValueError, match="2 users but 1 movies"):
        OnlineBPR().learn_many(["u", "v"], ["m"])


def test_diverging_factors_raise_instead_of_spreading_nan() -> None:
    model = OnlineBPR(dim=2, lr=1e200, l2=0.0, seed=1)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(NumericalError, match="NaN"):
        for k in range(50):
            model.learn_one(f"u{k % 2}", f"m{k % 5}")


def test_sample_negatives_skips_the_item_and_what_the_user_rated() -> None:
    rng = np.random.default_rng(0)
    pool = np.arange(10, dtype=np.intp)
    for _ in range(50):
        drawn = sample_negatives(rng, pool, {1, 2, 3}, 4, 3)
        assert len(set(drawn.tolist())) == len(drawn) <= 3
        assert not set(drawn.tolist()) & {1, 2, 3, 4}
    assert len(sample_negatives(rng, np.zeros(0, dtype=np.intp), set(), 0, 3)) == 0


def test_bpr_step_raises_the_rated_item_above_the_negative() -> None:
    p = np.array([[0.5, -0.2]])
    q = np.array([[0.1, 0.3], [0.4, 0.0]])
    b = np.zeros(2)
    before = q[0] @ p[0] + b[0] - (q[1] @ p[0] + b[1])
    assert bpr_step(p, q, b, 0, 0, np.array([1], dtype=np.intp), 0.5, 0.0)
    after = q[0] @ p[0] + b[0] - (q[1] @ p[0] + b[1])
    assert after > before
    q[1, 0] = np.inf
    assert not bpr_step(p, q, b, 0, 0, np.array([1], dtype=np.intp), 0.5, 0.0)

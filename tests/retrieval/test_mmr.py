"""MMR re-ranking against examples worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from shared.exceptions import ConfigurationError, NumericalError
from shared.retrieval.mmr import mmr


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


# Candidate 1 is a near-duplicate of candidate 0 (cos 0.96); candidate 2 is orthogonal
# to both and the least relevant.
REL = np.array([0.9, 0.8, 0.5])
VECS = np.stack([unit(1, 0), unit(0.96, 0.28), unit(0, 1)])


def test_lambda_one_is_the_relevance_order() -> None:
    rel = np.array([0.2, 0.9, 0.5, 0.7])
    vecs = np.stack([unit(1, 0), unit(1, 0.01), unit(1, 0.02), unit(1, 0.03)])
    assert mmr(rel, vecs, k=4, lambda_=1.0) == [1, 3, 2, 0]


def test_lambda_zero_picks_the_most_different() -> None:
    # All gains are 0, so the first pick is the tie-break (index 0). Then, from a=[1,0]:
    # d=[-1,0] (cos -1) is the most different; then c=[0,1] (max cos 0) beats b (0.8).
    vecs = np.stack([unit(1, 0), unit(0.8, 0.6), unit(0, 1), unit(-1, 0)])
    rel = np.array([0.9, 0.8, 0.7, 0.1])
    assert mmr(rel, vecs, k=4, lambda_=0.0) == [0, 3, 2, 1]


def test_three_items_by_hand() -> None:
    # lambda 0.5. Step 1: 0.45, 0.40, 0.25 -> 0.
    # Step 2: item 1: 0.5*0.8 - 0.5*0.96 = -0.08; item 2: 0.5*0.5 - 0.5*0 = 0.25 -> 2.
    # Step 3: only item 1 is left.
    assert mmr(REL, VECS, k=3, lambda_=0.5) == [0, 2, 1]
    assert mmr(REL, VECS, k=2, lambda_=0.5) == [0, 2]


@pytest.mark.parametrize(
    ("lambda_", "second"),
    [
        # item 1: 0.7*0.8 - 0.3*0.96 = 0.272 < item 2: 0.7*0.5 = 0.35
        (0.7, 2),
        # item 1: 0.9*0.8 - 0.1*0.96 = 0.624 > item 2: 0.9*0.5 = 0.45
        (0.9, 1),
    ],
)
def test_the_lambda_threshold_by_hand(lambda_: float, second: int) -> None:
    assert mmr(REL, VECS, k=2, lambda_=lambda_)[1] == second


def test_ties_go_to_the_lower_index() -> None:
    rel = np.array([0.2, 0.9, 0.9, 0.9])
    vecs = np.eye(4, dtype=np.float32)  # orthogonal: no redundancy to break the tie
    assert mmr(rel, vecs, k=4, lambda_=1.0) == [1, 2, 3, 0]
    assert mmr(rel, vecs, k=4, lambda_=0.5) == [1, 2, 3, 0]
    assert mmr(np.zeros(3), np.eye(3, dtype=np.float32), k=3, lambda_=0.3) == [0, 1, 2]


def test_k_is_capped_and_zero_gives_nothing() -> None:
    assert sorted(mmr(REL, VECS, k=10, lambda_=0.5)) == [0, 1, 2]
    assert mmr(REL, VECS, k=0, lambda_=0.5) == []
    assert mmr(np.zeros(0), np.zeros((0, 2), dtype=np.float32), k=3, lambda_=0.5) == []


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ConfigurationError, match="lambda"):
        mmr(REL, VECS, k=2, lambda_=1.5)
    with pytest.raises(ValueError, match="do not fit"):
        mmr(REL[:2], VECS, k=2, lambda_=0.5)
    with pytest.raises(NumericalError):
        mmr(np.array([0.1, np.nan, 0.3]), VECS, k=2, lambda_=0.5)

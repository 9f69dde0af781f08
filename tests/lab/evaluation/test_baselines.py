"""The T1 baselines: the EvalModel contract over all of them, then each one's behaviour.

Everything runs on small synthetic events built here; no broker is involved.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import numpy as np
import pytest

from infra.lab.evaluation.baselines import (
    BiasPredictor,
    MostPopular,
    OnlineMF,
    OnlinePopularity,
)
from infra.lab.evaluation.model import DEFAULT_RATING, EvalModel
from shared.events import MoviePublished, RatingSubmitted
from shared.exceptions import NumericalError
from shared.types import MovieId, UserId

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def movie(movie_id: MovieId) -> MoviePublished:
    return MoviePublished(movie_id=movie_id, title=f"Movie {movie_id}")


def rating(user_id: UserId, movie_id: MovieId, stars: float = 4.0, t: int = 0) -> RatingSubmitted:
    return RatingSubmitted(
        user_id=user_id,
        movie_id=movie_id,
        rating=stars,
        occurred_at=T0 + timedelta(seconds=t),
        event_id=f"e{t}-{user_id}-{movie_id}",
    )


def stream(pairs: list[tuple[UserId, MovieId, float]]) -> list[RatingSubmitted]:
    return [rating(u, m, s, t) for t, (u, m, s) in enumerate(pairs)]


ModelFactory = Callable[[int], EvalModel]

FACTORIES: dict[str, ModelFactory] = {
    # The popularity models hold nothing random; the seed only matters to OnlineMF.
    "most-popular": lambda seed: MostPopular(),
    "online-popularity": lambda seed: OnlinePopularity(),
    "online-mf": lambda seed: OnlineMF(seed=seed),
}

# --- a synthetic T1 run --------------------------------------------------------------

CATALOGUE = [movie(f"m{n}") for n in range(30)]
GHOST = "ghost"  # rated in TRAIN, never added before the end
LATE = "late"  # added mid-stream, then rated
LATE_AT = 40  # index of the TEST event before which LATE is added


def _synthetic_events() -> tuple[list[RatingSubmitted], list[RatingSubmitted]]:
    rng = np.random.default_rng(42)
    pairs: list[tuple[UserId, MovieId, float]] = []
    for _ in range(300):
        user = f"u{rng.integers(0, 12)}"
        # Skewed popularity so that the lists are not all ties.
        item = f"m{min(29, int(rng.exponential(8.0)))}"
        pairs.append((user, item, float(rng.integers(1, 11)) / 2))
    pairs[10] = ("u1", GHOST, 5.0)
    for n in range(100):
        # Users u12..u14 appear only in TEST (cold users).
        user = f"u{rng.integers(0, 15)}"
        item = LATE if n in (LATE_AT, LATE_AT + 3) else f"m{rng.integers(0, 30)}"
        pairs.append((user, item, float(rng.integers(1, 11)) / 2))
    events = stream(pairs)
    return events[:300], events[300:]


TRAIN, TEST = _synthetic_events()


def run_protocol(model: EvalModel, k: int = 5) -> tuple[list[list[MovieId]], list[float]]:
    """Drive ``model`` through T1 on the synthetic stream, checking every answer."""
    model.add_movies(CATALOGUE)
    model.fit(TRAIN)
    added = {m.movie_id for m in CATALOGUE}
    rated: dict[UserId, set[MovieId]] = defaultdict(set)
    for event in TRAIN:
        rated[event.user_id].add(event.movie_id)
    lists: list[list[MovieId]] = []
    predictions: list[float] = []
    for n, event in enumerate(TEST):
        if n == LATE_AT:
            model.add_movies([movie(LATE)])
            added.add(LATE)
        exclude = frozenset(rated[event.user_id])
        recommended = model.recommend(event.user_id, exclude, k)
        assert len(recommended) <= k
        assert len(set(recommended)) == len(recommended), recommended
        assert not set(recommended) & exclude
        assert set(recommended) <= added, set(recommended) - added
        # These baselines rank every added movie, so a list is never short.
        assert len(recommended) == min(k, len(added - exclude))
        predicted = model.predict_rating(event.user_id, event.movie_id)
        assert math.isfinite(predicted)
        assert 0.5 <= predicted <= 5.0
        lists.append(recommended)
        predictions.append(predicted)
        model.learn_one(event)
        rated[event.user_id].add(event.movie_id)
    return lists, predictions


@pytest.mark.parametrize("name", FACTORIES)
def test_contract(name: str) -> None:
    model = FACTORIES[name](0)
    assert isinstance(model, EvalModel)
    assert model.name == name
    run_protocol(model)
    everything: frozenset[MovieId] = frozenset()
    all_added = {m.movie_id for m in CATALOGUE} | {LATE}
    # The late movie is recommendable, the never-added one is not ...
    for user in ("u0", "u13", "never-seen"):
        assert set(model.recommend(user, everything, 100)) == all_added
    assert model.recommend("u0", everything, 0) == []
    # ... until it is added.
    model.add_movies([movie(GHOST)])
    assert GHOST in model.recommend("u0", everything, 100)
    # Adding again replaces the movie without duplicating it.
    model.add_movies([movie(LATE)])
    assert len(model.recommend("u0", everything, 100)) == len(all_added) + 1
    for user, item in [("u0", "m0"), ("never-seen", "m0"), ("u0", "never-seen"), ("x", "y")]:
        predicted = model.predict_rating(user, item)
        assert math.isfinite(predicted)
        assert 0.5 <= predicted <= 5.0


@pytest.mark.parametrize("name", FACTORIES)
def test_knows_nothing_before_fit(name: str) -> None:
    model = FACTORIES[name](0)
    assert model.predict_rating("u0", "m0") == DEFAULT_RATING
    assert model.recommend("u0", frozenset(), 10) == []
    model.add_movies(CATALOGUE[:3])
    assert model.recommend("u0", frozenset({"m1"}), 10) == ["m0", "m2"]


@pytest.mark.parametrize("name", FACTORIES)
def test_same_seed_same_answers(name: str) -> None:
    first = run_protocol(FACTORIES[name](7))
    second = run_protocol(FACTORIES[name](7))
    assert first == second


def test_online_mf_seed_matters() -> None:
    _, first = run_protocol(OnlineMF(seed=1))
    _, second = run_protocol(OnlineMF(seed=2))
    assert first != second


# --- bias predictor -----------------------------------------------------------------

# mu = 4; b_i1 = (1 + 0) / (10 + 2) = 1/12; b_i2 = -1 / 11;
# b_u1 = ((5 - 4 - 1/12) + (3 - 4 + 1/11)) / (5 + 2) = 1/924; b_u2 = (4 - 4 - 1/12) / 6 = -1/72.
TINY = stream([("u1", "i1", 5.0), ("u1", "i2", 3.0), ("u2", "i1", 4.0)])


def test_bias_predictor_fit_by_hand() -> None:
    bias = BiasPredictor(item_shrinkage=10, user_shrinkage=5)
    bias.fit(TINY)
    assert bias.mean == pytest.approx(4.0)
    assert bias.item_bias("i1") == pytest.approx(float(Fraction(1, 12)))
    assert bias.item_bias("i2") == pytest.approx(float(Fraction(-1, 11)))
    assert bias.user_bias("u1") == pytest.approx(float(Fraction(1, 924)))
    assert bias.user_bias("u2") == pytest.approx(float(Fraction(-1, 72)))
    expected = float(4 + Fraction(1, 12) + Fraction(1, 924))
    assert bias.predict("u1", "i1") == pytest.approx(expected)
    assert bias.predict("u2", "i2") == pytest.approx(float(4 - Fraction(1, 11) - Fraction(1, 72)))
    assert bias.predict("new", "i1") == pytest.approx(float(4 + Fraction(1, 12)))
    assert bias.predict("u1", "new") == pytest.approx(float(4 + Fraction(1, 924)))
    assert bias.predict("new", "new") == pytest.approx(4.0)
    # MostPopular's predictions are exactly this predictor fitted on TRAIN.
    popular = MostPopular()
    popular.fit(TINY)
    assert popular.predict_rating("u1", "i1") == pytest.approx(expected)


def test_bias_predictor_online_by_hand() -> None:
    bias = BiasPredictor(item_shrinkage=10, user_shrinkage=5)
    for event in TINY:
        bias.learn_one(event)
    # Same mu and item biases as the batch fit; a user's residuals use the item bias
    # current at its event: u1 saw b_i1 = b_i2 = 0 (unrated), u2 saw b_i1 = (5 - 4) / 11.
    assert bias.mean == pytest.approx(4.0)
    assert bias.item_bias("i1") == pytest.approx(1 / 12)
    assert bias.user_bias("u1") == pytest.approx((8 - 2 * 4) / 7)
    assert bias.user_bias("u2") == pytest.approx((4 - 1 / 11 - 4) / 6)
    online = OnlinePopularity()
    online.fit(TINY)
    assert online.predict_rating("u2", "i2") == pytest.approx(4 - 1 / 11 - 1 / 66)


def test_bias_predictions_are_clipped() -> None:
    # Without shrinkage: mu = 13/3, b_i2 = 2/3, b_u1 = 1/2, so u1 on i2 would be 5.5.
    bias = BiasPredictor(item_shrinkage=0, user_shrinkage=0)
    bias.fit(stream([("u1", "i1", 5.0), ("u2", "i1", 3.0), ("u1", "i2", 5.0)]))
    assert bias.user_bias("u1") + bias.item_bias("i2") + bias.mean == pytest.approx(5.5)
    assert bias.predict("u1", "i2") == 5.0
    assert bias.predict("u2", "i1") == pytest.approx(3.0)


# --- MostPopular --------------------------------------------------------------------


def test_most_popular_order_and_ties() -> None:
    model = MostPopular()
    model.add_movies([movie(m) for m in "abcd"])
    model.fit(stream([("u", m, 4.0) for m in "cccbbddz"]))
    assert model.recommend("anyone", frozenset(), 10) == ["c", "b", "d", "a"]
    assert model.recommend("anyone", frozenset(), 2) == ["c", "b"]
    assert model.recommend("anyone", frozenset({"b", "c"}), 10) == ["d", "a"]
    model.add_movies([movie("e"), movie("z")])
    assert model.recommend("anyone", frozenset(), 10) == ["c", "b", "d", "z", "a", "e"]
    # Static: test events change nothing.
    for t in range(5):
        model.learn_one(rating("u", "a", 5.0, t))
    assert model.recommend("anyone", frozenset(), 10) == ["c", "b", "d", "z", "a", "e"]


# --- OnlinePopularity ---------------------------------------------------------------


def test_online_popularity_half_life_by_hand() -> None:
    # Half-life 1 event: gamma = 1/2; after A, A, B the scores are A = 1/4 + 1/2, B = 1.
    model = OnlinePopularity(half_life=1)
    model.add_movies([movie("A"), movie("B")])
    model.fit(stream([("u", "A", 4.0), ("u", "A", 4.0), ("u", "B", 4.0)]))
    assert model.scores() == pytest.approx({"A": 0.75, "B": 1.0})
    assert model.recommend("u2", frozenset(), 2) == ["B", "A"]
    # Half-life 2 events: gamma = 2^-1/2; A = 1/2 + 1/sqrt(2) > 1.
    model = OnlinePopularity(half_life=2)
    model.add_movies([movie("A"), movie("B")])
    for event in stream([("u", "A", 4.0), ("u", "A", 4.0), ("u", "B", 4.0)]):
        model.learn_one(event)
    assert model.scores() == pytest.approx({"A": 0.5 + 2**-0.5, "B": 1.0})
    assert model.recommend("u2", frozenset(), 2) == ["A", "B"]


def test_online_popularity_recent_burst_overtakes() -> None:
    events = stream([("u", "A", 4.0)] * 20 + [("u", "B", 4.0)] * 15)
    decayed = OnlinePopularity(half_life=5)
    static = MostPopular()
    for model in (decayed, static):
        model.add_movies([movie("A"), movie("B")])
        model.fit(events)
    assert decayed.recommend("u", frozenset(), 2) == ["B", "A"]
    assert static.recommend("u", frozenset(), 2) == ["A", "B"]
    # With a very long memory, decayed counts are plain counts again.
    forever = OnlinePopularity(half_life=1e9)
    forever.add_movies([movie("A"), movie("B")])
    forever.fit(events)
    assert forever.recommend("u", frozenset(), 2) == ["A", "B"]


def test_online_popularity_renormalises_instead_of_overflowing() -> None:
    # 2,000 events at half-life 1 would need an increment of 2^2000 (inf in float64).
    model = OnlinePopularity(half_life=1)
    model.add_movies([movie("A"), movie("B")])
    events = [("u", "A", 4.0)] * 1000 + [("u", "B", 4.0)] + [("u", "A", 4.0)] * 999
    model.fit(stream(events))
    scores = model.scores()
    assert scores["A"] == pytest.approx(2.0)  # 1 + 1/2 + 1/4 + ...
    assert 0.0 <= scores["B"] < 1e-200
    assert model.recommend("u", frozenset(), 2) == ["A", "B"]


# --- OnlineMF -----------------------------------------------------------------------


def _two_groups(seed: int) -> tuple[list[RatingSubmitted], dict[UserId, set[MovieId]]]:
    """Users g1-* like only A-* items, g2-* only B-*; each rates 6 of its group's 10."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[UserId, MovieId, float]] = []
    rated: dict[UserId, set[MovieId]] = {}
    for group, prefix in (("g1", "A"), ("g2", "B")):
        for n in range(10):
            user = f"{group}-{n}"
            items = [f"{prefix}{i}" for i in rng.choice(10, 6, replace=False)]
            rated[user] = set(items)
            pairs += [(user, item, float(rng.choice([4.0, 5.0]))) for item in items]
    order = rng.permutation(len(pairs))
    return stream([pairs[i] for i in order]), rated


def test_online_mf_ranks_the_users_group_first() -> None:
    train, rated = _two_groups(seed=5)
    model = OnlineMF()
    model.add_movies([movie(f"{p}{i}") for i in range(10) for p in "AB"])
    model.fit(train)
    for user, seen in rated.items():
        group_items = {f"{'A' if user.startswith('g1') else 'B'}{i}" for i in range(10)}
        recommended = model.recommend(user, frozenset(seen), 4)
        # The four unrated items of the user's own group come before any other.
        assert set(recommended) == group_items - seen, (user, recommended)


def test_online_mf_rating_error_falls_on_a_repeating_pattern() -> None:
    # g1 users give A items 5 stars and B items 1; g2 the opposite. Every user and item
    # mean is 3, so only the factors can explain the pattern.
    pairs = [
        (f"{g}-{u}", f"{p}{i}", 5.0 if (g == "g1") == (p == "A") else 1.0)
        for g in ("g1", "g2")
        for u in range(5)
        for p in "AB"
        for i in range(5)
    ]
    model = OnlineMF(seed=0)
    model.add_movies([movie(f"{p}{i}") for p in "AB" for i in range(5)])
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(40):
        absolute = 0.0
        for event in stream([pairs[i] for i in rng.permutation(len(pairs))]):
            absolute += abs(model.predict_rating(event.user_id, event.movie_id) - event.rating)
            model.learn_one(event)
        errors.append(absolute / len(pairs))
    assert errors[0] > 1.5
    assert errors[-1] < 0.5 * errors[0]
    assert errors[-1] < 1.0


def test_online_mf_cold_user_gets_its_popular_movies() -> None:
    model = OnlineMF()
    model.add_movies([movie(m) for m in "abc"])
    model.fit(stream([("u", "c", 4.0), ("v", "c", 3.0), ("w", "b", 2.0)]))
    assert model.recommend("new", frozenset(), 3) == ["c", "b", "a"]


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_online_mf_names_a_numerical_fault() -> None:
    model = OnlineMF(lr=1e300, rating_lr=1e300)
    model.add_movies(CATALOGUE)
    with pytest.raises(NumericalError, match="NaN"):
        model.fit(TRAIN)

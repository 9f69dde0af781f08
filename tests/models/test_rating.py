"""The rating predictor: item factors fitted by ALS, a per-user fold-in and item-kNN on
the residuals, on real MovieLens-100K ratings."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from infra.lab.training.rating import prequential_rmse, save_rating_model
from shared.convert import ratings_of
from shared.data.movielens import MovieLens, load_movielens
from shared.events import RatingSubmitted
from shared.exceptions import ConfigurationError, NumericalError
from shared.models.item_stats import ItemStats
from shared.models.rating import (
    RatingModel,
    RatingParams,
    corating_similarity,
    fit_rating_factors,
    load_rating_model,
)
from shared.types import MovieId

DATA = Path(__file__).resolve().parents[2] / "data" / "ml-100k"
T0 = datetime(1998, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def movielens() -> MovieLens:
    assert DATA.is_dir(), f"{DATA} missing: run `make data`"
    return load_movielens(DATA)


def genre_vectors(dataset: MovieLens) -> dict[MovieId, np.ndarray]:
    """Real content vectors, cheap: each movie's genres, one-hot, L2-normalised."""
    genres = sorted({g for m in dataset.movies for g in m.genres})
    column = {g: i for i, g in enumerate(genres)}
    out = {}
    for movie in dataset.movies:
        v = np.zeros(len(genres) + 1)
        v[[column[g] for g in movie.genres]] = 1.0
        v[-1] = 0.5  # no genre still has a direction
        out[movie.movie_id] = v / np.linalg.norm(v)
    return out


def rating(user: str, movie: str, stars: float, minutes: int = 0) -> RatingSubmitted:
    return RatingSubmitted(
        user_id=user, movie_id=movie, rating=stars, occurred_at=T0 + timedelta(minutes=minutes)
    )


def toy_model(params: RatingParams | None = None) -> RatingModel:
    ratings = [
        rating(u, m, 1.0 + (int(u) * 7 + int(m) * 3) % 5)
        for u in ("1", "2", "3", "4")
        for m in ("1", "2", "3")
    ]
    fit = fit_rating_factors(ratings_of(ratings), dim=2)
    return RatingModel(fit.movie_ids, fit.factors, params or RatingParams(), (1.0, 5.0), "toy")


def learned(ratings: list[RatingSubmitted]) -> ItemStats:
    stats = ItemStats()
    for r in ratings:
        stats.learn_one(r.movie_id, r.rating, r.occurred_at)
    return stats


def test_on_real_ratings_the_user_offset_and_the_fold_in_lower_the_error(
    movielens: MovieLens,
) -> None:
    # Genre vectors are too coarse for the kNN term (it is tested on its own below).
    train, test = movielens.ratings[:30_000], movielens.ratings[30_000:33_000]
    fit = fit_rating_factors(ratings_of(train))
    vectors = genre_vectors(movielens)

    def rmse(params: RatingParams) -> float:
        model = RatingModel(fit.movie_ids, fit.factors, params, (1.0, 5.0), "test")
        return prequential_rmse(model, train, test, vectors, ItemStats())

    off = {"neighbours": 0, "corating_weight": 0.0}
    fold_in = rmse(RatingParams(**off))
    biases_only = rmse(RatingParams(factor_ridge=1e12, **off))
    item_mean = rmse(RatingParams(user_prior=1e12, factor_ridge=1e12, **off))
    assert fold_in < biases_only - 0.005
    assert biases_only < item_mean - 0.02
    assert 0.8 < fold_in < 1.0

    def with_corating(weight: float) -> float:
        model = RatingModel(
            fit.movie_ids,
            fit.factors,
            RatingParams(neighbours=0, corating_weight=weight),
            (1.0, 5.0),
            "test",
            (fit.neighbour_rows, fit.neighbour_similarity),
        )
        return prequential_rmse(model, train, test, vectors, ItemStats())

    assert with_corating(0.7) < fold_in - 0.002


def test_corating_similarity_finds_the_movies_rated_alike() -> None:
    # Movies 0 and 1 are rated alike by four users, 2 the opposite way; 3 is noise.
    residual = np.array(
        [
            [1.0, 1.0, -1.0, 0.5],
            [-1.0, -1.0, 1.0, 0.5],
            [1.0, 1.0, -1.0, -0.5],
            [-1.0, -1.0, 1.0, -0.5],
        ]
    )
    mask = np.ones_like(residual)
    rows, similarity = corating_similarity(residual, mask, shrink=0.0, keep=2)
    assert rows.shape == similarity.shape == (4, 2)
    assert rows[0, 0] == 1 and rows[1, 0] == 0 and rows[2, 0] == 3
    np.testing.assert_allclose(similarity[0, 0], 1.0, atol=1e-6)
    assert 0 not in rows[0]  # never its own neighbour
    # Shrinkage: four common raters and shrink 4 halve the similarity.
    _, shrunk = corating_similarity(residual, mask, shrink=4.0, keep=2)
    np.testing.assert_allclose(shrunk[0, 0], 0.5, atol=1e-6)
    # Without common raters there is no similarity.
    lonely = np.array([[1.0, 0.0], [0.0, 1.0]])
    _, none = corating_similarity(lonely, lonely, shrink=1.0, keep=1)
    np.testing.assert_allclose(none, 0.0)


def test_a_movie_rated_like_a_loved_one_is_predicted_higher() -> None:
    # TRAIN: whoever likes "a" likes "b" too, and "c" goes the other way.
    train = []
    for u in range(40):
        taste = 1.0 if u % 2 else -1.0
        train += [
            rating(str(u), "a", 3.0 + taste),
            rating(str(u), "b", 3.0 + taste),
            rating(str(u), "c", 3.0 - taste),
            rating(str(u), "d", 3.0),
        ]
    fit = fit_rating_factors(ratings_of(train), dim=1, similarity_shrink=0.0)
    params = RatingParams(neighbours=0, factor_ridge=1e12)
    neighbours = (fit.neighbour_rows, fit.neighbour_similarity)
    with_term = RatingModel(fit.movie_ids, fit.factors, params, (1.0, 5.0), "t", neighbours)
    without = RatingModel(fit.movie_ids, fit.factors, params, (1.0, 5.0), "t")
    stats = learned(train)
    vectors = np.eye(4)
    # A new user loved "a" and was lukewarm on "d".
    args = (stats, ["a", "d"], [5.0, 3.0], vectors[[0, 3]], ["b", "c"], vectors[[1, 2]])
    b, c = with_term.predict(*args)
    b0, c0 = without.predict(*args)
    # Negative similarities are left out, so the opposite movie is not lifted.
    assert b > b0 + 0.3 and c <= c0 + 1e-9
    # A movie without TRAIN ratings has no co-raters: the term leaves it alone.
    new = (stats, ["a"], [5.0], vectors[:1], ["new"], vectors[1:2])
    np.testing.assert_allclose(with_term.predict(*new), without.predict(*new))


def test_fitting_is_seeded(movielens: MovieLens) -> None:
    ratings = ratings_of(movielens.ratings[:5_000])
    a, b = fit_rating_factors(ratings, seed=3), fit_rating_factors(ratings, seed=3)
    np.testing.assert_array_equal(a.factors, b.factors)
    assert a.movie_ids == b.movie_ids
    assert not np.array_equal(a.factors, fit_rating_factors(ratings, seed=4).factors)
    assert a.config["rating_min"] == 1.0 and a.config["rating_max"] == 5.0


def test_a_user_without_ratings_gets_the_movies_shrunk_mean() -> None:
    stats = learned([rating("9", "1", 5.0), rating("9", "2", 2.0), rating("8", "1", 4.0)])
    model = toy_model()
    none = np.zeros((0, 3))
    predicted = model.predict(stats, [], [], none, ["1", "2", "new"], np.eye(3))
    np.testing.assert_allclose(
        predicted, [stats.shrunk_mean("1"), stats.shrunk_mean("2"), stats.global_mean]
    )


def test_a_users_ratings_move_the_prediction_and_recent_ones_more() -> None:
    stats = learned([rating(str(u), "1", 3.0) for u in range(20)])
    model = toy_model(RatingParams(recency=0.5, neighbours=0, factor_ridge=1e9))
    movies = ["1", "2", "3", "4"]
    vectors = np.eye(4)
    lately_low = model.predict(stats, movies, [5.0, 5.0, 1.0, 1.0], vectors, ["5"], np.eye(4)[:1])
    lately_high = model.predict(stats, movies, [1.0, 1.0, 5.0, 5.0], vectors, ["5"], np.eye(4)[:1])
    cold = model.predict(stats, [], [], np.zeros((0, 4)), ["5"], np.eye(4)[:1])
    assert lately_low[0] < cold[0] < lately_high[0]


def test_the_closest_rated_movie_decides_the_knn_term() -> None:
    stats = learned([rating(str(u), m, 3.0) for u in range(30) for m in ("1", "2", "3")])
    model = toy_model(RatingParams(user_prior=1e9, factor_ridge=1e9, neighbours=1))
    rated_vectors = np.array([[1.0, 0.0], [0.0, 1.0]])
    near_1 = np.array([[0.99, math.sqrt(1 - 0.99**2)]])
    loved_1 = model.predict(stats, ["1", "2"], [5.0, 1.0], rated_vectors, ["3"], near_1)
    hated_1 = model.predict(stats, ["1", "2"], [1.0, 5.0], rated_vectors, ["3"], near_1)
    assert loved_1[0] > 3.5 > 2.5 > hated_1[0]


def test_predictions_stay_in_the_rating_range() -> None:
    # Also the regression test of a 0/0 NaN when no rated movie is similar and
    # knn_prior is 0.
    stats = learned([rating(str(u), "1", 5.0) for u in range(50)])
    model = toy_model(RatingParams(user_prior=0.0, knn_prior=0.0))
    predicted = model.predict(stats, ["1"], [5.0], np.eye(3)[:1], ["1", "2"], np.eye(3)[:2])
    assert predicted.max() <= 5.0 and predicted.min() >= 1.0


def test_bad_inputs_are_refused() -> None:
    model, stats = toy_model(), ItemStats()
    with pytest.raises(ValueError, match="2 rated movies, 1 ratings"):
        model.predict(stats, ["1", "2"], [3.0], np.eye(3)[:2], ["3"], np.eye(3)[:1])
    with pytest.raises(ValueError, match="1 targets but 2 vectors"):
        model.predict(stats, [], [], np.zeros((0, 3)), ["3"], np.eye(3)[:2])
    with pytest.raises(NumericalError):
        model.predict(stats, ["1"], [math.nan], np.eye(3)[:1], ["3"], np.eye(3)[:1])
    with pytest.raises(ValueError, match="recency"):
        RatingParams(recency=-1.0)
    with pytest.raises(ValueError, match="no ratings"):
        fit_rating_factors([])


def test_a_checkpoint_round_trips_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    ratings = [rating(str(u), str(m), 1.0 + (u + m) % 5) for u in range(6) for m in range(5)]
    fit = fit_rating_factors(ratings_of(ratings), dim=3)
    params = RatingParams(recency=0.1, neighbours=2)
    saved = save_rating_model(tmp_path / "rating", fit, params, {"item_encoder_version": "x"})
    loaded = load_rating_model(tmp_path / "rating")
    assert loaded.model_version == saved.model_version
    assert loaded.model_version.startswith("fold-in-v2-")
    # The same fit with other settings is another version.
    other = save_rating_model(tmp_path / "other", fit, RatingParams(recency=0.2, neighbours=2), {})
    assert other.model_version != saved.model_version
    assert loaded.params == params and loaded.dim == 3
    stats = learned(ratings)
    vectors = np.random.default_rng(0).standard_normal((4, 3))
    args = (stats, ["0", "1"], [4.0, 2.0], vectors[:2], ["2", "3"], vectors[2:])
    np.testing.assert_array_equal(loaded.predict(*args), saved.predict(*args))

    config_file = tmp_path / "rating" / "config.json"
    config = json.loads(config_file.read_text())
    del config["params"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigurationError, match="does not describe a rating model"):
        load_rating_model(tmp_path / "rating")
    config_file.write_text(json.dumps({**config, "kind": "two-tower-ranker"}))
    with pytest.raises(ConfigurationError, match="not a 'rating-model'"):
        load_rating_model(tmp_path / "rating")

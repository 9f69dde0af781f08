"""Protocol T1 in process: the harness, the pipeline model over the services' handlers,
the MMR sweep, the mid-stream variant and the reports, on a small synthetic dataset."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from infra.lab.eval import write_run_reports
from infra.lab.evaluation.baselines import MostPopular, OnlineMF, OnlinePopularity
from infra.lab.evaluation.harness import evaluate, initial_movies, mmr_sweep
from infra.lab.evaluation.metrics import ndcg_at_k
from infra.lab.evaluation.model import EvalModel
from infra.lab.evaluation.pipeline import EvaluationError, PipelineModel
from infra.lab.evaluation.report import markdown_table
from infra.lab.evaluation.split import Split, temporal_split
from shared.config import Settings
from shared.events import MoviePublished, RatingSubmitted
from shared.models.item_encoder import ConcatItemEncoder
from shared.models.recommend import recommend
from shared.models.text import TextEncoder
from shared.models.updater import RatingWeightedMean
from shared.types import MovieId, UserId

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
T0 = datetime(1998, 1, 1, tzinfo=UTC)


def make_movies(n: int = 36) -> list[MoviePublished]:
    return [
        MoviePublished(
            movie_id=str(i),
            title=f"{GENRES[i % 6]} story number {i}",
            year=1980 + i,
            genres=[GENRES[i % 6], GENRES[(i * 7) % 6]],
            overview=f"A {GENRES[i % 6].lower()} film about subject {i}.",
        )
        for i in range(1, n + 1)
    ]


def make_ratings(
    movies: Sequence[MoviePublished], n_users: int = 12, per_user: int = 8
) -> list[RatingSubmitted]:
    """Users join over time (so later users are cold), each rating a seeded sample of
    movies of mostly one genre."""
    rng = np.random.default_rng(7)
    ratings: list[RatingSubmitted] = []
    for u in range(n_users):
        taste = u % 6
        # The last six movies are new releases: only the users who join late rate them.
        pool = movies if u >= n_users * 2 // 3 else movies[:-6]
        liked = [m for i, m in enumerate(pool, start=1) if i % 6 == taste]
        others = [m for m in pool if m not in liked]
        picks = list(rng.choice(len(liked), size=min(5, len(liked)), replace=False))
        chosen = [liked[p] for p in picks] + [
            others[p] for p in rng.choice(len(others), size=per_user - len(picks), replace=False)
        ]
        for j, movie in enumerate(chosen):
            ratings.append(
                RatingSubmitted(
                    event_id=f"e{u}-{j}",
                    user_id=f"u{u}",
                    movie_id=movie.movie_id,
                    rating=5.0 if movie in liked else float(rng.integers(1, 4)),
                    occurred_at=T0 + timedelta(hours=u * 10 + j),
                )
            )
    return ratings


@pytest.fixture(scope="module")
def encoder() -> ConcatItemEncoder:
    return ConcatItemEncoder(TextEncoder())


@pytest.fixture(scope="module")
def data() -> tuple[list[MoviePublished], Split]:
    movies = make_movies()
    return movies, temporal_split(make_ratings(movies), train_fraction=0.6)


@pytest.fixture
def pipeline(encoder: ConcatItemEncoder) -> Iterator[PipelineModel]:
    # Item vectors stay as encoded here; test_ratings_pull_... covers moving them.
    model = PipelineModel(
        Settings(top_k=10, n_candidates=20, mmr_lambda=0.7, item_pull=0.0),
        encoder,
        RatingWeightedMean(),
    )
    yield model
    model.close()


def test_pipeline_lists_are_the_recommenders_lists_of_the_mean_profile(
    pipeline: PipelineModel, data: tuple[list[MoviePublished], Split]
) -> None:
    """The list a user holds equals ``recommend`` on the rating-weighted mean of the
    rated movies' vectors, computed here independently of the handlers."""
    movies, split = data
    pipeline.add_movies(movies)
    pipeline.fit(split.train)
    index = pipeline.catalogue.index
    assert index is not None
    for user in sorted(split.train_users):
        rated = [r for r in split.train if r.user_id == user]
        ids = [r.movie_id for r in rated]
        total = sum(r.rating * index.vectors([r.movie_id])[0].astype(np.float64) for r in rated)
        vector = (total / np.linalg.norm(total)).astype(np.float32)
        expected = recommend(
            vector, set(ids), pipeline.catalogue, k=10, n_candidates=20, mmr_lambda=0.7
        )
        assert pipeline.recommend(user, set(ids), 10) == [item.movie_id for item in expected]
        mean = sum(r.rating for r in rated)
        assert pipeline.predict_rating(user, "1") == pytest.approx(
            (mean + 3.5 * 5) / (len(rated) + 5)
        )
    # A user with no rating holds the newcomers' list: the most rated movies of late.
    counts: dict[MovieId, float] = {}
    for age, r in enumerate(reversed(split.train)):
        counts[r.movie_id] = counts.get(r.movie_id, 0.0) + 0.5 ** (age / 5000)
    most = sorted(counts, key=lambda m: -counts[m])
    assert pipeline.recommend("nobody", set(), 10) == most[:10]
    assert pipeline.recommend("nobody", {most[0]}, 3) == most[1:4]
    assert pipeline.predict_rating("nobody", "1") == 3.5


def test_ratings_pull_content_only_vectors_towards_their_raters(
    encoder: ConcatItemEncoder, data: tuple[list[MoviePublished], Split]
) -> None:
    """Every concat vector is content alone, so its raters move each movie:
    ``v = normalise(c + pull * sum(u))`` over the ratings by users who had a profile,
    recomputed here rating by rating, with the rating-weighted mean's profile built
    from the content vectors (a profile learns from the encoder's vector)."""
    movies, split = data
    pull = 0.5
    model = PipelineModel(
        Settings(top_k=10, n_candidates=20, item_pull=pull, batch_size=1),
        encoder,
        RatingWeightedMean(),
    )
    try:
        model.add_movies(movies)
        index = model.catalogue.index
        assert index is not None
        encoded = {m.movie_id: index.vectors([m.movie_id])[0].astype(np.float64) for m in movies}
        tastes: dict[str, np.ndarray] = {}
        sums: dict[UserId, np.ndarray] = {}
        for r in split.train:
            if r.user_id in sums:
                profile = sums[r.user_id] / np.linalg.norm(sums[r.user_id])
                tastes[r.movie_id] = tastes.get(r.movie_id, 0.0) + profile
            sums[r.user_id] = sums.get(r.user_id, 0.0) + r.rating * encoded[r.movie_id]
        vectors = dict(encoded)
        for movie_id, taste in tastes.items():
            moved = encoded[movie_id] + pull * taste
            vectors[movie_id] = moved / np.linalg.norm(moved)

        model.fit(split.train)

        moved_ids = [m for m in vectors if not np.allclose(vectors[m], encoded[m])]
        assert moved_ids, "some movie must have been rated by a user with a profile"
        for movie_id, vector in vectors.items():
            np.testing.assert_allclose(index.vectors([movie_id])[0], vector, atol=1e-4)
        for user, total in sums.items():
            snapshot = model.snapshot(user)
            assert snapshot is not None
            np.testing.assert_allclose(snapshot.vector, total / np.linalg.norm(total), atol=1e-4)
    finally:
        model.close()


def models(encoder: ConcatItemEncoder) -> list[EvalModel]:
    return [
        MostPopular(),
        OnlinePopularity(),
        OnlineMF(seed=0),
        PipelineModel(Settings(top_k=10, n_candidates=20), encoder, RatingWeightedMean()),
    ]


def test_evaluate_is_deterministic_and_scores_every_event(
    encoder: ConcatItemEncoder, data: tuple[list[MoviePublished], Split]
) -> None:
    movies, split = data
    first = [evaluate(m, movies, split, keep_lists=True, progress=False) for m in models(encoder)]
    second = [evaluate(m, movies, split, keep_lists=True, progress=False) for m in models(encoder)]
    for a, b in zip(first, second, strict=True):
        assert a.summary == b.summary, a.name
        assert a.lists == b.lists
        assert a.summary["n_events"] == len(split.test)
        assert a.summary["segments"]["cold_users"]["n"] == sum(
            split.is_cold_user(r.user_id) for r in split.test
        )
        # The per-event series is what the summary averages.
        assert float(np.mean(a.ndcg_series)) == pytest.approx(a.summary["segments"]["all"]["ndcg"])
        assert a.lists is not None
        for rating, listed, ndcg in zip(split.test, a.lists, a.ndcg_series, strict=True):
            assert ndcg == pytest.approx(ndcg_at_k(listed, rating.movie_id, 10))


def test_test_events_are_scored_before_they_are_learned(
    encoder: ConcatItemEncoder, data: tuple[list[MoviePublished], Split]
) -> None:
    """A streaming model's list for an event never contains the event's own movie
    because of that event: the exclusion is of earlier ratings, and learning comes after."""
    movies, split = data
    run = evaluate(OnlinePopularity(), movies, split, keep_lists=True, progress=False)
    assert run.lists is not None
    seen: dict[UserId, set[MovieId]] = {}
    for r in split.train:
        seen.setdefault(r.user_id, set()).add(r.movie_id)
    for rating, listed in zip(split.test, run.lists, strict=True):
        assert not seen.get(rating.user_id, set()).intersection(listed)
        seen.setdefault(rating.user_id, set()).add(rating.movie_id)


class _RecommendsRated:
    """Breaks the contract on purpose: recommends what the user already rated."""

    name = "broken"

    def __init__(self) -> None:
        self.movies: list[MovieId] = []

    def add_movies(self, movies: Sequence[MoviePublished]) -> None:
        self.movies += [m.movie_id for m in movies]

    def fit(self, train: Sequence[RatingSubmitted]) -> None:
        pass

    def recommend(self, user_id: UserId, exclude: AbstractSet[MovieId], k: int) -> list[MovieId]:
        return sorted(exclude)[:k] or self.movies[:k]

    def predict_rating(self, user_id: UserId, movie_id: MovieId) -> float:
        return 3.0

    def learn_one(self, rating: RatingSubmitted) -> None:
        pass


def test_a_model_that_breaks_the_contract_stops_the_evaluation(
    data: tuple[list[MoviePublished], Split],
) -> None:
    movies, split = data
    with pytest.raises(EvaluationError, match="already rated"):
        evaluate(_RecommendsRated(), movies, split, progress=False)


def test_mmr_sweep_at_the_deployed_lambda_reproduces_the_run(
    pipeline: PipelineModel, data: tuple[list[MoviePublished], Split]
) -> None:
    movies, split = data
    run = evaluate(pipeline, movies, split, progress=False)
    points = mmr_sweep(pipeline, run, movies, split, [0.0, 0.7, 1.0])
    deployed = next(p for p in points if p["mmr_lambda"] == 0.7)
    assert deployed["ndcg"] == pytest.approx(run.summary["segments"]["all"]["ndcg"])
    assert deployed["ild"] == pytest.approx(run.summary["ild"])
    # Pure diversity is at least as diverse as pure relevance.
    by = {p["mmr_lambda"]: p for p in points}
    assert by[0.0]["ild"] >= by[1.0]["ild"]


def test_mid_stream_movies_arrive_just_before_their_first_rating(
    encoder: ConcatItemEncoder, data: tuple[list[MoviePublished], Split]
) -> None:
    movies, split = data
    start, later = initial_movies(movies, split, "mid-stream")
    cold = {r.movie_id for r in split.test if split.is_cold_item(r.movie_id)}
    assert cold, "the synthetic data must have cold items"
    assert {m.movie_id for m in start} == {m.movie_id for m in movies} - cold
    arriving_at = {m.movie_id: i for i, group in later.items() for m in group}
    assert set(arriving_at) == cold
    for movie_id, i in arriving_at.items():
        assert split.test[i].movie_id == movie_id
        assert all(r.movie_id != movie_id for r in split.test[:i])

    for model in models(encoder):
        run = evaluate(model, movies, split, variant="mid-stream", keep_lists=True, progress=False)
        assert run.lists is not None
        for i, listed in enumerate(run.lists):
            too_early = {m for m, at in arriving_at.items() if at > i}
            assert not too_early.intersection(listed), (model.name, i)


def test_reports_are_written(
    tmp_path: Path, encoder: ConcatItemEncoder, data: tuple[list[MoviePublished], Split]
) -> None:
    movies, split = data
    runs = [evaluate(m, movies, split, progress=False) for m in models(encoder)[:2]]
    table = markdown_table(runs)
    assert "`most-popular`" in table and "`online-popularity`" in table
    meta = {
        "command": "test",
        "finished_at": "now",
        "wall_s": 1.0,
        "environment": {"cpus": 2},
        "data": {
            "ratings": 96,
            "movies": 36,
            "train": len(split.train),
            "test": len(split.test),
            "cold_test_users": 1,
            "test_users": 2,
            "cold_test_items": 1,
        },
        "test_events_scored": len(split.test),
        "k": 10,
        "settings": {"n_candidates": 20, "mmr_lambda": 0.7},
        "seed": 0,
    }
    sweep = [{"mmr_lambda": 0.0, "hr": 0.1, "ndcg": 0.05, "ild": 0.6, "coverage": 0.5}]
    written = write_run_reports(tmp_path, "t1", runs, sweep, meta, 0.7)
    for path in written:
        assert path.stat().st_size > 0, path
    assert (tmp_path / "t1-ndcg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| all-items | `most-popular` |" in (tmp_path / "t1.md").read_text()


def test_a_user_who_rated_every_movie_gets_an_empty_list_scored_as_a_miss(
    encoder: ConcatItemEncoder,
) -> None:
    movies = make_movies(4)
    ratings = [
        RatingSubmitted(
            event_id=f"e{i}",
            user_id="u1" if i < 4 else "u2",
            movie_id=str(i % 4 + 1),
            rating=4.0,
            occurred_at=T0 + timedelta(hours=i),
        )
        for i in range(6)
    ]
    # TEST: u1 re-rates movie 1 after rating all four; u2 rates movie 2.
    ratings.append(
        RatingSubmitted(
            event_id="again",
            user_id="u1",
            movie_id="1",
            rating=5.0,
            occurred_at=T0 + timedelta(hours=9),
        )
    )
    split = temporal_split(ratings, train_fraction=6 / 7)
    assert [r.event_id for r in split.test] == ["again"]
    for model in models(encoder):
        run = evaluate(model, movies, split, keep_lists=True, progress=False)
        assert run.lists == [[]], model.name
        assert run.summary["segments"]["all"]["hr"] == 0.0
        assert run.summary["empty_lists"] == 1
        assert run.summary["ild"] is None

"""Retrieve → exclude → (rank) → MMR over a real FAISS-backed catalogue; the candidate
sources (cosine neighbours, trending, newest) and a real, small two-tower ranker."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import torch

from infra.lab.training.ranker import TwoTowerNet, ranker_of
from shared.domain import Rating
from shared.events import ItemEmbedded, RatingSubmitted
from shared.exceptions import ConfigurationError
from shared.models.item_stats import (
    CO_LONG_WINDOW,
    N_CANDIDATE_FEATURES,
    N_ITEM_FEATURES,
    PAIR_FEATURE_NAMES,
    ItemStats,
    co_rated,
    user_features_batch,
)
from shared.models.ranker import Ranker
from shared.models.rating import RatingModel, RatingParams, fit_rating_factors
from shared.models.recommend import (
    CandidateSources,
    Reranker,
    ScoredItem,
    merge_candidates,
    newcomer_list,
    recommend,
    recommend_batch,
    retrieve_batch,
)
from shared.retrieval.catalogue import Catalogue

DIM = 16


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def item(movie_id: str, vector: np.ndarray, year: int | None = None) -> ItemEmbedded:
    return ItemEmbedded(
        movie_id=movie_id,
        title=f"Title {movie_id}",
        year=year,
        genres=["Drama"],
        vector=unit(vector),
        modalities=["text"],
        model_version="test-v1",
        embedded_at=datetime.now(UTC),
    )


def random_catalogue(n: int, seed: int = 0, dated: bool = False) -> tuple[Catalogue, np.ndarray]:
    """``m0 .. m{n-1}`` at random directions; ``dated``: ``m{i}`` released in 1900 + i,
    so the newest are the highest numbers."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    catalogue = Catalogue()
    events = [item(f"m{i}", v, 1900 + i if dated else None) for i, v in enumerate(vectors)]
    assert catalogue.apply(events) == []
    return catalogue, vectors


def users(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_most_similar_unrated_item_comes_first() -> None:
    catalogue, _ = random_catalogue(50)
    axis = np.eye(DIM, dtype=np.float32)[0]
    near = axis + 0.1 * np.eye(DIM, dtype=np.float32)[1]
    catalogue.apply([item("exact", axis), item("near", near)])
    out = recommend(axis, {"exact"}, catalogue, k=5, n_candidates=20, mmr_lambda=0.7)
    assert out[0].movie_id == "near"
    assert out[0].score == pytest.approx(float(unit(near)[0]), rel=1e-5)
    assert [s.rank for s in out] == [1, 2, 3, 4, 5]
    assert all(s.movie_id != "exact" for s in out)


def test_rated_movies_are_never_recommended() -> None:
    catalogue, _ = random_catalogue(60)
    query = users(1, seed=1)[0]
    top = [s.movie_id for s in recommend(query, (), catalogue, k=10, n_candidates=10, mmr_lambda=1)]
    out = recommend(query, top, catalogue, k=10, n_candidates=10, mmr_lambda=1.0)
    assert len(out) == 10
    assert not {s.movie_id for s in out} & set(top)


def test_a_user_who_rated_almost_everything_gets_fewer_than_k() -> None:
    catalogue, _ = random_catalogue(20)
    rated = [f"m{i}" for i in range(20) if i not in (3, 11, 17)] + ["not-in-catalogue"]
    out = recommend(users(1, 2)[0], rated, catalogue, k=10, n_candidates=5, mmr_lambda=0.7)
    assert sorted(s.movie_id for s in out) == ["m11", "m17", "m3"]
    everything = [f"m{i}" for i in range(20)]
    assert (
        recommend(users(1, 2)[0], everything, catalogue, k=10, n_candidates=5, mmr_lambda=0.7) == []
    )


def test_batch_and_single_calls_agree() -> None:
    catalogue, _ = random_catalogue(300, seed=3)
    queries = users(12, seed=4)
    rng = np.random.default_rng(5)
    excludes = [
        {f"m{j}" for j in rng.choice(300, size=int(rng.integers(0, 80)), replace=False)}
        for _ in range(len(queries))
    ]
    batch = recommend_batch(queries, excludes, catalogue, k=10, n_candidates=40, mmr_lambda=0.6)
    single = [
        recommend(q, e, catalogue, k=10, n_candidates=40, mmr_lambda=0.6)
        for q, e in zip(queries, excludes, strict=True)
    ]
    assert batch == single
    assert all(len(lst) == 10 for lst in batch)


def mean_pairwise_similarity(catalogue: Catalogue, ids: list[str]) -> float:
    assert catalogue.index is not None
    v = catalogue.index.vectors(ids)
    sim = v @ v.T
    return float((sim.sum() - np.trace(sim)) / (len(ids) * (len(ids) - 1)))


def test_the_mmr_lambda_trades_relevance_for_diversity() -> None:
    # A tight cluster of near-duplicates right at the user, and spread-out items a bit
    # further away: pure relevance takes the cluster, a low lambda spreads out.
    rng = np.random.default_rng(6)
    user = np.eye(DIM, dtype=np.float32)[0]
    cluster = [item(f"c{i}", user + 0.05 * rng.standard_normal(DIM)) for i in range(10)]
    spread = [item(f"s{i}", user + 0.9 * rng.standard_normal(DIM)) for i in range(30)]
    catalogue = Catalogue()
    catalogue.apply(cluster + spread)

    def top(lambda_: float) -> list[str]:
        out = recommend(user, (), catalogue, k=5, n_candidates=40, mmr_lambda=lambda_)
        return [s.movie_id for s in out]

    relevant, diverse = top(1.0), top(0.3)
    assert all(m.startswith("c") for m in relevant)
    assert any(m.startswith("s") for m in diverse)
    assert diverse[0] == relevant[0]
    assert mean_pairwise_similarity(catalogue, diverse) < mean_pairwise_similarity(
        catalogue, relevant
    )


def test_an_empty_catalogue_gives_empty_lists() -> None:
    out = recommend_batch(
        users(3, 8), [(), (), ()], Catalogue(), k=5, n_candidates=10, mmr_lambda=0.5
    )
    assert out == [[], [], []]


def test_a_user_vector_of_another_dimension_is_refused() -> None:
    catalogue, _ = random_catalogue(5)
    with pytest.raises(ConfigurationError, match="shape"):
        recommend(
            np.ones(DIM + 1, dtype=np.float32), (), catalogue, k=3, n_candidates=5, mmr_lambda=0.5
        )
    with pytest.raises(ValueError, match="exclude sets"):
        recommend_batch(users(2, 9), [()], catalogue, k=3, n_candidates=5, mmr_lambda=0.5)


# --- candidate sources and the reranker ------------------------------------------------------

TRENDING = ["m0", "m1", "m2", "m3", "m4"]
"""The catalogue movies of ``rated_stats``, most rated first."""


def rated_stats() -> ItemStats:
    """Ratings of "ghost" (not in the catalogue) 6 times, then m0 5 times ... m4 once."""
    stats = ItemStats()
    moment = datetime(1990, 6, 1, tzinfo=UTC)
    for movie, times in [("ghost", 6), *((m, 5 - i) for i, m in enumerate(TRENDING))]:
        stats.learn_many([movie] * times, [4.0] * times, [moment] * times)
    assert stats.trending(3) == ["ghost", "m0", "m1"]
    return stats


def rows_unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def cosine_order(vectors: np.ndarray, query: np.ndarray) -> list[str]:
    sims = rows_unit(vectors) @ query
    return [f"m{i}" for i in np.argsort(-sims, kind="stable")]


def test_the_newcomers_list_is_the_most_rated_catalogue_movies_of_late() -> None:
    catalogue, _ = random_catalogue(8)
    stats = rated_stats()
    listed = newcomer_list(stats, catalogue, 3)
    # "ghost" is rated most but is not in the catalogue: the next movies take its place.
    assert [i.movie_id for i in listed] == ["m0", "m1", "m2"]
    assert [i.rank for i in listed] == [1, 2, 3]
    total = stats.decayed_total()
    assert [i.score for i in listed] == pytest.approx(
        [stats.decayed_count(m) / total for m in ("m0", "m1", "m2")]
    )
    assert listed[0].predicted_rating == pytest.approx(stats.shrunk_mean("m0"))
    # Asking for more than was ever rated gives every rated catalogue movie once.
    assert [i.movie_id for i in newcomer_list(stats, catalogue, 50)] == TRENDING
    # Popularity of late, not of all time: a burst of m4 puts it first.
    moment = datetime(1990, 6, 2, tzinfo=UTC)
    stats.learn_many(["m4"] * 12, [3.0] * 12, [moment] * 12)
    assert newcomer_list(stats, catalogue, 1)[0].movie_id == "m4"


def test_no_newcomers_list_before_any_rating_or_for_k_zero() -> None:
    catalogue, _ = random_catalogue(8)
    assert newcomer_list(ItemStats(), catalogue, 5) == []
    assert newcomer_list(rated_stats(), catalogue, 0) == []
    assert newcomer_list(rated_stats(), Catalogue(), 5) == []


def test_merge_candidates_order_dedup_exclusion_and_count() -> None:
    pools = [(["c", "a", "x", "d", "e", "h"], 2), (["e", "f", "d", "g"], 2), (["z"], 3)]
    assert merge_candidates(["a", "b"], pools, {"x"}) == ["a", "b", "c", "d", "e", "f", "z"]
    # An excluded movie is skipped and the next one taken in its place.
    skipping = merge_candidates(["a", "b"], pools, {"c", "x", "e"})
    assert skipping == ["a", "b", "d", "h", "f", "g", "z"]
    assert merge_candidates(["a"], [(["b", "c"], 0)], ()) == ["a"]
    assert merge_candidates([], [(["b", "c"], 5)], ["b"]) == ["c"]
    assert merge_candidates(["a", "b"], [], {"a"}) == ["a", "b"]  # the caller filters first


def test_retrieve_batch_takes_neighbours_then_trending_then_newest() -> None:
    catalogue, vectors = random_catalogue(60, seed=10, dated=True)
    sources = CandidateSources(rated_stats(), n_trending=2, n_new=2)
    # The last user sits between m1 (trending) and m59 (newest): both are neighbours.
    between = rows_unit((vectors[1] + vectors[59])[None])
    queries = np.concatenate([users(3, seed=11), between]).astype(np.float32)
    newest = [f"m{i}" for i in range(59, -1, -1)]
    assert catalogue.newest(3) == newest[:3]
    excludes = [
        set(),
        {"m0", "m59", cosine_order(vectors, queries[1])[0], "not-in-catalogue"},
        {"m0", "m1", "m2", "m58", "m57", *cosine_order(vectors, queries[2])[1:4]},
        set(),
    ]
    out = retrieve_batch(queries, excludes, catalogue, 5, sources)
    assert len(out) == 4
    assert set(out[3][0][:2]) == {"m1", "m59"}
    assert out[3][0][5:] == ["m0", "m2", "m58", "m57"]  # taken ones are not repeated
    for query, exclude, (candidates, scores) in zip(queries, excludes, out, strict=True):
        first = [m for m in cosine_order(vectors, query) if m not in exclude][:5]
        trend = [m for m in TRENDING if m not in exclude and m not in first][:2]
        new = [m for m in newest if m not in exclude and m not in first + trend][:2]
        assert candidates == first + trend + new
        assert not set(candidates) & exclude
        assert len(set(candidates)) == len(candidates)
        assert "ghost" not in candidates
        assert scores.shape == (5,)
        np.testing.assert_allclose(
            scores, rows_unit(vectors[[int(m[1:]) for m in first]]) @ query, rtol=1e-5
        )
    # Without sources only the neighbours; the same ones.
    plain = retrieve_batch(queries, excludes, catalogue, 5)
    assert [c for c, _ in plain] == [c[:5] for c, _ in out]


def test_retrieve_batch_adds_each_users_most_co_rated_movies_last() -> None:
    catalogue, _ = random_catalogue(30, seed=14, dated=True)
    stats = rated_stats()
    # m20 was rated after m0 twice and m21 once; m22 after m1 (the second user's).
    stats.learn_many(
        ["m20", "m20", "m21", "m22", "ghost"],
        [4.0] * 5,
        [datetime(1990, 6, 2, tzinfo=UTC)] * 5,
        [["m0"], ["m0"], ["m0"], ["m1"], ["m0"]],
    )
    sources = CandidateSources(stats, n_trending=1, n_new=1, n_co=2)
    queries = users(2, 15)
    out = retrieve_batch(queries, [set(), {"m21"}], catalogue, 3, sources, [["m0"], ["m1"]])
    plain = retrieve_batch(queries, [set(), {"m21"}], catalogue, 3, sources)
    for (candidates, _), (before, _), co in zip(out, plain, [["m20", "m21"], ["m22"]], strict=True):
        assert candidates[: len(before)] == before
        assert candidates[len(before) :] == [m for m in co if m not in before]
        assert "ghost" not in candidates  # co-rated, but not in the catalogue
    with pytest.raises(ValueError, match="recent lists"):
        retrieve_batch(queries, [set(), set()], catalogue, 3, sources, [["m0"]])


def test_retrieve_batch_edge_cases() -> None:
    sources = CandidateSources(rated_stats(), n_trending=2, n_new=2)
    empty = retrieve_batch(users(2, 12), [(), ()], Catalogue(), 5, sources)
    assert [c for c, _ in empty] == [[], []]
    catalogue, _ = random_catalogue(8, dated=True)
    everything = {f"m{i}" for i in range(8)}
    out = retrieve_batch(users(2, 13), [everything, everything - {"m3"}], catalogue, 5, sources)
    assert out[0][0] == []
    assert out[1][0] == ["m3"]  # the only movie left, however it is found
    assert retrieve_batch(np.zeros((0, DIM), dtype=np.float32), [], catalogue, 5, sources) == []


def test_candidate_sources_features() -> None:
    catalogue, _ = random_catalogue(10, dated=True)
    stats = rated_stats()
    sources = CandidateSources(stats)
    ids = ["m3", "m0", "m9"]
    items = stats.features(ids, [1903, 1900, 1909])
    features = sources.features(catalogue, ids, "u1")
    assert features.shape == (3, N_CANDIDATE_FEATURES)
    np.testing.assert_array_equal(features[:, :N_ITEM_FEATURES], items)
    np.testing.assert_array_equal(features[:, N_ITEM_FEATURES:], 0.0)  # no online CF model
    rated = [["m0", "m4"], [], ["ghost"]]
    np.testing.assert_array_equal(
        sources.user_features([2, 0, 1], [4.0, 3.5, 2.0], rated),
        user_features_batch([2, 0, 1], [4.0, 3.5, 2.0], [stats.rated_offset(r) for r in rated]),
    )
    assert Reranker(small_ranker(), sources).item_stats is stats


def test_the_pair_columns_read_the_short_and_the_long_window() -> None:
    catalogue, _ = random_catalogue(30, dated=True)
    stats = ItemStats()
    moment = datetime(1998, 1, 1, tzinfo=UTC)
    # m1 follows m0 (rated long ago by the user), m2 follows m20 (rated lately).
    stats.learn_many(["m0", "m20"], [4.0, 4.0], [moment] * 2)
    stats.learn_many(["m1", "m2", "m2"], [4.0] * 3, [moment] * 3, [["m0"], ["m20"], ["m20"]])
    recent = ["m0", *(f"m{i}" for i in range(10, 21))]  # m0 is 12th from last
    features = CandidateSources(stats).features(catalogue, ["m1", "m2", "m3"], recent)
    pair = features[:, N_ITEM_FEATURES:]
    assert PAIR_FEATURE_NAMES == ("co_score", "co_score_long")
    np.testing.assert_allclose(pair[:, 0], stats.co_scores(recent, ["m1", "m2", "m3"]))
    np.testing.assert_allclose(
        pair[:, 1], stats.co_scores(recent, ["m1", "m2", "m3"], CO_LONG_WINDOW)
    )
    assert pair[0, 0] < 0 < pair[0, 1]  # m0 counts only in the long window
    assert pair[1, 0] > 0 and pair[1, 1] > 0


def rating(user: str, movie: str, day: int = 1) -> RatingSubmitted:
    return RatingSubmitted(
        user_id=user,
        movie_id=movie,
        rating=4.0,
        occurred_at=datetime(1998, 1, day, tzinfo=UTC),
    )


def test_candidate_sources_learn_feeds_the_item_statistics_and_co_score() -> None:
    catalogue, _ = random_catalogue(10, dated=True)
    sources = CandidateSources(ItemStats())
    # u0..u5 all rate m1 then m2: the users who rated m1 go on to m2.
    history: dict[str, list[str]] = {}
    for i in range(6):
        for m in ("m1", "m2", f"m{3 + i % 4}"):
            seen = history.setdefault(f"u{i}", [])
            sources.learn([rating(f"u{i}", m)], [co_rated(seen, m)])
            seen.append(m)
    assert sources.item_stats.count("m1") == 6
    ids = ["m2", "m9", "m1"]
    features = sources.features(catalogue, ids, ["m1"])
    np.testing.assert_array_equal(
        features[:, -1], sources.item_stats.co_scores(["m1"], ids).astype(np.float32)
    )
    # After m1, m2 (rated next by all six) scores highest; m9 was never rated.
    assert features[0, -1] > features[1, -1] and features[0, -1] > features[2, -1]
    np.testing.assert_array_equal(sources.features(catalogue, ids)[:, -1], 0.0)  # no history


def test_recommend_batch_scores_the_users_own_co_score() -> None:
    torch.set_num_threads(1)
    catalogue, _ = random_catalogue(30, seed=21, dated=True)
    stats = rated_stats()
    reranker = Reranker(small_ranker(), CandidateSources(stats))
    moment = datetime(1990, 6, 1, tzinfo=UTC)
    for i in range(40):
        movie = f"m{(i * 7) % 30}"
        stats.learn_one(movie, 4.0, moment, [f"m{i % 5}", f"m{(i + 1) % 5}"])
    queries = users(2, seed=22)
    ufeats = reranker.sources.user_features([3, 3], [3.5, 3.5], [[], []])
    recents = [["m0", "m1"], ["m3"]]

    def ranked(lists: list[list[str]]) -> list[list[ScoredItem]]:
        return recommend_batch(
            queries,
            [set(), set()],
            catalogue,
            k=5,
            n_candidates=10,
            mmr_lambda=1.0,
            reranker=reranker,
            user_features=ufeats,
            recents=lists,
        )

    lists = ranked(recents)
    retrieved = retrieve_batch(queries, [set(), set()], catalogue, 10, reranker.sources)
    for row, (recent, (candidates, _)) in enumerate(zip(recents, retrieved, strict=True)):
        logits = reranker.ranker.score(
            queries[row],
            ufeats[row],
            catalogue.index.vectors(candidates),
            reranker.sources.features(catalogue, candidates, recent),
        )
        by_movie = dict(zip(candidates, logits, strict=True))
        for item in lists[row]:
            assert item.score == pytest.approx(float(by_movie[item.movie_id]), abs=1e-5)
    with pytest.raises(ValueError, match="recent lists"):
        ranked([["m0"]])


def small_ranker() -> Ranker:
    """A real, untrained two-tower net: what it scores does not matter here, only that
    its candidates are the right ones."""
    torch.manual_seed(0)
    net = TwoTowerNet(DIM, embed_dim=8, hidden=16, feature_hidden=8, rating_hidden=8)
    return ranker_of(net)


def test_recommend_batch_with_a_reranker_never_returns_an_excluded_movie() -> None:
    torch.set_num_threads(1)
    catalogue, vectors = random_catalogue(80, seed=14, dated=True)
    stats = rated_stats()
    reranker = Reranker(small_ranker(), CandidateSources(stats, n_trending=3, n_new=3))
    queries = users(6, seed=15)
    # Each user rated their nearest movies and the most trending and newest ones.
    excludes = [
        {*cosine_order(vectors, q)[: 2 * row], *TRENDING[:row], *[f"m{79 - j}" for j in range(row)]}
        for row, q in enumerate(queries)
    ]
    ufeats = reranker.sources.user_features(
        [len(e) for e in excludes], [3.5 + 0.1 * i for i in range(6)], [sorted(e) for e in excludes]
    )

    def ranked(
        queries: np.ndarray, excludes: list[set[str]], features: np.ndarray | None
    ) -> list[list[ScoredItem]]:
        return recommend_batch(
            queries,
            excludes,
            catalogue,
            k=6,
            n_candidates=8,
            mmr_lambda=0.7,
            reranker=reranker,
            user_features=features,
        )

    batch = ranked(queries, excludes, ufeats)
    retrieved = retrieve_batch(queries, excludes, catalogue, 8, reranker.sources)
    for exclude, lst, (candidates, _) in zip(excludes, batch, retrieved, strict=True):
        ids = [s.movie_id for s in lst]
        assert len(ids) == 6 == len(set(ids))
        assert not set(ids) & exclude
        assert set(ids) <= set(candidates)
        assert [s.rank for s in lst] == [1, 2, 3, 4, 5, 6]
        assert all(s.predicted_rating is not None and 0.5 <= s.predicted_rating <= 5.0 for s in lst)
    single = [
        recommend(
            q,
            e,
            catalogue,
            k=6,
            n_candidates=8,
            mmr_lambda=0.7,
            reranker=reranker,
            user_features=f,
        )
        for q, e, f in zip(queries, excludes, ufeats, strict=True)
    ]
    for one, many in zip(single, batch, strict=True):
        assert [s.movie_id for s in one] == [s.movie_id for s in many]
        np.testing.assert_allclose(
            [s.score for s in one], [s.score for s in many], rtol=1e-5, atol=1e-5
        )
    # A user who rated all but three gets those three, trending and new ones included.
    left = {"m0", "m79", "m40"}
    rated = {f"m{i}" for i in range(80)} - left
    (only,) = ranked(queries[:1], [rated], ufeats[:1])
    assert {s.movie_id for s in only} == left
    without = recommend_batch(queries, excludes, catalogue, k=6, n_candidates=8, mmr_lambda=0.7)
    assert all(s.predicted_rating is None for lst in without for s in lst)
    with pytest.raises(ValueError, match="user_features"):
        ranked(queries, excludes, None)
    with pytest.raises(ValueError, match="user_features"):
        ranked(queries, excludes, ufeats[:2])


def small_rating_model() -> RatingModel:
    """Item factors fitted on a few made-up ratings of the first catalogue movies."""
    ratings = [
        Rating(user_id=str(u), movie_id=f"m{m}", rating=1.0 + (u * m) % 5)
        for u in range(8)
        for m in range(10)
    ]
    fit = fit_rating_factors(ratings, dim=2)
    return RatingModel(fit.movie_ids, fit.factors, RatingParams(), (1.0, 5.0), "fold-in-test")


def test_listed_items_get_the_rating_models_stars_when_the_ratings_are_known() -> None:
    torch.set_num_threads(1)
    catalogue, _ = random_catalogue(30, seed=21, dated=True)
    reranker = Reranker(
        small_ranker(), CandidateSources(rated_stats(), n_trending=3, n_new=3), small_rating_model()
    )
    queries = users(3, seed=22)
    histories = [(["m1", "m5"], [5.0, 1.0]), ([], []), (["m2"], [])]  # last: no stars sent
    excludes = [set(h[0]) for h in histories]
    features = reranker.sources.user_features(
        [len(e) for e in excludes], [3.5] * 3, [h[0] for h in histories]
    )

    def ranked(given: list[tuple[list[str], list[float]]] | None) -> list[list[ScoredItem]]:
        return recommend_batch(
            queries,
            excludes,
            catalogue,
            k=5,
            n_candidates=8,
            mmr_lambda=0.7,
            reranker=reranker,
            user_features=features,
            histories=given,
        )

    rated, head = ranked(histories), ranked(None)
    for row in (0, 1):
        ids = [s.movie_id for s in rated[row]]
        assert ids == [s.movie_id for s in head[row]]  # the rating model does not reorder
        expected = reranker.predict_ratings(catalogue, histories[row], ids)
        assert expected is not None
        np.testing.assert_allclose([s.predicted_rating for s in rated[row]], expected)
        assert not np.allclose(expected, [s.predicted_rating for s in head[row]])
    # A profile with rated movies but no stars keeps the rating head's prediction.
    assert [s.predicted_rating for s in rated[2]] == [s.predicted_rating for s in head[2]]
    with pytest.raises(ValueError, match="3 user vectors but 1 histories"):
        ranked(histories[:1])

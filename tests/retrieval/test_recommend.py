"""Retrieve → exclude → MMR over a real FAISS-backed catalogue."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from shared.events import ItemEmbedded
from shared.exceptions import ConfigurationError
from shared.retrieval.catalogue import Catalogue
from shared.retrieval.recommend import recommend, recommend_batch

DIM = 16


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def item(movie_id: str, vector: np.ndarray) -> ItemEmbedded:
    return ItemEmbedded(
        movie_id=movie_id,
        title=f"Title {movie_id}",
        genres=["Drama"],
        vector=unit(vector),
        modalities=["text"],
        model_version="test-v1",
        embedded_at=datetime.now(UTC),
    )


def random_catalogue(n: int, seed: int = 0) -> tuple[Catalogue, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    catalogue = Catalogue()
    assert catalogue.apply([item(f"m{i}", v) for i, v in enumerate(vectors)]) == []
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

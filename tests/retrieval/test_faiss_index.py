"""The exact FAISS index: upsert, replace, search, dimensions, concurrent use."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shared.exceptions import ConfigurationError, NumericalError
from shared.retrieval.faiss_index import FaissIndex
from shared.retrieval.index import VectorIndex


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_it_is_a_vector_index() -> None:
    assert isinstance(FaissIndex(4), VectorIndex)


def test_search_returns_the_nearest_first_with_cosine_scores() -> None:
    index = FaissIndex(3)
    index.upsert(["a", "b", "c"], np.eye(3, dtype=np.float32))
    query = np.array([[0.8, 0.6, 0.0]], dtype=np.float32)
    ids, scores = index.search(query, 2)
    assert ids == [["a", "b"]]
    np.testing.assert_allclose(scores, [[0.8, 0.6]], rtol=1e-6)
    assert scores.dtype == np.float32


def test_upsert_replaces_an_existing_id_instead_of_duplicating_it() -> None:
    index = FaissIndex(3)
    index.upsert(["a", "b", "c"], np.eye(3, dtype=np.float32))
    index.upsert(["a"], np.array([[0.0, 0.0, 1.0]], dtype=np.float32))
    assert len(index) == 3
    ids, _ = index.search(np.array([[0.0, 0.0, 1.0]], dtype=np.float32), 10)
    assert sorted(ids[0]) == ["a", "b", "c"]
    assert ids[0][1] in {"a", "c"} and ids[0][2] == "b"
    np.testing.assert_array_equal(index.vectors(["a"]), [[0.0, 0.0, 1.0]])
    # The old vector of "a" is gone: nothing is similar to it any more.
    _, scores = index.search(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), 3)
    np.testing.assert_allclose(scores, [[0.0, 0.0, 0.0]], atol=1e-6)


def test_an_id_repeated_in_one_upsert_keeps_its_last_vector() -> None:
    index = FaissIndex(2)
    index.upsert(["a", "b", "a"], np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32))
    assert len(index) == 2
    np.testing.assert_array_equal(index.vectors(["b", "a"]), [[0, 1], [-1, 0]])


def test_k_is_capped_at_the_size_and_an_empty_index_finds_nothing() -> None:
    index = FaissIndex(2)
    ids, scores = index.search(np.array([[1, 0], [0, 1]], dtype=np.float32), 5)
    assert ids == [[], []] and scores.shape == (2, 0)
    index.upsert(["a", "b"], np.eye(2, dtype=np.float32))
    ids, scores = index.search(np.array([[1, 0]], dtype=np.float32), 5)
    assert ids == [["a", "b"]] and scores.shape == (1, 2)


def test_wrong_dimensions_are_refused() -> None:
    index = FaissIndex(4)
    with pytest.raises(ConfigurationError, match=r"shape \(n, 4\)"):
        index.upsert(["a"], np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ConfigurationError, match=r"shape \(n, 4\)"):
        index.search(np.ones((1, 5), dtype=np.float32), 1)
    with pytest.raises(ConfigurationError, match="2 ids but 1 vectors"):
        index.upsert(["a", "b"], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(ConfigurationError):
        FaissIndex(0)
    with pytest.raises(NumericalError):
        index.upsert(["a"], np.full((1, 4), np.nan, dtype=np.float32))
    with pytest.raises(KeyError):
        index.vectors(["missing"])
    assert len(index) == 0


def test_concurrent_upserts_and_searches_stay_consistent() -> None:
    rng = np.random.default_rng(7)
    dim, n_items, n_writes = 16, 200, 30
    pool = unit_rows(rng, n_items, dim)
    queries = unit_rows(rng, 8, dim)
    index = FaissIndex(dim)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(n_writes):
                # Every write re-embeds half of what is already there, plus new items.
                ids = [f"m{j}" for j in range(i * 5, i * 5 + 10)]
                index.upsert(ids, pool[[int(m[1:]) % n_items for m in ids]])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            while not done.is_set():
                ids, scores = index.search(queries, 20)
                for row, row_scores in zip(ids, scores, strict=True):
                    assert len(row) == len(set(row)), "an id appeared twice"
                    assert np.all(np.diff(row_scores) <= 1e-6)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    expected = n_writes * 5 + 5
    assert len(index) == expected
    ids, _ = index.search(queries, expected + 10)
    assert all(sorted(row) == sorted({f"m{j}" for j in range(expected)}) for row in ids)

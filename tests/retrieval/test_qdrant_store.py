"""The Qdrant item store, in embedded mode under a temporary folder."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from shared.config import Settings
from shared.events import ItemEmbedded
from shared.exceptions import ConfigurationError
from shared.retrieval.qdrant_store import QdrantStore, point_id

DIM = 8


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def item(movie_id: str, vector: np.ndarray, title: str = "A movie") -> ItemEmbedded:
    return ItemEmbedded(
        movie_id=movie_id,
        title=title,
        year=1995,
        genres=["Comedy"],
        vector=vector,
        modalities=["text"],
        model_version="test-v1",
        embedded_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(qdrant_url=None, qdrant_path=tmp_path / "qdrant", qdrant_collection="movies")


def test_upsert_search_count(settings: Settings) -> None:
    items = [item(str(i), unit(i), title=f"Movie {i}") for i in range(20)]
    with QdrantStore(settings, DIM) as store:
        assert store.count() == 0
        store.upsert(items)
        assert store.count() == 20
        hits = store.search(unit(3), k=5)
        assert len(hits) == 5
        assert hits[0][0] == "3"
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
        scores = [score for _, score in hits]
        assert scores == sorted(scores, reverse=True)
        # The ranking is by cosine similarity.
        expected = sorted(range(20), key=lambda i: -float(unit(i) @ unit(3)))[:5]
        assert [movie_id for movie_id, _ in hits] == [str(i) for i in expected]
        assert store.search(unit(3), k=0) == []


def test_payload_and_point_ids(settings: Settings) -> None:
    with QdrantStore(settings, DIM) as store:
        store.upsert([item("tt0114709", unit(1), title="Toy Story")])
        (point,) = store.client.retrieve(settings.qdrant_collection, [point_id("tt0114709")])
    assert uuid.UUID(str(point.id)) == uuid.UUID(point_id("tt0114709"))
    assert point.payload == {
        "movie_id": "tt0114709",
        "title": "Toy Story",
        "year": 1995,
        "genres": ["Comedy"],
        "model_version": "test-v1",
    }
    assert point_id("1") == point_id("1") != point_id("2")


def test_upsert_replaces_and_last_wins(settings: Settings) -> None:
    with QdrantStore(settings, DIM) as store:
        store.upsert([item("1", unit(1)), item("2", unit(2))])
        store.upsert([item("1", unit(5)), item("1", unit(6), title="latest")])
        assert store.count() == 2
        hits = store.search(unit(6), k=1)
        assert hits[0][0] == "1"
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)


def test_points_survive_a_restart(settings: Settings) -> None:
    with QdrantStore(settings, DIM) as store:
        store.upsert([item("1", unit(1)), item("2", unit(2))])
    with QdrantStore(settings, DIM) as store:
        assert store.count() == 2
        assert store.search(unit(2), k=1)[0][0] == "2"


def test_a_collection_of_another_dimension_is_refused(settings: Settings) -> None:
    with QdrantStore(settings, DIM) as store:
        store.upsert([item("1", unit(1))])
    with pytest.raises(ConfigurationError, match="dimension 8 but the item encoder makes 16"):
        QdrantStore(settings, 16)
    # The refusal released the storage: the right dimension still opens.
    with QdrantStore(settings, DIM) as store:
        assert store.count() == 1


def test_a_vector_of_the_wrong_size_is_refused(settings: Settings) -> None:
    with QdrantStore(settings, DIM) as store:
        with pytest.raises(ConfigurationError, match="shape"):
            store.upsert([item("1", unit(1, dim=4))])
        with pytest.raises(ConfigurationError, match="shape"):
            store.search(unit(1, dim=4), k=3)
        assert store.count() == 0


def test_embedded_storage_has_one_owner(settings: Settings) -> None:
    with (
        QdrantStore(settings, DIM),
        pytest.raises(ConfigurationError, match="in use by another process"),
    ):
        QdrantStore(settings, DIM)


def test_collections_are_separate(settings: Settings) -> None:
    with QdrantStore(settings, DIM) as store:
        store.upsert([item("1", unit(1))])
    other = settings.model_copy(update={"qdrant_collection": "movies-other"})
    with QdrantStore(other, 16) as store:
        assert store.count() == 0

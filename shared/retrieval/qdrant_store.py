"""The Qdrant collection of item vectors, written by the item-embedding service.

Embedded mode (``QDRANT_URL`` unset) keeps the collection in ``QDRANT_PATH`` through
qdrant-client's local mode, which one process owns at a time; with ``QDRANT_URL`` the
same code talks to a Qdrant server.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client.http import models

from shared.config import Settings
from shared.events import ItemEmbedded
from shared.exceptions import ConfigurationError
from shared.types import MovieId, Vector

log = logging.getLogger(__name__)

POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "reelstream:movie")
"""Namespace of the point ids (Qdrant ids must be unsigned integers or UUIDs)."""


def point_id(movie_id: MovieId) -> str:
    """The Qdrant point id of a movie: a UUID5 of its id, stable everywhere."""
    return str(uuid.uuid5(POINT_NAMESPACE, movie_id))


class QdrantStore:
    """A cosine-distance collection of item vectors with their reader payload.

    Args:
        settings: ``qdrant_url`` (None: embedded at ``qdrant_path``) and
            ``qdrant_collection`` are read.
        dim: Dimension of the item vectors; the collection is created with it.

    Raises:
        ConfigurationError: the collection exists with another dimension or distance,
            or the embedded storage is already owned by another process.
    """

    def __init__(self, settings: Settings, dim: int) -> None:
        if dim < 1:
            raise ConfigurationError(f"vector dimension {dim} must be at least 1")
        self._collection = settings.qdrant_collection
        self._dim = dim
        if settings.qdrant_url is None:
            self._where = f"embedded at {settings.qdrant_path}"
            settings.qdrant_path.mkdir(parents=True, exist_ok=True)
            try:
                self._client = QdrantClient(path=str(settings.qdrant_path))
            except RuntimeError as exc:
                # qdrant-client's local mode locks its folder; only one process may own it.
                raise ConfigurationError(
                    f"Qdrant storage {settings.qdrant_path} is in use by another process "
                    f"(embedded mode has one owner; use QDRANT_URL to share): {exc}"
                ) from exc
        else:
            self._where = f"at {settings.qdrant_url}"
            self._client = QdrantClient(url=settings.qdrant_url)
        try:
            self._ensure_collection()
        except BaseException:
            self._client.close()
            raise
        log.info("qdrant collection=%s dim=%d %s", self._collection, dim, self._where)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def client(self) -> QdrantClient:
        """The underlying client, for queries this class does not wrap."""
        return self._client

    def _ensure_collection(self) -> None:
        if not self._client.collection_exists(self._collection):
            self._client.create_collection(
                self._collection,
                vectors_config=models.VectorParams(size=self._dim, distance=models.Distance.COSINE),
            )
            return
        params = self._client.get_collection(self._collection).config.params.vectors
        if not isinstance(params, models.VectorParams):
            raise ConfigurationError(
                f"Qdrant collection {self._collection!r} ({self._where}) uses named vectors; "
                "expected one unnamed vector per point"
            )
        if params.size != self._dim:
            raise ConfigurationError(
                f"Qdrant collection {self._collection!r} ({self._where}) holds vectors of "
                f"dimension {params.size} but the item encoder makes {self._dim}; drop the "
                "collection or set QDRANT_COLLECTION to a new name"
            )
        if params.distance != models.Distance.COSINE:
            raise ConfigurationError(
                f"Qdrant collection {self._collection!r} ({self._where}) uses "
                f"{params.distance} distance; expected Cosine"
            )

    def upsert(self, items: Sequence[ItemEmbedded]) -> None:
        """Insert or replace the points of these items (one per movie id, last wins).

        Raises:
            ConfigurationError: a vector is not of the store's dimension.
        """
        latest = {item.movie_id: item for item in items}
        if not latest:
            return
        points = []
        for item in latest.values():
            vector = np.asarray(item.vector, dtype=np.float32)
            if vector.shape != (self._dim,):
                raise ConfigurationError(
                    f"movie {item.movie_id}: vector of shape {vector.shape} in a store of "
                    f"dimension {self._dim}"
                )
            points.append(
                models.PointStruct(
                    id=point_id(item.movie_id),
                    vector=vector.tolist(),
                    payload=_payload(item),
                )
            )
        self._client.upsert(self._collection, points=points, wait=True)

    def search(self, vector: Vector, k: int) -> list[tuple[MovieId, float]]:
        """The ``k`` nearest movies by cosine similarity, best first, as (movie_id, score)."""
        if k < 1:
            return []
        query = np.asarray(vector, dtype=np.float32)
        if query.shape != (self._dim,):
            raise ConfigurationError(
                f"query of shape {query.shape} in a store of dimension {self._dim}"
            )
        result = self._client.query_points(
            self._collection, query=query.tolist(), limit=k, with_payload=["movie_id"]
        )
        return [(str((p.payload or {})["movie_id"]), float(p.score)) for p in result.points]

    def similar(
        self,
        movie_id: MovieId,
        k: int,
        *,
        genre: str | None = None,
        year: int | None = None,
    ) -> list[tuple[MovieId, float]]:
        """The ``k`` movies nearest to ``movie_id``'s point (Qdrant's query by point id,
        which leaves that point out), best first, as (movie_id, score); only movies of
        ``genre`` and of ``year`` when given. Empty for a movie not in the store."""
        if k < 1:
            return []
        conditions: list[models.Condition] = []
        if genre is not None:
            conditions.append(
                models.FieldCondition(key="genres", match=models.MatchValue(value=genre))
            )
        if year is not None:
            conditions.append(
                models.FieldCondition(key="year", match=models.MatchValue(value=year))
            )
        point = point_id(movie_id)
        if not self._client.retrieve(self._collection, [point], with_payload=False):
            return []
        result = self._client.query_points(
            self._collection,
            query=point,
            limit=k,
            query_filter=models.Filter(must=conditions) if conditions else None,
            with_payload=["movie_id"],
        )
        return [(str((p.payload or {})["movie_id"]), float(p.score)) for p in result.points]

    def count(self) -> int:
        """Number of points (movies) in the collection."""
        return int(self._client.count(self._collection, exact=True).count)

    def close(self) -> None:
        """Release the client (and the embedded storage lock)."""
        self._client.close()

    def __enter__(self) -> QdrantStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _payload(item: ItemEmbedded) -> dict[str, Any]:
    return {
        "movie_id": item.movie_id,
        "title": item.title,
        "year": item.year,
        "genres": list(item.genres),
        "model_version": item.model_version,
    }

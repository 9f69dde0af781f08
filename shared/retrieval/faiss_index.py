"""Exact in-process retrieval with FAISS (inner product over L2-normalised vectors)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import faiss
import numpy as np

from shared.exceptions import ConfigurationError, NumericalError
from shared.types import Matrix, MovieId


class FaissIndex:
    """A ``VectorIndex`` over ``faiss.IndexIDMap2(faiss.IndexFlatIP(dim))``.

    Search is exact (brute force), which is what a catalogue of thousands of items needs;
    with unit vectors the inner product is the cosine similarity. Movie ids (strings)
    map to FAISS's int64 ids in order of arrival. A lock serialises every call, because
    the index is fed by a reader thread while the consumer thread searches.
    """

    def __init__(self, dim: int) -> None:
        """``dim``: vector dimension, at least 1."""
        if dim < 1:
            raise ConfigurationError(f"index dimension must be at least 1, got {dim}")
        self._dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._int_of: dict[MovieId, int] = {}
        self._id_of: list[MovieId] = []
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        with self._lock:
            return len(self._int_of)

    def __contains__(self, movie_id: object) -> bool:
        with self._lock:
            return movie_id in self._int_of

    def upsert(self, ids: Sequence[MovieId], vectors: Matrix) -> None:
        """Insert or replace vectors; the last row wins for an id repeated in one call.

        Raises:
            ConfigurationError: ``vectors`` is not ``(len(ids), dim)``.
            NumericalError: a vector holds NaN or infinity.
        """
        matrix = self._check(vectors, "vectors")
        if matrix.shape[0] != len(ids):
            raise ConfigurationError(f"{len(ids)} ids but {matrix.shape[0]} vectors")
        if not np.isfinite(matrix).all():
            raise NumericalError("NaN or infinity encountered in item vectors")
        # A re-embedded item arriving twice in one batch must still be stored once.
        last_row = {movie_id: row for row, movie_id in enumerate(ids)}
        if not last_row:
            return
        rows = np.fromiter(last_row.values(), dtype=np.int64, count=len(last_row))
        with self._lock:
            stale = [self._int_of[m] for m in last_row if m in self._int_of]
            if stale:
                self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(stale, dtype=np.int64)))
            labels = np.empty(len(last_row), dtype=np.int64)
            for i, movie_id in enumerate(last_row):
                label = self._int_of.get(movie_id)
                if label is None:
                    label = len(self._id_of)
                    self._int_of[movie_id] = label
                    self._id_of.append(movie_id)
                labels[i] = label
            self._index.add_with_ids(np.ascontiguousarray(matrix[rows]), labels)

    def search(self, queries: Matrix, k: int) -> tuple[list[list[MovieId]], Matrix]:
        """The ``min(k, len(self))`` nearest items of each query, most similar first.

        Raises:
            ConfigurationError: ``queries`` is not ``(n, dim)``.
        """
        matrix = self._check(queries, "queries")
        with self._lock:
            k = max(0, min(k, len(self._int_of)))
            if k == 0 or matrix.shape[0] == 0:
                return [[] for _ in range(matrix.shape[0])], np.zeros(
                    (matrix.shape[0], 0), dtype=np.float32
                )
            scores, labels = self._index.search(matrix, k)
            ids = [[self._id_of[label] for label in row] for row in labels.tolist()]
        return ids, scores.astype(np.float32, copy=False)

    def vectors(self, ids: Sequence[MovieId]) -> Matrix:
        """The stored vectors of ``ids``; raises ``KeyError`` for an unknown id."""
        if not ids:
            return np.zeros((0, self._dim), dtype=np.float32)
        with self._lock:
            labels = np.asarray([self._int_of[m] for m in ids], dtype=np.int64)
            return np.asarray(self._index.reconstruct_batch(labels), dtype=np.float32)

    def _check(self, matrix: Matrix, what: str) -> Matrix:
        array = np.asarray(matrix)
        if array.ndim != 2 or array.shape[1] != self._dim:
            raise ConfigurationError(
                f"{what} must have shape (n, {self._dim}), got {tuple(array.shape)}"
            )
        return np.ascontiguousarray(array, dtype=np.float32)

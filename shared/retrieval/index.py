"""The contract every nearest-neighbour backend fulfils.

Backends wrap a vector store (FAISS in-process, Qdrant, ...) behind one small
interface, so the catalogue and the recommendation functions never know which one
serves them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from shared.types import Matrix, MovieId


@runtime_checkable
class VectorIndex(Protocol):
    """A mutable set of item vectors searchable by inner product.

    Vectors are L2-normalised float32, so inner product is cosine similarity.
    Implementations are safe to feed from one thread while another searches.
    """

    @property
    def dim(self) -> int:
        """Dimension of every vector in the index."""
        ...

    def __len__(self) -> int:
        """Number of distinct movie ids in the index."""
        ...

    def upsert(self, ids: Sequence[MovieId], vectors: Matrix) -> None:
        """Insert or replace the vectors of ``ids`` (row ``i`` of ``vectors`` is ``ids[i]``).

        An id already present is replaced, never duplicated; when an id appears more than
        once in one call the last row wins.

        Raises:
            ConfigurationError: ``vectors`` is not ``(len(ids), dim)``.
        """
        ...

    def search(self, queries: Matrix, k: int) -> tuple[list[list[MovieId]], Matrix]:
        """The ``k`` most similar items of each query row, most similar first.

        ``k`` is capped at ``len(self)``. Returns, per query, the movie ids and a
        ``(len(queries), k')`` float32 matrix of their inner products.

        Raises:
            ConfigurationError: ``queries`` is not ``(n, dim)``.
        """
        ...

    def vectors(self, ids: Sequence[MovieId]) -> Matrix:
        """The stored vectors of ``ids`` as a ``(len(ids), dim)`` matrix.

        Raises:
            KeyError: an id is not in the index.
        """
        ...

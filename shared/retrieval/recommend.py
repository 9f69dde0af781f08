"""Retrieve → exclude → MMR re-rank: the recommendation list of a user vector.

Pure functions over a catalogue, shared by the recommender service, the offline
evaluation and the tests.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from shared.retrieval.catalogue import Catalogue
from shared.retrieval.mmr import mmr
from shared.types import Matrix, MovieId, Vector


@dataclass(frozen=True)
class ScoredItem:
    """One recommended item."""

    movie_id: MovieId
    score: float
    """Cosine similarity of the item to the user vector (its relevance, before MMR)."""
    rank: int
    """Position in the list, 1-based (MMR order)."""


def recommend(
    user_vector: Vector,
    exclude: Collection[MovieId],
    catalogue: Catalogue,
    *,
    k: int,
    n_candidates: int,
    mmr_lambda: float,
) -> list[ScoredItem]:
    """The list of one user; same result as the matching row of ``recommend_batch``."""
    query = np.asarray(user_vector, dtype=np.float32).reshape(1, -1)
    return recommend_batch(
        query, [exclude], catalogue, k=k, n_candidates=n_candidates, mmr_lambda=mmr_lambda
    )[0]


def recommend_batch(
    user_vectors: Matrix,
    excludes: Sequence[Collection[MovieId]],
    catalogue: Catalogue,
    *,
    k: int,
    n_candidates: int,
    mmr_lambda: float,
) -> list[list[ScoredItem]]:
    """Lists of up to ``k`` items for each row of ``user_vectors``, with one index search.

    Per user: retrieve ``n_candidates + len(exclude)`` items by cosine similarity (the
    batch searches with the largest exclude, capped at the catalogue size), drop the
    excluded movies, keep the ``max(n_candidates, k)`` most similar, and re-rank them
    to ``k`` with MMR (``mmr_lambda`` 1.0 = pure relevance, 0.0 = pure diversity).
    An excluded movie is never returned: a user who has rated nearly everything gets
    fewer than ``k`` items, and an empty catalogue gives empty lists.

    Args:
        user_vectors: ``(n, dim)`` L2-normalised user vectors.
        excludes: per user, the movies never to recommend (already rated).

    Raises:
        ConfigurationError: the vectors' dimension is not the catalogue's, or
            ``mmr_lambda`` is outside ``[0, 1]``.
        ValueError: ``excludes`` does not have one entry per user vector.
    """
    queries = np.asarray(user_vectors, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"user_vectors must be 2-D (n, dim), got shape {queries.shape}")
    if len(excludes) != queries.shape[0]:
        raise ValueError(f"{queries.shape[0]} user vectors but {len(excludes)} exclude sets")
    index = catalogue.index
    if index is None or queries.shape[0] == 0 or k <= 0:
        return [[] for _ in range(queries.shape[0])]

    keep = max(n_candidates, k)
    exclude_sets = [e if isinstance(e, set | frozenset) else set(e) for e in excludes]
    depth = min(len(index), keep + max(len(e) for e in exclude_sets))
    ids, scores = index.search(queries, depth)

    lists: list[list[ScoredItem]] = []
    for row, exclude in enumerate(exclude_sets):
        allowed = (j for j, movie_id in enumerate(ids[row]) if movie_id not in exclude)
        picked = list(islice(allowed, keep))
        if not picked:
            lists.append([])
            continue
        candidates = [ids[row][j] for j in picked]
        relevance = scores[row, picked]
        order = mmr(relevance, index.vectors(candidates), k, mmr_lambda)
        lists.append(
            [
                ScoredItem(candidates[i], float(relevance[i]), rank)
                for rank, i in enumerate(order, start=1)
            ]
        )
    return lists

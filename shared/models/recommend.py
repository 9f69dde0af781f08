"""Retrieve → exclude → rank → MMR re-rank: the recommendation list of a user vector.

Pure functions over a catalogue (``shared.retrieval``: the index and MMR) and the
ranking models, shared by the recommender service, the offline evaluation and the
tests. Ranking is optional: without a ``Reranker`` the candidates' cosine similarity is
their relevance.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Protocol

import numpy as np

from shared.models.item_stats import CO_LONG_WINDOW, N_PAIR_FEATURES, ItemStats, user_features_batch
from shared.models.ranker import Ranker
from shared.models.rating import RatingModel
from shared.retrieval.catalogue import Catalogue
from shared.retrieval.mmr import mmr
from shared.types import Matrix, MovieId, UserId, Vector


class Rating(Protocol):
    """What the online features learn of a rating (a ``RatingSubmitted`` has it all)."""

    @property
    def user_id(self) -> UserId: ...
    @property
    def movie_id(self) -> MovieId: ...
    @property
    def rating(self) -> float: ...
    @property
    def occurred_at(self) -> datetime: ...


@dataclass(frozen=True)
class ScoredItem:
    """One recommended item."""

    movie_id: MovieId
    score: float
    """Cosine similarity of the item to the user vector (its relevance, before MMR)."""
    rank: int
    """Position in the list, 1-based (MMR order)."""
    predicted_rating: float | None = None
    """Stars the user is predicted to give the item (None without a ranker): the
    rating model's when the user's ratings are known, else the ranker's rating head."""


@dataclass(frozen=True)
class CandidateSources:
    """Where candidates come from besides the cosine neighbours of the user vector, and
    the online features the ranker reads of them (``item_stats``: popularity, mean
    rating, co-rating counts, stream time)."""

    item_stats: ItemStats
    n_trending: int = 100
    """Candidates added from the most-rated movies of late (decayed counts), so the
    ranker can weigh popularity against taste."""
    n_new: int = 50
    """Candidates added from the latest release years, so a new movie can be listed
    before its ratings or its neighbours' pull bring it close to anyone."""
    n_rising: int = 0
    """Candidates added from the most-rated movies of the last day or so
    (``ItemStats.rising``): a release everyone is rating now, long before its
    long-memory count makes it trending."""
    n_co: int = 0
    """Candidates added per user from the movies most co-rated with what the user lately
    rated (``ItemStats.co_candidates``, the ``co_score`` order): who rated what together
    finds movies that neither the content vectors nor popularity bring near. The
    services set it (``REELSTREAM_CO_CANDIDATES``); the ranker learns without it."""

    def learn(self, ratings: Sequence[Rating], co_rated: Sequence[Sequence[MovieId]]) -> None:
        """The item statistics learn these ratings, in order; ``co_rated``: per rating,
        the rater's latest earlier-rated movies (``ItemRated.co_rated``)."""
        self.item_stats.learn_many(
            [r.movie_id for r in ratings],
            [r.rating for r in ratings],
            [r.occurred_at for r in ratings],
            co_rated,
        )

    def pools(self, catalogue: Catalogue, spare: int) -> list[tuple[list[MovieId], int]]:
        """The extra candidate sources of one batch, as ``(movies in order, how many to
        add per user)``; each lists ``spare`` more than it adds, so that a user who
        excluded (rated) up to ``spare`` of them still gets the full number."""
        stats = self.item_stats
        trending = [m for m in stats.trending(self.n_trending + spare) if m in catalogue]
        pools = [(trending, self.n_trending), (catalogue.newest(self.n_new + spare), self.n_new)]
        if self.n_rising > 0:
            rising = [m for m in stats.rising(self.n_rising + spare) if m in catalogue]
            pools.append((rising, self.n_rising))
        return pools

    def user_pool(
        self, recent: Sequence[MovieId], catalogue: Catalogue, exclude: Collection[MovieId]
    ) -> tuple[list[MovieId], int]:
        """The per-user candidate source (``n_co``), as a pool of ``pools``."""
        if self.n_co <= 0:
            return [], 0
        co = self.item_stats.co_candidates(recent, 2 * self.n_co, exclude)
        return [m for m in co if m in catalogue], self.n_co

    def features(
        self,
        catalogue: Catalogue,
        movie_ids: Sequence[MovieId],
        recent: Sequence[MovieId] = (),
    ) -> Matrix:
        """The ranker's candidate features of catalogue movies for a user who lately
        rated ``recent`` (oldest first), as of now: ``(len(movie_ids),
        N_CANDIDATE_FEATURES)``, the item features then the ``co_score`` of each (0 for
        every movie without ``recent``)."""
        items = self.item_stats.features(movie_ids, catalogue.years(movie_ids))
        pair = np.zeros((len(movie_ids), N_PAIR_FEATURES), dtype=np.float32)
        pair[:, 0] = self.item_stats.co_scores(recent, movie_ids)
        pair[:, 1] = self.item_stats.co_scores(recent, movie_ids, CO_LONG_WINDOW)
        return np.concatenate([items, pair], axis=1)

    def user_features(
        self,
        n_ratings: Sequence[int],
        mean_ratings: Sequence[float],
        rated: Sequence[Sequence[MovieId]],
    ) -> Matrix:
        """The ranker's user features of users with these counts, mean ratings and
        rated movies, as of now."""
        return user_features_batch(
            n_ratings, mean_ratings, [self.item_stats.rated_offset(r) for r in rated]
        )


History = tuple[Sequence[MovieId], Sequence[float]]
"""A user's rated movies (oldest first) and their stars, as the profile carries them."""


@dataclass(frozen=True)
class Reranker:
    """The trained ranker between retrieval and MMR, the candidate sources it scores
    besides the cosine neighbours (``sources``), and the rating predictor of listed
    items (``rating_model``; None: the ranker's rating head)."""

    ranker: Ranker
    sources: CandidateSources
    rating_model: RatingModel | None = None

    @property
    def item_stats(self) -> ItemStats:
        """The online item features (``sources.item_stats``)."""
        return self.sources.item_stats

    def predict_ratings(
        self, catalogue: Catalogue, history: History, targets: Sequence[MovieId]
    ) -> np.ndarray | None:
        """The rating model's stars for catalogue movies ``targets`` of a user with this
        history, or None without a rating model or when the history has no ratings
        while it has rated movies (a profile from a producer that does not send them).
        Rated movies outside the catalogue are left out (they have no vector)."""
        rated, ratings = history
        index = catalogue.index
        if self.rating_model is None or index is None or len(ratings) != len(rated):
            return None
        kept = [(m, r) for m, r in zip(rated, ratings, strict=True) if m in catalogue]
        movies = [m for m, _ in kept]
        return self.rating_model.predict(
            self.item_stats,
            movies,
            [r for _, r in kept],
            index.vectors(movies),
            targets,
            index.vectors(targets),
        )


def merge_candidates(
    first: Sequence[MovieId],
    pools: Sequence[tuple[Sequence[MovieId], int]],
    exclude: Collection[MovieId],
) -> list[MovieId]:
    """``first`` followed by up to ``n`` movies of each pool ``(movies, n)`` in order,
    skipping excluded movies and movies already taken."""
    out = list(first)
    seen = set(out)
    for movies, n in pools:
        added = 0
        for movie_id in movies:
            if added >= n:
                break
            if movie_id in exclude or movie_id in seen:
                continue
            out.append(movie_id)
            seen.add(movie_id)
            added += 1
    return out


def relevance_scale(scores: np.ndarray) -> np.ndarray:
    """Ranker logits mapped to [0, 1] within one list (min-max; all 1.0 when equal), so
    MMR weighs them against cosine redundancy on a fixed scale."""
    values = np.asarray(scores, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        return np.ones_like(values)
    return (values - low) / (high - low)


def recommend(
    user_vector: Vector,
    exclude: Collection[MovieId],
    catalogue: Catalogue,
    *,
    k: int,
    n_candidates: int,
    mmr_lambda: float,
    reranker: Reranker | None = None,
    user_features: np.ndarray | None = None,
    history: History | None = None,
    recent: Sequence[MovieId] | None = None,
) -> list[ScoredItem]:
    """The list of one user; same result as the matching row of ``recommend_batch``."""
    query = np.asarray(user_vector, dtype=np.float32).reshape(1, -1)
    features = None if user_features is None else np.asarray(user_features).reshape(1, -1)
    return recommend_batch(
        query,
        [exclude],
        catalogue,
        k=k,
        n_candidates=n_candidates,
        mmr_lambda=mmr_lambda,
        reranker=reranker,
        user_features=features,
        histories=None if history is None else [history],
        recents=None if recent is None else [recent],
    )[0]


def newcomer_list(item_stats: ItemStats, catalogue: Catalogue, k: int) -> list[ScoredItem]:
    """The list of a user with no rating yet: the ``k`` catalogue movies rated most of
    late (``ItemStats.trending``, the long-memory decayed counts), most rated first.
    Nothing is known of the user, so what everyone is watching now is the best guess:
    on the validation split it holds a new user's first rating 43% of the time (26 of
    61), against 31% by the short-memory counts and 18% by all-time counts.

    ``score`` is the movie's share of the recent (decayed) ratings and
    ``predicted_rating`` its shrunk mean rating. Empty until a catalogue movie has been
    rated, or for ``k <= 0``.
    """
    if k <= 0:
        return []
    depth = k
    while True:
        trending = item_stats.trending(depth)
        listed = [m for m in trending if m in catalogue][:k]
        if len(listed) == k or len(trending) < depth:
            break
        depth *= 2  # ratings of movies outside the catalogue took places
    total = item_stats.decayed_total()
    return [
        ScoredItem(
            movie_id=movie_id,
            score=item_stats.decayed_count(movie_id) / total,
            rank=rank,
            predicted_rating=item_stats.shrunk_mean(movie_id),
        )
        for rank, movie_id in enumerate(listed, start=1)
    ]


def retrieve_batch(
    user_vectors: Matrix,
    excludes: Sequence[Collection[MovieId]],
    catalogue: Catalogue,
    keep: int,
    sources: CandidateSources | None = None,
    recents: Sequence[Sequence[MovieId]] | None = None,
) -> list[tuple[list[MovieId], np.ndarray]]:
    """The candidates of each user, with one index search: the ``keep`` movies most
    similar to the user vector that are not excluded, then (with ``sources``) the
    trending and newest movies and, given the user's latest rated movies (``recents``),
    the movies most co-rated with them (``merge_candidates``). Per user: ``(candidates,
    cosine similarities of the first ones)``, the similarities only for the cosine
    neighbours. The ranker's training builds its examples with this same function.

    Raises:
        ConfigurationError: the vectors' dimension is not the catalogue's.
        ValueError: ``excludes`` or ``recents`` does not have one entry per user vector.
    """
    queries = np.asarray(user_vectors, dtype=np.float32)
    if len(excludes) != len(queries):
        raise ValueError(f"{len(queries)} user vectors but {len(excludes)} exclude sets")
    if recents is not None and len(recents) != len(queries):
        raise ValueError(f"{len(queries)} user vectors but {len(recents)} recent lists")
    index = catalogue.index
    if index is None or len(queries) == 0:
        return [([], np.zeros(0, dtype=np.float32)) for _ in range(len(queries))]
    exclude_sets = [e if isinstance(e, set | frozenset) else set(e) for e in excludes]
    spare = max(len(e) for e in exclude_sets)
    depth = min(len(index), keep + spare)
    ids, scores = index.search(queries, depth)
    pools = [] if sources is None else sources.pools(catalogue, spare)
    out: list[tuple[list[MovieId], np.ndarray]] = []
    for row, exclude in enumerate(exclude_sets):
        allowed = (j for j, movie_id in enumerate(ids[row]) if movie_id not in exclude)
        picked = list(islice(allowed, keep))
        if not picked:
            out.append(([], np.zeros(0, dtype=np.float32)))
            continue
        first = [ids[row][j] for j in picked]
        mine = pools
        if sources is not None and recents is not None:
            mine = [*pools, sources.user_pool(recents[row], catalogue, exclude)]
        out.append((merge_candidates(first, mine, exclude), scores[row, picked]))
    return out


def recommend_batch(
    user_vectors: Matrix,
    excludes: Sequence[Collection[MovieId]],
    catalogue: Catalogue,
    *,
    k: int,
    n_candidates: int,
    mmr_lambda: float,
    reranker: Reranker | None = None,
    user_features: Matrix | None = None,
    histories: Sequence[History] | None = None,
    recents: Sequence[Sequence[MovieId]] | None = None,
) -> list[list[ScoredItem]]:
    """Lists of up to ``k`` items for each row of ``user_vectors``, with one index search.

    Per user: retrieve ``n_candidates + len(exclude)`` items by cosine similarity (the
    batch searches with the largest exclude, capped at the catalogue size), drop the
    excluded movies, keep the ``max(n_candidates, k)`` most similar; with a ``reranker``,
    add the trending and newest movies of its ``sources`` (``retrieve_batch``) and score
    them all with it (relevance = its logits scaled to [0, 1] per list; with ``recents``,
    the movies most co-rated with them too), and re-rank
    them to ``k`` with MMR
    (``mmr_lambda`` 1.0 = pure relevance, 0.0 = pure diversity).
    An excluded movie is never returned: a user who has rated nearly everything gets
    fewer than ``k`` items, and an empty catalogue gives empty lists.

    Args:
        user_vectors: ``(n, dim)`` L2-normalised user vectors.
        excludes: per user, the movies never to recommend (already rated).
        reranker: the trained ranker and item features; None ranks by cosine.
        user_features: ``(n, N_USER_FEATURES)`` (``CandidateSources.user_features``); required
            with a ``reranker``.
        histories: per user, the rated movies and their stars: the listed items'
            predicted ratings come from the reranker's rating model with them
            (``Reranker.predict_ratings``), from the ranker's rating head without.
        recents: per row, the user's latest rated movies, oldest first, for the ranker's
            ``co_score`` feature (0 for every candidate without).

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

    if reranker is not None and (user_features is None or len(user_features) != len(queries)):
        raise ValueError("a reranker needs one row of user_features per user vector")
    if histories is not None and len(histories) != len(queries):
        raise ValueError(f"{len(queries)} user vectors but {len(histories)} histories")
    if recents is not None and len(recents) != len(queries):
        raise ValueError(f"{len(queries)} user vectors but {len(recents)} recent lists")
    sources = None if reranker is None else reranker.sources
    retrieved = retrieve_batch(queries, excludes, catalogue, max(n_candidates, k), sources, recents)
    lists: list[list[ScoredItem]] = []
    for row, (candidates, relevance) in enumerate(retrieved):
        if not candidates:
            lists.append([])
            continue
        vectors = index.vectors(candidates)
        if reranker is None:
            order = mmr(relevance, vectors, k, mmr_lambda)
            lists.append(
                [
                    ScoredItem(candidates[i], float(relevance[i]), rank)
                    for rank, i in enumerate(order, start=1)
                ]
            )
            continue
        assert user_features is not None  # checked above
        cand_features = reranker.sources.features(
            catalogue, candidates, () if recents is None else recents[row]
        )[None, :, :]
        user = (queries[row : row + 1], np.asarray(user_features[row : row + 1], dtype=np.float32))
        parts = reranker.ranker.item_vector_parts(candidates, vectors)
        logits = reranker.ranker.score_batch(
            *user, vectors[None, :, :], cand_features, parts[None, :, :]
        )
        order = mmr(relevance_scale(logits[0]), vectors, k, mmr_lambda)
        listed = [candidates[i] for i in order]
        # The listed items' stars: the rating model from the user's ratings, or else the
        # ranker's rating head, run on the listed items only.
        predicted = (
            None
            if histories is None
            else reranker.predict_ratings(catalogue, histories[row], listed)
        )
        if predicted is None:
            predicted = reranker.ranker.predict_rating_batch(
                *user, vectors[None, order, :], cand_features[:, order, :]
            )[0]
        lists.append(
            [
                ScoredItem(
                    candidates[i],
                    float(logits[0, i]),
                    rank,
                    float(predicted[rank - 1]),
                )
                for rank, i in enumerate(order, start=1)
            ]
        )
    return lists

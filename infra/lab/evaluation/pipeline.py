"""The deployed pipeline as an ``EvalModel``: the services' own handlers, in process.

``PipelineModel`` feeds events through exactly the functions the services run, in the
order the topics would carry them:

- ``movies`` → ``shared.handlers.item_embedding.handle_items`` (item encoder + Qdrant
  upsert) → ``item-embeddings`` → ``shared.handlers.recommender.handle_item_embeddings``
  (the recommender's FAISS catalogue) and the user-profile service's vector lookup;
- ``ratings`` → ``shared.handlers.user_profile.handle_ratings`` (the user updater over
  states stored as bytes, as in the service's table) → ``item-feedback`` and
  ``user-profiles``. The feedback goes through ``handle_items`` (the raters' tastes move
  new movies' vectors, ``settings.item_pull``) to ``item-embeddings``, and reaches the
  catalogue before the profiles go through
  ``shared.handlers.recommender.handle_user_profiles`` (retrieve, exclude, rank, MMR)
  to ``recommendations``. The movies' statistics that the feedback updated
  (``item-features``) reach the recommender's ``ItemStats`` after those lists, as they
  do through the stack, where they take one more hop than the profiles.

Each user's latest ``RecommendationsGenerated`` list is kept, and that is the list a
test event is scored against: the list the user would be holding when they rate,
which is also what ``make eval-stream`` reads back from the real topic. A user with no
rating yet holds the newcomers' list (``newcomers_recommendations`` of the recommender's
handlers, from the movies' statistics as of the ratings so far). With the current
updater (rating-weighted mean of content vectors) this is the "content kNN" baseline.
No Kafka is involved: sources are synthetic (one offset counter per topic, no broker
timestamp), and every output is checked for dead letters, which here mean a
bug, so they raise.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

from shared.config import Settings
from shared.events import (
    DEAD_LETTERS,
    DeadLetter,
    Event,
    ItemEmbedded,
    ItemFeaturesUpdated,
    ItemRated,
    MoviePublished,
    RatingSubmitted,
    RecommendationsGenerated,
    UserProfileUpdated,
)
from shared.exceptions import ReelstreamError
from shared.handlers.item_embedding import ItemEvent, handle_items
from shared.handlers.recommender import (
    StatsBefore,
    UserHistory,
    handle_item_embeddings,
    handle_item_features,
    handle_user_profiles,
    newcomers_recommendations,
)
from shared.handlers.user_profile import handle_ratings
from shared.kafka.item_vectors import ItemVectors
from shared.kafka.message import Incoming, Outgoing, Source
from shared.models.item_encoder import ItemEncoder
from shared.models.item_stats import CO_LONG_WINDOW, ItemStats
from shared.models.recommend import CandidateSources, Reranker
from shared.models.updater import UserUpdater, shrunk_mean_rating
from shared.retrieval.catalogue import Catalogue
from shared.retrieval.qdrant_store import QdrantStore
from shared.types import Matrix, MovieId, UserId, Vector

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


class EvaluationError(ReelstreamError):
    """The evaluation cannot go on: a model broke its contract or a handler refused an
    event that a correct pipeline accepts."""


@dataclass(frozen=True)
class Snapshot:
    """What a user's current list was computed from: the profile vector and the movies
    excluded (rated). Kept per test event for the MMR lambda sweep."""

    vector: Vector
    rated: tuple[MovieId, ...]


class PipelineModel:
    """The services' handler chain as an ``EvalModel`` (see the module docstring).

    Args:
        settings: ``top_k``, ``n_candidates``, ``mmr_lambda`` and ``batch_size`` (TRAIN is
            applied in micro-batches of this many ratings, as the user-profile service
            would take them) are read; Qdrant runs embedded in a temporary folder.
        encoder: the item encoder (the item-embedding service's).
        updater: the user model (the user-profile service's).
        reranker: the recommender's trained ranker and online item features, or None
            (candidates ranked by cosine; online item features of its own for the
            newcomers' list). The movies' statistics of a batch reach them after the
            batch's lists are computed, as through the stack, where ``item-features``
            takes one more hop than ``user-profiles``.
        name: the name in reports.
    """

    def __init__(
        self,
        settings: Settings,
        encoder: ItemEncoder,
        updater: UserUpdater,
        *,
        reranker: Reranker | None = None,
        name: str = "content-knn",
    ) -> None:
        self.name = name
        self._reranker = reranker
        self._encoder = encoder
        self._updater = updater
        self._tmp = tempfile.TemporaryDirectory(prefix="reelstream-eval-")
        self._settings = settings.model_copy(
            update={"qdrant_url": None, "qdrant_path": Path(self._tmp.name) / "qdrant"}
        )
        self._store = QdrantStore(self._settings, encoder.dim)
        self.catalogue = Catalogue()
        # The user-profile service's map of item vectors, filled by calls, not a reader.
        self._vectors = ItemVectors(self._settings)
        self._states: dict[UserId, bytes] = {}
        self._items: dict[MovieId, bytes] = {}
        # The recommender's table of users' rated movies, and the same decoded.
        self._histories: dict[UserId, bytes] = {}
        self._history: dict[UserId, UserHistory] = {}
        self._lists: dict[UserId, RecommendationsGenerated] = {}
        self._profiles: dict[UserId, UserProfileUpdated] = {}
        self._offsets: dict[str, int] = {}
        # The recommender's online item features: the reranker's, or its own without one
        # (the newcomers' list needs them either way).
        self._sources = reranker.sources if reranker is not None else CandidateSources(ItemStats())
        # item-features as the recommender's reader gets them: after the lists of the
        # batch that rated the movies (one more hop through the item side).
        self._pending_features: list[ItemFeaturesUpdated] = []
        self._stats_before = StatsBefore()
        self._last_features: Incoming[ItemFeaturesUpdated] | None = None
        self._cold_prediction = shrunk_mean_rating(updater.initial_state())

    # -- EvalModel ----------------------------------------------------------------------

    def add_movies(self, movies: Sequence[MoviePublished]) -> None:
        if not movies:
            return
        self._item_events(self._incoming("movies", movies))

    def fit(self, train: Sequence[RatingSubmitted]) -> None:
        size = self._settings.batch_size
        for start in range(0, len(train), size):
            self._apply(train[start : start + size])

    def recommend(self, user_id: UserId, exclude: AbstractSet[MovieId], k: int) -> list[MovieId]:
        if k > self._settings.top_k:
            raise EvaluationError(f"lists have top_k={self._settings.top_k} items; {k} asked")
        current = self._lists.get(user_id)
        if current is None:
            # No rating yet: the newcomers' list, as the recommender would publish it now.
            current = self._newcomers()
            if current is None:
                return []
            return [i.movie_id for i in current.items if i.movie_id not in exclude][:k]
        return [item.movie_id for item in current.items[:k]]

    def predict_rating(self, user_id: UserId, movie_id: MovieId) -> float:
        """The recommender's ``predicted_rating``. With a ranker: its rating model on the
        user's ratings so far (the movie's shrunk mean before the first), or without
        one its rating head on the user's current profile (the shrunk mean before the
        first rating). Without a ranker, the baseline's one number per user from the
        current list, the profile's mean rating when the list is empty, the prior
        before any rating."""
        profile = self._profiles.get(user_id)
        fallback = self._cold_prediction if profile is None else profile.mean_rating
        if self._reranker is not None and movie_id in self.catalogue:
            rated = self._history.get(user_id, UserHistory())
            history = (rated.rated, rated.ratings)
            stars = self._reranker.predict_ratings(self.catalogue, history, [movie_id])
            if stars is not None:
                return float(stars[0])
        if self._reranker is not None and profile is None:
            # No profile, so no list yet: the movie's shrunk mean rating so far.
            return self._reranker.item_stats.shrunk_mean(movie_id)
        if self._reranker is not None and profile is not None and movie_id in self.catalogue:
            # The ranker's rating head, as the recommender applies it to listed items.
            index = self.catalogue.index
            assert index is not None  # the movie is in the catalogue
            return float(
                self._reranker.ranker.predict_rating(
                    np.asarray(profile.vector, dtype=np.float32),
                    self._reranker.sources.user_features(
                        [profile.n_ratings],
                        [profile.mean_rating],
                        [self._history[user_id].rated],
                    )[0],
                    index.vectors([movie_id]),
                    self._reranker.sources.features(
                        self.catalogue, [movie_id], self._history[user_id].rated[-CO_LONG_WINDOW:]
                    ),
                )[0]
            )
        current = self._lists.get(user_id)
        if current is None or not current.items:
            return fallback
        listed = next((i for i in current.items if i.movie_id == movie_id), current.items[0])
        return fallback if listed.predicted_rating is None else listed.predicted_rating

    def learn_one(self, rating: RatingSubmitted) -> None:
        self._apply([rating])

    # -- for the MMR sweep ---------------------------------------------------------------

    def snapshot(self, user_id: UserId) -> Snapshot | None:
        """The profile the user's current list was computed from (None before any)."""
        profile = self._profiles.get(user_id)
        if profile is None:
            return None
        rated = self._history[user_id].rated
        return Snapshot(np.asarray(profile.vector, dtype=np.float32), rated)

    @property
    def settings(self) -> Settings:
        """The settings the handlers run with."""
        return self._settings

    def close(self) -> None:
        """Release the embedded Qdrant and its temporary folder."""
        self._store.close()
        self._tmp.cleanup()

    # -- the handler chain ----------------------------------------------------------------

    def _apply(self, ratings: Sequence[RatingSubmitted]) -> None:
        users = {r.user_id for r in ratings}
        movie_ids = {r.movie_id for r in ratings}
        states = {u: self._states[u] for u in users if u in self._states}
        incoming = self._incoming("ratings", ratings)
        outgoing, updated = handle_ratings(
            incoming,
            states,
            self._vectors.get_many(movie_ids),
            self._updater,
            _now(),
            item_model_version=self._vectors.model_version,
            content_only=self._vectors.content_only(movie_ids),
        )
        feedback = [o.event for o in outgoing if isinstance(o.event, ItemRated)]
        self._item_events(self._incoming("item-feedback", feedback))
        for user, state in updated.items():
            self._states[user] = state.to_bytes()
        profiles = [
            o.event for o in self._checked(outgoing) if isinstance(o.event, UserProfileUpdated)
        ]
        for profile in profiles:
            self._profiles[profile.user_id] = profile
        lists, histories = handle_user_profiles(
            self._incoming("user-profiles", profiles),
            self._histories,
            self.catalogue,
            self._settings,
            _now(),
            self._reranker,
            self._stats_before,
        )
        for user, history in histories.items():
            self._histories[user] = history.to_bytes()
            self._history[user] = history
        for out in self._checked(lists):
            if isinstance(out.event, RecommendationsGenerated):
                self._lists[out.event.user_id] = out.event
        features = self._incoming("item-features", self._pending_features)
        self._pending_features = []
        self._checked(handle_item_features(features, self._sources.item_stats, self._stats_before))
        if features:
            self._last_features = features[-1]

    def _item_events(self, batch: Sequence[Incoming[ItemEvent]]) -> None:
        """Run ``batch`` through the item-embedding handler and its outputs on."""
        if not batch:
            return
        outgoing, updated = handle_items(
            batch,
            self._items,
            self._encoder,
            self._store,
            _now(),
            item_pull=self._settings.item_pull,
        )
        for movie_id, record in updated.items():
            self._items[movie_id] = record.to_bytes()
        self._embedded(outgoing)
        self._pending_features.extend(
            o.event for o in outgoing if isinstance(o.event, ItemFeaturesUpdated)
        )

    def _embedded(self, outgoing: list[Outgoing]) -> None:
        """Pass the ``item-embeddings`` among ``outgoing`` to the recommender's catalogue
        and the user-profile service's vectors."""
        embedded = [o.event for o in self._checked(outgoing) if isinstance(o.event, ItemEmbedded)]
        if not embedded:
            return
        self._checked(
            handle_item_embeddings(self._incoming("item-embeddings", embedded), self.catalogue)
        )
        self._vectors.update(embedded)

    def _newcomers(self) -> RecommendationsGenerated | None:
        """The recommender's newcomers' list as of the ratings applied so far."""
        if self._last_features is None:
            return None
        return newcomers_recommendations(
            self._sources.item_stats, self.catalogue, self._settings, _now(), self._last_features
        )

    def _incoming(self, topic: str, events: Sequence[E]) -> list[Incoming[E]]:
        first = self._offsets.get(topic, 0)
        self._offsets[topic] = first + len(events)
        return [
            Incoming(event, Source(topic, 0, first + i, None, None, None))
            for i, event in enumerate(events)
        ]

    @staticmethod
    def _checked(outgoing: list[Outgoing]) -> list[Outgoing]:
        letters = [o.event for o in outgoing if o.spec is DEAD_LETTERS]
        if letters:
            reasons = "; ".join(
                letter.error for letter in letters if isinstance(letter, DeadLetter)
            )
            raise EvaluationError(f"{len(letters)} event(s) dead-lettered: {reasons[:500]}")
        return outgoing


def _now() -> datetime:
    return datetime.now(UTC)


def stack_snapshots(snapshots: Sequence[Snapshot]) -> Matrix:
    """The snapshots' vectors as one ``(n, dim)`` matrix."""
    return np.stack([s.vector for s in snapshots]).astype(np.float32, copy=False)

"""Pure batch handlers of the recommender: item vectors in, recommendation lists out."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import orjson

from shared.config import Settings
from shared.convert import movie_stats_of
from shared.events import (
    NEWCOMERS_USER_ID,
    RECOMMENDATIONS,
    ItemEmbedded,
    ItemFeaturesUpdated,
    RecommendationsGenerated,
    RecommendedItem,
    UserProfileUpdated,
)
from shared.exceptions import InvalidEventError, UnprocessableEventError
from shared.kafka.message import Incoming, Outgoing, dead_letter
from shared.models.item_stats import CO_LONG_WINDOW, ItemStats, MovieStats
from shared.models.recommend import Reranker, ScoredItem, newcomer_list, recommend_batch
from shared.retrieval.catalogue import Catalogue, check_vector
from shared.types import EventId, MovieId, UserId

log = logging.getLogger(__name__)

SERVICE = "recommender"
"""Consumer group, dead-letter ``service`` field and ready-file name of the recommender."""
TABLE = "user-history"
"""The per-user table (``UserHistory`` bytes); its changelog is
``Settings.changelog(SERVICE, TABLE)``."""


@dataclass(frozen=True)
class UserHistory:
    """Every movie a user has rated, oldest first, each once, with their latest stars:
    what the recommender excludes from the user's lists and what its rating model and
    user features read. Built from the windows of the user's profiles (``merged``)."""

    rated: tuple[MovieId, ...] = ()
    ratings: tuple[float, ...] = ()
    """Stars of ``rated``, same order; empty when a profile came without them."""

    def merged(self, profile: UserProfileUpdated) -> UserHistory:
        """This history with ``profile``'s window in its place: the window is the last
        ``len(rated)`` of the ``n_rated`` movies rated, so it replaces what this history
        holds from position ``n_rated - len(rated)`` on (a re-rated movie's new stars
        included) and appends the rest. A profile without ``n_rated`` carries all."""
        window, stars = tuple(profile.rated), tuple(profile.ratings)
        if profile.n_rated is None:
            return UserHistory(window, stars)
        start = profile.n_rated - len(window)
        if start > len(self.rated):
            log.warning(
                "user_id=%s history holds %d movies, profile starts at %d: %d rated movies "
                "never reached the recommender (a profile compacted away unread)",
                profile.user_id,
                len(self.rated),
                start,
                start - len(self.rated),
            )
            start = len(self.rated)
        ratings = self.ratings[:start] + stars if stars and len(self.ratings) >= start else ()
        return UserHistory(self.rated[:start] + window, ratings)

    def to_bytes(self) -> bytes:
        return orjson.dumps({"r": self.rated, "y": self.ratings})

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserHistory:
        """Read ``to_bytes`` output.

        Raises:
            InvalidEventError: the bytes are not a history.
        """
        try:
            data = orjson.loads(raw)
            return cls(tuple(str(m) for m in data["r"]), tuple(float(y) for y in data["y"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(f"user history is unreadable: {exc}") from exc


MIN_STARS = 0.5
MAX_STARS = 5.0


class StatsBefore:
    """Each movie's statistics before its latest update from ``item-features``, and the
    rating that update ended with.

    A list caused by a rating is computed from the movies' statistics before that
    rating. Through the stack the rating's own statistics take one more hop (the item
    side) than its profile, so whether they had arrived when the list was computed would
    depend on timing; ``excluding`` puts the earlier statistics back while a batch's
    lists are computed. Holds one earlier version per movie.
    """

    def __init__(self) -> None:
        self._before: dict[MovieId, MovieStats | None] = {}
        self._movie_of: dict[EventId, MovieId] = {}
        self._event_of: dict[MovieId, EventId] = {}

    def record(self, movie_id: MovieId, before: MovieStats | None, event_id: EventId) -> None:
        """``movie_id``'s statistics were ``before`` until the update ending with the
        rating ``event_id``."""
        earlier = self._event_of.pop(movie_id, None)
        if earlier is not None:
            self._movie_of.pop(earlier, None)
        self._before[movie_id] = before
        self._event_of[movie_id] = event_id
        self._movie_of[event_id] = movie_id

    @contextmanager
    def excluding(self, item_stats: ItemStats, causes: Iterable[EventId]) -> Iterator[None]:
        """Within the block, ``item_stats`` holds, for each movie whose latest update
        ended with one of the ratings ``causes``, its statistics before that update."""
        movies = [m for e in causes if (m := self._movie_of.get(e)) is not None]
        current = {m: item_stats.get(m) for m in movies}
        for m in movies:
            _restore(item_stats, m, self._before[m])
        try:
            yield
        finally:
            for m, stats in current.items():
                _restore(item_stats, m, stats)


def _restore(item_stats: ItemStats, movie_id: MovieId, stats: MovieStats | None) -> None:
    if stats is None:
        item_stats.remove(movie_id)
    else:
        item_stats.put(movie_id, stats)


def handle_item_embeddings(
    batch: Sequence[Incoming[ItemEmbedded]], catalogue: Catalogue
) -> list[Outgoing]:
    """Upsert a batch of item vectors into the catalogue; returns dead letters for the
    items it refused (wrong dimension, vector not L2-normalised)."""
    refusals = catalogue.apply([incoming.event for incoming in batch])
    out: list[Outgoing] = []
    for refusal in refusals:
        out.append(dead_letter(batch[refusal.position].source, str(refusal.error), SERVICE))
    return out


def handle_item_features(
    batch: Sequence[Incoming[ItemFeaturesUpdated]],
    item_stats: ItemStats,
    before: StatsBefore | None = None,
) -> list[Outgoing]:
    """Put a batch of movies' published statistics into ``item_stats`` (and what they
    replace into ``before``); returns dead letters for those decayed over other
    half-lives than ``item_stats`` reads (the ranker was trained on other features than
    the item side computes)."""
    out: list[Outgoing] = []
    expected = (item_stats.half_life_days, item_stats.fast_half_life_days)
    for incoming in batch:
        event = incoming.event
        if (event.half_life_days, event.fast_half_life_days) != expected:
            reason = (
                f"statistics decayed over half-lives {event.half_life_days:g}/"
                f"{event.fast_half_life_days:g} days; the ranker reads "
                f"{expected[0]:g}/{expected[1]:g}"
            )
            out.append(dead_letter(incoming.source, reason, SERVICE))
            continue
        if before is not None:
            before.record(
                event.movie_id, item_stats.get(event.movie_id), event.last_rating_event_id
            )
        item_stats.put(event.movie_id, movie_stats_of(event))
    return out


def handle_user_profiles(
    batch: Sequence[Incoming[UserProfileUpdated]],
    histories: Mapping[UserId, bytes],
    catalogue: Catalogue,
    settings: Settings,
    now: datetime,
    reranker: Reranker | None = None,
    before: StatsBefore | None = None,
) -> tuple[list[Outgoing], dict[UserId, UserHistory]]:
    """A ``RecommendationsGenerated`` list per user of the batch, plus dead letters, and
    the users' histories to store.

    Every profile's window is merged, in order, into the user's stored history
    (``UserHistory.merged``; ``histories`` holds the stored bytes of at least the
    batch's users); the merged history is what the list excludes and what the rating
    model and the user features read. An unreadable stored history is logged and
    started again from the profile's window.

    Profiles are coalesced by user: only the last valid profile of a user in the batch
    gets a list (at full replay speed one list per rating would swamp the output, and
    the earlier ones are already stale). A profile whose vector does not fit the
    catalogue (other dimension, not L2-normalised) is dead-lettered; the rest of the
    batch still gets lists. All lists come from one ``recommend_batch`` call with
    ``settings.top_k``, ``settings.n_candidates`` and ``settings.mmr_lambda``.

    Empty catalogue: the profile is fine and the catalogue will fill up, so neither a
    dead letter nor silence is right; the list is published with the items that exist
    (none) and a warning is logged.

    Ranking: with a ``reranker`` (the trained two-tower ranker and the online item
    features) the retrieved candidates are scored by it before MMR; the items' ``score``
    is then its logit and ``predicted_rating`` the stars its rating model predicts from
    the profile's ratings (its rating head when the profile carries none). Without one, ``score``
    is the cosine relevance and ``predicted_rating`` the profile's ``mean_rating``
    clipped to [0.5, 5] (the baseline rating predictor).
    Each list reads the movies' statistics as they were before its cause (``before``,
    when given, holds what ``handle_item_features`` replaced).
    ``latency_ms`` is ``now - cause_published_at`` in milliseconds, never negative
    (clocks of different hosts may disagree by a little).

    Args:
        now: the time the lists are generated (UTC), also their ``generated_at``.
    """
    out: list[Outgoing] = []
    dim = catalogue.dim
    latest: dict[UserId, UserProfileUpdated] = {}
    updated: dict[UserId, UserHistory] = {}
    n_valid = 0
    for incoming in batch:
        profile = incoming.event
        user = profile.user_id
        if user not in updated:
            updated[user] = _stored(histories.get(user), user)
        updated[user] = updated[user].merged(profile)
        try:
            check_vector(np.asarray(profile.vector), dim, f"user {profile.user_id} profile vector")
        except UnprocessableEventError as exc:
            out.append(dead_letter(incoming.source, str(exc), SERVICE))
            continue
        n_valid += 1
        latest.pop(profile.user_id, None)  # keep users in the order of their last profile
        latest[profile.user_id] = profile
    if not latest:
        return out, updated

    profiles = list(latest.values())
    history = [updated[p.user_id] for p in profiles]
    if dim is None:
        log.warning("catalogue is empty; publishing empty lists users=%d", len(profiles))
        lists: list[list[ScoredItem]] = [[] for _ in profiles]
    elif reranker is None:
        lists = _recommend(profiles, history, catalogue, settings, None)
    else:
        causes = [p.cause_event_id for p in profiles]
        with (before or StatsBefore()).excluding(reranker.sources.item_stats, causes):
            lists = _recommend(profiles, history, catalogue, settings, reranker)
    item_version = catalogue.model_version
    ranker_version = "none" if reranker is None else reranker.ranker.model_version
    rating_version = (
        "none"
        if reranker is None or reranker.rating_model is None
        else reranker.rating_model.model_version
    )
    for profile, scored in zip(profiles, lists, strict=True):
        predicted = float(np.clip(profile.mean_rating, MIN_STARS, MAX_STARS))
        latency_ms = (now - profile.cause_published_at).total_seconds() * 1000.0
        event = RecommendationsGenerated(
            user_id=profile.user_id,
            items=[
                RecommendedItem(
                    movie_id=item.movie_id,
                    title=catalogue.title(item.movie_id),
                    score=item.score,
                    predicted_rating=predicted
                    if item.predicted_rating is None
                    else item.predicted_rating,
                )
                for item in scored
            ],
            model_version=(
                f"user={profile.model_version};item={item_version};"
                f"ranker={ranker_version};rating={rating_version};mmr={settings.mmr_lambda:g}"
            ),
            cause_event_id=profile.cause_event_id,
            generated_at=now,
            latency_ms=max(0.0, latency_ms),
        )
        out.append(Outgoing(RECOMMENDATIONS, event))
    log.debug(
        "lists=%d superseded=%d dead_lettered=%d",
        len(profiles),
        n_valid - len(profiles),
        len(out) - len(profiles),
    )
    return out, updated


def _recommend(
    profiles: Sequence[UserProfileUpdated],
    history: Sequence[UserHistory],
    catalogue: Catalogue,
    settings: Settings,
    reranker: Reranker | None,
) -> list[list[ScoredItem]]:
    """One ``recommend_batch`` call for the users of ``profiles``."""
    return recommend_batch(
        np.stack([np.asarray(p.vector, dtype=np.float32) for p in profiles]),
        [h.rated for h in history],
        catalogue,
        k=settings.top_k,
        n_candidates=settings.n_candidates,
        mmr_lambda=settings.mmr_lambda,
        reranker=reranker,
        user_features=None
        if reranker is None
        else reranker.sources.user_features(
            [p.n_ratings for p in profiles],
            [p.mean_rating for p in profiles],
            [h.rated for h in history],
        ),
        histories=[(h.rated, h.ratings) for h in history],
        recents=[h.rated[-CO_LONG_WINDOW:] for h in history],
    )


def _stored(raw: bytes | None, user: UserId) -> UserHistory:
    if raw is None:
        return UserHistory()
    try:
        return UserHistory.from_bytes(raw)
    except InvalidEventError as exc:
        # Derived state: the profiles' windows rebuild what they can.
        log.error("user_id=%s stored history dropped: %s", user, exc)
        return UserHistory()


def newcomers_recommendations(
    item_stats: ItemStats,
    catalogue: Catalogue,
    settings: Settings,
    now: datetime,
    cause: Incoming[ItemFeaturesUpdated],
) -> RecommendationsGenerated | None:
    """The list of users with no rating yet (``user_id`` ``NEWCOMERS_USER_ID``): the
    ``settings.top_k`` movies rated most of late (``newcomer_list``), as of the
    statistics in ``item_stats``, the last of which came with ``cause``. ``latency_ms``
    runs from its broker timestamp (``now`` without one). None while no catalogue movie
    has been rated."""
    scored = newcomer_list(item_stats, catalogue, settings.top_k)
    if not scored:
        return None
    latency_ms = (now - cause.source.published_at(now)).total_seconds() * 1000.0
    return RecommendationsGenerated(
        user_id=NEWCOMERS_USER_ID,
        items=[
            RecommendedItem(
                movie_id=item.movie_id,
                title=catalogue.title(item.movie_id),
                score=item.score,
                predicted_rating=item.predicted_rating,
            )
            for item in scored
        ],
        model_version=(
            f"newcomers=trending-h{item_stats.half_life_days:g}d;item={catalogue.model_version}"
        ),
        cause_event_id=cause.event.last_rating_event_id,
        generated_at=now,
        latency_ms=max(0.0, latency_ms),
    )

"""Pure batch handler of the user-profile service: ratings in, user profiles out.

No Kafka, no faust, no clock: the caller passes the stored states, a snapshot of the
item vectors and ``now``, and writes the returned states back. The same function runs
in the faust agent, in the offline evaluation and in unit tests.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

import numpy as np

from services.user_profile.naming import SERVICE
from shared.events import (
    ITEM_EMBEDDINGS,
    USER_PROFILES,
    ItemEmbedded,
    RatingSubmitted,
    UserProfileUpdated,
)
from shared.exceptions import InvalidEventError, NumericalError, ReelstreamError
from shared.kafka.message import Incoming, Outgoing, dead_letter
from shared.models.updater import UserState, UserUpdater
from shared.types import MovieId, UserId, Vector

log = logging.getLogger(__name__)

Rating = Incoming[RatingSubmitted]


def model_version(updater: UserUpdater, item_model_version: str | None) -> str:
    """The version published with a profile: ``<updater>+<item encoder>``."""
    if item_model_version is None:
        return updater.model_version
    return f"{updater.model_version}+{item_model_version}"


def _reject(incoming: Rating, reason: str) -> Outgoing:
    return dead_letter(incoming.source, reason, SERVICE)


def _is_replay(incoming: Rating, state: UserState) -> bool:
    offset = incoming.source.offset
    return offset is not None and state.last_offset is not None and offset <= state.last_offset


def pulled(
    item: ItemEmbedded,
    profiles: Sequence[Vector],
    pull: float,
    now: datetime,
    centre: Vector | None = None,
) -> ItemEmbedded:
    """``item`` moved towards the profiles of its new raters: the vector becomes
    ``normalise(v + pull * sum(profile - centre))`` and ``online_ratings`` grows by
    their number.

    ``centre`` is what every profile shares (the updater's prior; None: nothing is
    taken off). Without it a movie moved by many raters ends up near every user and
    crowds their lists; with it, it moves only by what its raters' tastes have of
    their own.

    Raises:
        NumericalError: the moved vector is zero, NaN or infinite.
    """
    taste = np.asarray(profiles, dtype=np.float64)
    if centre is not None:
        taste = taste - np.asarray(centre, dtype=np.float64)
    moved = np.asarray(item.vector, dtype=np.float64) + pull * np.sum(taste, axis=0)
    norm = float(np.linalg.norm(moved))
    if not np.isfinite(norm) or norm == 0.0:
        raise NumericalError(f"item {item.movie_id} vector has norm {norm} after the pull")
    return item.model_copy(
        update={
            "vector": (moved / norm).astype(np.float32),
            "online_ratings": item.online_ratings + len(profiles),
            "embedded_at": now,
        }
    )


class _Batch:
    """Working state of one ``handle_ratings`` call."""

    def __init__(
        self,
        updater: UserUpdater,
        vectors: Mapping[MovieId, Vector],
        pullable: Mapping[MovieId, ItemEmbedded],
        pull: float,
        now: datetime,
    ) -> None:
        self.updater = updater
        self.base_vectors = vectors
        self.pullable = pullable
        self.pull = pull
        self.now = now
        self.centre = updater.centre() if pull > 0 else None
        self.moved: dict[MovieId, ItemEmbedded] = {}
        """Items moved in this batch: later ratings of the batch see their new vectors."""
        self.out: list[Outgoing] = []
        self.current: dict[UserId, UserState] = {}
        self.pending: dict[UserId, list[Rating]] = {}
        self.applied: dict[UserId, Rating] = {}
        """The last rating applied to each user in this batch (the profile's cause)."""
        self.replayed: dict[UserId, Rating] = {}
        """A re-delivered rating that caused a user's stored state (see ``handle_ratings``)."""
        self.n_replayed = 0

    def admit(self, user: UserId, ratings: list[Rating], raw: bytes | None) -> None:
        """Load a user's state and queue the ratings that can be applied."""
        try:
            stored = self.updater.initial_state() if raw is None else UserState.from_bytes(raw)
        except InvalidEventError as exc:
            # Dead-letter rather than reset: resetting would silently drop the history.
            for incoming in ratings:
                self.out.append(_reject(incoming, f"stored state of user is unreadable: {exc}"))
            return
        state = stored.for_model(self.updater.model_version)
        if state.vector is None and stored.vector is not None:
            log.warning(
                "user_id=%s state written by %s restarts under %s (vectors are not portable)",
                user,
                stored.model,
                self.updater.model_version,
            )
        todo: list[Rating] = []
        for incoming in ratings:
            if _is_replay(incoming, state):
                self.n_replayed += 1
                if incoming.source.offset == state.last_offset:
                    self.replayed[user] = incoming
                continue
            movie_id = incoming.event.movie_id
            if movie_id not in self.base_vectors:
                self.out.append(
                    _reject(
                        incoming,
                        f"movie_id {movie_id!r} has no item vector "
                        f"(nothing on item-embeddings for it yet)",
                    )
                )
                continue
            todo.append(incoming)
        self.current[user] = state
        self.pending[user] = todo

    def vector(self, movie_id: MovieId) -> Vector:
        """The item's vector as of now: moved in this batch, or as given."""
        item = self.moved.get(movie_id)
        return self.base_vectors[movie_id] if item is None else item.vector

    def pull_items(self, rows: Sequence[tuple[UserId, Rating]], states: list[UserState]) -> None:
        """Move the pullable items of a round towards their raters' profiles as they
        were before the round (a user's first rating pulls nothing: no profile yet)."""
        profiles: dict[MovieId, list[Vector]] = {}
        for (_, incoming), state in zip(rows, states, strict=True):
            movie_id = incoming.event.movie_id
            if movie_id not in self.moved and movie_id not in self.pullable:
                continue
            profile = self.updater.vector(state)
            if profile is not None:
                profiles.setdefault(movie_id, []).append(profile)
        for movie_id, vectors in profiles.items():
            item = self.moved[movie_id] if movie_id in self.moved else self.pullable[movie_id]
            try:
                self.moved[movie_id] = pulled(item, vectors, self.pull, self.now, self.centre)
            except NumericalError as exc:
                # The ratings still apply, to the vector as it was.
                log.warning("item vector kept: %s", exc)

    def apply_round(self, step: int) -> bool:
        """Apply the ``step``-th queued rating of every user that has one, in one
        ``learn_many`` call; returns False when no user had one."""
        rows = [(u, queue[step]) for u, queue in self.pending.items() if len(queue) > step]
        if not rows:
            return False
        states = [self.current[u] for u, _ in rows]
        if self.pull > 0:
            self.pull_items(rows, states)
        events = [incoming.event for _, incoming in rows]
        learned: list[UserState] | None
        try:
            learned = self.updater.learn_many(
                states,
                [self.vector(e.movie_id) for e in events],
                [e.rating for e in events],
                [e.occurred_at for e in events],
            )
        except (ReelstreamError, ValueError) as exc:
            # Some row is bad; find it by applying the rows one at a time.
            log.info("learn_many failed (%s); applying %d rows one by one", exc, len(rows))
            learned = None
        for i, (user, incoming) in enumerate(rows):
            event = incoming.event
            try:
                new = (
                    learned[i]
                    if learned is not None
                    else self.updater.learn_one(
                        states[i], self.vector(event.movie_id), event.rating, event.occurred_at
                    )
                )
                # A state whose vector cannot be read must not be stored.
                self.updater.vector(new)
            except (ReelstreamError, ValueError) as exc:
                self.out.append(_reject(incoming, f"{type(exc).__name__}: {exc}"))
                continue
            offset = incoming.source.offset
            self.current[user] = replace(
                new.after(
                    event.movie_id,
                    event.rating,
                    offset if offset is not None else states[i].last_offset,
                ),
                model=self.updater.model_version,
            )
            self.applied[user] = incoming
        return True

    def profile(
        self, user: UserId, cause: Rating, version: str, now: datetime
    ) -> UserProfileUpdated:
        state = self.current[user]
        vector = self.updater.vector(state)
        if vector is None:  # only reachable with an updater that breaks its contract
            raise ReelstreamError(f"user {user!r} has ratings but no vector")
        return UserProfileUpdated(
            user_id=user,
            vector=vector,
            n_ratings=state.n_ratings,
            mean_rating=self.updater.mean_rating(state),
            rated=list(state.rated),
            ratings=list(state.ratings),
            model_version=version,
            cause_event_id=cause.event.event_id,
            # Without a broker timestamp the latency clock starts now (never negative).
            cause_published_at=cause.source.published_at(now),
            updated_at=now,
        )


def handle_ratings(
    batch: Sequence[Rating],
    states: Mapping[UserId, bytes],
    vectors: Mapping[MovieId, Vector],
    updater: UserUpdater,
    now: datetime,
    *,
    item_model_version: str | None = None,
    pullable: Mapping[MovieId, ItemEmbedded] | None = None,
    item_pull: float = 0.0,
) -> tuple[list[Outgoing], dict[UserId, UserState]]:
    """Apply a micro-batch of ratings; returns what to publish and the states to store.

    Each user's ratings are applied in batch order (per-user order is the ``ratings``
    partition order). Across users the updater runs in rounds, one ``learn_many`` call
    per round, so a batched model sees many users at once.

    - A rating at or below the stored state's ``last_offset`` was applied before a
      crash or rebalance and is skipped. If it is the very rating that made the stored
      state, the profile is published again from that state: the crash may have come
      between storing the state and publishing the profile.
    - A rating of a movie missing from ``vectors`` is dead-lettered (the caller has
      already waited for it), as is one the updater refuses (NaN, other dimension).
    - One ``UserProfileUpdated`` per user per batch, caused by the user's last applied
      rating: ``cause_published_at`` is that message's broker timestamp.
    - A rating of a ``pullable`` movie (one the item encoder did not learn from ratings)
      first moves its vector towards the rater's profile as it was before the rating,
      less ``updater.centre()`` (``pulled``), and the rating is applied with the moved
      vector; so are the later ratings of the batch. One ``ItemEmbedded`` per moved
      movie goes out, on ``item-embeddings``, ahead of the profiles. The item encoder
      places a movie from its content alone; who rates it then says more about who will.

    Args:
        batch: valid ratings in offset order (any users, any partitions).
        states: stored ``UserState`` bytes of (at least) the batch's users; a user that
            is missing starts from ``updater.initial_state()``.
        vectors: item vectors of (at least) the batch's movies that have one.
        updater: the user model.
        now: the update time (UTC), the profiles' ``updated_at``.
        item_model_version: the item encoder's version, appended to the updater's in
            the profiles' ``model_version``.
        pullable: the latest ``ItemEmbedded`` of (at least) the batch's movies with
            ``rated_in_training`` false.
        item_pull: how far a rating moves such a movie's vector (0: not at all).

    Returns:
        ``(outputs, updated)``: profiles and dead letters to publish, and the new state
        of every user that changed (to write back to the table).
    """
    by_user: dict[UserId, list[Rating]] = {}
    for incoming in batch:
        by_user.setdefault(incoming.event.user_id, []).append(incoming)

    work = _Batch(updater, vectors, pullable or {}, item_pull, now)
    for user, ratings in by_user.items():
        work.admit(user, ratings, states.get(user))
    step = 0
    while work.apply_round(step):
        step += 1

    work.out.extend(Outgoing(ITEM_EMBEDDINGS, item) for item in work.moved.values())
    version = model_version(updater, item_model_version)
    updated: dict[UserId, UserState] = {}
    for user in by_user:
        cause = work.applied.get(user)
        if cause is not None:
            updated[user] = work.current[user]
        else:
            cause = work.replayed.get(user)
            if cause is None:
                continue
            log.info("republishing profile user_id=%s after a re-delivered rating", user)
        work.out.append(Outgoing(USER_PROFILES, work.profile(user, cause, version, now)))
    if work.n_replayed:
        log.info("skipped re-delivered ratings already applied n=%d", work.n_replayed)
    return work.out, updated

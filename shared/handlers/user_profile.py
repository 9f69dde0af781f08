"""Pure batch handler of the user-profile service: ratings in, user profiles out.

No Kafka, no clock: the caller passes the stored records, a snapshot of the item
vectors and ``now``, and writes the returned records back. The same function runs in
the service's consumer loop, in the offline evaluation and in unit tests.

A user's record is the updater's ``UserState`` plus the ratings parked in it: a rating
of a movie that has no vector yet waits there, with the user's later ratings behind it
(a user's ratings apply in order), until the vector arrives or the wait runs out.
Other users never wait for it. The record also keeps the ``event_id`` of the user's
last ``RECENT_EVENTS`` ratings, so a copy of one (a client that sent it again after a
broker error) is not applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import orjson

from shared.events import (
    ITEM_FEEDBACK,
    USER_PROFILES,
    ItemRated,
    RatingSubmitted,
    UserProfileUpdated,
    decode,
    encode,
)
from shared.exceptions import InvalidEventError, ReelstreamError
from shared.kafka.message import Incoming, Outgoing, Source, dead_letter
from shared.models.item_stats import co_rated
from shared.models.updater import UserState, UserUpdater
from shared.types import EventId, MovieId, UserId, Vector

log = logging.getLogger(__name__)

SERVICE = "user-profile"
"""Consumer group, dead-letter ``service`` field and ready-file name of user-profile."""
TABLE = "user-state"
"""The per-user table (``UserRecord`` bytes); its changelog is
``Settings.changelog(SERVICE, TABLE)``."""

Rating = Incoming[RatingSubmitted]


def model_version(updater: UserUpdater, item_model_version: str | None) -> str:
    """The version published with a profile: ``<updater>+<item encoder>``."""
    if item_model_version is None:
        return updater.model_version
    return f"{updater.model_version}+{item_model_version}"


def _reject(incoming: Rating, reason: str) -> Outgoing:
    return dead_letter(incoming.source, reason, SERVICE)


PROFILE_WINDOW = 50
"""How many of the user's latest rated movies a profile carries at least: all those
rated since the user's previous profile, and never fewer than this."""

RECENT_EVENTS = 128
"""How many of a user's latest ``event_id`` a record keeps to recognise a copy."""

_PARKED_PREFIXES = (b'{"parked":', b'{"state":')
"""How the bytes of a record with parked ratings begin (the second: as first written,
before records kept event ids)."""


@dataclass(frozen=True)
class UserRecord:
    """What the service stores per user: the model's state, the parked ratings and the
    event ids of its latest ratings."""

    state: UserState
    parked: tuple[Rating, ...] = ()
    """Ratings waiting for their movie's vector (the first one) or for the ratings
    before them, in offset order."""
    recent: tuple[EventId, ...] = ()
    """``event_id`` of the last ``RECENT_EVENTS`` ratings taken in (applied, parked or
    dead-lettered), oldest first."""

    @staticmethod
    def has_parked(raw: bytes) -> bool:
        """Whether ``to_bytes`` output holds parked ratings (without parsing it)."""
        return raw.startswith(_PARKED_PREFIXES)

    @property
    def seen_offset(self) -> int | None:
        """The highest ``ratings`` offset taken in: applied or parked."""
        offsets = [r.source.offset for r in self.parked if r.source.offset is not None]
        if self.state.last_offset is not None:
            offsets.append(self.state.last_offset)
        return max(offsets, default=None)

    def to_bytes(self) -> bytes:
        """``{"parked": [...], "recent": [...], "state": <state>}``, without ``parked``
        when nothing is parked (``has_parked`` tells them apart); the state's own
        bytes when the record holds nothing else."""
        state = orjson.Fragment(self.state.to_bytes())
        if not self.parked:
            if not self.recent:
                return self.state.to_bytes()
            return orjson.dumps({"recent": self.recent, "state": state})
        parked = [
            {
                "e": orjson.Fragment(encode(r.event)),
                # The message as it came, for its dead letter (valid JSON: it parsed).
                "v": orjson.Fragment(r.source.value or encode(r.event)),
                "k": r.event.user_id,
                "t": r.source.topic,
                "p": r.source.partition,
                "o": r.source.offset,
                "ts": r.source.timestamp_ms,
            }
            for r in self.parked
        ]
        return orjson.dumps({"parked": parked, "recent": self.recent, "state": state})

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserRecord:
        """Read ``to_bytes`` output (or a bare ``UserState``).

        Raises:
            InvalidEventError: the bytes are not a user record.
        """
        try:
            data: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEventError(f"user record is not JSON: {exc}") from exc
        if not isinstance(data, dict) or "state" not in data:
            return cls(UserState.from_bytes(raw))
        try:
            parked = tuple(
                Incoming(
                    decode(RatingSubmitted, orjson.dumps(p["e"])),
                    Source(p["t"], p["p"], p["o"], p["k"].encode(), orjson.dumps(p["v"]), p["ts"]),
                )
                for p in data.get("parked", ())
            )
            recent = tuple(str(e) for e in data.get("recent", ()))
        except (KeyError, TypeError) as exc:
            raise InvalidEventError(f"user record has unreadable parked ratings: {exc}") from exc
        return cls(UserState.from_bytes(orjson.dumps(data["state"])), parked, recent)


def _is_replay(incoming: Rating, seen_offset: int | None) -> bool:
    offset = incoming.source.offset
    return offset is not None and seen_offset is not None and offset <= seen_offset


def taste(profile: Vector, centre: Vector | None) -> Vector:
    """What a rater's profile says of a movie they rate: the profile less what every
    profile shares (``centre``, the user model's prior; None: nothing is taken off).
    Without the centre, a movie moved by many raters would end up near every user."""
    vector = np.asarray(profile, dtype=np.float32)
    return vector if centre is None else vector - np.asarray(centre, dtype=np.float32)


class _Batch:
    """Working state of one ``handle_ratings`` call."""

    def __init__(
        self,
        updater: UserUpdater,
        vectors: Mapping[MovieId, Vector],
        content_only: Container[MovieId],
        now: datetime,
        wait_s: float,
        version: str,
    ) -> None:
        self.updater = updater
        self.wait_s = wait_s
        self.vectors = vectors
        self.content_only = content_only
        self.now = now
        self.version = version
        self.centre = updater.centre()
        self.out: list[Outgoing] = []
        self.feedback: list[Outgoing] = []
        """One ``ItemRated`` per applied rating, in the order applied."""
        self.current: dict[UserId, UserState] = {}
        self.pending: dict[UserId, list[Rating]] = {}
        self.parked: dict[UserId, tuple[Rating, ...]] = {}
        """Each admitted user's parked ratings after this batch."""
        self.was_parked: dict[UserId, tuple[Rating, ...]] = {}
        self.recent: dict[UserId, tuple[EventId, ...]] = {}
        """Each admitted user's ``UserRecord.recent`` after this batch."""
        self.n_rated_before: dict[UserId, int] = {}
        """How many movies each admitted user had rated before this batch."""
        self.applied: dict[UserId, Rating] = {}
        """The last rating applied to each user in this batch (the profile's cause)."""
        self.replayed: dict[UserId, Rating] = {}
        """A re-delivered rating that caused a user's stored state (see ``handle_ratings``)."""
        self.n_replayed = 0
        self.n_copies = 0

    def admit(self, user: UserId, ratings: list[Rating], raw: bytes | None) -> None:
        """Load a user's record and queue, in order, its parked ratings and the new
        ones that can be applied now; park the rest."""
        try:
            record = (
                UserRecord(self.updater.initial_state())
                if raw is None
                else UserRecord.from_bytes(raw)
            )
        except InvalidEventError as exc:
            # Dead-letter rather than reset: resetting would silently drop the history.
            for incoming in ratings:
                self.out.append(_reject(incoming, f"stored state of user is unreadable: {exc}"))
            return
        stored = record.state
        state = stored.for_model(self.updater.model_version)
        if state.vector is None and stored.vector is not None:
            log.warning(
                "user_id=%s state written by %s restarts under %s (vectors are not portable)",
                user,
                stored.model,
                self.updater.model_version,
            )
        queue = list(record.parked)
        seen = record.seen_offset
        recent = list(record.recent)
        known = set(recent)
        for incoming in ratings:
            if _is_replay(incoming, seen):
                self.n_replayed += 1
                if incoming.source.offset == state.last_offset:
                    self.replayed[user] = incoming
                continue
            event_id = incoming.event.event_id
            if event_id in known:
                self.n_copies += 1
                log.info(
                    "skipped a copy of a rating already taken in user_id=%s event_id=%s "
                    "partition=%s offset=%s",
                    user,
                    event_id,
                    incoming.source.partition,
                    incoming.source.offset,
                )
                continue
            known.add(event_id)
            recent.append(event_id)
            queue.append(incoming)
        todo: list[Rating] = []
        parked: list[Rating] = []
        for incoming in queue:
            if not parked and incoming.event.movie_id in self.vectors:
                todo.append(incoming)
            elif not parked and self._waited_out(incoming):
                self.out.append(
                    _reject(
                        incoming,
                        f"movie_id {incoming.event.movie_id!r} has no item vector (nothing "
                        f"on item-embeddings for it within {self.wait_s:g} s)",
                    )
                )
            else:
                parked.append(incoming)
        self.current[user] = state
        self.n_rated_before[user] = len(state.rated)
        self.pending[user] = todo
        self.parked[user] = tuple(parked)
        self.was_parked[user] = record.parked
        self.recent[user] = tuple(recent[-RECENT_EVENTS:])

    def _waited_out(self, incoming: Rating) -> bool:
        published = incoming.source.published_at(self.now)
        return (self.now - published).total_seconds() >= self.wait_s

    def apply_round(self, step: int) -> bool:
        """Apply the ``step``-th queued rating of every user that has one, in one
        ``learn_many`` call; returns False when no user had one."""
        rows = [(u, queue[step]) for u, queue in self.pending.items() if len(queue) > step]
        if not rows:
            return False
        states = [self.current[u] for u, _ in rows]
        events = [incoming.event for _, incoming in rows]
        learned: list[UserState] | None
        try:
            learned = self.updater.learn_many(
                states,
                [self.vectors[e.movie_id] for e in events],
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
                        states[i], self.vectors[event.movie_id], event.rating, event.occurred_at
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
            self.feedback.append(Outgoing(ITEM_FEEDBACK, self.item_rated(incoming, states[i])))
        return True

    def item_rated(self, incoming: Rating, before: UserState) -> ItemRated:
        """The ``item-feedback`` event of an applied rating; ``before``: the user's
        state before it."""
        event = incoming.event
        profile = self.updater.vector(before) if event.movie_id in self.content_only else None
        return ItemRated(
            movie_id=event.movie_id,
            user_id=event.user_id,
            rating=event.rating,
            occurred_at=event.occurred_at,
            rating_event_id=event.event_id,
            taste=None if profile is None else taste(profile, self.centre),
            model_version=self.version,
            cause_published_at=incoming.source.published_at(self.now),
            co_rated=co_rated(before.rated, event.movie_id),
        )

    def profile(self, user: UserId, cause: Rating, *, whole: bool = False) -> UserProfileUpdated:
        """The user's profile as of this batch; its ``rated`` window holds every movie
        rated in the batch and at least ``PROFILE_WINDOW`` (``whole``: all of them)."""
        state = self.current[user]
        added = len(state.rated) - self.n_rated_before[user]
        window = len(state.rated) if whole else max(PROFILE_WINDOW, added)
        vector = self.updater.vector(state)
        if vector is None:  # only reachable with an updater that breaks its contract
            raise ReelstreamError(f"user {user!r} has ratings but no vector")
        return UserProfileUpdated(
            user_id=user,
            vector=vector,
            n_ratings=state.n_ratings,
            mean_rating=self.updater.mean_rating(state),
            rated=list(state.rated[-window:]),
            ratings=list(state.ratings[-window:]),
            n_rated=len(state.rated),
            model_version=self.version,
            cause_event_id=cause.event.event_id,
            # Without a broker timestamp the latency clock starts now (never negative).
            cause_published_at=cause.source.published_at(self.now),
            updated_at=self.now,
        )


def handle_ratings(
    batch: Sequence[Rating],
    states: Mapping[UserId, bytes],
    vectors: Mapping[MovieId, Vector],
    updater: UserUpdater,
    now: datetime,
    *,
    item_model_version: str | None = None,
    content_only: Container[MovieId] = (),
    revisit: Iterable[UserId] = (),
    wait_s: float = 0.0,
) -> tuple[list[Outgoing], dict[UserId, UserRecord]]:
    """Apply a micro-batch of ratings; returns what to publish and the records to store.

    Each user's ratings are applied in order: first those parked in its record, then
    the batch's (per-user order is the ``ratings`` partition order). Across users the
    updater runs in rounds, one ``learn_many`` call per round, so a batched model sees
    many users at once.

    - A rating at or below the highest offset the record has taken in (applied or
      parked) was seen before a crash or rebalance and is skipped. If it is the very
      rating that made the stored state, the profile is published again from that
      state: the crash may have come between storing the state and publishing it.
    - A rating whose ``event_id`` is one of the user's last ``RECENT_EVENTS`` taken in
      is a copy (a producer that sent it again) and is skipped, with a log line.
    - A rating of a movie missing from ``vectors`` parks in the user's record with the
      user's later ratings behind it; when it has waited ``wait_s`` seconds since its
      publication (``now`` minus its broker timestamp) with still no vector, it is
      dead-lettered and the ratings behind it go on. A rating the updater refuses (NaN,
      other dimension) is dead-lettered.
    - One ``UserProfileUpdated`` per user per batch, caused by the user's last applied
      rating: ``cause_published_at`` is that message's broker timestamp.
    - One ``ItemRated`` per applied rating goes out on ``item-feedback`` (keyed by
      movie), ahead of the profiles: the movie's owner counts it, and for a movie of
      ``content_only`` it carries the rater's taste (``taste``: the profile as it was
      before the rating), by which the owner moves that movie's vector.

    Args:
        batch: valid ratings in offset order (any users, any partitions).
        states: stored ``UserRecord`` bytes of (at least) the batch's and ``revisit``'s
            users; a user that is missing starts from ``updater.initial_state()``.
        vectors: item vectors of (at least) the movies of the batch and of the parked
            ratings that have one.
        updater: the user model.
        now: the update time (UTC), the profiles' ``updated_at``.
        item_model_version: the item encoder's version, appended to the updater's in
            the profiles' ``model_version``.
        content_only: movies whose vector stands for their content alone (the item
            encoder did not learn them from ratings): their raters' taste goes out.
        revisit: users with parked ratings to try again (their movie may have arrived,
            or their wait run out), with or without ratings in the batch.
        wait_s: how long a parked rating waits for its movie (seconds; default 0: a
            rating of a movie with no vector is dead-lettered at once).

    Returns:
        ``(outputs, updated)``: profiles and dead letters to publish, and the new record
        of every user that changed (to write back to the table).
    """
    by_user: dict[UserId, list[Rating]] = {user: [] for user in revisit}
    for incoming in batch:
        by_user.setdefault(incoming.event.user_id, []).append(incoming)

    version = model_version(updater, item_model_version)
    work = _Batch(updater, vectors, content_only, now, wait_s, version)
    for user, ratings in by_user.items():
        work.admit(user, ratings, states.get(user))
    step = 0
    while work.apply_round(step):
        step += 1

    work.out.extend(work.feedback)
    updated: dict[UserId, UserRecord] = {}
    for user in by_user:
        if user not in work.current:
            continue  # its stored record is unreadable: dead-lettered
        cause = work.applied.get(user)
        # Event ids alone do not make a record worth writing: they go with the next change.
        if cause is not None or work.parked[user] != work.was_parked[user]:
            updated[user] = UserRecord(work.current[user], work.parked[user], work.recent[user])
        whole = cause is None
        if cause is None:
            cause = work.replayed.get(user)
            if cause is None:
                continue
            # The lost profile's window may have been wider than the usual one.
            log.info("republishing profile user_id=%s after a re-delivered rating", user)
        work.out.append(Outgoing(USER_PROFILES, work.profile(user, cause, whole=whole)))
    if work.n_replayed:
        log.info("skipped re-delivered ratings already applied n=%d", work.n_replayed)
    return work.out, updated


class Records(Protocol):
    """A store of users' ``UserRecord`` bytes (the worker's changelog table)."""

    generation: int
    """Changes whenever the set of keys held changes (a restore or a revoke)."""

    def items(self) -> Iterable[tuple[int, bytes, bytes]]:
        """``(partition, key, value)`` of every record held."""
        ...


class ParkedUsers:
    """The users of the table whose records hold parked ratings: the movie each waits
    for and until when (epoch seconds)."""

    def __init__(self, wait_s: float) -> None:
        self._wait_s = wait_s
        self._heads: dict[UserId, tuple[MovieId, float]] = {}
        self._generation = -1

    def sync(self, table: Records) -> None:
        """Rebuild from the table after its partitions changed (restore or revoke)."""
        if table.generation == self._generation:
            return
        self._generation = table.generation
        self._heads = {}
        for _, key, value in table.items():
            if UserRecord.has_parked(value):
                self.update({key.decode(): UserRecord.from_bytes(value)})

    def update(self, records: dict[UserId, UserRecord]) -> None:
        for user, record in records.items():
            if record.parked:
                head = record.parked[0]
                published = head.source.timestamp_ms
                since = time.time() if published is None else published / 1000
                self._heads[user] = (head.event.movie_id, since + self._wait_s)
            else:
                self._heads.pop(user, None)

    def due(self, vectors: Container[MovieId], now: float) -> set[UserId]:
        """Users whose awaited movie has a vector now, or whose wait has run out."""
        return {
            user for user, (movie, until) in self._heads.items() if movie in vectors or now >= until
        }

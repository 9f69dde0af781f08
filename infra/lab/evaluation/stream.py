"""Protocol T1 through the running stack: replay TRAIN and TEST on the real topics and read
back, for every TEST rating, the recommendation list the user held when they rated.

The in-process harness calls the services' handlers directly; this module drives the
deployed services (``make up``: broker, item-embedding, user-profile, recommender) and
only talks to them through ``movies``, ``ratings``, ``item-embeddings`` and
``recommendations``.

How a list is matched to a TEST rating: the stack publishes a list per user per
micro-batch, caused by the user's last rating in it (``cause_event_id``). The list a user
holds when rating *i* is the one caused by their previous rating, so the TEST phase is a
closed loop: before rating *i* of user *u* is published, the list caused by *u*'s
previous rating is awaited (one rating per user in flight, so no list is coalesced
away), recorded, and only then is rating *i* published. The replay keeps the TEST order
exactly: publishing a later rating of another user while *u* waits would let a list
recorded for an earlier event be computed from a later one (a movie arriving
mid-stream, online popularity), which T1 forbids. Rating *i* also waits for the list
caused by rating *i - 1*, whoever rated it (so that no two TEST ratings share a batch of
the recommender's), and until the item side has published the statistics of every
earlier rating (``item-features``): the recommender reads its global tables to their
ends before each batch, so the list caused by rating *i* then sees the statistics of
every earlier rating and, by design, not those of rating *i* itself, as in process.
The cost is about two round trips through the stack per TEST rating.

The movies' statistics are global: ratings of earlier runs on the same stack count in
them, so lists equal the in-process ones only on a fresh stack (``StreamResult.fresh``).

Isolation on a used stack: user and event ids are namespaced by a run id
(``<run_id>.<id>``), so user states of earlier replays or runs never mix in. Movie ids
are kept: the catalogue is shared, and publishing a movie again embeds it to the same
vector.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from tqdm import tqdm

from shared.config import Settings
from shared.events import (
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    MOVIES,
    NEWCOMERS_USER_ID,
    RATINGS,
    RECOMMENDATIONS,
    Event,
    ItemFeaturesUpdated,
    MoviePublished,
    RatingSubmitted,
    RecommendationsGenerated,
    decode,
)
from shared.exceptions import ConfigurationError, InvalidEventError, ReelstreamError
from shared.kafka.client import make_consumer, make_producer
from shared.kafka.message import Incoming, Outgoing, Source
from shared.kafka.publisher import Publisher
from shared.kafka.topic_reader import TopicReader
from shared.replay import check_topics, wait_until_embedded
from shared.types import EventId, MovieId, UserId

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 64
"""Longest id the wire contract accepts (``shared.events.record.Id``)."""

CATALOGUE_READ_TIMEOUT_S = 120.0
"""Longest wait (seconds) to read ``item-embeddings`` to its end for the arrivals check."""

_NEWCOMERS_KEY = NEWCOMERS_USER_ID.encode()

# How long (seconds) one reader poll blocks: the reader's stop latency, not the lists'
# (poll returns as soon as a message is there).
_POLL_S = 0.1
# Longest single wait on the condition: bounds the time to notice a crashed reader.
_WAIT_SLICE_S = 0.5
# Pause (seconds) between two reads of item-features while waiting for statistics.
_SETTLE_PAUSE_S = 0.005


class StreamError(ReelstreamError):
    """The running stack did not do its part (movies not embedded, list reader failed)."""


@dataclass(frozen=True)
class StreamedEvent:
    """A TEST rating and the list its user held when it was published."""

    rating: RatingSubmitted
    """The original TEST rating (original user id and event id, not the namespaced ones)."""
    recommended: list[MovieId] | None
    """The list caused by the user's previous rating (TRAIN or TEST), best first. For a
    user's first rating it is the newcomers' list last read (``NEWCOMERS_USER_ID``),
    after a time-out the user's latest list read so far (``exact`` is False for both);
    None when no such list came back at all."""
    predicted: float | None
    """Predicted stars: the target's ``predicted_rating`` in that list when it is listed,
    else the first item's (the baseline predicts one number per user); None without a
    list (or with an empty one)."""
    exact: bool
    """True when the list's ``cause_event_id`` is the user's previous rating; False
    without a list and after a time-out."""


@dataclass(frozen=True)
class StreamResult:
    """What ``run_stream`` recorded and how it went."""

    events: list[StreamedEvent]
    """One per TEST rating, in TEST order."""
    run_id: str
    """Namespace of this run's users and events on the topics (``<run_id>.<id>``)."""
    wall_s: float
    """Seconds of the whole run: catalogue, embedding wait, TRAIN and TEST."""
    lists_read: int
    """Lists of this run's users read from ``recommendations``."""
    timeouts: int
    """Waits for a list that ran out (``list_timeout_s``), TRAIN and TEST together."""
    train_published: int
    test_published: int
    fresh: bool
    """Whether the stack had no movie statistics when the run started (no earlier
    ratings count in this run's lists)."""


@dataclass(frozen=True)
class _List:
    """The parts of a ``RecommendationsGenerated`` the evaluation needs."""

    cause: EventId
    movie_ids: list[MovieId]
    predicted: list[float | None]

    def predicted_for(self, movie_id: MovieId) -> float | None:
        if not self.movie_ids:
            return None
        try:
            return self.predicted[self.movie_ids.index(movie_id)]
        except ValueError:
            return self.predicted[0]


class _ListReader:
    """Follows ``recommendations`` from the end offsets taken at ``start`` (all
    partitions assigned, no consumer group commit) and keeps the lists of one run's
    users by cause event id; waiting threads are woken as lists arrive."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self._settings = settings
        self._topic = settings.topic(RECOMMENDATIONS.name)
        self._group = f"{run_id}-lists"
        self._key_prefix = f"{run_id}.".encode()
        self._changed = threading.Condition()
        self._by_cause: dict[EventId, _List] = {}
        self._latest: dict[UserId, _List] = {}
        self._newcomers: _List | None = None
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="t1-stream-lists", daemon=True)
        self._consumer: Consumer | None = None
        self.lists_read = 0
        self.last_read_at = time.monotonic()
        """``time.monotonic()`` of the last list of this run read (or of the start)."""

    def start(self) -> None:
        """Take the partitions' end offsets now (so nothing published afterwards is
        missed) and start following them in a thread.

        Raises:
            ConfigurationError: the topic does not exist.
        """
        consumer = make_consumer(self._settings, self._group)
        try:
            metadata = consumer.list_topics(self._topic, timeout=10).topics.get(self._topic)
            if metadata is None or metadata.error is not None:
                raise ConfigurationError(
                    f"topic {self._topic} does not exist: is the stack up (`make up`)?"
                )
            assignment = []
            for partition in sorted(metadata.partitions):
                # Concrete offsets, not OFFSET_END: that would be resolved only at the
                # first fetch, after which lists published in between would be skipped.
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self._topic, partition), timeout=10, cached=False
                )
                assignment.append(TopicPartition(self._topic, partition, high))
            consumer.assign(assignment)
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None  # start() sets it before the thread runs
        try:
            while not self._stop.is_set():
                # poll returns at the first message; consume(n, 0) then drains what is
                # already fetched. consume(n, t) alone would hold every list until n
                # messages or t seconds, and the closed loop waits on each list.
                first = consumer.poll(_POLL_S)
                if first is None:
                    continue
                self._take([first, *consumer.consume(1000, timeout=0)])
        except BaseException as exc:
            log.exception("list reader crashed topic=%s", self._topic)
            with self._changed:
                self._failure = exc
                self._changed.notify_all()
        finally:
            consumer.close()

    def _take(self, messages: list[Message]) -> None:
        lists: list[tuple[UserId, _List]] = []
        for message in messages:
            err = message.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("topic=%s error=%s", self._topic, err)
                continue
            key = message.key()
            # Other users' lists (other runs, live traffic) are skipped unparsed.
            if key is None or not (key.startswith(self._key_prefix) or key == _NEWCOMERS_KEY):
                continue
            try:
                event = decode(RecommendationsGenerated, message.value())
            except InvalidEventError as exc:
                # Not ours to dead-letter: the topic's producer is the recommender.
                log.warning(
                    "skipping invalid list partition=%s offset=%s reason=%s",
                    message.partition(),
                    message.offset(),
                    exc,
                )
                continue
            items = event.items
            lists.append(
                (
                    event.user_id,
                    _List(
                        cause=event.cause_event_id,
                        movie_ids=[item.movie_id for item in items],
                        predicted=[item.predicted_rating for item in items],
                    ),
                )
            )
        if not lists:
            return
        with self._changed:
            own = 0
            for user, recs in lists:
                if user == NEWCOMERS_USER_ID:
                    # The whole stack's, not this run's: it does not count as read.
                    self._newcomers = recs
                    continue
                self._by_cause[recs.cause] = recs
                self._latest[user] = recs
                own += 1
            if own:
                self.lists_read += own
                self.last_read_at = time.monotonic()
            self._changed.notify_all()

    def _check_alive(self) -> None:
        # Called with the condition held.
        if self._failure is not None:
            raise StreamError(f"the reader of {self._topic} failed: {self._failure!r}")
        if not self._thread.is_alive() and not self._stop.is_set():
            raise StreamError(f"the reader of {self._topic} stopped unexpectedly")

    def caused_by(self, cause: EventId) -> _List | None:
        """The list caused by ``cause`` if it has been read, without waiting."""
        with self._changed:
            return self._by_cause.get(cause)

    def newcomers(self) -> _List | None:
        """The newcomers' list last read (None before any)."""
        with self._changed:
            return self._newcomers

    def latest(self, user: UserId) -> _List | None:
        """The user's latest list read so far (namespaced user id)."""
        with self._changed:
            return self._latest.get(user)

    def wait_for(self, cause: EventId, timeout_s: float) -> _List | None:
        """The list caused by ``cause``, waiting up to ``timeout_s`` seconds; None when
        it has not come.

        Raises:
            StreamError: the reader thread failed.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while cause not in self._by_cause:
                self._check_alive()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(min(remaining, _WAIT_SLICE_S))
            return self._by_cause[cause]

    def wait_for_all(
        self, causes: Collection[EventId], *, stall_s: float, since: float, bar: tqdm[None]
    ) -> set[EventId]:
        """Wait until every list caused by ``causes`` has been read, giving up once no
        list of this run has been read for ``stall_s`` seconds (counting from ``since``,
        a ``time.monotonic()``, at the earliest); returns the causes still missing.

        Raises:
            StreamError: the reader thread failed.
        """
        wanted = set(causes)
        with self._changed:
            while True:
                missing = wanted - self._by_cause.keys()
                bar.update(len(wanted) - len(missing) - bar.n)
                if not missing:
                    return missing
                self._check_alive()
                remaining = max(since, self.last_read_at) + stall_s - time.monotonic()
                if remaining <= 0:
                    return missing
                self._changed.wait(min(remaining, _WAIT_SLICE_S))


class _FeaturesWatcher:
    """Follows ``item-features`` and tells when the item side has published the
    statistics of every rating published so far (each movie's ``n_ratings`` reached what
    it held at ``start`` plus this run's ratings of it)."""

    def __init__(self, settings: Settings) -> None:
        self._changed = threading.Condition()
        self._counts: dict[MovieId, int] = {}
        self._expected: dict[MovieId, int] = {}
        self._baseline: dict[MovieId, int] = {}
        self._reader = TopicReader(
            settings,
            ITEM_FEATURES,
            self._on_events,
            self._on_invalid,
            name="t1-stream-features",
        )

    def start(self, timeout_s: float) -> bool:
        """Read the topic to its end; returns whether it held no statistics (a fresh
        stack).

        Raises:
            StreamError: the topic could not be read to its end in ``timeout_s`` seconds.
        """
        self._reader.start()
        if not self._reader.wait_caught_up(timeout_s):
            raise StreamError(f"could not read item-features to its end in {timeout_s:.0f} s")
        with self._changed:
            self._baseline = dict(self._counts)
            return not self._baseline

    def stop(self) -> None:
        self._reader.stop()

    def published(self, movie_id: MovieId) -> None:
        """One more rating of ``movie_id`` was published."""
        with self._changed:
            before = self._expected.get(movie_id, self._baseline.get(movie_id, 0))
            self._expected[movie_id] = before + 1

    def settled(self) -> bool:
        return all(self._counts.get(m, 0) >= n for m, n in self._expected.items())

    def wait_settled(self, timeout_s: float) -> bool:
        """Wait until every published rating's statistics are on the topic; False when
        they are not after ``timeout_s`` seconds. Reads the topic's news on demand
        (``TopicReader.sync``), pausing ``_SETTLE_PAUSE_S`` between reads."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._changed:
                if self.settled():
                    return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._reader.sync(min(remaining, _WAIT_SLICE_S))
            with self._changed:
                if self._changed.wait_for(self.settled, _SETTLE_PAUSE_S):
                    return True

    def _on_events(self, batch: list[Incoming[Event]]) -> None:
        with self._changed:
            for incoming in batch:
                event = incoming.event
                if isinstance(event, ItemFeaturesUpdated):
                    self._counts[event.movie_id] = event.n_ratings
            self._changed.notify_all()

    def _on_invalid(self, source: Source, reason: str) -> None:
        # Not ours to dead-letter: the recommender reading this topic does that.
        log.debug("skipping invalid item-features offset=%s reason=%s", source.offset, reason)


def _namespaced(rating: RatingSubmitted, run_id: str) -> RatingSubmitted:
    # model_copy skips validation; run_stream has checked the lengths of the new ids.
    return rating.model_copy(
        update={"user_id": f"{run_id}.{rating.user_id}", "event_id": f"{run_id}.{rating.event_id}"}
    )


def _check_ids(run_id: str, ratings: Sequence[RatingSubmitted]) -> None:
    if not run_id or run_id != run_id.strip():
        raise ValueError(f"run_id must be a non-empty string without outer spaces, got {run_id!r}")
    longest = max((max(len(r.user_id), len(r.event_id)) for r in ratings), default=0)
    if len(run_id) + 1 + longest > MAX_ID_LENGTH:
        raise ValueError(
            f"run_id {run_id!r} is too long: namespaced ids '<run_id>.<id>' would exceed "
            f"{MAX_ID_LENGTH} characters (longest user or event id: {longest})"
        )


def _check_arrivals(
    arrivals: Mapping[MovieId, int], movies: Sequence[MoviePublished], n_test: int
) -> None:
    known = {m.movie_id for m in movies}
    unknown = sorted(set(arrivals) - known)
    if unknown:
        raise ValueError(f"arrival movies not among the movies: {unknown[:10]}")
    outside = sorted(m for m, i in arrivals.items() if not 0 <= i < n_test)
    if outside:
        raise ValueError(f"arrival indices outside the TEST stream (0..{n_test - 1}): {outside}")


def embedded_movie_ids(
    settings: Settings, *, timeout_s: float = CATALOGUE_READ_TIMEOUT_S
) -> set[str]:
    """Movie ids that have a vector on ``item-embeddings`` (the whole topic, read once
    to its end).

    Raises:
        StreamError: the topic could not be read to its end within ``timeout_s`` seconds.
    """
    seen: set[str] = set()

    def on_events(batch: list[Incoming[Event]]) -> None:
        seen.update(str(getattr(i.event, "movie_id", "")) for i in batch)

    def on_invalid(source: Source, reason: str) -> None:
        # Not ours to dead-letter: the services reading this topic do that.
        log.debug("skipping invalid item-embedding offset=%s reason=%s", source.offset, reason)

    reader = TopicReader(settings, ITEM_EMBEDDINGS, on_events, on_invalid, name="t1-stream")
    reader.start()
    try:
        if not reader.wait_caught_up(timeout_s):
            raise StreamError(
                f"could not read {settings.topic(ITEM_EMBEDDINGS.name)} to its end "
                f"in {timeout_s:.0f} s"
            )
    finally:
        reader.stop()
    return seen


def run_stream(
    settings: Settings,
    movies: Sequence[MoviePublished],
    train: Sequence[RatingSubmitted],
    test: Sequence[RatingSubmitted],
    *,
    run_id: str | None = None,
    arrivals: Mapping[MovieId, int] | None = None,
    list_timeout_s: float = 30.0,
    embed_timeout_s: float = 600.0,
    progress: bool = True,
) -> StreamResult:
    """Replay TRAIN, then TEST in a closed loop, through the running stack, and record
    the list each TEST rating's user held when it was published (see the module doc).

    1. Catalogue: publish ``movies`` (without the ``arrivals`` ones), flush, and wait up
       to ``embed_timeout_s`` seconds (default 600) until each has a vector.
    2. TRAIN: publish every rating at full speed, then wait for the list caused by the
       last TRAIN rating of every user who also rates in TEST, until no list of this run
       has come for ``list_timeout_s`` seconds, and for the statistics of every rating.
    3. TEST, in order: publish the movies arriving at this index (``arrivals``), wait up
       to ``list_timeout_s`` seconds (default 30) for the list caused by the user's
       previous rating (on a time-out the user's latest list is used, ``exact`` False;
       for a user's first rating the newcomers' list last read), for the list caused
       by the previous TEST rating and for the statistics of every earlier rating,
       record the list, publish the rating.

    Args:
        movies: the catalogue; movie ids are published as they are.
        train, test: ratings in time order, with their original ids (namespaced here).
        run_id: namespace of this run's user and event ids; default ``t1-<8 hex>``.
        arrivals: the "items arrive mid-stream" variant: movie id -> index in ``test``
            of its first rating; such a movie is published just before that rating
            (its rating then waits, in the user-profile service, for its vector).
        progress: tqdm bars on stderr.

    Raises:
        ValueError: an id too long once namespaced, or arrivals that are not movies or
            point outside ``test``.
        ConfigurationError: a topic is missing, or (arrivals variant) a movie of
            ``arrivals`` already has a vector: the variant needs a fresh stack.
        StreamError: movies were not embedded in time, or the list reader failed.
        DeliveryError: the broker did not answer or refused messages.
    """
    started = time.perf_counter()
    run_id = run_id if run_id is not None else f"t1-{uuid.uuid4().hex[:8]}"
    _check_ids(run_id, [*train, *test])
    arriving: dict[int, list[MoviePublished]] = {}
    if arrivals is not None:
        _check_arrivals(arrivals, movies, len(test))
        by_id = {m.movie_id: m for m in movies}
        for movie_id, index in sorted(arrivals.items(), key=lambda kv: kv[1]):
            arriving.setdefault(index, []).append(by_id[movie_id])
    # No linger: in the closed loop every rating is awaited, so a produce held back for
    # batching would add its linger to every round trip.
    publisher = Publisher(settings, make_producer(settings, **{"linger.ms": 0}))
    check_topics(publisher, settings, [MOVIES, RATINGS, ITEM_EMBEDDINGS, RECOMMENDATIONS])
    if arrivals:
        present = sorted(set(arrivals) & embedded_movie_ids(settings))
        if present:
            raise ConfigurationError(
                f"{len(present)} movies meant to arrive mid-stream already have a vector on "
                f"{settings.topic(ITEM_EMBEDDINGS.name)} (e.g. {present[:5]}), put there by an "
                "earlier replay: the arrivals variant needs a fresh stack "
                "(`make down clean up`)"
            )

    catalogue = [m for m in movies if arrivals is None or m.movie_id not in arrivals]
    reader = _ListReader(settings, run_id)
    features = _FeaturesWatcher(settings)
    fresh = features.start(CATALOGUE_READ_TIMEOUT_S)
    if not fresh:
        log.warning(
            "the stack holds statistics of earlier ratings: they count in this run's lists, "
            "which will differ from the in-process ones (`make down clean up` for a fresh one)"
        )
    reader.start()
    try:
        for movie in catalogue:
            publisher.publish(Outgoing(MOVIES, movie))
        publisher.flush()
        missing = wait_until_embedded(
            settings,
            {m.movie_id for m in catalogue},
            timeout_s=embed_timeout_s,
            progress=progress,
        )
        if missing:
            raise StreamError(
                f"{missing} of {len(catalogue)} movies have no vector after "
                f"{embed_timeout_s:.0f} s: is the item-embedding service up (`make status`)?"
            )

        # Namespaced user -> namespaced event id of their last published rating.
        previous: dict[UserId, EventId] = {}
        for rating in train:
            namespaced = _namespaced(rating, run_id)
            publisher.publish(Outgoing(RATINGS, namespaced))
            features.published(namespaced.movie_id)
            previous[namespaced.user_id] = namespaced.event_id
        publisher.flush()
        train_done = time.monotonic()

        test_users = {f"{run_id}.{r.user_id}" for r in test}
        wanted = {previous[u] for u in test_users if u in previous}
        with tqdm(total=len(wanted), desc="train lists", unit="user", disable=not progress) as bar:
            given_up = reader.wait_for_all(
                wanted, stall_s=list_timeout_s, since=train_done, bar=bar
            )
        timeouts = len(given_up)
        if not features.wait_settled(list_timeout_s):
            timeouts += 1
            log.warning("statistics of the TRAIN ratings not all published run_id=%s", run_id)
        if given_up:
            log.warning(
                "lists of last TRAIN ratings not read run_id=%s missing=%d of=%d",
                run_id,
                len(given_up),
                len(wanted),
            )

        events: list[StreamedEvent] = []
        # The previous TEST rating, of any user: its list must be out before the next
        # rating goes in, or the two could share a batch of the recommender's.
        last: EventId | None = None
        test_started = time.perf_counter()
        for index, rating in enumerate(
            tqdm(test, desc="test", unit="ev", disable=not progress, smoothing=0.1)
        ):
            for movie in arriving.get(index, ()):
                publisher.publish(Outgoing(MOVIES, movie))
            namespaced = _namespaced(rating, run_id)
            user = namespaced.user_id
            cause = previous.get(user)
            if (
                last is not None
                and last != cause
                and last not in given_up
                and reader.wait_for(last, list_timeout_s) is None
            ):
                timeouts += 1
                given_up.add(last)
            recs: _List | None = None
            exact = False
            if cause is not None:
                if cause in given_up:
                    # Already waited out once: take it if it came since, never wait again.
                    recs = reader.caused_by(cause)
                else:
                    recs = reader.wait_for(cause, list_timeout_s)
                    if recs is None:
                        timeouts += 1
                        given_up.add(cause)
                exact = recs is not None
                if recs is None:
                    recs = reader.latest(user)
            else:
                recs = reader.newcomers()
            if not features.wait_settled(list_timeout_s):
                timeouts += 1
                log.warning("statistics not published in %.0f s index=%d", list_timeout_s, index)
            events.append(
                StreamedEvent(
                    rating=rating,
                    recommended=None if recs is None else list(recs.movie_ids),
                    predicted=None if recs is None else recs.predicted_for(rating.movie_id),
                    exact=exact,
                )
            )
            publisher.publish(Outgoing(RATINGS, namespaced))
            features.published(namespaced.movie_id)
            previous[user] = last = namespaced.event_id
        publisher.flush()
        test_s = time.perf_counter() - test_started
    finally:
        reader.stop()
        features.stop()

    result = StreamResult(
        events=events,
        run_id=run_id,
        wall_s=time.perf_counter() - started,
        lists_read=reader.lists_read,
        timeouts=timeouts,
        train_published=len(train),
        test_published=len(test),
        fresh=fresh,
    )
    log.info(
        "stream run_id=%s movies=%d arrivals=%d train=%d test=%d lists_read=%d exact=%d "
        "timeouts=%d test_s=%.1f test_events_per_s=%.1f wall_s=%.1f",
        run_id,
        len(catalogue),
        len(arrivals or {}),
        result.train_published,
        result.test_published,
        result.lists_read,
        sum(e.exact for e in events),
        result.timeouts,
        test_s,
        len(test) / test_s if test_s > 0 else 0.0,
        result.wall_s,
    )
    return result

"""Replay a dataset onto the ``movies`` and ``ratings`` topics.

Movies go first and are flushed, so every rating's movie is in the catalogue before the
rating arrives. Ratings follow in time order, keyed by user id (per-user order is kept
by the partitioner), at full speed, at a steady rate, or with the dataset's own gaps
compressed by a time scale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaException
from tqdm import tqdm

from shared.config import Settings
from shared.data import MovieLens
from shared.events import ITEM_EMBEDDINGS, MOVIES, RATINGS, Event, RatingSubmitted, TopicSpec
from shared.exceptions import ConfigurationError
from shared.kafka.message import Incoming, Outgoing, Source
from shared.kafka.publisher import DeliveryError, Publisher
from shared.kafka.topic_reader import TopicReader

log = logging.getLogger(__name__)

# The pacer sleeps only when it is at least this far ahead of schedule (seconds); shorter
# sleeps overshoot on most kernels and would cost more than they save.
_MIN_SLEEP_S = 0.002
# Progress bar updates are batched: tqdm.update per message would cost more than the
# produce call itself at full speed.
_PROGRESS_EVERY = 500


def check_topics(publisher: Publisher, settings: Settings, specs: Sequence[TopicSpec]) -> None:
    """Fail fast, with what to do, when the broker does not answer or lacks a topic.

    Producing to a missing topic would either wait out the delivery timeout or, on
    brokers that auto-create topics, make one with the wrong partition count. Asking
    for metadata also connects the producer before a paced replay starts its clock.

    Raises:
        DeliveryError: the broker did not answer within 10 s.
        ConfigurationError: a topic is missing.
    """
    try:
        metadata = publisher.producer.list_topics(timeout=10.0)
    except KafkaException as exc:
        raise DeliveryError(
            f"broker {settings.kafka_bootstrap_servers} did not answer: {exc}"
        ) from exc
    missing = [
        settings.topic(s.name) for s in specs if settings.topic(s.name) not in metadata.topics
    ]
    if missing:
        raise ConfigurationError(
            f"topics {', '.join(missing)} do not exist on {settings.kafka_bootstrap_servers}: "
            "create them with `python -m infra.topics`"
        )


@dataclass(frozen=True)
class ReplayStats:
    """What a replay published and how fast."""

    movies: int
    ratings: int
    wall_s: float
    """Seconds spent publishing, from the first message to the last delivery confirmed
    (flush included); the wait for the movies' vectors is not part of it."""
    interrupted: bool = False
    """True when Ctrl-C stopped the replay; the counts are what was delivered."""
    embed_wait_s: float = 0.0
    """Seconds spent between movies and ratings waiting for the movies' vectors."""

    @property
    def events(self) -> int:
        return self.movies + self.ratings

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0


class Pacer:
    """Holds a producer to a schedule measured from its start, so that sleep errors do
    not accumulate (each wait targets an absolute time, not a gap)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def wait_until(self, offset_s: float) -> None:
        """Block until ``offset_s`` seconds after the pacer was created."""
        ahead = self._start + offset_s - time.perf_counter()
        if ahead >= _MIN_SLEEP_S:
            time.sleep(ahead)


def schedule(
    ratings: Sequence[RatingSubmitted], *, rate: float | None, time_scale: float | None
) -> list[float] | None:
    """Send offsets (seconds from the start) of each rating, or None for full speed.

    ``rate`` spaces events evenly at that many per second; ``time_scale`` keeps the
    dataset's own gaps divided by it (a time scale of 3600 plays an hour per second).
    """
    if rate is not None and time_scale is not None:
        raise ValueError("give either rate or time_scale, not both")
    if rate is not None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        return [i / rate for i in range(len(ratings))]
    if time_scale is not None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if not ratings:
            return []
        first = ratings[0].occurred_at
        # Never negative: a dataset not sorted by time plays out of order at once.
        return [max(0.0, (r.occurred_at - first).total_seconds() / time_scale) for r in ratings]
    return None


def wait_until_embedded(
    settings: Settings, movie_ids: Collection[str], *, timeout_s: float, progress: bool = True
) -> int:
    """Block until every movie id has a vector on ``item-embeddings``; returns how many
    are still missing when ``timeout_s`` runs out (0 when all arrived).

    A replay waits here between movies and ratings, as in production where a movie is
    in the catalogue long before its ratings: otherwise a full-speed replay outruns the
    item-embedding service and ratings wait (bounded) for their movies' vectors.
    """
    wanted = set(movie_ids)
    seen: set[str] = set()
    changed = threading.Condition()

    def on_events(batch: list[Incoming[Event]]) -> None:
        with changed:
            seen.update(str(getattr(i.event, "movie_id", "")) for i in batch)
            changed.notify_all()

    def on_invalid(source: Source, reason: str) -> None:
        # Not ours to dead-letter: the services reading this topic do that.
        log.debug("skipping invalid item-embedding offset=%s reason=%s", source.offset, reason)

    reader = TopicReader(settings, ITEM_EMBEDDINGS, on_events, on_invalid, name="replay")
    bar = tqdm(total=len(wanted), desc="embedded", unit="movie", disable=not progress)
    deadline = time.monotonic() + timeout_s
    reader.start()
    try:
        with changed:
            while True:
                done = len(wanted & seen)
                bar.update(done - bar.n)
                if done == len(wanted) or time.monotonic() > deadline or not reader.is_alive():
                    break
                changed.wait(0.5)
    finally:
        reader.stop()
        bar.close()
    missing = len(wanted - seen)
    if missing:
        log.warning("movies without a vector after %.0fs missing=%d", timeout_s, missing)
    return missing


def replay(
    settings: Settings,
    dataset: MovieLens,
    *,
    limit: int | None = None,
    rate: float | None = None,
    time_scale: float | None = None,
    progress: bool = True,
    movies: bool = True,
    ratings: bool = True,
    publisher: Publisher | None = None,
    embed_timeout_s: float = 0.0,
) -> ReplayStats:
    """Publish the dataset's movies, then the first ``limit`` ratings (all by default).

    Args:
        limit: replay only this prefix of the time-ordered ratings.
        rate: ratings per second (a steady pacer); None is full speed.
        time_scale: keep the real gaps between ratings divided by this factor.
        progress: show a tqdm bar (events/s) on stderr.
        movies, ratings: publish that part (``--ratings-only`` / ``--movies-only``).
        embed_timeout_s: when > 0 and both parts are replayed, wait up to this long
            (seconds) for the movies' vectors before the ratings (``wait_until_embedded``).

    Raises:
        ValueError: negative limit, non-positive rate or time scale, or both given.
        ConfigurationError: a topic is missing.
        DeliveryError: the broker did not answer or refused messages.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    selected = dataset.ratings[:limit] if ratings else []
    offsets = schedule(selected, rate=rate, time_scale=time_scale)
    publisher = publisher or Publisher(settings)
    check_topics(publisher, settings, ([MOVIES] if movies else []) + ([RATINGS] if ratings else []))
    sent_movies = sent_ratings = 0
    embed_wait_s = 0.0
    interrupted = False
    start = time.perf_counter()
    total = (len(dataset.movies) if movies else 0) + len(selected)
    bar = tqdm(total=total, unit="ev", unit_scale=True, disable=not progress, smoothing=0.1)
    try:
        if movies:
            for movie in dataset.movies:
                publisher.publish(Outgoing(MOVIES, movie))
                sent_movies += 1
            # Ratings must not overtake the catalogue: consumers of ratings look movies up.
            publisher.flush()
            bar.update(sent_movies)
            if selected and embed_timeout_s > 0:
                bar.clear()
                waiting_since = time.perf_counter()
                wait_until_embedded(
                    settings,
                    {m.movie_id for m in dataset.movies},
                    timeout_s=embed_timeout_s,
                    progress=progress,
                )
                embed_wait_s = time.perf_counter() - waiting_since
        pacer = Pacer()
        pending = 0
        for i, rating in enumerate(selected):
            if offsets is not None:
                pacer.wait_until(offsets[i])
            publisher.publish(Outgoing(RATINGS, rating))
            sent_ratings += 1
            pending += 1
            if pending >= _PROGRESS_EVERY or offsets is not None:
                bar.update(pending)
                pending = 0
        bar.update(pending)
        publisher.flush()
    except KeyboardInterrupt:
        # Deliver what was queued, so the counts returned are what the topics hold.
        interrupted = True
        publisher.flush()
    finally:
        bar.close()
    stats = ReplayStats(
        sent_movies,
        sent_ratings,
        time.perf_counter() - start - embed_wait_s,
        interrupted,
        embed_wait_s,
    )
    log.info(
        "replay movies=%d ratings=%d wall_s=%.2f events_per_s=%.0f interrupted=%s",
        stats.movies,
        stats.ratings,
        stats.wall_s,
        stats.events_per_s,
        stats.interrupted,
    )
    return stats

"""Pure batch handler of the item-embedding service, the owner of every movie's vector.

``movies`` and ``item-feedback`` in (both keyed by movie, read co-partitioned), the
movies' vectors out on ``item-embeddings`` and in Qdrant, and their online rating
statistics out on ``item-features``. No Kafka, no clock: the caller passes the stored
records and ``now`` and writes the returned records back. The same function runs in the
service's consumer loop, in the offline evaluation and in tests.

A movie's record (``ItemRecord``) holds its content embedding, as the item encoder made
it, the sum of the tastes of the users who rated it (``ItemRated.taste``) and its rating
statistics (``MovieStats``: counts, decayed counts, co-rating counts). The vector served
is ``normalise(content + item_pull * sum of tastes)`` for a movie the encoder did not
learn from ratings (``rated_in_training`` false), and the content vector otherwise.
Sums do not depend on the order the ratings arrive in, so the vector and the statistics
are the same whichever user-profile instance sent them first, and however they were
batched.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from shared.convert import item_features_of, movie_of
from shared.events import (
    ITEM_EMBEDDINGS,
    ITEM_FEATURES,
    ItemEmbedded,
    ItemRated,
    MoviePublished,
    decode,
    encode,
)
from shared.exceptions import InvalidEventError
from shared.kafka.message import Incoming, Outgoing, dead_letter
from shared.models.item_encoder import ItemEncoder
from shared.models.item_stats import (
    DEFAULT_FAST_HALF_LIFE_DAYS,
    DEFAULT_HALF_LIFE_DAYS,
    MovieStats,
)
from shared.retrieval.qdrant_store import QdrantStore
from shared.types import EventId, MovieId

log = logging.getLogger(__name__)

SERVICE = "item-embedding"
"""Consumer group, dead-letter ``service`` field and ready-file name of item-embedding."""
TABLE = "item-state"
"""The per-movie table (``ItemRecord`` bytes); its changelog is
``Settings.changelog(SERVICE, TABLE)``."""

RECENT_EVENTS = 256
"""How many of a movie's latest ``rating_event_id`` a record keeps to recognise a copy."""

HALF_LIVES = (DEFAULT_HALF_LIFE_DAYS, DEFAULT_FAST_HALF_LIFE_DAYS)
"""The half-lives (days) of the decayed counts the service keeps and publishes; the
ranker's features must be trained with the same (the recommender checks)."""

ItemEvent = MoviePublished | ItemRated


@dataclass(frozen=True)
class ItemRecord:
    """What the service stores per movie."""

    content: ItemEmbedded | None = None
    """The encoder's embedding of the movie's latest ``movies`` message (None: ratings
    of it came before its content, e.g. after it left the catalogue)."""
    taste: np.ndarray | None = None
    """Sum of the tastes of its raters (float64; None: none yet)."""
    n_tastes: int = 0
    """How many tastes ``taste`` sums."""
    seen_offset: int | None = None
    """The highest ``item-feedback`` offset taken in (a movie's feedback is all in one
    partition): a message at or below it was re-delivered after a crash."""
    recent: tuple[int, ...] = ()
    """Digests (``event_digest``) of the ``rating_event_id`` of the last
    ``RECENT_EVENTS`` ratings taken in, oldest first: 8 bytes each in the changelog
    rather than a 36-character id."""
    last_event_id: EventId | None = None
    """``rating_event_id`` of the latest rating taken in."""
    stats: MovieStats = field(default_factory=MovieStats)
    """The movie's rating statistics (decayed over ``HALF_LIVES``)."""

    def served(self, item_pull: float, now: datetime) -> ItemEmbedded | None:
        """The ``ItemEmbedded`` to serve (None without content): the content vector,
        moved by the tastes for a movie the encoder did not learn from ratings."""
        content = self.content
        if content is None:
            return None
        if content.rated_in_training or self.taste is None or item_pull <= 0:
            return content
        moved = content.vector.astype(np.float64) + item_pull * self.taste
        norm = float(np.linalg.norm(moved))
        if not np.isfinite(norm) or norm == 0.0:
            log.warning("item vector kept as encoded movie_id=%s norm=%s", content.movie_id, norm)
            return content
        return content.model_copy(
            update={
                "vector": (moved / norm).astype(np.float32),
                "online_ratings": self.n_tastes,
                "content_vector": content.vector,
                "embedded_at": now,
            }
        )

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "content": None if self.content is None else orjson.Fragment(encode(self.content)),
                "taste": None
                if self.taste is None
                else base64.b64encode(self.taste.astype("<f8").tobytes()).decode("ascii"),
                "n": self.n_tastes,
                "offset": self.seen_offset,
                "recent": base64.b64encode(np.asarray(self.recent, dtype="<u8").tobytes()).decode(
                    "ascii"
                ),
                "last": self.last_event_id,
                "stats": _stats_json(self.stats),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> ItemRecord:
        """Read ``to_bytes`` output.

        Raises:
            InvalidEventError: the bytes are not an item record.
        """
        try:
            data: Any = orjson.loads(raw)
            content = data["content"]
            taste = data["taste"]
            return cls(
                content=None if content is None else decode(ItemEmbedded, orjson.dumps(content)),
                taste=None
                if taste is None
                else np.frombuffer(base64.b64decode(taste), dtype="<f8").astype(np.float64),
                n_tastes=int(data["n"]),
                seen_offset=data["offset"],
                **_recent_from_json(data["recent"], data.get("last")),
                stats=_stats_from_json(data.get("stats")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidEventError(f"item record is unreadable: {exc}") from exc


def handle_items(
    batch: Sequence[Incoming[ItemEvent]],
    records: Mapping[MovieId, bytes | ItemRecord],
    encoder: ItemEncoder,
    store: QdrantStore,
    now: datetime,
    *,
    item_pull: float = 0.0,
) -> tuple[list[Outgoing], dict[MovieId, ItemRecord]]:
    """Take a batch of movies and ratings of movies; returns what to publish and the
    records to store.

    - A movie published twice in one batch is embedded once, from its last message
      (``movies`` is compacted: the latest value is the movie). Encoding runs once for
      the whole batch; ``published_at`` is the broker time of the movie's message.
    - An ``ItemRated`` adds its rating to the movie's statistics and its ``taste``, if
      it has one, to the movie's record. One at or below the record's ``seen_offset``,
      or whose ``rating_event_id`` is among the record's ``recent``, is a copy and is
      skipped. A taste of another dimension than the movie's vector is dead-lettered
      (the rating still counts).
    - Every movie whose served vector may have changed (new content, new tastes) is
      upserted into Qdrant and published on ``item-embeddings``, once per batch;
      ``embedded_at`` is ``now``. Every movie rated in the batch has its statistics
      published on ``item-features``, once per batch.

    Returns:
        ``(outputs, updated)``: item embeddings and dead letters to publish, and the new
        record of every movie that changed (to write back to the table).

    Args:
        records: the stored record of (at least) the batch's movies: its bytes, or the
            ``ItemRecord`` they read as (a caller that keeps the records it wrote need
            not read them again).
        item_pull: how far a taste moves a movie's vector (0: vectors stay as encoded).

    Raises:
        NumericalError: a vector came out NaN or infinite (the consumer then retries the
            events one by one and dead-letters the culprit).
    """
    out: list[Outgoing] = []
    current: dict[MovieId, ItemRecord] = {}

    def record(movie_id: MovieId, incoming: Incoming[Any]) -> ItemRecord | None:
        if movie_id not in current:
            stored = records.get(movie_id)
            try:
                if isinstance(stored, bytes):
                    stored = ItemRecord.from_bytes(stored)
                current[movie_id] = ItemRecord() if stored is None else stored
            except InvalidEventError as exc:
                # Dead-letter rather than reset: resetting would forget its raters.
                out.append(dead_letter(incoming.source, f"stored state of movie: {exc}", SERVICE))
                return None
        return current[movie_id]

    changed: set[MovieId] = set()  # the served vector may have moved
    # The ratings each movie counts, in order; the movies in order of first rating.
    rated: dict[MovieId, list[ItemRated]] = {}
    latest: dict[MovieId, Incoming[MoviePublished]] = {}
    for one in batch:
        event = one.event
        if isinstance(event, MoviePublished):
            # Re-inserting moves a repeated id to its last position, keeping offset order.
            latest.pop(event.movie_id, None)
            latest[event.movie_id] = Incoming(event, one.source)
        elif item := record(event.movie_id, one):
            after = _rated(item, event, one, out)
            if after is not item:
                current[event.movie_id] = after
                rated.setdefault(event.movie_id, []).append(event)
                if after.n_tastes != item.n_tastes:
                    changed.add(event.movie_id)
    for movie_id, ratings in rated.items():
        counted = ((e.rating, e.occurred_at, e.co_rated) for e in ratings)
        stats = current[movie_id].stats.added_many(counted, *HALF_LIVES)
        current[movie_id] = replace(current[movie_id], stats=stats)
    chosen = [m for m in latest.values() if record(m.event.movie_id, m) is not None]
    if chosen:
        encoded = encoder.encode([movie_of(incoming.event) for incoming in chosen])
        for chosen_movie, vector in zip(chosen, encoded, strict=True):
            movie = chosen_movie.event
            content = ItemEmbedded(
                movie_id=movie.movie_id,
                title=movie.title,
                year=movie.year,
                genres=list(movie.genres),
                vector=vector.vector,
                modalities=vector.modalities,
                model_version=encoder.model_version,
                published_at=_broker_time(chosen_movie.source.timestamp_ms),
                embedded_at=now,
                rated_in_training=vector.rated_in_training,
            )
            current[movie.movie_id] = replace(current[movie.movie_id], content=content)
            changed.add(movie.movie_id)
    if len(chosen) < sum(isinstance(i.event, MoviePublished) for i in batch):
        log.debug("movies=%d after folding duplicates", len(chosen))

    served = [
        s
        for m, r in current.items()
        if m in changed and (s := r.served(item_pull, now)) is not None
    ]
    if served:
        store.upsert(served)
    out.extend(Outgoing(ITEM_EMBEDDINGS, item) for item in served)
    out.extend(
        Outgoing(
            ITEM_FEATURES,
            item_features_of(m, current[m].stats, *HALF_LIVES, now, _last_event_id(current[m])),
        )
        for m in rated
    )
    return out, {m: current[m] for m in current if m in changed or m in rated}


def _rated(
    item: ItemRecord, event: ItemRated, incoming: Incoming[Any], out: list[Outgoing]
) -> ItemRecord:
    """``item`` with the rating of ``event`` taken in (its id and offset, its taste if
    it has one; the caller adds it to the statistics); ``item`` itself for a copy."""
    offset = incoming.source.offset
    if offset is not None and item.seen_offset is not None and offset <= item.seen_offset:
        return item
    digest = event_digest(event.rating_event_id)
    if digest in item.recent:
        log.info(
            "skipped a copy of a rating movie_id=%s rating_event_id=%s",
            event.movie_id,
            event.rating_event_id,
        )
        return item
    counted = replace(
        item,
        seen_offset=item.seen_offset if offset is None else offset,
        recent=(*item.recent, digest)[-RECENT_EVENTS:],
        last_event_id=event.rating_event_id,
    )
    taste = event.taste
    if taste is None:
        return counted
    dim = None if item.content is None else item.content.vector.shape[0]
    if (dim is not None and taste.shape[0] != dim) or (
        item.taste is not None and taste.shape[0] != item.taste.shape[0]
    ):
        out.append(
            dead_letter(
                incoming.source,
                f"taste has dimension {taste.shape[0]}, movie {event.movie_id!r} has "
                f"{dim if dim is not None else item.taste.shape[0]}",  # type: ignore[union-attr]
                SERVICE,
            )
        )
        return counted
    total = taste.astype(np.float64) if item.taste is None else item.taste + taste
    return replace(counted, taste=total, n_tastes=item.n_tastes + 1)


def event_digest(event_id: EventId) -> int:
    """A 64-bit digest of a rating's event id: what an ``ItemRecord`` keeps to recognise
    a copy (two of a movie's last ``RECENT_EVENTS`` ids collide with odds of about
    2^-56)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


def _recent_from_json(recent: Any, last: Any) -> dict[str, Any]:
    """``ItemRecord.recent`` and ``last_event_id`` from their JSON: packed digests, or
    the list of event ids that records held before."""
    if isinstance(recent, str):
        digests = tuple(int(d) for d in np.frombuffer(base64.b64decode(recent), dtype="<u8"))
        return {"recent": digests, "last_event_id": None if last is None else str(last)}
    ids = [str(e) for e in recent]
    return {
        "recent": tuple(event_digest(e) for e in ids),
        "last_event_id": ids[-1] if ids else None,
    }


def _last_event_id(item: ItemRecord) -> EventId:
    if item.last_event_id is None:  # only a record with no rating, never published
        raise InvalidEventError("a movie with statistics but no rating event id")
    return item.last_event_id


def _broker_time(timestamp_ms: int | None) -> datetime | None:
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)


def _stats_json(stats: MovieStats) -> list[Any] | None:
    """A record's statistics as JSON (None before any rating: ``-inf`` is not JSON)."""
    if stats.count == 0:
        return None
    return [
        stats.count,
        stats.rating_sum,
        stats.log_decayed,
        stats.log_fast_decayed,
        stats.last_day,
        stats.co,
    ]


def _stats_from_json(data: Any) -> MovieStats:
    """``_stats_json`` read back (``KeyError``, ``TypeError`` or ``ValueError`` when it
    is not)."""
    if data is None:
        return MovieStats()
    count, rating_sum, log_decayed, log_fast, last_day, co = data
    if not isinstance(co, dict):
        raise TypeError("co-rating counts must be a JSON object")
    return MovieStats(
        count=int(count),
        rating_sum=float(rating_sum),
        log_decayed=float(log_decayed),
        log_fast_decayed=float(log_fast),
        last_day=float(last_day),
        co={str(m): int(n) for m, n in co.items()},
    )

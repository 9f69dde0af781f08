"""Turns a micro-batch of ``movies`` messages into item embeddings."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import cast

from shared.events import ITEM_EMBEDDINGS, Event, ItemEmbedded, MoviePublished
from shared.kafka.batch_consumer import BatchHandler
from shared.kafka.message import Incoming, Outgoing
from shared.models.item_encoder import ItemEncoder
from shared.retrieval.qdrant_store import QdrantStore

log = logging.getLogger(__name__)

SERVICE = "item-embedding"
"""Consumer group, dead-letter ``service`` field and ready-file name of item-embedding."""


def handle_movies(
    batch: list[Incoming[MoviePublished]],
    encoder: ItemEncoder,
    store: QdrantStore,
    now: datetime,
) -> list[Outgoing]:
    """Embed a batch of movies, upsert them into Qdrant and return their ``item-embeddings``.

    A movie published twice in one batch is embedded once, from its last message
    (``movies`` is compacted: the latest value is the movie). Encoding runs once for
    the whole batch. ``published_at`` is the broker timestamp of the source message,
    ``embedded_at`` is ``now``.

    Raises:
        NumericalError: a vector came out NaN or infinite (the consumer then retries the
            movies one by one and dead-letters the culprit).
    """
    latest: dict[str, Incoming[MoviePublished]] = {}
    for incoming in batch:
        # Re-inserting moves a repeated id to its last position, keeping offset order.
        latest.pop(incoming.event.movie_id, None)
        latest[incoming.event.movie_id] = incoming
    if not latest:
        return []
    chosen = list(latest.values())
    encoded = encoder.encode([incoming.event for incoming in chosen])
    embedded = [
        ItemEmbedded(
            movie_id=incoming.event.movie_id,
            title=incoming.event.title,
            year=incoming.event.year,
            genres=list(incoming.event.genres),
            vector=item.vector,
            modalities=item.modalities,
            model_version=encoder.model_version,
            published_at=_broker_time(incoming.source.timestamp_ms),
            embedded_at=now,
            rated_in_training=item.rated_in_training,
        )
        for incoming, item in zip(chosen, encoded, strict=True)
    ]
    store.upsert(embedded)
    if len(chosen) < len(batch):
        log.debug("batch=%d movies=%d (duplicates folded)", len(batch), len(chosen))
    return [Outgoing(ITEM_EMBEDDINGS, event) for event in embedded]


def _broker_time(timestamp_ms: int | None) -> datetime | None:
    if timestamp_ms is None or timestamp_ms < 0:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, tz=UTC)


def make_handler(encoder: ItemEncoder, store: QdrantStore) -> BatchHandler:
    """``handle_movies`` as a ``BatchConsumer`` handler of the ``movies`` topic."""

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        # The consumer only subscribes to ``movies``, so every event is a MoviePublished.
        movies = cast(list[Incoming[MoviePublished]], batch)
        return handle_movies(movies, encoder, store, datetime.now(UTC))

    return handler

"""The item-embedding worker: every movie's vector, from its content
and its raters.

Reads ``movies`` and ``item-feedback`` co-partitioned in micro-batches
(``handle_items``), the movies of a batch ahead of its feedback, in a batch of their
own: movies are encoded in one call per batch (in the consumer thread:
there is no event loop to block), the tastes of new movies' raters move their vectors
(``Settings.item_pull``), and every changed vector is upserted into Qdrant and published
on ``item-embeddings``. Per-movie records live in a ``ChangelogTable`` restored from
``Settings.changelog(SERVICE, TABLE)``. Stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import cast

import torch

# Every model is read from local files; make the Hugging Face libraries refuse to reach
# the network rather than stall or download at run time. Set before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shared.config import Settings
from shared.events import ITEM_FEEDBACK, MOVIES, Event
from shared.handlers.item_embedding import SERVICE, TABLE, ItemEvent, ItemRecord, handle_items
from shared.kafka.batch_consumer import BatchConsumer, BatchHandler
from shared.kafka.message import Incoming, Outgoing
from shared.kafka.table import ChangelogTable
from shared.models.deployed import build_deployed_item_encoder
from shared.models.item_encoder import ItemEncoder
from shared.retrieval.qdrant_store import QdrantStore
from shared.types import MovieId

log = logging.getLogger(__name__)


def make_handler(
    settings: Settings, encoder: ItemEncoder, store: QdrantStore, table: ChangelogTable
) -> BatchHandler:
    """``handle_items`` as a ``BatchConsumer`` handler that keeps its records in ``table``.

    The records it writes are also kept as read (``ItemRecord``), each with the bytes
    object it put in the table: while the table holds that very object, the next batch
    takes the record as is instead of parsing it again (a popular movie's co-rating
    counts are kilobytes of JSON, and most batches touch it). A table restored, or a
    batch discarded after a failed commit, holds other objects, which are parsed.
    """
    read: dict[MovieId, tuple[bytes, ItemRecord]] = {}
    generation = table.generation

    def stored(movie_id: MovieId) -> bytes | ItemRecord | None:
        raw = table.get(movie_id.encode())
        kept = read.get(movie_id)
        return kept[1] if kept is not None and raw is kept[0] else raw

    def handler(batch: list[Incoming[Event]]) -> list[Outgoing]:
        nonlocal generation
        if table.generation != generation:  # partitions restored or revoked
            generation = table.generation
            read.clear()
        # The consumer reads only movies and item-feedback, both keyed by movie_id.
        events = cast(list[Incoming[ItemEvent]], batch)
        partitions = {i.event.movie_id: i.source.partition for i in events}
        records = {m: record for m in partitions if (record := stored(m)) is not None}
        out, updated = handle_items(
            events, records, encoder, store, datetime.now(UTC), item_pull=settings.item_pull
        )
        for movie_id, record in updated.items():
            partition = partitions[movie_id]
            if partition is not None:
                raw = record.to_bytes()
                table.put(movie_id.encode(), raw, partition)
                read[movie_id] = (raw, record)
        return out

    return handler


class ItemEmbeddingWorker:
    """The item-embedding loop and its clean stop; ``run`` blocks until ``stop``.

    Args:
        settings: broker, topics, batch size, ``item_pull``, Qdrant, var dir.
        encoder: the item encoder (default: the deployed one).

    Raises:
        ConfigurationError: the deployed encoder or Qdrant cannot be set up.
    """

    def __init__(self, settings: Settings, encoder: ItemEncoder | None = None) -> None:
        # The one worker that runs torch: its nets on as few threads as the cores allow.
        torch.set_num_threads(settings.torch_threads)
        self.encoder = encoder or build_deployed_item_encoder(settings)
        self.store = QdrantStore(settings, self.encoder.dim)
        self.table = ChangelogTable(settings, settings.changelog(SERVICE, TABLE))
        self.consumer = BatchConsumer(
            settings,
            SERVICE,
            [MOVIES, ITEM_FEEDBACK],
            make_handler(settings, self.encoder, self.store, self.table),
            ready_file=settings.ready_file(SERVICE),
            table=self.table,
            # A new movie is searchable without waiting for the feedback fetched with it.
            ahead=[MOVIES],
        )

    def run(self) -> None:
        try:
            self.consumer.run()
        finally:
            self.store.close()

    def stop(self) -> None:
        self.consumer.stop()

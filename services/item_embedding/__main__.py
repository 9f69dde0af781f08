"""``python -m services.item_embedding worker``: embed every movie published on ``movies``.

Reads ``movies`` in micro-batches, encodes each batch in one call (in the consumer
thread: there is no event loop to block), upserts the vectors into Qdrant and publishes
them on ``item-embeddings``. Stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Every model is read from local files; make the Hugging Face libraries refuse to reach
# the network rather than stall or download at run time. Set before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shared.config import Settings
from shared.events import MOVIES
from shared.exceptions import ConfigurationError
from shared.handlers.item_embedding import SERVICE, make_handler
from shared.kafka.batch_consumer import BatchConsumer
from shared.logs import configure_logging
from shared.models.deployed import build_deployed_item_encoder
from shared.retrieval.qdrant_store import QdrantStore

log = logging.getLogger(__name__)


def worker() -> int:
    """Run the service until SIGTERM; 0 on a clean stop, 2 on a configuration error."""
    configure_logging(SERVICE)
    settings = Settings()
    try:
        encoder = build_deployed_item_encoder(settings)
        store = QdrantStore(settings, encoder.dim)
    except ConfigurationError as exc:
        log.error("service=%s cannot start: %s", SERVICE, exc)
        return 2
    try:
        consumer = BatchConsumer(
            settings,
            SERVICE,
            [MOVIES],
            make_handler(encoder, store),
            ready_file=settings.ready_file(SERVICE),
        )
        consumer.install_signal_handlers()
        consumer.run()
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.item_embedding", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="consume movies, publish item embeddings")
    parser.parse_args(argv)
    return worker()


if __name__ == "__main__":
    sys.exit(main())

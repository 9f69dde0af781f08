"""The pass-through pipeline of ``make bench``: what this broker and runtime allow.

``python -m infra.ceiling`` runs one processor on the services' runtime (``BatchConsumer``,
the same settings, transactions as the stack runs them) that reads ``ratings``, decodes and
validates each event, and publishes it again, keyed by user, on ``ceiling-echo``: one
small message per event, no model, no state. The bench produces ratings into a topic
namespace of its own (``REELSTREAM_TOPIC_PREFIX``), starts this process, and reads
``ceiling-echo`` back; the events per second it measures are the ceiling that a stack
of one hop on this machine's broker and Python clients could reach.
"""

from __future__ import annotations

from infra.topics import ensure_topics
from shared.config import Settings
from shared.events import RATINGS, Event, RatingSubmitted, TopicSpec
from shared.kafka.batch_consumer import BatchConsumer
from shared.kafka.client import make_admin
from shared.kafka.message import Incoming, Outgoing
from shared.logs import configure_logging

SERVICE = "ceiling"
ECHO = TopicSpec("ceiling-echo", RatingSubmitted, "user_id", compacted=False)
"""Where the pass-through publishes (not a topic of the stack's contract)."""


def echo(batch: list[Incoming[Event]]) -> list[Outgoing]:
    """The pass-through handler: every valid event out again, as it came."""
    return [Outgoing(ECHO, incoming.event) for incoming in batch]


def create_topics(settings: Settings) -> None:
    """The contract's topics and ``ceiling-echo`` in ``settings``' namespace."""
    from confluent_kafka.admin import NewTopic

    ensure_topics(settings)
    admin = make_admin(settings)
    name = settings.topic(ECHO.name)
    if name not in admin.list_topics(timeout=30).topics:
        future = admin.create_topics([NewTopic(name, settings.topic_partitions, 1)])[name]
        future.result(30)


def delete_topics(settings: Settings) -> None:
    """Remove every topic of ``settings``' namespace (the prefix must not be empty)."""
    if not settings.topic_prefix:
        raise ValueError("refusing to delete the topics of the stack's own namespace")
    admin = make_admin(settings)
    names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(settings.topic_prefix)]
    for future in admin.delete_topics(names).values() if names else ():
        future.result(30)


def main() -> None:
    configure_logging(SERVICE)
    settings = Settings()
    consumer = BatchConsumer(
        settings, SERVICE, [RATINGS], echo, ready_file=settings.ready_file(SERVICE)
    )
    consumer.install_signal_handlers()
    consumer.run()


if __name__ == "__main__":
    main()

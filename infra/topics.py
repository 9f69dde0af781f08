"""Create every topic reelstream uses, explicitly, before any service starts.

Some brokers auto-create topics with one partition; a table's changelog must have as
many partitions as the topics its table is fed from, and topics read co-partitioned
(``movies`` and ``item-feedback``) the same number. So every topic is created here from
the registry in ``shared.events`` and the services' tables, with
``Settings.topic_partitions``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from shared.config import Settings
from shared.events import TOPICS
from shared.handlers import item_embedding, recommender, user_profile
from shared.kafka.client import make_admin

log = logging.getLogger(__name__)

COMPACTION = {"segment.ms": "60000", "min.cleanable.dirty.ratio": "0.1"}
"""Settings of every compacted topic besides ``cleanup.policy``: a broker compacts only
closed segments, so a segment rolls every minute, and a log is cleaned once a tenth of
it is overwritten values. With the broker defaults (a segment of 1 GiB or 7 days) a
global table such as ``item-features`` would keep every version of every movie, and a
recommender's start would read all of them."""


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    compacted: bool


def plan(settings: Settings) -> list[TopicPlan]:
    """Every topic of the stack with its physical name, partitions and cleanup policy."""
    n = settings.topic_partitions
    topics = [TopicPlan(settings.topic(spec.name), n, spec.compacted) for spec in TOPICS]
    topics += [
        TopicPlan(settings.changelog(handler.SERVICE, handler.TABLE), n, compacted=True)
        for handler in (item_embedding, recommender, user_profile)
    ]
    return topics


def topic_config(topic: TopicPlan) -> dict[str, str]:
    """The broker settings a topic is created with."""
    if topic.compacted:
        return {"cleanup.policy": "compact", **COMPACTION}
    return {"cleanup.policy": "delete"}


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics; returns the names created. Existing ones are kept."""
    admin = make_admin(settings)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [t for t in plan(settings) if t.name not in existing]
    if not wanted:
        return []
    new = [
        NewTopic(
            t.name,
            num_partitions=t.partitions,
            replication_factor=1,
            config=topic_config(t),
        )
        for t in wanted
    ]
    created = []
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    log.info("topics created=%s", ",".join(created))
    return created


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    created = ensure_topics(settings)
    for t in plan(settings):
        state = "created" if t.name in created else "exists"
        print(f"{t.name:40s} partitions={t.partitions} compacted={t.compacted} {state}")


if __name__ == "__main__":
    main()

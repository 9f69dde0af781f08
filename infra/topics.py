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
            config={"cleanup.policy": "compact" if t.compacted else "delete"},
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

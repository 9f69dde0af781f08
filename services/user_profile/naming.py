"""Names of the user-profile service's consumer group and its changelog topic.

Kept free of Kafka client imports so that ``infra.topics`` can create the changelog
(with as many partitions as ``ratings``) before any worker starts.
"""

from __future__ import annotations

from shared.config import Settings

SERVICE = "user-profile"
TABLE = "user-state"


def app_id(settings: Settings) -> str:
    """The consumer-group id of the service; also the prefix of its changelog topic."""
    return settings.group(SERVICE)


def changelog_topic(settings: Settings) -> str:
    """The compacted topic behind the per-user table, partitioned like ``ratings``."""
    return f"{app_id(settings)}-{TABLE}-changelog"

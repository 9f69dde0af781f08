"""Topic creation: every topic of the registry and the tables, with its cleanup settings."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import ConfigResource

from infra.topics import COMPACTION, ensure_topics, plan
from shared.config import Settings
from shared.events import ITEM_FEATURES, RATINGS
from shared.kafka.client import make_admin
from tests.conftest import SettingsFactory


def described(settings: Settings, topic: str) -> dict[str, str]:
    """The broker's settings of ``topic``."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.topic(topic))
    admin = make_admin(settings)  # kept alive until the answer is in
    configs = admin.describe_configs([resource])[resource].result(timeout=15)
    return {name: str(entry.value) for name, entry in configs.items()}


@pytest.mark.integration
def test_compacted_topics_roll_and_clean_so_that_global_tables_stay_small(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings()
    # The factory created them already: a second call creates nothing.
    assert ensure_topics(settings) == []
    names = {t.name for t in plan(settings)}
    assert settings.topic(ITEM_FEATURES.name) in names
    features = described(settings, ITEM_FEATURES.name)
    assert features["cleanup.policy"] == "compact"
    for key, value in COMPACTION.items():
        assert features[key] == value, key
    ratings = described(settings, RATINGS.name)
    assert ratings["cleanup.policy"] == "delete"

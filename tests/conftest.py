"""Shared fixtures: a real broker, per-test topic namespaces, and Kafka helpers.

The broker is a local noida-db started on a free port for the session, unless
``KAFKA_BOOTSTRAP_SERVERS`` names one (then the tests run against that broker; every
test still gets its own topics through a unique prefix).
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from infra import broker as local_broker
from infra.topics import ensure_topics
from shared.config import Settings


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    data_dir = tmp_path_factory.mktemp("broker")
    address = local_broker.start(local_broker.free_port(), data_dir)
    try:
        yield address
    finally:
        # Kafka clients left in reference cycles by finished tests would otherwise
        # outlive the broker and log "Connection refused" until the interpreter exits.
        gc.collect()
        local_broker.stop(data_dir)


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(bootstrap: str, tmp_path: Path) -> SettingsFactory:
    """Builds Settings on the test broker with a fresh topic prefix and var dir;
    creates the topics. Keyword arguments override fields."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": bootstrap,
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
            "topic_partitions": 2,
            "var_dir": tmp_path / "var",
            "qdrant_path": tmp_path / "qdrant",
            "batch_timeout_s": 0.02,
            "rating_wait_s": 2.0,
            # Baseline models unless a test asks for the trained checkpoints: tests feed
            # vectors of their own dimensions, which the trained models would refuse.
            "trained_models": False,
        }
        values.update(overrides)
        settings = Settings(**values)
        ensure_topics(settings)
        return settings

    return factory


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one intra-op thread for a module of tiny nets: extra threads only add
    overhead (and, on a busy machine, spin-waiting that makes training many times
    slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Logging set-up for services and tools: one line per record, key=value fields."""

from __future__ import annotations

import logging
import os


def configure_logging(service: str, level: str | None = None) -> None:
    """Log to stderr as ``time level service logger message`` (LOG_LEVEL, default INFO)."""
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s %(levelname)s service={service} %(name)s %(message)s",
        force=True,
    )
    # librdkafka and HTTP client chatter is not ours to report at INFO.
    for noisy in ("httpx", "urllib3", "aiokafka", "faust", "mode", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

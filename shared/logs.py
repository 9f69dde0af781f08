"""Logging set-up for services and tools: one line per record, key=value fields."""

from __future__ import annotations

import contextlib
import logging
import os

from tqdm.contrib.logging import logging_redirect_tqdm


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


_REDIRECTED = contextlib.ExitStack()


def log_above_progress_bars() -> None:
    """From now on, console log records go through ``tqdm.write``: a record logged while
    a progress bar is drawn is printed above the bar instead of splitting its line. For
    commands that draw bars (replay, train, eval), after their logging is configured;
    the redirection lasts as long as the process."""
    _REDIRECTED.enter_context(logging_redirect_tqdm())

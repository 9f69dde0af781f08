"""A worker's clean stop on SIGTERM (the process manager's) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

log = logging.getLogger(__name__)


def stop_on_signals(stop: Callable[[], None], service: str) -> None:
    """Call ``stop`` on SIGTERM or SIGINT; the worker then finishes its batch, commits
    and returns. Call it from the main thread."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal=%s stopping service=%s", signal.Signals(signum).name, service)
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

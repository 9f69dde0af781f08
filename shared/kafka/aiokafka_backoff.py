"""Make aiokafka (faust's client) wait after an empty fetch, like a long poll.

Kafka brokers hold an empty fetch for up to ``fetch.wait.max.ms``; some Kafka-protocol
brokers (the local noida-db among them) answer at once, and aiokafka's fetcher then
re-fetches in a tight loop (an idle user-profile worker used 71% of a core here,
34% with this backoff; the rest is its librdkafka item reader). aiokafka has
no setting for this, so ``install`` wraps its fetcher's request coroutine: when a
response brings no records, that broker is not asked again for ``pause_s`` seconds
(minus the time the request took). On a broker that long-polls the wrapper never
sleeps, because an empty answer has already taken ``fetch.wait.max.ms``.

This is a targeted patch of one private aiokafka coroutine (pinned: aiokafka 0.14.0);
``install`` checks that it is there and is idempotent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.consumer.fetcher import Fetcher

from shared.exceptions import ConfigurationError

_ORIGINAL = "_reelstream_original_proc_fetch_request"


def install(pause_s: float) -> None:
    """Patch aiokafka's ``Fetcher`` in this process (``pause_s`` <= 0: leave it alone)."""
    if pause_s <= 0:
        return
    original: Callable[..., Awaitable[bool]] | None = getattr(Fetcher, _ORIGINAL, None)
    if original is None:
        original = getattr(Fetcher, "_proc_fetch_request", None)
        if original is None:
            raise ConfigurationError("aiokafka's Fetcher has no _proc_fetch_request: re-check")
        setattr(Fetcher, _ORIGINAL, original)

    async def proc_fetch_request(self: Fetcher, *args: Any, **kwargs: Any) -> bool:
        started = time.monotonic()
        got_records = await original(self, *args, **kwargs)
        if not got_records:
            # The node stays "in flight" while we sleep, so nothing re-fetches from it.
            remaining = pause_s - (time.monotonic() - started)
            if remaining > 0:
                try:
                    await asyncio.sleep(remaining)
                except asyncio.CancelledError:
                    # As the original does when cancelled (close, or partitions revoked):
                    # the fetcher awaits these tasks and expects a result, not an error.
                    return False
        return got_records

    Fetcher._proc_fetch_request = proc_fetch_request

"""What the dashboard shows, kept by the read side as the topics stream by.

``Activity`` holds the latest lists as they were published (user, titles, latency), a
per-second series of lists and their latency, the dead letters by service and reason,
and each user's recent vectors (their trajectory). ``project`` maps item and user
vectors onto the catalogue's first two principal components, so a user's trajectory
can be drawn among the movies.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.events import NEWCOMERS_USER_ID, DeadLetter, RecommendationsGenerated
from shared.metrics import reason_of
from shared.types import UserId

FEED_SIZE = 100
"""Lists kept for the feed."""
SERIES_S = 300
"""Seconds of the throughput and latency series."""
TRAJECTORY = 50
"""Vectors kept per user."""
TITLES_SHOWN = 3
RECENT_LETTERS = 20


@dataclass(frozen=True)
class FeedItem:
    seq: int
    user_id: str
    titles: list[str]
    latency_ms: float
    generated_at: str


class Activity:
    """Thread-safe: the views' reader threads write, the HTTP handlers read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._feed: deque[FeedItem] = deque(maxlen=FEED_SIZE)
        self._seconds: dict[int, list[float]] = {}
        """Epoch second of arrival → latencies (ms) of the lists that arrived in it."""
        self._letters: Counter[tuple[str, str]] = Counter()
        self._recent_letters: deque[dict[str, object]] = deque(maxlen=RECENT_LETTERS)
        self._paths: dict[UserId, deque[np.ndarray]] = {}

    def lists(self, events: Sequence[RecommendationsGenerated], now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        with self._lock:
            for event in events:
                if event.user_id == NEWCOMERS_USER_ID:
                    continue
                self._seq += 1
                self._feed.append(
                    FeedItem(
                        seq=self._seq,
                        user_id=event.user_id,
                        titles=[item.title for item in event.items[:TITLES_SHOWN]],
                        latency_ms=event.latency_ms,
                        generated_at=event.generated_at.isoformat(),
                    )
                )
                self._seconds.setdefault(second, []).append(event.latency_ms)
            for old in [s for s in self._seconds if s <= second - SERIES_S]:
                del self._seconds[old]

    def dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        with self._lock:
            for letter in letters:
                self._letters[(letter.service, reason_of(letter.error))] += 1
                self._recent_letters.append(
                    {
                        "service": letter.service,
                        "source": f"{letter.source_topic}[{letter.partition}]@{letter.offset}",
                        "reason": letter.error[:200],
                        "failed_at": letter.failed_at.isoformat(),
                    }
                )

    def vector(self, user_id: UserId, vector: np.ndarray) -> None:
        with self._lock:
            path = self._paths.setdefault(user_id, deque(maxlen=TRAJECTORY))
            path.append(np.asarray(vector, dtype=np.float32))

    def trajectory(self, user_id: UserId) -> list[np.ndarray]:
        with self._lock:
            return list(self._paths.get(user_id, ()))

    def feed(self, after: int = 0) -> list[FeedItem]:
        with self._lock:
            return [item for item in self._feed if item.seq > after]

    def series(self, now: float | None = None) -> list[dict[str, float | int | None]]:
        """Per second of the last ``SERIES_S``: lists published, and their latency p50
        and p99 (ms; None in a second without lists)."""
        end = int(time.time() if now is None else now)
        with self._lock:
            seconds = {s: list(v) for s, v in self._seconds.items()}
        out: list[dict[str, float | int | None]] = []
        for second in range(end - SERIES_S + 1, end + 1):
            values = seconds.get(second, [])
            out.append(
                {
                    "t": second,
                    "lists": len(values),
                    "p50_ms": float(np.percentile(values, 50)) if values else None,
                    "p99_ms": float(np.percentile(values, 99)) if values else None,
                }
            )
        return out

    def letters(self) -> dict[str, object]:
        with self._lock:
            return {
                "by_reason": [
                    {"service": service, "reason": reason, "count": n}
                    for (service, reason), n in self._letters.most_common()
                ],
                "recent": list(self._recent_letters),
            }


def project(items: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """2-D coordinates of ``items`` (one row each) and of each of ``others``, on the
    first two principal components of ``items``."""
    if len(items) == 0:
        return (np.zeros((0, 2)), *(np.zeros((len(o), 2)) for o in others))
    mean = items.mean(axis=0)
    _, _, vt = np.linalg.svd(items - mean, full_matrices=False)
    basis = vt[:2].T
    if basis.shape[1] < 2:
        basis = np.pad(basis, ((0, 0), (0, 2 - basis.shape[1])))
    return ((items - mean) @ basis, *((np.asarray(o) - mean) @ basis for o in others))

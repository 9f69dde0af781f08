"""Wire events to the plain domain values the models read (``shared.domain``).

The one place the two meet: handlers, the lab and tools convert here before they call a
model, so that ``shared.models`` never imports the wire contract.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from shared.domain import Movie, People, Rating
from shared.events import ItemFeaturesUpdated, MoviePublished, RatingSubmitted
from shared.events import People as WirePeople
from shared.models.item_stats import SECONDS_PER_DAY, MovieStats, days
from shared.types import EventId, MovieId


def people_of(people: WirePeople) -> People:
    """A movie's people as the models read them."""
    return People(
        directors=tuple(people.directors),
        cast=tuple(people.cast),
        writers=tuple(people.writers),
    )


def movie_of(event: MoviePublished) -> Movie:
    """The content of a published movie, as an item encoder reads it."""
    return Movie(
        movie_id=event.movie_id,
        title=event.title,
        year=event.year,
        genres=tuple(event.genres),
        overview=event.overview,
        people=people_of(event.people),
        poster=event.poster,
    )


def movies_of(events: Iterable[MoviePublished]) -> list[Movie]:
    """``movie_of`` of each event, in order."""
    return [movie_of(e) for e in events]


def rating_of(event: RatingSubmitted) -> Rating:
    """The user, movie and stars of a submitted rating."""
    return Rating(user_id=event.user_id, movie_id=event.movie_id, rating=event.rating)


def ratings_of(events: Iterable[RatingSubmitted]) -> list[Rating]:
    """``rating_of`` of each event, in order."""
    return [rating_of(e) for e in events]


def movie_stats_of(event: ItemFeaturesUpdated) -> MovieStats:
    """A movie's published online statistics, as ``ItemStats.put`` takes them."""
    return MovieStats(
        count=event.n_ratings,
        rating_sum=event.rating_sum,
        log_decayed=event.log_decayed,
        log_fast_decayed=event.log_fast_decayed,
        last_day=days(event.last_rated_at),
        co=dict(zip(event.co_rated, event.co_counts, strict=True)),
    )


def item_features_of(
    movie_id: MovieId,
    stats: MovieStats,
    half_life_days: float,
    fast_half_life_days: float,
    now: datetime,
    last_rating_event_id: EventId,
) -> ItemFeaturesUpdated:
    """The ``item-features`` event of a movie's statistics (with at least one rating),
    keeping its most co-rated movies (``MovieStats.published``)."""
    if stats.last_day is None:
        raise ValueError(f"movie {movie_id!r} has no rating to publish statistics of")
    top = stats.top_co()
    return ItemFeaturesUpdated(
        movie_id=movie_id,
        n_ratings=stats.count,
        rating_sum=stats.rating_sum,
        log_decayed=stats.log_decayed,
        log_fast_decayed=stats.log_fast_decayed,
        half_life_days=half_life_days,
        fast_half_life_days=fast_half_life_days,
        last_rated_at=datetime.fromtimestamp(stats.last_day * SECONDS_PER_DAY, tz=UTC),
        co_rated=list(top),
        co_counts=list(top.values()),
        last_rating_event_id=last_rating_event_id,
        updated_at=now,
    )

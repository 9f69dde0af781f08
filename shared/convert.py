"""Wire events to the plain domain values the models read (``shared.domain``).

The one place the two meet: handlers, the lab and tools convert here before they call a
model, so that ``shared.models`` never imports the wire contract.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.domain import Movie, People, Rating
from shared.events import MoviePublished, RatingSubmitted
from shared.events import People as WirePeople


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

"""Plain domain values the models read: a movie's content and a rating.

Immutable and free of the wire contract: ``shared.models`` takes these, and
``shared.convert`` makes them from the events of ``shared.events``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from shared.types import MovieId, UserId

Modality: TypeAlias = Literal["text", "image", "metadata"]
"""An input an item vector can stand for."""


@dataclass(frozen=True, slots=True)
class People:
    """Names or ids of a movie's people; order matters (first director, lead actor)."""

    directors: tuple[str, ...] = ()
    cast: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Movie:
    """What an item encoder reads of a movie."""

    movie_id: MovieId
    title: str
    year: int | None = None
    genres: tuple[str, ...] = ()
    overview: str = ""
    people: People = People()
    poster: str | None = None
    """A local file (a path, absolute or relative to the poster folder), an http(s) URL
    or a ``data:image/...;base64,`` URI; None: no poster."""


@dataclass(frozen=True, slots=True)
class Rating:
    """A user's stars (0.5 to 5.0) for a movie."""

    user_id: UserId
    movie_id: MovieId
    rating: float

"""MovieLens-100K as contract events: the catalogue as ``MoviePublished``, the ratings
as ``RatingSubmitted`` in time order.

Two layouts of the same data are read, detected from the files in the folder:

- RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``, optional ``ml-100k.kg`` and
  ``ml-100k.link``), as shipped inside the ``recbole==1.2.1`` wheel and fetched by
  ``python -m infra.data``. Tab-separated with a typed header (``user_id:token``).
  The knowledge graph adds each movie's directors, cast (lead first) and writers as
  Freebase ids such as ``m.0bln8``.
- The official GroupLens folder (``u.data``, ``u.item``), from
  https://grouplens.org/datasets/movielens/100k/. No people; the IMDb URL and the
  release date go to ``metadata``.

Event ids are deterministic (``ml100k-<row index in the ratings file>``), so replaying the
same data twice produces the same events.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from shared.events import MoviePublished, People, RatingSubmitted
from shared.exceptions import ReelstreamError

log = logging.getLogger(__name__)

ML100K_GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
"""The 19 genres of MovieLens-100K in the order of ``u.genre`` (and of the flags in
``u.item``)."""

EVENT_ID_PREFIX = "ml100k-"

# Freebase relations whose head is the film and whose tail is the person.
DIRECTED_BY = "film.film.directed_by"
ACTOR = "film.film.actor"
WRITTEN_BY = "film.film.written_by"

# A year in parentheses at the end of a title, possibly followed by further
# parenthesised notes, e.g. "Toy Story (1995)" or "Land Before Time III (1995) (V)".
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)(?P<notes>(?:\s*\([^()]*\))*)\s*$")

DatasetFormat = Literal["recbole", "grouplens"]


class DatasetError(ReelstreamError):
    """A dataset folder that is missing or holds files that cannot be read."""


@dataclass(frozen=True)
class MovieLens:
    """A loaded dataset: every movie, and every rating sorted by time."""

    movies: list[MoviePublished]
    ratings: list[RatingSubmitted]
    """Sorted by ``(occurred_at, row index in the file)``: ties keep file order."""
    format: DatasetFormat
    path: Path
    people_linked: int = field(default=0)
    """How many movies got people from the knowledge graph (RecBole format only)."""


def load_movielens(path: Path) -> MovieLens:
    """Load MovieLens-100K from a folder in RecBole atomic or GroupLens layout.

    Raises:
        DatasetError: the folder holds neither layout, or a file has a malformed row
            (the message names the file and line).
    """
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"no dataset folder at {path}")
    if (path / "u.data").is_file() and (path / "u.item").is_file():
        return _load_grouplens(path)
    inter = _recbole_file(path, "inter")
    if inter is not None:
        return _load_recbole(path, inter.stem)
    raise DatasetError(
        f"{path} holds neither RecBole atomic files (ml-100k.inter, ml-100k.item) "
        "nor the GroupLens ml-100k files (u.data, u.item)"
    )


# --- RecBole atomic files -----------------------------------------------------------


def _recbole_file(path: Path, suffix: str) -> Path | None:
    preferred = path / f"ml-100k.{suffix}"
    if preferred.is_file():
        return preferred
    found = sorted(path.glob(f"*.{suffix}"))
    return found[0] if len(found) == 1 else None


def _load_recbole(path: Path, stem: str) -> MovieLens:
    item_file = path / f"{stem}.item"
    if not item_file.is_file():
        raise DatasetError(f"{item_file} is missing (RecBole layout needs .inter and .item)")
    people: dict[str, People] = {}
    entity_of: dict[str, str] = {}
    kg_file, link_file = path / f"{stem}.kg", path / f"{stem}.link"
    if kg_file.is_file() and link_file.is_file():
        entity_of = {row["item_id"]: row["entity_id"] for _, row in _atomic_rows(link_file)}
        people = _people_from_kg(kg_file, set(entity_of.values()))

    movies: list[MoviePublished] = []
    linked = 0
    for line_no, row in _atomic_rows(item_file):
        movie_id = row.get("item_id", "")
        entity = entity_of.get(movie_id)
        person = people.get(entity) if entity is not None else None
        linked += person is not None
        metadata: dict[str, str | int | float | bool | list[str] | None] = {}
        if entity is not None:
            metadata["freebase_id"] = entity
        title, year = _title_and_year(row.get("movie_title", ""), row.get("release_year"))
        movies.append(
            _movie(
                item_file,
                line_no,
                movie_id=movie_id,
                title=title,
                year=year,
                genres=row.get("class", "").split(),
                people=person or People(),
                metadata=metadata,
            )
        )

    inter_file = path / f"{stem}.inter"
    rows = (
        (n, r.get("user_id", ""), r.get("item_id", ""), r.get("rating", ""), r.get("timestamp", ""))
        for n, r in _atomic_rows(inter_file)
    )
    ratings = _ratings(inter_file, rows)
    log.info(
        "dataset=%s format=recbole movies=%d ratings=%d people_linked=%d",
        path,
        len(movies),
        len(ratings),
        linked,
    )
    return MovieLens(movies, ratings, "recbole", path, people_linked=linked)


def _atomic_rows(file: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a RecBole atomic file as ``{field name: text}``, with 1-based line numbers.

    The header types each column (``user_id:token``); only the name is kept.
    """
    with file.open(encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n")
        if not header:
            raise DatasetError(f"{file} is empty (expected a typed header line)")
        names = [column.split(":", 1)[0] for column in header.split("\t")]
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(names):
                raise DatasetError(
                    f"{file}:{line_no}: expected {len(names)} tab-separated fields, "
                    f"got {len(values)}"
                )
            yield line_no, dict(zip(names, values, strict=True))


def _people_from_kg(kg_file: Path, films: set[str]) -> dict[str, People]:
    """Directors, cast and writers of each linked film, in file order, without repeats."""
    wanted = {DIRECTED_BY: "directors", ACTOR: "cast", WRITTEN_BY: "writers"}
    found: dict[str, dict[str, dict[str, None]]] = {}
    for line_no, row in _atomic_rows(kg_file):
        role = wanted.get(row.get("relation_id", ""))
        if role is None:
            continue
        head, tail = row.get("head_id", ""), row.get("tail_id", "")
        if not head or not tail:
            raise DatasetError(f"{kg_file}:{line_no}: empty head or tail id")
        if head not in films:
            continue
        # A dict keeps insertion order and drops duplicates: the first actor stays the lead.
        roles = found.setdefault(head, {"directors": {}, "cast": {}, "writers": {}})
        roles[role][tail] = None
    return {
        film: People(
            directors=list(roles["directors"]),
            cast=list(roles["cast"]),
            writers=list(roles["writers"]),
        )
        for film, roles in found.items()
    }


# --- GroupLens files ----------------------------------------------------------------


def _load_grouplens(path: Path) -> MovieLens:
    item_file = path / "u.item"
    movies: list[MoviePublished] = []
    # u.item predates UTF-8 in MovieLens: it is latin-1.
    with item_file.open(encoding="latin-1", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("|")
            if len(fields) != 5 + len(ML100K_GENRES):
                raise DatasetError(
                    f"{item_file}:{line_no}: expected {5 + len(ML100K_GENRES)} '|'-separated "
                    f"fields, got {len(fields)}"
                )
            movie_id, raw_title, release, video, imdb_url = fields[:5]
            flags = fields[5:]
            if any(flag not in ("0", "1") for flag in flags):
                raise DatasetError(f"{item_file}:{line_no}: genre flags must be 0 or 1")
            release_date = _grouplens_date(release)
            title, year = _title_and_year(raw_title, None)
            if year is None and release_date is not None:
                year = _valid_year(release_date.year)
            metadata: dict[str, str | int | float | bool | list[str] | None] = {}
            if imdb_url.strip():
                metadata["imdb_url"] = imdb_url.strip()
            if release_date is not None:
                metadata["release_date"] = release_date.date().isoformat()
            video_date = _grouplens_date(video)
            if video_date is not None:
                metadata["video_release_date"] = video_date.date().isoformat()
            movies.append(
                _movie(
                    item_file,
                    line_no,
                    movie_id=movie_id,
                    title=title,
                    year=year,
                    genres=[g for g, flag in zip(ML100K_GENRES, flags, strict=True) if flag == "1"],
                    people=People(),
                    metadata=metadata,
                )
            )

    data_file = path / "u.data"
    ratings = _ratings(data_file, _grouplens_ratings(data_file))
    log.info("dataset=%s format=grouplens movies=%d ratings=%d", path, len(movies), len(ratings))
    return MovieLens(movies, ratings, "grouplens", path)


def _grouplens_ratings(file: Path) -> Iterator[tuple[int, str, str, str, str]]:
    with file.open(encoding="latin-1", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                raise DatasetError(
                    f"{file}:{line_no}: expected 4 tab-separated fields, got {len(fields)}"
                )
            yield line_no, fields[0], fields[1], fields[2], fields[3]


def _grouplens_date(text: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        return datetime.strptime(text, "%d-%b-%Y").replace(tzinfo=UTC)
    except ValueError:
        return None


# --- shared -------------------------------------------------------------------------


def _ratings(file: Path, rows: Iterator[tuple[int, str, str, str, str]]) -> list[RatingSubmitted]:
    """Rating events from ``(line, user, movie, stars, epoch seconds)`` rows, time-sorted.

    The event id is the row's 0-based index among the data rows of the file.
    """
    ratings: list[tuple[float, RatingSubmitted]] = []
    for index, (line_no, user, movie, stars, timestamp) in enumerate(rows):
        try:
            seconds = float(timestamp)
            event = RatingSubmitted(
                event_id=f"{EVENT_ID_PREFIX}{index}",
                user_id=user,
                movie_id=movie,
                rating=float(stars),
                occurred_at=datetime.fromtimestamp(seconds, UTC),
            )
        except (ValueError, OverflowError, OSError) as exc:
            # pydantic's ValidationError is a ValueError: the message names the field.
            raise DatasetError(f"{file}:{line_no}: invalid rating row: {exc}") from exc
        ratings.append((seconds, event))
    # list.sort is stable: equal timestamps keep their order in the file.
    ratings.sort(key=lambda pair: pair[0])
    return [event for _, event in ratings]


def _movie(
    file: Path,
    line_no: int,
    *,
    movie_id: str,
    title: str,
    year: int | None,
    genres: list[str],
    people: People,
    metadata: dict[str, str | int | float | bool | list[str] | None],
) -> MoviePublished:
    try:
        return MoviePublished(
            movie_id=movie_id,
            title=title,
            year=year,
            genres=genres,
            people=people,
            metadata=metadata,
        )
    except ValueError as exc:
        raise DatasetError(f"{file}:{line_no}: invalid movie row: {exc}") from exc


def _title_and_year(raw_title: str, year_field: str | None) -> tuple[str, int | None]:
    """The title without a trailing ``(YYYY)`` and the year.

    The year field wins when it holds a plausible year; otherwise the year comes from
    the title. A year found in the title is removed from it either way, so titles look
    alike in both layouts ("Toy Story").
    """
    title = raw_title.strip()
    year: int | None = None
    if year_field is not None and year_field.strip().isdigit():
        year = _valid_year(int(year_field.strip()))
    match = _TITLE_YEAR.match(title)
    if match is not None and match.group("title"):
        title = (match.group("title") + match.group("notes")).strip()
        if year is None:
            year = _valid_year(int(match.group("year")))
    return title, year


def _valid_year(year: int) -> int | None:
    # The contract's range; anything else is a parsing accident, not a year.
    return year if 1870 <= year <= 2100 else None

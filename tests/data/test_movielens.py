"""MovieLens-100K loader on small files of both layouts."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from shared.data import ML100K_GENRES, DatasetError, load_movielens
from shared.events import People
from tests.data.ml100k_files import GENRE_ORDER, generated_ratings, write_grouplens, write_recbole


def test_genre_constant_is_the_u_genre_order() -> None:
    assert list(ML100K_GENRES) == GENRE_ORDER
    assert len(ML100K_GENRES) == 19


# --- RecBole ------------------------------------------------------------------------


def test_recbole_ratings_are_time_sorted_with_stable_ties(tmp_path: Path) -> None:
    data = load_movielens(write_recbole(tmp_path))

    assert data.format == "recbole"
    # File rows 0..5 with timestamps 950, 949, 949, 960, 940, 960 (+881250000).
    assert [r.event_id for r in data.ratings] == [
        "ml100k-4",
        "ml100k-1",
        "ml100k-2",
        "ml100k-0",
        "ml100k-3",
        "ml100k-5",
    ]
    first = data.ratings[0]
    assert (first.user_id, first.movie_id, first.rating) == ("186", "1", 2.0)
    assert first.occurred_at == datetime.fromtimestamp(881250940, UTC)
    assert data.ratings[-1].rating == 4.5


def test_recbole_titles_years_and_genres(tmp_path: Path) -> None:
    movies = {m.movie_id: m for m in load_movielens(write_recbole(tmp_path)).movies}

    assert len(movies) == 5
    assert (movies["1"].title, movies["1"].year) == ("Toy Story", 1995)
    assert movies["1"].genres == ["Animation", "Children's", "Comedy"]
    # A year left in the title moves to the year when the year field is not a year.
    assert movies["3"].title == "Land Before Time III: The Time of the Great Giving"
    assert movies["3"].year == 1995
    assert movies["4"].title == "Misérables, Les"
    assert (movies["5"].year, movies["5"].genres) == (None, ["unknown"])


def test_recbole_people_come_from_the_knowledge_graph(tmp_path: Path) -> None:
    data = load_movielens(write_recbole(tmp_path))
    movies = {m.movie_id: m for m in data.movies}

    toy = movies["1"]
    assert toy.people == People(
        directors=["m.lasseter"], cast=["m.hanks", "m.allen"], writers=["m.whedon"]
    )
    assert toy.people.cast[0] == "m.hanks"  # the lead is the first actor in the file
    assert toy.metadata == {"freebase_id": "m.toy"}
    assert movies["2"].people == People(directors=["m.campbell"], cast=["m.brosnan"])
    assert movies["3"].people == People()
    assert "freebase_id" not in movies["3"].metadata
    assert data.people_linked == 2


def test_recbole_without_knowledge_graph_has_no_people(tmp_path: Path) -> None:
    data = load_movielens(write_recbole(tmp_path, knowledge_graph=False))
    assert all(m.people == People() for m in data.movies)
    assert len(data.ratings) == 6


def test_event_ids_are_deterministic(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path, ratings=generated_ratings(50))
    first, second = load_movielens(folder), load_movielens(folder)

    assert first.ratings == second.ratings
    assert first.movies == second.movies
    assert sorted(r.event_id for r in first.ratings) == sorted(f"ml100k-{i}" for i in range(50))
    times = [r.occurred_at for r in first.ratings]
    assert times == sorted(times)


def test_malformed_rating_row_names_file_and_line(tmp_path: Path) -> None:
    ratings = [("1", "1", "4", "881250950"), ("1", "2", "7", "881250951")]
    folder = write_recbole(tmp_path, ratings=ratings)
    with pytest.raises(DatasetError, match=r"ml-100k\.inter:3: .*rating"):
        load_movielens(folder)


def test_short_row_names_file_and_line(tmp_path: Path) -> None:
    folder = write_recbole(tmp_path)
    with (folder / "ml-100k.item").open("a") as f:
        f.write("6\tOnly a title\n")
    with pytest.raises(DatasetError, match=r"ml-100k\.item:7: expected 4"):
        load_movielens(folder)


def test_folder_without_a_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="neither"):
        load_movielens(tmp_path)
    with pytest.raises(DatasetError, match="no dataset folder"):
        load_movielens(tmp_path / "missing")


# --- GroupLens ----------------------------------------------------------------------


def test_grouplens_movies(tmp_path: Path) -> None:
    data = load_movielens(write_grouplens(tmp_path))
    movies = {m.movie_id: m for m in data.movies}

    assert data.format == "grouplens"
    toy = movies["1"]
    assert (toy.title, toy.year) == ("Toy Story", 1995)
    assert toy.genres == ["Animation", "Children's", "Comedy"]
    assert toy.people == People()
    assert toy.metadata == {
        "imdb_url": "http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)",
        "release_date": "1995-01-01",
    }
    assert movies["543"].title == "Misérables, Les"  # latin-1 decoded
    assert movies["1412"].title == "Land Before Time III: The Time of the Great Giving (V)"
    assert movies["1412"].year == 1995
    assert (movies["267"].title, movies["267"].year, movies["267"].metadata) == (
        "unknown",
        None,
        {},
    )
    # No year in the title: the release date gives it.
    assert (movies["99"].title, movies["99"].year) == ("Mystery Film", 1993)
    assert movies["99"].metadata["video_release_date"] == "1994-04-20"


def test_grouplens_ratings(tmp_path: Path) -> None:
    data = load_movielens(write_grouplens(tmp_path))

    assert [r.event_id for r in data.ratings] == [
        "ml100k-3",
        "ml100k-1",
        "ml100k-0",
        "ml100k-2",
    ]
    assert [(r.user_id, r.movie_id, r.rating) for r in data.ratings][:2] == [
        ("7", "99", 3.0),
        ("7", "267", 1.0),
    ]


def test_grouplens_wins_when_both_layouts_are_present(tmp_path: Path) -> None:
    write_recbole(tmp_path)
    write_grouplens(tmp_path)
    assert load_movielens(tmp_path).format == "grouplens"

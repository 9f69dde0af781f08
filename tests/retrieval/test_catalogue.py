"""The recommender's catalogue: dimension, refusals, replacement, versions, years."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from shared.events import ItemEmbedded
from shared.exceptions import UnprocessableEventError
from shared.retrieval.catalogue import Catalogue


def item(
    movie_id: str,
    vector: list[float],
    version: str = "v1",
    title: str = "",
    year: int | None = 1995,
) -> ItemEmbedded:
    return ItemEmbedded(
        movie_id=movie_id,
        title=title or f"Title {movie_id}",
        year=year,
        genres=["Comedy"],
        vector=np.asarray(vector, dtype=np.float32),
        modalities=["text", "metadata"],
        model_version=version,
        embedded_at=datetime.now(UTC),
    )


def test_an_empty_catalogue_has_no_dimension() -> None:
    catalogue = Catalogue()
    assert (catalogue.dim, catalogue.index, len(catalogue)) == (None, None, 0)
    assert catalogue.model_version == "none"


def test_the_first_item_fixes_the_dimension_and_others_are_refused() -> None:
    catalogue = Catalogue()
    refusals = catalogue.apply(
        [item("a", [1, 0, 0]), item("b", [1, 0]), item("c", [0, 1, 0]), item("d", [2, 0, 0])]
    )
    assert catalogue.dim == 3 and len(catalogue) == 2
    assert [r.position for r in refusals] == [1, 3]
    assert "dimension 2; the item catalogue's dimension is 3" in str(refusals[0].error)
    assert "L2 norm 2" in str(refusals[1].error)
    with pytest.raises(UnprocessableEventError, match="dimension 4"):
        catalogue.add(item("e", [0, 0, 0, 1]))
    assert "b" not in catalogue and "e" not in catalogue


def test_a_first_item_that_is_refused_does_not_fix_the_dimension() -> None:
    catalogue = Catalogue()
    assert len(catalogue.apply([item("bad", [3, 4])])) == 1
    assert catalogue.dim is None
    catalogue.add(item("a", [0, 0, 1]))
    assert catalogue.dim == 3


def test_a_re_embedded_item_replaces_the_old_one() -> None:
    catalogue = Catalogue()
    catalogue.apply([item("a", [1, 0], "v1", "Old"), item("b", [0, 1], "v1")])
    assert catalogue.model_version == "v1"
    catalogue.add(item("a", [0, 1], "v2", "New"))
    assert len(catalogue) == 2
    assert catalogue.title("a") == "New"
    assert catalogue.model_version == "v1+v2"
    catalogue.add(item("b", [1, 0], "v2"))
    assert catalogue.model_version == "v2"
    assert catalogue.index is not None
    np.testing.assert_array_equal(catalogue.index.vectors(["a"]), [[0, 1]])
    with pytest.raises(KeyError):
        catalogue.title("zzz")


def dated(movie_id: str, year: int | None) -> ItemEmbedded:
    return item(movie_id, [1, 0], year=year)


def test_years_of_known_movies() -> None:
    catalogue = Catalogue()
    catalogue.apply([dated("a", 1995), dated("b", None), dated("c", 2001)])
    assert catalogue.years(["c", "a", "b", "a"]) == [2001, 1995, None, 1995]
    assert catalogue.years([]) == []
    with pytest.raises(KeyError):
        catalogue.years(["a", "zzz"])


def test_newest_orders_by_year_then_latest_entry() -> None:
    catalogue = Catalogue()
    assert catalogue.newest(5) == []
    catalogue.apply(
        [dated("old", 1950), dated("a", 1999), dated("undated", None), dated("b", 2001)]
    )
    catalogue.apply([dated("c", 1999), dated("d", 2001)])
    # 2001: d entered after b; 1999: c after a; the movie without a year is left out.
    assert catalogue.newest(10) == ["d", "b", "c", "a", "old"]
    assert catalogue.newest(3) == ["d", "b", "c"]
    assert catalogue.newest(0) == catalogue.newest(-1) == []


def test_newest_is_recomputed_when_the_catalogue_changes() -> None:
    catalogue = Catalogue()
    catalogue.apply([dated("a", 1990), dated("b", 1995)])
    top = catalogue.newest(2)
    assert top == ["b", "a"]
    top.append("mutated")  # the caller's copy, not the cached order
    assert catalogue.newest(5) == ["b", "a"]
    catalogue.add(dated("new", 2020))
    assert catalogue.newest(2) == ["new", "b"]
    # A re-embedded movie with another year moves; one that loses its year drops out.
    catalogue.apply([dated("a", 2030), dated("new", None)])
    assert catalogue.newest(5) == ["a", "b"]
    assert catalogue.years(["new"]) == [None]
    # A batch that is refused entirely changes nothing.
    assert len(catalogue.apply([item("bad", [1, 0, 0], year=2050)])) == 1
    assert catalogue.newest(5) == ["a", "b"]

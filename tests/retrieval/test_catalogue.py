"""The recommender's catalogue: dimension, refusals, replacement, versions."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from shared.events import ItemEmbedded
from shared.exceptions import UnprocessableEventError
from shared.retrieval.catalogue import Catalogue


def item(movie_id: str, vector: list[float], version: str = "v1", title: str = "") -> ItemEmbedded:
    return ItemEmbedded(
        movie_id=movie_id,
        title=title or f"Title {movie_id}",
        year=1995,
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

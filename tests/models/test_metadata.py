"""Metadata features: genre multi-hot and signed feature hashing of people."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.data.movielens import ML100K_GENRES
from shared.domain import People
from shared.models.metadata import (
    GENRE_FEATURES,
    PEOPLE_DIM,
    cast_weight,
    genre_features,
    genre_index,
    people_features,
    people_tokens,
)

REPO = Path(__file__).resolve().parents[2]

# ML-100K's knowledge-graph people are Freebase ids; ids and names hash alike.
TOY_STORY_PEOPLE = People(
    directors=("m.06pj8",),
    cast=("m.0bln8", "m.0c1pj", "m.02_jjm", "m.0h0wd9"),
    writers=("m.0d4wn",),
)


def test_genre_columns_are_the_ml100k_genres_then_other() -> None:
    assert GENRE_FEATURES[:-1] == tuple(ML100K_GENRES)
    assert GENRE_FEATURES[-1] == "other"
    assert len(GENRE_FEATURES) == 20


@pytest.mark.parametrize(
    ("genre", "expected"),
    [
        ("Sci-Fi", "Sci-Fi"),
        ("sci-fi", "Sci-Fi"),
        ("SCI FI", "Sci-Fi"),
        ("Science Fiction", "Sci-Fi"),
        ("children's", "Children's"),
        ("Film-Noir", "Film-Noir"),
        ("film noir", "Film-Noir"),
        ("unknown", "unknown"),
        ("Western", "Western"),
        ("Anime Mecha", "other"),
    ],
)
def test_genres_match_case_insensitively_with_an_other_bucket(genre: str, expected: str) -> None:
    assert GENRE_FEATURES[genre_index(genre)] == expected


def test_genre_multi_hot() -> None:
    vector = genre_features(["Animation", "comedy", "Children's", "Space Opera", "Comedy"])
    assert vector is not None
    assert vector.dtype == np.float32
    on = {GENRE_FEATURES[i] for i in np.flatnonzero(vector)}
    assert on == {"Animation", "Comedy", "Children's", "other"}
    assert set(vector.tolist()) == {0.0, 1.0}


def test_no_genres_is_none_not_zeros() -> None:
    assert genre_features([]) is None
    assert genre_features(["  "]) is None


def test_people_tokens_are_role_prefixed_and_leads_weigh_more() -> None:
    tokens = dict(people_tokens(TOY_STORY_PEOPLE))
    assert tokens["director:m.06pj8"] == 1.0
    assert tokens["writer:m.0d4wn"] < tokens["director:m.06pj8"]
    lead, fourth = tokens["cast:m.0bln8"], tokens["cast:m.0h0wd9"]
    assert lead == 1.0
    assert 0 < fourth < lead
    assert [cast_weight(i) for i in range(6)] == sorted(
        (cast_weight(i) for i in range(6)), reverse=True
    )


def test_same_person_in_another_role_is_another_feature() -> None:
    as_director = people_tokens(People(directors=("Clint Eastwood",)))
    as_actor = people_tokens(People(cast=("Clint Eastwood",)))
    assert as_director[0][0] != as_actor[0][0]


def test_names_ignore_case_and_spacing() -> None:
    a = people_features(People(directors=("Steven  Spielberg",)))
    b = people_features(People(directors=("steven spielberg ",)))
    assert a is not None and b is not None
    np.testing.assert_array_equal(a, b)


def test_people_hashing_is_pinned() -> None:
    # Regression guard: a change of hash or weights silently moves every item vector.
    vector = people_features(TOY_STORY_PEOPLE)
    assert vector is not None
    assert vector.shape == (PEOPLE_DIM,)
    assert vector.dtype == np.float32
    nonzero = np.flatnonzero(vector)
    assert nonzero.tolist() == [11, 18, 19, 35, 53, 57]
    np.testing.assert_allclose(vector[nonzero], [1.0, -0.5, 0.7, 1.0, 1.0, 1.0])


def test_people_hashing_does_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from shared.domain import People;"
        "from shared.models.metadata import people_features;"
        "print(people_features(People(directors=('m.06pj8',), cast=('m.0bln8', 'm.0c1pj')),"
        " 32).tolist())"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        outputs.add(result.stdout)
    assert len(outputs) == 1
    here = people_features(People(directors=("m.06pj8",), cast=("m.0bln8", "m.0c1pj")), 32)
    assert here is not None
    assert outputs.pop().strip() == str(here.tolist())


def test_no_people_is_none_not_zeros() -> None:
    assert people_features(People()) is None
    assert people_features(People(cast=("", "  "))) is None


def test_other_dimensions() -> None:
    vector = people_features(TOY_STORY_PEOPLE, dim=8)
    assert vector is not None and vector.shape == (8,)

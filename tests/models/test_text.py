"""The text encoder (the real all-MiniLM-L6-v2 shipped in a package) and movie text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.domain import Movie, People
from shared.exceptions import ConfigurationError
from shared.models.device import resolve_precision
from shared.models.text import TextEncoder, is_freebase_id, movie_text


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def movie(movie_id: str, title: str, **fields: Any) -> Movie:
    return Movie(movie_id=movie_id, title=title, **fields)


STAR_WARS = movie(
    "50",
    "Star Wars",
    year=1977,
    genres=("Action", "Adventure", "Sci-Fi"),
    overview="A farm boy joins rebels to fight the evil Galactic Empire in space.",
)
EMPIRE = movie(
    "172",
    "The Empire Strikes Back",
    year=1980,
    genres=("Action", "Adventure", "Sci-Fi"),
    overview="The rebels flee the Empire's starships while Luke trains as a Jedi in space.",
)
SENSE = movie(
    "275",
    "Sense and Sensibility",
    year=1995,
    genres=("Drama", "Romance"),
    overview="Two sisters of an English family seek love and marriage after losing their home.",
)


def test_default_model_is_all_minilm_with_384_dims(encoder: TextEncoder) -> None:
    assert encoder.dim == 384
    assert encoder.name == "all-MiniLM-L6-v2"


def test_embeddings_are_normalised_float32(encoder: TextEncoder) -> None:
    vectors = encoder.encode(["Toy Story", "Heat", "a much longer sentence about a movie"])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similar_movies_are_closer_than_unrelated_ones(encoder: TextEncoder) -> None:
    star_wars, empire, sense = encoder.encode([movie_text(m) for m in (STAR_WARS, EMPIRE, SENSE)])
    assert star_wars @ empire > star_wars @ sense + 0.1
    assert empire @ star_wars > empire @ sense + 0.1


def test_similar_titles_are_closer_than_unrelated_ones(encoder: TextEncoder) -> None:
    toy, toy2, schindler = encoder.encode(["Toy Story", "Toy Story 2", "Schindler's List"])
    assert toy @ toy2 > toy @ schindler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_texts_embedding_does_not_depend_on_its_batch(dtype: torch.dtype) -> None:
    """Alone, with texts of other lengths, in any order: the same to float32 rounding
    (padding would move a bfloat16 embedding by about 1e-3)."""
    encoder = TextEncoder(dtype=dtype)
    texts = [movie_text(m) for m in (STAR_WARS, EMPIRE, SENSE)] + ["Heat", "Toy Story", "Fargo"]
    singles = np.concatenate([encoder.encode([t]) for t in texts])
    for batch in (encoder.encode(texts), encoder.encode(texts, batch_size=2)):
        np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-6)
    np.testing.assert_allclose(encoder.encode(texts[::-1])[::-1], singles, rtol=0, atol=1e-6)


def test_bfloat16_embeddings_agree_with_float32(encoder: TextEncoder) -> None:
    bf16 = TextEncoder(dtype=torch.bfloat16)
    texts = [movie_text(m) for m in (STAR_WARS, EMPIRE, SENSE)] + ["Toy Story", "Heat"]
    exact, fast = encoder.encode(texts), bf16.encode(texts)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert (exact * fast).sum(axis=1).min() > 0.999


@pytest.mark.parametrize(
    ("name", "flags", "expected"),
    [
        ("auto", "fpu avx2 avx512f avx512_bf16", torch.bfloat16),
        ("auto", "fpu amx_bf16 amx_tile", torch.bfloat16),
        ("auto", "fpu avx2 fma", torch.float32),
        ("float32", "avx512_bf16", torch.float32),
        ("bfloat16", "avx2", torch.bfloat16),
    ],
)
def test_text_precision_is_bfloat16_where_the_cpu_has_it(
    tmp_path: Path, name: str, flags: str, expected: torch.dtype
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert resolve_precision(name, torch.device("cpu"), cpuinfo) is expected


def test_text_precision_without_cpuinfo_is_float32(tmp_path: Path) -> None:
    missing = tmp_path / "cpuinfo"
    assert resolve_precision("auto", torch.device("cpu"), missing) is torch.float32


def test_empty_batch(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)


def test_a_missing_model_directory_is_refused_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a local sentence-transformers directory"):
        TextEncoder(tmp_path / "missing")
    with pytest.raises(ConfigurationError, match="not a local"):
        TextEncoder("sentence-transformers/all-MiniLM-L6-v2")


def test_a_directory_without_a_model_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot load the text model"):
        TextEncoder(tmp_path)


def test_movie_text_reads_everything_but_freebase_ids() -> None:
    film = movie(
        "1",
        "Toy Story",
        year=1995,
        genres=("Animation", "Comedy"),
        overview="Toys come to life.",
        people=People(
            directors=("John Lasseter",), cast=("Tom Hanks", "m.0c1pj"), writers=("/m/0d4wn",)
        ),
    )
    text = movie_text(film)
    assert text.startswith("Toy Story (1995).")
    for part in ("Animation, Comedy", "John Lasseter", "Tom Hanks", "Toys come to life."):
        assert part in text
    assert "m.0c1pj" not in text
    assert "0d4wn" not in text
    assert "Written by" not in text


def test_movie_text_of_a_bare_title() -> None:
    assert movie_text(movie("2", "Heat")) == "Heat."


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("m.0bln8", True),
        ("/m/02_jjm", True),
        ("M.0H0WD9", True),
        ("Tom Hanks", False),
        ("m", False),
        ("Mr. T", False),
    ],
)
def test_freebase_ids(value: str, expected: bool) -> None:
    assert is_freebase_id(value) is expected

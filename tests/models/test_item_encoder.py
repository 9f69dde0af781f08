"""The baseline item encoder: layout, masking, versions, batch == single, posters."""

from __future__ import annotations

import base64
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.config import Settings
from shared.domain import Movie, People
from shared.exceptions import ConfigurationError
from shared.models.image import ImageEncoder, load_image_encoder
from shared.models.item_encoder import (
    BlockWeights,
    ConcatItemEncoder,
    EncodedItem,
    ItemEncoder,
    build_item_encoder,
)
from shared.models.text import TextEncoder
from tests.models.tiny_clip import TINY_CLIP_NAME, tiny_clip_settings


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageEncoder:
    # Local posters must be in REELSTREAM_POSTER_DIR: the tests' temporary folders.
    settings = tiny_clip_settings(
        tmp_path_factory.mktemp("clip"), poster_dir=tmp_path_factory.getbasetemp()
    )
    loaded = load_image_encoder(settings)
    assert loaded is not None
    return loaded


@pytest.fixture(scope="module")
def poster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (60, 40, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("posters") / "poster.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def movie(movie_id: str, title: str, **fields: Any) -> Movie:
    return Movie(movie_id=movie_id, title=title, **fields)


FULL = movie(
    "1",
    "Toy Story",
    year=1995,
    genres=("Animation", "Children's", "Comedy"),
    overview="Toys come to life when people are not around.",
    people=People(directors=("m.06pj8",), cast=("m.0bln8", "m.0c1pj"), writers=("m.0d4wn",)),
)
TITLE_ONLY = movie("2", "GoldenEye")
PEOPLE_ONLY = movie("3", "Four Rooms", people=People(directors=("Quentin Tarantino",)))
GENRES_ONLY = movie("4", "Get Shorty", genres=("Action", "Comedy", "Drama"))
MOVIES = [FULL, TITLE_ONLY, PEOPLE_ONLY, GENRES_ONLY]


def block(encoder: ConcatItemEncoder, vector: np.ndarray, name: str) -> np.ndarray:
    spec = next(b for b in encoder.blocks if b.name == name)
    return vector[spec.start : spec.stop]


def test_text_and_metadata_layout_and_version(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text)
    assert isinstance(encoder, ItemEncoder)
    assert [b.name for b in encoder.blocks] == ["text", "genres", "people"]
    assert encoder.dim == 384 + 20 + 64
    assert encoder.model_version == "concat-v1+all-MiniLM-L6-v2+img-off"
    assert encoder.modalities_enabled == ["text", "metadata"]


def test_vectors_are_normalised_float32_of_the_encoder_dim(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text)
    items = encoder.encode(MOVIES)
    assert len(items) == len(MOVIES)
    for item in items:
        assert isinstance(item, EncodedItem)
        assert item.vector.shape == (encoder.dim,)
        assert item.vector.dtype == np.float32
        assert np.isfinite(item.vector).all()
        assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-5)


def test_batch_equals_single(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text)
    batch = encoder.encode(MOVIES)
    for movie_, item in zip(MOVIES, batch, strict=True):
        (single,) = encoder.encode([movie_])
        np.testing.assert_allclose(item.vector, single.vector, atol=1e-5)
        assert item.modalities == single.modalities


def test_missing_modalities_are_masked_and_reported(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text)
    full, title_only, people_only, genres_only = encoder.encode(MOVIES)
    assert full.modalities == ["text", "metadata"]
    assert title_only.modalities == ["text"]
    assert not block(encoder, title_only.vector, "genres").any()
    assert not block(encoder, title_only.vector, "people").any()
    assert people_only.modalities == ["text", "metadata"]
    assert not block(encoder, people_only.vector, "genres").any()
    assert block(encoder, people_only.vector, "people").any()
    assert genres_only.modalities == ["text", "metadata"]
    assert block(encoder, genres_only.vector, "genres").any()
    assert not block(encoder, genres_only.vector, "people").any()


def test_blocks_carry_their_weights(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text)
    (item,) = encoder.encode([FULL])
    norms = {b.name: np.linalg.norm(block(encoder, item.vector, b.name)) for b in encoder.blocks}
    # Every block is unit length times its weight before the overall normalisation.
    scale = norms["text"] / 1.0
    assert norms["genres"] / scale == pytest.approx(0.5, rel=1e-4)
    assert norms["people"] / scale == pytest.approx(0.3, rel=1e-4)


def test_weights_are_configurable_and_in_the_version(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text, weights=BlockWeights(genres=1.0))
    assert encoder.model_version == "concat-v1+all-MiniLM-L6-v2+w1-1-0.3-0.7-p64+img-off"
    (heavier,) = encoder.encode([GENRES_ONLY])
    (default,) = ConcatItemEncoder(text).encode([GENRES_ONLY])
    assert np.linalg.norm(block(encoder, heavier.vector, "genres")) > np.linalg.norm(
        block(encoder, default.vector, "genres")
    )
    with pytest.raises(ConfigurationError, match="must be positive"):
        BlockWeights(text=0.0)
    with pytest.raises(ConfigurationError, match="must be positive"):
        BlockWeights(image=float("nan"))


def test_similar_movies_are_closer(text: TextEncoder) -> None:
    encoder = ConcatItemEncoder(text)
    toy, toy2, heat = encoder.encode(
        [
            FULL,
            movie(
                "5",
                "Toy Story 2",
                year=1999,
                genres=("Animation", "Comedy"),
                people=People(directors=("m.06pj8",), cast=("m.0bln8",)),
            ),
            movie("6", "Heat", year=1995, genres=("Crime", "Thriller")),
        ]
    )
    assert toy.vector @ toy2.vector > toy.vector @ heat.vector


def test_empty_batch(text: TextEncoder) -> None:
    assert ConcatItemEncoder(text).encode([]) == []


# --- with the image modality -------------------------------------------------------


def test_image_block_layout_and_version(text: TextEncoder, image: ImageEncoder) -> None:
    encoder = ConcatItemEncoder(text, image)
    assert [b.name for b in encoder.blocks] == ["text", "genres", "people", "image"]
    assert encoder.dim == 384 + 20 + 64 + image.dim
    assert encoder.model_version == f"concat-v1+all-MiniLM-L6-v2+img-{image.name}"
    assert encoder.modalities_enabled == ["text", "image", "metadata"]


def test_poster_path_versus_no_poster(text: TextEncoder, image: ImageEncoder, poster: Path) -> None:
    encoder = ConcatItemEncoder(text, image)
    with_poster = replace(FULL, poster=str(poster))
    pictured, bare = encoder.encode([with_poster, FULL])
    assert pictured.modalities == ["text", "image", "metadata"]
    assert bare.modalities == ["text", "metadata"]
    assert block(encoder, pictured.vector, "image").any()
    assert not block(encoder, bare.vector, "image").any()
    np.testing.assert_allclose(np.linalg.norm(pictured.vector), 1.0, atol=1e-5)


def test_the_same_poster_inline_or_on_disk_gives_the_same_vector(
    text: TextEncoder, image: ImageEncoder, poster: Path
) -> None:
    encoder = ConcatItemEncoder(text, image)
    inline = "data:image/png;base64," + base64.b64encode(poster.read_bytes()).decode()
    on_disk, in_line = encoder.encode(
        [
            replace(FULL, poster=str(poster)),
            replace(FULL, poster=inline),
        ]
    )
    np.testing.assert_allclose(on_disk.vector, in_line.vector, atol=1e-6)


def test_batch_equals_single_with_posters(
    text: TextEncoder, image: ImageEncoder, poster: Path
) -> None:
    encoder = ConcatItemEncoder(text, image)
    movies = [replace(FULL, poster=str(poster)), TITLE_ONLY, GENRES_ONLY]
    batch = encoder.encode(movies)
    for movie_, item in zip(movies, batch, strict=True):
        (single,) = encoder.encode([movie_])
        np.testing.assert_allclose(item.vector, single.vector, atol=1e-5)
        assert item.modalities == single.modalities


def test_an_unusable_poster_masks_the_image_and_warns(
    text: TextEncoder, image: ImageEncoder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = ConcatItemEncoder(text, image)
    not_an_image = tmp_path / "poster.jpg"
    not_an_image.write_text("this is not a picture")
    broken = [
        movie("7", "Broken", poster=str(not_an_image)),
        movie("8", "Gone", poster=str(tmp_path / "missing.png")),
        movie("9", "Internal", poster="http://169.254.169.254/latest/meta-data/"),
        movie("10", "Outside", poster="/etc/passwd"),
    ]
    with caplog.at_level(logging.WARNING, logger="shared.models.item_encoder"):
        items = encoder.encode(broken)
    for item in items:
        assert item.modalities == ["text"]
        assert not block(encoder, item.vector, "image").any()
    assert "movie_id=7" in caplog.text and "not a readable image" in caplog.text
    assert "movie_id=8" in caplog.text and "does not exist" in caplog.text
    assert "movie_id=9 reason=poster host '169.254.169.254' is not public" in caplog.text
    assert "movie_id=10 reason=poster file '/etc/passwd' is outside" in caplog.text


# --- building from settings ---------------------------------------------------------


def test_build_logs_the_modalities(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        encoder = build_item_encoder(Settings(clip_weights=None, device="cpu"))
    assert encoder.model_version == "concat-v1+all-MiniLM-L6-v2+img-off"
    assert "text on, metadata on, image off (CLIP_WEIGHTS not set)" in caplog.text


def test_build_with_clip_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        encoder = build_item_encoder(tiny_clip_settings(tmp_path))
    assert encoder.modalities_enabled == ["text", "image", "metadata"]
    assert encoder.model_version.startswith(f"concat-v1+all-MiniLM-L6-v2+img-{TINY_CLIP_NAME}@")
    assert "text on, metadata on, image on" in caplog.text


def test_posters_beyond_the_first_chunk_are_encoded_in_place(
    text: TextEncoder, image: ImageEncoder, poster: Path
) -> None:
    # Regression guard for chunked poster loading: rows must map back to their movies.
    encoder = ConcatItemEncoder(text, image)
    movies = [movie(str(i), f"Movie {i}") for i in range(70)]
    movies[66] = replace(movies[66], poster=str(poster))
    items = encoder.encode(movies)
    assert [i for i, item in enumerate(items) if "image" in item.modalities] == [66]
    (single,) = encoder.encode([movies[66]])
    np.testing.assert_allclose(items[66].vector, single.vector, atol=1e-5)

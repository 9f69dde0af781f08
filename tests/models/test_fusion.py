"""The trained fusion item encoder: contract, masking, posters, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.lab.training.fusion import save_fusion, train_fusion
from shared.config import Settings
from shared.convert import movies_of
from shared.events import MoviePublished, People
from shared.exceptions import ConfigurationError
from shared.models.checkpoint import CONFIG_FILE
from shared.models.fusion import (
    RATED_KEY,
    FusionItemEncoder,
    FusionNet,
    encode_catalogue,
    load_fusion_encoder,
)
from shared.models.image import ImageEncoder, load_image_encoder
from shared.models.item_encoder import ItemEncoder
from shared.models.text import TextEncoder
from tests.models.fusion_data import MOVIES, N_MOVIES, RATINGS, SMALL, make_movie, vectors
from tests.models.tiny_clip import TINY_CLIP_CONFIG, tiny_clip_settings, write_tiny_clip


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def trained(text: TextEncoder) -> tuple[FusionNet, dict, dict]:
    return train_fusion(MOVIES, RATINGS, text, config=SMALL, seed=0, progress=False)


@pytest.fixture(scope="module")
def encoder(trained: tuple[FusionNet, dict, dict], text: TextEncoder) -> FusionItemEncoder:
    net, config, _ = trained
    return FusionItemEncoder(net, config, text)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clip")


@pytest.fixture(scope="module")
def image(clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageEncoder:
    # Local posters must be in REELSTREAM_POSTER_DIR: the tests' temporary folders.
    settings = tiny_clip_settings(clip_dir, poster_dir=tmp_path_factory.getbasetemp())
    loaded = load_image_encoder(settings)
    assert loaded is not None
    return loaded


@pytest.fixture(scope="module")
def posters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("posters")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = folder / f"poster{i}.png"
        pixels = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


def test_vectors_are_normalised_of_the_encoder_dim_and_batch_equals_single(
    encoder: FusionItemEncoder,
) -> None:
    assert isinstance(encoder, ItemEncoder)
    assert encoder.dim == SMALL.out_dim
    assert encoder.modalities_enabled == ["text", "metadata"]
    assert encoder.model_version.startswith("fusion-v1-")
    batch = vectors(encoder, MOVIES[:6])
    assert batch.dtype == np.float32
    assert batch.shape == (6, SMALL.out_dim)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    single = np.stack([vectors(encoder, [m])[0] for m in MOVIES[:6]])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert encoder.encode([]) == []


def test_a_movie_without_metadata_is_embedded_from_its_text_alone(
    encoder: FusionItemEncoder,
) -> None:
    bare = MoviePublished(movie_id="900", title="A film with nothing else known")
    people_only = MoviePublished(
        movie_id="901", title="Another film", people=People(directors=["director 1"])
    )
    items = encoder.encode(movies_of([bare, people_only, MOVIES[0]]))
    assert [i.modalities for i in items] == [["text"], ["text", "metadata"], ["text", "metadata"]]
    for item in items:
        assert np.isfinite(item.vector).all()
        assert np.linalg.norm(item.vector) == pytest.approx(1.0, abs=1e-5)
    # The metadata branch changes the vector: it is used, not ignored.
    with_meta = encoder.encode(movies_of([make_movie(0)]))[0].vector
    stripped = make_movie(0, genres=[], year=None, people=People())
    without = encoder.encode(movies_of([stripped]))[0].vector
    assert not np.allclose(with_meta, without, atol=1e-4)


def test_an_unseen_movie_gets_a_vector_from_its_content(encoder: FusionItemEncoder) -> None:
    unseen = make_movie(
        777,
        title="A brand new release",
        people=People(directors=["someone new"], cast=["a new face"]),
    )
    vector = encoder.encode(movies_of([unseen]))[0].vector
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    catalogue = vectors(encoder, MOVIES)
    assert (catalogue @ vector).max() < 1.0 - 1e-4


def test_the_encoder_says_which_movies_it_learned_from_ratings(
    trained: tuple[FusionNet, dict, dict],
    encoder: FusionItemEncoder,
    text: TextEncoder,
    tmp_path: Path,
) -> None:
    net, config, _ = trained
    some = [r for r in RATINGS if int(r.movie_id) < 30]  # movies 30-39 left unrated
    rated = sorted({r.movie_id for r in some})
    half, half_config, _ = train_fusion(MOVIES, some, text, config=SMALL, seed=0, progress=False)
    assert half_config[RATED_KEY] == rated and len(rated) == 30
    half_encoder = FusionItemEncoder(half, half_config, text)
    flags = [item.rated_in_training for item in half_encoder.encode(movies_of(MOVIES))]
    assert flags == [m.movie_id in rated for m in MOVIES]
    assert not encoder.encode(movies_of([make_movie(777)]))[0].rated_in_training

    # The list is data, not weights: a checkpoint without it loads under the same
    # version, and then counts every movie as learned, so no vector is ever moved.
    directory = save_fusion(tmp_path / "fusion", net, config)
    raw = json.loads((directory / CONFIG_FILE).read_text())
    del raw[RATED_KEY]
    (directory / CONFIG_FILE).write_text(json.dumps(raw))
    older = load_fusion_encoder(directory, text)
    assert older.model_version == encoder.model_version
    assert older.encode(movies_of([make_movie(777)]))[0].rated_in_training


def test_save_and_load_give_the_same_vectors_and_version(
    trained: tuple[FusionNet, dict, dict],
    encoder: FusionItemEncoder,
    text: TextEncoder,
    tmp_path: Path,
) -> None:
    net, config, _ = trained
    save_fusion(tmp_path / "fusion", net, config)
    loaded = load_fusion_encoder(tmp_path / "fusion", text)
    assert loaded.model_version == encoder.model_version
    assert loaded.dim == encoder.dim
    np.testing.assert_array_equal(vectors(loaded, MOVIES[:5]), vectors(encoder, MOVIES[:5]))
    ids, matrix = encode_catalogue(loaded, movies_of(MOVIES[:7]))
    assert ids == [m.movie_id for m in MOVIES[:7]]
    np.testing.assert_array_equal(matrix, vectors(encoder, MOVIES[:7]))


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("text_model", "another-text-model", "text model"),
        ("text_dim", 768, "text model"),
        ("out_dim", 64, "does not fit"),
        ("version", "fusion-v1-00000000", "does not match its weights"),
        ("kind", "user-updater", "not a 'fusion-item-encoder'"),
    ],
)
def test_a_checkpoint_that_does_not_match_is_refused(
    trained: tuple[FusionNet, dict, dict],
    text: TextEncoder,
    tmp_path: Path,
    key: str,
    value: object,
    reason: str,
) -> None:
    net, config, _ = trained
    directory = save_fusion(tmp_path / "fusion", net, config)
    raw = json.loads((directory / CONFIG_FILE).read_text())
    raw[key] = value
    (directory / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ConfigurationError, match=reason):
        load_fusion_encoder(directory, text)


def test_posters_feed_the_image_modality_and_bad_ones_are_masked(
    text: TextEncoder, image: ImageEncoder, posters: list[Path], tmp_path: Path
) -> None:
    movies = [
        make_movie(i, poster=str(posters[i % len(posters)])) if i % 2 == 0 else make_movie(i)
        for i in range(N_MOVIES)
    ]
    net, config, _ = train_fusion(
        movies, RATINGS, text, image, config=SMALL, seed=0, progress=False
    )
    assert config["image_dim"] == image.dim
    encoder = FusionItemEncoder(net, config, text, image)
    assert encoder.modalities_enabled == ["text", "image", "metadata"]
    broken = make_movie(5, poster=str(tmp_path / "missing.png"))
    items = encoder.encode(movies_of([movies[0], movies[1], broken]))
    assert [i.modalities for i in items] == [
        ["text", "image", "metadata"],
        ["text", "metadata"],
        ["text", "metadata"],
    ]
    # The poster is used: the same movie without it gets another vector.
    assert not np.allclose(
        items[0].vector, encoder.encode(movies_of([make_movie(0)]))[0].vector, atol=1e-4
    )
    batch = vectors(encoder, movies[:4])
    single = np.stack([vectors(encoder, [m])[0] for m in movies[:4]])
    np.testing.assert_allclose(batch, single, atol=1e-5)

    # Without an image encoder the image of every movie is masked, not zero-filled.
    masked = FusionItemEncoder(net, config, text)
    assert masked.modalities_enabled == ["text", "metadata"]
    assert masked.encode(movies_of([movies[0]]))[0].modalities == ["text", "metadata"]

    # A checkpoint trained on one CLIP is refused with another.
    save_fusion(tmp_path / "fusion", net, config)
    config_path, weights = write_tiny_clip(
        tmp_path / "other-clip",
        name="reelstream-other-clip",
        config={**TINY_CLIP_CONFIG, "embed_dim": 16},
    )
    other = load_image_encoder(
        Settings(
            clip_weights=weights,
            clip_model="reelstream-other-clip",
            clip_model_config=config_path,
            device="cpu",
        )
    )
    assert other is not None
    with pytest.raises(ConfigurationError, match="image model"):
        load_fusion_encoder(tmp_path / "fusion", text, other)
